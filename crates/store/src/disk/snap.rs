//! Snapshots of the disk store (key layout and visibility rule: see [`super::keys`]).
//!
//! Creating one is O(1): flush, then one `X` record. Later writes and trims keep the
//! block versions a snapshot sees as `P` entries instead of freeing their slots. Deleting
//! one drops its record (durably), then frees (in bounded steps, each under the volume lock
//! for a short time) the `P` versions no remaining snapshot sees; their slots wait for the
//! next flush, like slots freed by overwrites. Versions left by a delete a power cut
//! interrupted are dropped at open (`drop_orphaned_versions`).

use std::collections::{BTreeMap, BTreeSet};

use super::batch::Batch;

use hlstore_core::error::{Error, Result};

use super::super::check;
use super::super::record::{SnapshotInfo, BLOCK_SIZE};
use super::keys::{self, Entry};
use super::volume::{self, preserves, Snaps, VolInner, Volume};
use super::{blocks, corrupt_meta, DiskStore};

/// Preserved versions examined per lock hold when a snapshot is deleted.
const RECLAIM_STEP: usize = 2048;
/// The slot of a preserved version that reads as zeroes (installed by a resync).
const ZERO_SLOT: u64 = u64::MAX;

/// A preserved block version: written at `written`, replaced at `entry.seq` (until).
struct Preserved {
    block: u64,
    written: u64,
    entry: Entry,
}

fn find<'a>(name: &str, g: &'a VolInner, snap: &str) -> Result<&'a SnapshotInfo> {
    g.snaps
        .values()
        .find(|s| s.name == snap)
        .ok_or_else(|| Error::NotFound(format!("volume {name} has no snapshot {snap:?} on this replica")))
}

impl DiskStore {
    pub(super) fn load_snapshots(&self, vid: u32) -> Result<Snaps> {
        let mut out = BTreeMap::new();
        for (_, val) in self.scan(&keys::vid_prefix(keys::SNAPSHOT, vid), None)? {
            let s: SnapshotInfo = serde_json::from_slice(&val).map_err(|_| corrupt_meta("snapshot"))?;
            out.insert((s.seq, s.name.clone()), s);
        }
        Ok(out)
    }

    fn preserved_in(&self, vid: u32, range: std::ops::Range<u64>) -> Result<Vec<Preserved>> {
        let from = keys::preserved(vid, range.start, 0);
        // Bounded by the range's end, not the volume's last kept version: a snapshot read
        // of a few blocks must not walk every version kept after them.
        let to = match range.end {
            u64::MAX => keys::prefix_end(&keys::vid_prefix(keys::PRESERVED, vid)),
            end => keys::preserved(vid, end, 0),
        };
        let mut out = Vec::new();
        for (k, val) in self.scan_between(&from, to)? {
            let block = keys::u64_at(&k, keys::FIELD0).ok_or_else(|| corrupt_meta("preserved key"))?;
            if block >= range.end {
                break;
            }
            let written = keys::u64_at(&k, keys::FIELD1).ok_or_else(|| corrupt_meta("preserved key"))?;
            let entry = Entry::decode(&val).ok_or_else(|| corrupt_meta("preserved entry"))?;
            out.push(Preserved { block, written, entry });
        }
        Ok(out)
    }

    pub(super) fn snap_create(&self, name: &str, epoch: u64, snap: SnapshotInfo) -> Result<SnapshotInfo> {
        check::snapshot_name(name, &snap.name)?;
        check::seq(name, snap.seq)?;
        let v = self.vol(name)?;
        {
            let g = volume::read(&v);
            check::epoch(name, g.record.epoch, epoch)?;
            if let Some(s) = g.snaps.values().find(|s| s.name == snap.name) {
                return Ok(s.clone());
            }
            if g.st.resync_from.is_some() {
                return Err(Error::Unavailable(format!(
                    "volume {name}: this replica is being resynced; snapshot {:?} must come from an in-sync replica",
                    snap.name
                )));
            }
            if g.st.last_seq > snap.seq {
                return Err(Error::Unavailable(format!(
                    "volume {name}: this replica already applied seq {} past the snapshot point {}",
                    g.st.last_seq, snap.seq
                )));
            }
        }
        // Everything the snapshot sees must survive a crash before the record does.
        self.flush_volume(name, &v)?;
        let mut g = volume::write(&v);
        check::epoch(name, g.record.epoch, epoch)?;
        if let Some(s) = g.snaps.values().find(|s| s.name == snap.name) {
            return Ok(s.clone());
        }
        let snap = SnapshotInfo { size: g.record.size, ..snap };
        let mut batch = Batch::default();
        let json = serde_json::to_vec(&snap).map_err(|e| Error::Internal(e.to_string()))?;
        batch.put(keys::snapshot(v.vid, snap.seq, &snap.name), json);
        self.commit(batch, true, "recording snapshot")?;
        g.snaps.insert((snap.seq, snap.name.clone()), snap.clone());
        Ok(snap)
    }

    pub(super) fn snap_list(&self, name: &str) -> Result<Vec<SnapshotInfo>> {
        let v = self.vol(name)?;
        let g = volume::read(&v);
        Ok(g.snaps.values().cloned().collect())
    }

    pub(super) fn snap_read(&self, name: &str, snap: &str, offset: u64, len: u64) -> Result<Vec<u8>> {
        let v = self.vol(name)?;
        let g = volume::read(&v);
        let info = find(name, &g, snap)?;
        let (seq, size) = (info.seq, info.size);
        if info.partial {
            return Err(Error::Unavailable(format!(
                "volume {name}: snapshot {snap} is still being copied to this replica; read it from another one"
            )));
        }
        check::range(name, size, offset, len)?;
        check::read_len(name, len)?;
        let range = blocks(offset, len);
        // Per block: the live entry if the snapshot sees it, else the newest preserved
        // version written at or before the snapshot and replaced after it.
        let mut seen: BTreeMap<u64, Entry> =
            self.map_range(v.vid, range.clone())?.into_iter().filter(|(_, e)| e.seq <= seq).collect();
        for p in self.preserved_in(v.vid, range.clone())? {
            if p.written <= seq && p.entry.seq > seq && seen.get(&p.block).is_none_or(|e| e.seq <= p.written) {
                seen.insert(p.block, Entry { seq: p.written, ..p.entry });
            }
        }
        let bs = BLOCK_SIZE as usize;
        let mut out = vec![0u8; len as usize];
        for (b, e) in seen.into_iter().filter(|(_, e)| e.slot != ZERO_SLOT) {
            let at = (b - range.start) as usize * bs;
            let buf = &mut out[at..at + bs];
            v.file
                .read(e.slot, buf)
                .map_err(|err| Error::io(format!("volume {name}: reading snapshot {snap}"), err))?;
            let actual = check::crc(buf);
            if actual != e.crc {
                return Err(Error::Corruption { volume: name.into(), offset: b * BLOCK_SIZE, expected: e.crc, actual });
            }
        }
        Ok(out)
    }

    pub(super) fn snap_changed(&self, name: &str, from: Option<&str>, to: Option<&str>) -> Result<Vec<u64>> {
        let v = self.vol(name)?;
        let g = volume::read(&v);
        let a = from.map(|s| find(name, &g, s)).transpose()?.map_or(0, |s| s.seq);
        let b = to.map(|s| find(name, &g, s)).transpose()?.map_or(u64::MAX, |s| s.seq);
        if a > b {
            return Err(Error::InvalidArgument(format!(
                "volume {name}: snapshot {:?} is newer than {:?}",
                from.unwrap_or(""),
                to.unwrap_or("the live volume")
            )));
        }
        let within = |s: u64| s > a && s <= b;
        let mut out = BTreeSet::new();
        // Live content written in (a, b]: the seq index is by seq.
        for (seq, block, _) in self.seq_index_from(v.vid, a.saturating_add(1))? {
            if seq > b {
                break;
            }
            out.insert(block);
        }
        // Kept versions written or replaced in (a, b].
        for p in self.preserved_in(v.vid, 0..u64::MAX)? {
            if within(p.written) || within(p.entry.seq) {
                out.insert(p.block);
            }
        }
        Ok(out.into_iter().collect())
    }

    pub(super) fn snap_delete(&self, name: &str, epoch: u64, snap: &str) -> Result<bool> {
        let v = self.vol(name)?;
        let seq = {
            let mut g = volume::write(&v);
            check::epoch(name, g.record.epoch, epoch)?;
            let Ok(seq) = find(name, &g, snap).map(|s| s.seq) else { return Ok(false) };
            self.drop_snapshot_record(&v, &mut g, seq, snap)?;
            seq
        };
        // Versions this snapshot saw; each is freed unless another snapshot still sees it.
        let candidates: Vec<Preserved> = self
            .preserved_in(v.vid, 0..u64::MAX)?
            .into_iter()
            .filter(|p| p.written <= seq && p.entry.seq > seq)
            .collect();
        let mut freed = 0u64;
        for step in candidates.chunks(RECLAIM_STEP) {
            let mut g = volume::write(&v);
            let mut batch = Batch::default();
            let mut pages = self.pages(&v, &mut g)?;
            let mut slots = Vec::new();
            let mut dropped = 0;
            for p in step.iter().filter(|p| !preserves(&g.snaps, p.written, p.entry.seq)) {
                let key = keys::preserved(v.vid, p.block, p.written);
                if self.db.get(&key).map_err(super::meta_err("reading a preserved version"))?.is_none() {
                    continue; // freed by a concurrent delete
                }
                batch.delete(key);
                dropped += 1;
                if p.entry.slot != ZERO_SLOT {
                    pages.set_free(&self.db, p.entry.slot, true)?;
                    slots.push(p.entry.slot);
                }
            }
            if dropped == 0 {
                pages.abandon(&mut g.pages);
                continue;
            }
            // Not synced here: the slots are handed to the next flush, which makes this
            // batch durable before they can be reused, and keeps or punches them like
            // slots freed by overwrites (a delete used to sync and punch each step itself:
            // most of its time). A power cut before that flush leaves the versions
            // orphaned; the store's open drops them (`drop_orphaned_versions`).
            self.commit_pages(&mut g, batch, pages, false, "freeing snapshot blocks")?;
            g.changes += 1;
            let at = g.changes;
            freed += slots.len() as u64;
            g.reclaimed.extend(slots.into_iter().map(|s| (at, s)));
        }
        tracing::debug!(volume.id = name, snapshot = snap, freed_blocks = freed, "snapshot deleted");
        Ok(true)
    }

    /// Drops the preserved versions no snapshot sees any more (a power cut after a
    /// snapshot's record was deleted and before the batch freeing its versions reached the
    /// disk leaves them behind) and frees their slots. Run at open, by recovery, whose
    /// durable commit follows; returns how many versions were dropped.
    pub(super) fn drop_orphaned_versions(&self, name: &str, v: &Volume, g: &mut VolInner) -> Result<u64> {
        let orphans: Vec<Preserved> = self
            .preserved_in(v.vid, 0..u64::MAX)?
            .into_iter()
            .filter(|p| !preserves(&g.snaps, p.written, p.entry.seq))
            .collect();
        if orphans.is_empty() {
            return Ok(0);
        }
        let mut batch = Batch::default();
        let mut pages = self.pages(v, g)?;
        let mut slots = Vec::new();
        for p in &orphans {
            batch.delete(keys::preserved(v.vid, p.block, p.written));
            if p.entry.slot != ZERO_SLOT {
                pages.set_free(&self.db, p.entry.slot, true)?;
                slots.push(p.entry.slot);
            }
        }
        self.commit_pages(g, batch, pages, false, "dropping orphaned snapshot versions")?;
        g.free.extend(slots);
        tracing::info!(volume.id = name, versions = orphans.len(), "dropped block versions of a deleted snapshot");
        Ok(orphans.len() as u64)
    }

    /// Deletes only snapshot `snap`'s record, durably, leaving its block versions: the
    /// state a power cut leaves when it strikes a delete between the two (test support).
    #[cfg(feature = "testing")]
    pub fn forget_snapshot_record(&self, name: &str, snap: &str) -> Result<()> {
        let v = self.vol(name)?;
        let mut g = volume::write(&v);
        let seq = find(name, &g, snap)?.seq;
        self.drop_snapshot_record(&v, &mut g, seq, snap)
    }

    /// Deletes snapshot `snap`'s record (taken at `seq`), durably.
    fn drop_snapshot_record(&self, v: &Volume, g: &mut VolInner, seq: u64, snap: &str) -> Result<()> {
        let mut batch = Batch::default();
        batch.delete(keys::snapshot(v.vid, seq, snap));
        self.commit(batch, true, "deleting snapshot")?;
        g.snaps.remove(&(seq, snap.to_string()));
        Ok(())
    }

    pub(super) fn snap_install(
        &self,
        name: &str,
        epoch: u64,
        snap: SnapshotInfo,
        blocks: &[(u64, Option<Vec<u8>>)],
        last: bool,
    ) -> Result<SnapshotInfo> {
        check::snapshot_name(name, &snap.name)?;
        check::seq(name, snap.seq)?;
        let v = self.vol(name)?;
        let mut g = volume::write(&v);
        check::epoch(name, g.record.epoch, epoch)?;
        let existing = g.snaps.values().find(|s| s.name == snap.name).cloned();
        if let Some(s) = existing.as_ref().filter(|s| !s.partial) {
            return Ok(s.clone());
        }
        let rec = existing.unwrap_or(SnapshotInfo { partial: true, ..snap });
        let s = rec.seq;
        let until = g.st.last_seq.max(s) + 1;
        let bs = BLOCK_SIZE as usize;
        let mut batch = Batch::default();
        let mut pages = self.pages(&v, &mut g)?;
        let mut wrote = false;
        for (b, data) in blocks {
            if *b >= rec.size / BLOCK_SIZE {
                return Err(Error::InvalidArgument(format!("volume {name}: snapshot block {b} is past its size")));
            }
            let key = keys::preserved(v.vid, *b, s);
            if self.db.get(&key).map_err(super::meta_err("reading a preserved version"))?.is_some() {
                continue;
            }
            let entry = match data {
                Some(d) if d.len() == bs => {
                    let a = g.alloc(1)[0];
                    v.file
                        .write(a.slot, d)
                        .map_err(|e| Error::io(format!("volume {name}: writing snapshot block"), e))?;
                    if a.from_free {
                        pages.set_free(&self.db, a.slot, false)?;
                    }
                    wrote = true;
                    Entry { slot: a.slot, crc: check::crc(d), seq: until }
                }
                Some(_) => {
                    return Err(Error::InvalidArgument(format!("volume {name}: snapshot block {b} is not one block")))
                }
                None => Entry { slot: ZERO_SLOT, crc: 0, seq: until },
            };
            batch.put(key, entry.encode());
        }
        let rec = SnapshotInfo { partial: !last, ..rec };
        let json = serde_json::to_vec(&rec).map_err(|e| Error::Internal(e.to_string()))?;
        batch.put(keys::snapshot(v.vid, rec.seq, &rec.name), json);
        batch.put(keys::state(v.vid), g.st.encode());
        // Durable before the versions are recorded: a retry skips recorded ones.
        if wrote {
            v.file.sync().map_err(|e| Error::io(format!("volume {name}: fdatasync"), e))?;
        }
        self.commit_pages(&mut g, batch, pages, true, "installing snapshot")?;
        g.snaps.insert((rec.seq, rec.name.clone()), rec.clone());
        Ok(rec)
    }
}

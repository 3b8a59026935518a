//! `MemStore`: an in-memory replica store with power-loss simulation.
//!
//! Same contract as `DiskStore`. `crash()` simulates a power loss: every change since the
//! last flush of each volume is undone (records and epochs are durable at once, as on disk),
//! `last_seq` included, so the replica claims exactly the flushed prefix it kept: the
//! all-lost case of the disk store's recovery rule (which, losing only some writes, also
//! lowers its resync mark to the clean prefix).
//! `corrupt()` flips a stored byte without updating its checksum.
//!
//! Snapshots follow the disk store's rules (see `disk/snap.rs`); each one keeps a copy of
//! the block versions it sees instead of sharing them with the live volume.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;

use hlstore_core::error::{Error, Result};

use super::check;
use super::history::History;
use super::record::{
    ApplyStats, Change, ChunkData, Claim, ReplicaInfo, ReplicaState, ResyncChunk, SnapshotInfo, VolumeRecord,
    BLOCK_SIZE,
};
use super::store::ReplicaStore;
use hlstore_core::{Epoch, Offset, Seq};

#[derive(Clone, PartialEq, Eq)]
struct Block {
    data: Vec<u8>,
    crc: u32,
    seq: u64,
}

/// A block as stored, seen behind the store's back (see [`MemStore::stored_block`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredBlock {
    pub data: Vec<u8>,
    /// The seq that wrote it.
    pub seq: u64,
    /// Whether its content still matches its checksum.
    pub intact: bool,
}

/// A snapshot: its record and the block versions it sees (absent: zeroes).
struct MemSnap {
    info: SnapshotInfo,
    blocks: BTreeMap<u64, Block>,
}

enum Undo {
    Block(u64, Option<Block>),
    Trim,
    Seq(u64),
}

struct MemVolume {
    record: VolumeRecord,
    blocks: BTreeMap<u64, Block>,
    trims: Vec<(u64, u64, u64)>,
    last_seq: u64,
    durable_seq: u64,
    resync_from: Option<u64>,
    resync_done: Option<(u64, u64)>,
    resync_done_epoch: u64,
    undo: Vec<Undo>,
    /// By `(seq, name)`: listed oldest first.
    snaps: BTreeMap<(u64, String), MemSnap>,
}

impl MemVolume {
    fn state(&self) -> ReplicaState {
        ReplicaState {
            epoch: self.record.epoch,
            owner: self.record.owner,
            last_seq: self.last_seq,
            durable_seq: self.durable_seq,
            size: self.record.size,
            allocated_bytes: self.blocks.len() as u64 * BLOCK_SIZE,
            resync_from: self.resync_from,
            resync_done: self.resync_done,
            history: History::from_entries(&self.record.history).unwrap_or_default(),
        }
    }

    fn info(&self) -> ReplicaInfo {
        ReplicaInfo { record: self.record.clone(), state: self.state() }
    }

    fn bump_seq(&mut self, seq: u64) {
        if seq > self.last_seq {
            self.undo.push(Undo::Seq(self.last_seq));
            self.last_seq = seq;
        }
    }

    fn set_block(&mut self, b: u64, block: Option<Block>) {
        let old = match block {
            Some(blk) => self.blocks.insert(b, blk),
            None => self.blocks.remove(&b),
        };
        self.undo.push(Undo::Block(b, old));
    }

    fn trim(&mut self, seq: u64, offset: u64, len: u64, only_older: bool) {
        let (first, end) = (offset / BLOCK_SIZE, (offset + len) / BLOCK_SIZE);
        let doomed: Vec<u64> =
            self.blocks.range(first..end).filter(|(_, blk)| !only_older || blk.seq < seq).map(|(b, _)| *b).collect();
        for b in doomed {
            self.set_block(b, None);
        }
        self.trims.push((seq, offset, len));
        self.undo.push(Undo::Trim);
        self.bump_seq(seq);
    }

    fn snap_key(&self, name: &str) -> Option<(u64, String)> {
        self.snaps.keys().find(|k| k.1 == name).cloned()
    }

    fn snap(&self, volume: &str, name: &str) -> Result<&MemSnap> {
        self.snaps
            .values()
            .find(|s| s.info.name == name)
            .ok_or_else(|| Error::NotFound(format!("volume {volume} has no snapshot {name:?} on this replica")))
    }

    fn flush(&mut self) -> u64 {
        self.undo.clear();
        self.durable_seq = self.last_seq;
        self.durable_seq
    }

    fn crash(&mut self) {
        while let Some(u) = self.undo.pop() {
            match u {
                Undo::Block(b, Some(old)) => {
                    self.blocks.insert(b, old);
                }
                Undo::Block(b, None) => {
                    self.blocks.remove(&b);
                }
                Undo::Trim => {
                    self.trims.pop();
                }
                Undo::Seq(s) => self.last_seq = s,
            }
        }
    }
}

/// An in-memory [`ReplicaStore`]. See the module docs.
#[derive(Default)]
pub struct MemStore {
    volumes: Mutex<BTreeMap<String, MemVolume>>,
}

impl MemStore {
    pub fn new() -> Self {
        Self::default()
    }

    /// Simulates a power loss: every volume loses the changes made since its last flush.
    pub fn crash(&self) {
        for v in self.lock().values_mut() {
            v.crash();
        }
    }

    /// Flips one byte of the stored block at `offset` without updating its checksum.
    /// Returns false if the block is not allocated.
    pub fn corrupt(&self, volume: &str, offset: u64) -> bool {
        let mut vols = self.lock();
        let Some(v) = vols.get_mut(volume) else { return false };
        match v.blocks.get_mut(&(offset / BLOCK_SIZE)) {
            Some(blk) => {
                blk.data[(offset % BLOCK_SIZE) as usize] ^= 0x40;
                true
            }
            None => false,
        }
    }

    /// The block `block` of `volume` as stored (None: unallocated), bypassing epochs and
    /// checksums: for tests that inspect a replica.
    pub fn stored_block(&self, volume: &str, block: u64) -> Option<StoredBlock> {
        let vols = self.lock();
        let blk = vols.get(volume)?.blocks.get(&block)?;
        Some(StoredBlock { data: blk.data.clone(), seq: blk.seq, intact: check::crc(&blk.data) == blk.crc })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, MemVolume>> {
        // A panic while holding the lock leaves the map consistent (every mutation is a
        // single insert/remove), so a poisoned lock is still usable.
        self.volumes.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn with<T>(&self, volume: &str, f: impl FnOnce(&mut MemVolume) -> Result<T>) -> Result<T> {
        let mut vols = self.lock();
        let v = vols.get_mut(volume).ok_or_else(|| not_found(volume))?;
        f(v)
    }

    fn with_io<T>(&self, volume: &str, epoch: u64, f: impl FnOnce(&mut MemVolume) -> Result<T>) -> Result<T> {
        self.with(volume, |v| {
            check::epoch(volume, v.record.epoch, epoch)?;
            f(v)
        })
    }
}

fn not_found(volume: &str) -> Error {
    Error::NotFound(format!("volume {volume} has no replica on this node"))
}

/// Reads `[offset, offset + len)` (checked) out of `blocks`, verifying every checksum.
fn read_blocks(volume: &str, blocks: &BTreeMap<u64, Block>, offset: u64, len: u64) -> Result<Vec<u8>> {
    check::read_len(volume, len)?;
    let mut out = vec![0u8; len as usize];
    let first = offset / BLOCK_SIZE;
    for (b, blk) in blocks.range(first..first + len / BLOCK_SIZE) {
        let actual = check::crc(&blk.data);
        if actual != blk.crc {
            return Err(Error::Corruption { volume: volume.into(), offset: b * BLOCK_SIZE, expected: blk.crc, actual });
        }
        let at = ((b - first) * BLOCK_SIZE) as usize;
        out[at..at + BLOCK_SIZE as usize].copy_from_slice(&blk.data);
    }
    Ok(out)
}

impl ReplicaStore for MemStore {
    fn create(&self, record: VolumeRecord) -> Result<ReplicaInfo> {
        check::record(&record)?;
        let mut vols = self.lock();
        if let Some(v) = vols.get(&record.volume_id) {
            if v.record.same_definition(&record) {
                return Ok(v.info());
            }
            return Err(Error::AlreadyExists(format!(
                "volume {} exists with a different definition",
                record.volume_id
            )));
        }
        let v = MemVolume {
            record: record.clone(),
            blocks: BTreeMap::new(),
            trims: Vec::new(),
            last_seq: 0,
            durable_seq: 0,
            resync_from: None,
            resync_done: None,
            resync_done_epoch: 0,
            undo: Vec::new(),
            snaps: BTreeMap::new(),
        };
        let info = v.info();
        vols.insert(record.volume_id, v);
        Ok(info)
    }

    fn delete(&self, volume: &str) -> Result<bool> {
        Ok(self.lock().remove(volume).is_some())
    }

    fn list(&self) -> Result<Vec<ReplicaInfo>> {
        Ok(self.lock().values().map(MemVolume::info).collect())
    }

    fn info(&self, volume: &str) -> Result<ReplicaInfo> {
        self.with(volume, |v| Ok(v.info()))
    }

    fn claim(&self, volume: &str, claim: &Claim) -> Result<ReplicaState> {
        check::new_epoch(volume, claim.epoch)?;
        self.with(volume, |v| {
            if let Some((epoch, owner)) = check::claim(volume, v.record.epoch, v.record.owner, claim)? {
                v.record.epoch = epoch;
                v.record.owner = owner;
                v.record.owner_node = if owner == 0 { String::new() } else { claim.owner_node.clone() };
            }
            Ok(v.state())
        })
    }

    fn state(&self, volume: &str) -> Result<ReplicaState> {
        self.with(volume, |v| Ok(v.state()))
    }

    fn write(&self, volume: &str, epoch: Epoch, seq: Seq, offset: Offset, data: &[u8], fua: bool) -> Result<Seq> {
        let epoch = epoch.get();
        let seq = seq.get();
        let offset = offset.get();
        self.with_io(volume, epoch, |v| {
            check::range(volume, v.record.size, offset, data.len() as u64)?;
            check::seq(volume, seq)?;
            for (i, chunk) in data.chunks(BLOCK_SIZE as usize).enumerate() {
                let blk = Block { data: chunk.to_vec(), crc: check::crc(chunk), seq };
                v.set_block(offset / BLOCK_SIZE + i as u64, Some(blk));
            }
            v.bump_seq(seq);
            Ok(if fua { v.flush() } else { v.durable_seq })
        })
        .map(Seq)
    }

    fn read(&self, volume: &str, epoch: Epoch, offset: Offset, len: u64) -> Result<Vec<u8>> {
        let epoch = epoch.get();
        let offset = offset.get();
        self.with_io(volume, epoch, |v| {
            check::range(volume, v.record.size, offset, len)?;
            read_blocks(volume, &v.blocks, offset, len)
        })
    }

    fn flush(&self, volume: &str, epoch: Epoch) -> Result<Seq> {
        let epoch = epoch.get();
        self.with_io(volume, epoch, |v| Ok(v.flush())).map(Seq)
    }

    fn trim(&self, volume: &str, epoch: Epoch, seq: Seq, offset: Offset, len: u64) -> Result<()> {
        let epoch = epoch.get();
        let seq = seq.get();
        let offset = offset.get();
        self.with_io(volume, epoch, |v| {
            check::range(volume, v.record.size, offset, len)?;
            check::seq(volume, seq)?;
            v.trim(seq, offset, len, false);
            Ok(())
        })
    }

    fn expand(&self, volume: &str, epoch: Epoch, new_size: u64) -> Result<ReplicaInfo> {
        let epoch = epoch.get();
        self.with_io(volume, epoch, |v| {
            check::new_size(volume, v.record.size, new_size)?;
            v.record.size = new_size;
            Ok(v.info())
        })
    }

    fn set_replica_set(&self, volume: &str, epoch: Epoch, replica_set: Vec<String>) -> Result<ReplicaInfo> {
        let epoch = epoch.get();
        check::new_epoch(volume, epoch)?;
        self.with(volume, |v| {
            if epoch < v.record.epoch {
                return Err(Error::StaleEpoch { volume: volume.into(), got: epoch, current: v.record.epoch });
            }
            if epoch > v.record.epoch {
                v.record.owner = 0;
                v.record.owner_node.clear();
            }
            v.record.epoch = epoch;
            v.record.replica_set = replica_set;
            Ok(v.info())
        })
    }

    fn set_labels(&self, volume: &str, labels: BTreeMap<String, String>) -> Result<ReplicaInfo> {
        check::labels(volume, &labels)?;
        self.with(volume, |v| {
            check::apply_labels(&mut v.record.labels, labels);
            Ok(v.info())
        })
    }

    fn changes_since(&self, volume: &str, epoch: Epoch, since: Seq) -> Result<Vec<Change>> {
        let epoch = epoch.get();
        let since = since.get();
        self.with_io(volume, epoch, |v| {
            let mut out: Vec<Change> = v
                .trims
                .iter()
                .filter(|t| t.0 > since)
                .map(|&(seq, offset, len)| Change::Trim { offset, len, seq })
                .collect();
            out.sort_by_key(|c| match c {
                Change::Trim { seq, .. } => *seq,
                Change::Block { .. } => 0,
            });
            out.extend(
                v.blocks
                    .iter()
                    .filter(|(_, blk)| blk.seq > since)
                    .map(|(b, blk)| Change::Block { offset: b * BLOCK_SIZE, seq: blk.seq }),
            );
            Ok(out)
        })
    }

    fn begin_resync(
        &self,
        volume: &str,
        epoch: Epoch,
        from_seq: Seq,
        resume: bool,
        history: History,
    ) -> Result<ReplicaState> {
        let epoch = epoch.get();
        let from_seq = from_seq.get();
        check::seq(volume, from_seq)?;
        self.with_io(volume, epoch, |v| {
            if !history.is_empty() {
                v.record.history = history.entries().to_vec();
            }
            if !resume || v.resync_from != Some(from_seq) || v.resync_done_epoch != epoch {
                v.resync_done = None;
            }
            v.resync_from = Some(v.resync_from.map_or(from_seq, |f| f.min(from_seq)));
            Ok(v.state())
        })
    }

    fn set_history(&self, volume: &str, epoch: Epoch, history: History) -> Result<ReplicaState> {
        let epoch = epoch.get();
        self.with_io(volume, epoch, |v| {
            v.record.history = history.entries().to_vec();
            Ok(v.state())
        })
    }

    fn checkpoint_resync(&self, volume: &str, epoch: Epoch, offset: Offset) -> Result<ReplicaState> {
        let epoch = epoch.get();
        let offset = offset.get();
        self.with_io(volume, epoch, |v| {
            if v.resync_from.is_none() {
                return Err(Error::InvalidArgument(format!("volume {volume}: no resync in progress")));
            }
            v.flush();
            v.resync_done = Some((offset, v.durable_seq));
            v.resync_done_epoch = epoch;
            Ok(v.state())
        })
    }

    fn apply_resync(&self, volume: &str, epoch: Epoch, chunks: &[ResyncChunk]) -> Result<ApplyStats> {
        let epoch = epoch.get();
        self.with_io(volume, epoch, |v| {
            let mut stats = ApplyStats::default();
            for c in chunks {
                check::resync_chunk(volume, v.record.size, c)?;
                let b = c.offset / BLOCK_SIZE;
                match &c.data {
                    ChunkData::Trim(len) => {
                        v.trim(c.seq, c.offset, *len, true);
                        stats.applied += 1;
                        continue;
                    }
                    _ if v.blocks.get(&b).is_some_and(|blk| blk.seq >= c.seq) => {
                        stats.skipped_newer += 1;
                        continue;
                    }
                    ChunkData::Data(d) => {
                        v.set_block(b, Some(Block { data: d.to_vec(), crc: check::crc(d), seq: c.seq }))
                    }
                    // Recorded as a one-block trim, as on disk, so a resync from this
                    // replica carries it on.
                    ChunkData::Zero => v.trim(c.seq, c.offset, BLOCK_SIZE, false),
                }
                v.bump_seq(c.seq);
                stats.applied += 1;
            }
            Ok(stats)
        })
    }

    fn end_resync(&self, volume: &str, epoch: Epoch) -> Result<ReplicaState> {
        let epoch = epoch.get();
        self.with_io(volume, epoch, |v| {
            v.flush();
            v.resync_from = None;
            v.resync_done = None;
            Ok(v.state())
        })
    }

    fn create_snapshot(&self, volume: &str, epoch: Epoch, snap: SnapshotInfo) -> Result<SnapshotInfo> {
        let epoch = epoch.get();
        check::snapshot_name(volume, &snap.name)?;
        check::seq(volume, snap.seq)?;
        self.with_io(volume, epoch, |v| {
            if let Ok(s) = v.snap(volume, &snap.name) {
                return Ok(s.info.clone());
            }
            if v.resync_from.is_some() {
                return Err(Error::Unavailable(format!(
                    "volume {volume}: this replica is being resynced; snapshot {:?} must come from an in-sync replica",
                    snap.name
                )));
            }
            if v.last_seq > snap.seq {
                return Err(Error::Unavailable(format!(
                    "volume {volume}: this replica already applied seq {} past the snapshot point {}",
                    v.last_seq, snap.seq
                )));
            }
            v.flush();
            let info = SnapshotInfo { size: v.record.size, ..snap };
            let blocks = v.blocks.clone();
            v.snaps.insert((info.seq, info.name.clone()), MemSnap { info: info.clone(), blocks });
            Ok(info)
        })
    }

    fn delete_snapshot(&self, volume: &str, epoch: Epoch, name: &str) -> Result<bool> {
        let epoch = epoch.get();
        self.with_io(volume, epoch, |v| Ok(v.snap_key(name).and_then(|k| v.snaps.remove(&k)).is_some()))
    }

    fn install_snapshot(
        &self,
        volume: &str,
        epoch: Epoch,
        snap: SnapshotInfo,
        blocks: &[(u64, Option<Vec<u8>>)],
        last: bool,
    ) -> Result<SnapshotInfo> {
        let epoch = epoch.get();
        check::snapshot_name(volume, &snap.name)?;
        check::seq(volume, snap.seq)?;
        self.with_io(volume, epoch, |v| {
            let key = v.snap_key(&snap.name);
            let info = match key.as_ref().and_then(|k| v.snaps.get(k)) {
                Some(s) if !s.info.partial => return Ok(s.info.clone()),
                Some(s) => s.info.clone(),
                None => SnapshotInfo { partial: true, ..snap },
            };
            for (b, data) in blocks {
                if *b >= info.size / BLOCK_SIZE {
                    return Err(Error::InvalidArgument(format!(
                        "volume {volume}: snapshot block {b} is past its size"
                    )));
                }
                if data.as_ref().is_some_and(|d| d.len() as u64 != BLOCK_SIZE) {
                    return Err(Error::InvalidArgument(format!(
                        "volume {volume}: snapshot block {b} is not one block"
                    )));
                }
            }
            let mut s = match key.and_then(|k| v.snaps.remove(&k)) {
                Some(s) => s,
                None => {
                    // A new (partial) snapshot sees the live versions up to its seq.
                    let seen = v.blocks.iter().filter(|(_, blk)| blk.seq <= info.seq);
                    let blocks = seen.map(|(b, blk)| (*b, blk.clone())).collect();
                    MemSnap { info, blocks }
                }
            };
            for (b, data) in blocks {
                match data {
                    Some(d) => s.blocks.insert(*b, Block { data: d.clone(), crc: check::crc(d), seq: s.info.seq }),
                    None => s.blocks.remove(b),
                };
            }
            s.info.partial = !last;
            let info = s.info.clone();
            v.snaps.insert((info.seq, info.name.clone()), s);
            Ok(info)
        })
    }

    fn list_snapshots(&self, volume: &str) -> Result<Vec<SnapshotInfo>> {
        self.with(volume, |v| Ok(v.snaps.values().map(|s| s.info.clone()).collect()))
    }

    fn read_snapshot(&self, volume: &str, name: &str, offset: Offset, len: u64) -> Result<Vec<u8>> {
        let offset = offset.get();
        self.with(volume, |v| {
            let s = v.snap(volume, name)?;
            if s.info.partial {
                return Err(Error::Unavailable(format!(
                    "volume {volume}: snapshot {name} is still being copied to this replica; read it from another one"
                )));
            }
            check::range(volume, s.info.size, offset, len)?;
            read_blocks(volume, &s.blocks, offset, len)
        })
    }

    fn changed_blocks(&self, volume: &str, from: Option<&str>, to: Option<&str>) -> Result<Vec<u64>> {
        self.with(volume, |v| {
            let a = from.map(|n| v.snap(volume, n)).transpose()?;
            let b = to.map(|n| v.snap(volume, n)).transpose()?;
            if a.map_or(0, |s| s.info.seq) > b.map_or(u64::MAX, |s| s.info.seq) {
                return Err(Error::InvalidArgument(format!(
                    "volume {volume}: snapshot {:?} is newer than {:?}",
                    from.unwrap_or(""),
                    to.unwrap_or("the live volume")
                )));
            }
            let empty = BTreeMap::new();
            let (x, y) = (a.map_or(&empty, |s| &s.blocks), b.map_or(&v.blocks, |s| &s.blocks));
            let differ = x.keys().chain(y.keys()).filter(|k| x.get(k) != y.get(k));
            Ok(differ.copied().collect::<BTreeSet<u64>>().into_iter().collect())
        })
    }
}

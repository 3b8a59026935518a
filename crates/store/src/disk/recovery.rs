//! Crash recovery of one volume at store open. See the `disk` module docs.
//!
//! What may be lost in a power cut is what no flush synced: blocks written at seqs above
//! the durable mark (seq-index entries above it) and blocks written at or below it since the last
//! flush (resync copies of older content, unsynced marks). Each is verified against its crc; a
//! block whose data did not reach the disk rolls back to the newest durable content it had
//! (kept in its seq-index value), losing the writes in between.
//!
//! Then the replica must not claim what it lost: if the lowest lost seq is `s`, it holds
//! the history as a clean prefix only up to `s - 1` (later writes it kept are strays:
//! it may hold `s + 5` without `s`). The recovered state says so: `last_seq` is the
//! highest seq it still holds, `durable_seq` is at most `s - 1`, and if it holds anything
//! beyond `s - 1` its resync mark (`resync_from`) is lowered to `s - 1`, so the engine
//! takes it as complete only up to there and resyncs it two-sided (its strays are
//! overwritten from the source).

use super::batch::Batch;

use hlstore_core::error::{Error, Result};

use super::super::check;
use super::super::record::BLOCK_SIZE;
use super::keys::{self, QValue};
use super::pages::{self, Pages};
use super::volume::{self, VolInner, Volume};
use super::{corrupt_meta, DiskStore};

/// Rolls back blocks whose data did not reach the disk, lowers the replica's claims to the
/// clean prefix it holds, then makes the recovered state durable. Returns how many blocks
/// were rolled back.
pub(super) fn recover(store: &DiskStore, name: &str, v: &Volume) -> Result<u64> {
    let mut g = volume::write(v);
    let durable = g.st.durable_seq;
    let mut r = Rollback {
        store,
        name,
        v,
        batch: Batch::default(),
        pages: store.pages(v, &mut g)?,
        buf: vec![0u8; BLOCK_SIZE as usize],
        lost: None,
        count: 0,
    };
    let db = &store.db;
    // Blocks written above the durable mark.
    for (seq, b, qv) in store.seq_index_from(v.vid, durable.saturating_add(1))? {
        r.check(&mut g, b, seq, qv)?;
    }
    // Blocks written at or below it (resync copies) since the last flush.
    for (k, val) in store.scan(&keys::vid_prefix(keys::UNSYNCED, v.vid), None)? {
        let page = keys::u64_at(&k, keys::FIELD0).ok_or_else(|| corrupt_meta("unsynced key"))?;
        let bits = pages::decode_bits(&val).ok_or_else(|| corrupt_meta("unsynced page"))?;
        for b in pages::bits_of(page, bits) {
            r.pages.set_unsynced(db, b, false)?;
            let Some(cur) = r.pages.entry(db, b)? else { continue };
            if cur.seq > durable {
                continue; // covered above
            }
            let qv = r.pages.qvalue(db, cur.seq, b)?.unwrap_or_default();
            r.check(&mut g, b, cur.seq, qv)?;
        }
    }
    let Rollback { batch, pages, lost, count, .. } = r;
    // The rollbacks are committed before the data sync below; either order is safe: a
    // rolled-back block points at content that was durable already.
    store.commit_pages(&mut g, batch, pages, false, "recovery")?;
    let mut batch = Batch::default();
    if count > 0 {
        tracing::warn!(volume.id = name, blocks = count, "rolled back blocks whose data was lost before a flush");
    }
    // Versions of a snapshot whose delete was cut short (their slots join the free ones
    // punched below, after the durable commit).
    store.drop_orphaned_versions(name, v, &mut g)?;
    // Make what we recovered durable before any slot is reused.
    v.file.sync().map_err(|e| Error::io(format!("volume {name}: recovery fdatasync"), e))?;
    match lost {
        None => g.st.durable_seq = g.st.last_seq,
        Some(lowest) => {
            batch.put(keys::state(v.vid), g.st.encode());
            store.commit(std::mem::take(&mut batch), false, "recovery")?;
            claim_clean_prefix(store, name, &mut g, v.vid, lowest - 1)?;
        }
    }
    batch.put(keys::state(v.vid), g.st.encode());
    store.commit(batch, true, "recovery")?;
    // Free slots may still hold data (freed before the crash, never punched): punch them.
    if let Err(e) = g.free.runs().try_for_each(|(slot, count)| v.file.punch(slot, count)) {
        tracing::warn!(volume.id = name, error = %e, "could not punch free slots");
    }
    Ok(count)
}

/// The replica lost writes from `clean + 1` on: it holds the history only up to `clean`.
fn claim_clean_prefix(store: &DiskStore, name: &str, g: &mut VolInner, vid: u32, clean: u64) -> Result<()> {
    // The highest seq it still holds (kept writes and trims beyond the loss).
    let mut held = clean;
    for tag in [keys::SEQ, keys::TRIM] {
        let from = keys::with_u64(tag, vid, clean.saturating_add(1));
        for (k, _) in store.scan(&keys::vid_prefix(tag, vid), Some(&from))? {
            held = held.max(keys::u64_at(&k, keys::FIELD0).ok_or_else(|| corrupt_meta("seq key"))?);
        }
    }
    let before = g.st;
    g.st.last_seq = held.min(before.last_seq);
    g.st.durable_seq = clean.min(g.st.last_seq);
    if g.st.last_seq > clean || before.resync_from.is_some() {
        g.st.resync_from = Some(before.resync_from.map_or(clean, |f| f.min(clean)));
        g.st.resync_done = None;
    }
    tracing::warn!(
        volume.id = name,
        lost_from = clean + 1,
        last_seq = g.st.last_seq,
        "power loss: the replica holds the history only up to {clean} and needs a resync"
    );
    Ok(())
}

/// Verifies blocks and stages the rollback of those whose data was lost.
struct Rollback<'a> {
    store: &'a DiskStore,
    name: &'a str,
    v: &'a Volume,
    batch: Batch,
    pages: Pages,
    buf: Vec<u8>,
    /// The lowest seq lost so far.
    lost: Option<u64>,
    count: u64,
}

impl Rollback<'_> {
    /// Checks block `b` whose current content was written at `seq` (`qv`: its seq-index
    /// value); rolls it back if the data is not what its crc says.
    fn check(&mut self, g: &mut VolInner, b: u64, seq: u64, qv: QValue) -> Result<()> {
        let (db, v) = (&self.store.db, self.v);
        let Some(cur) = self.pages.entry(db, b)? else { return Ok(()) };
        if cur.seq != seq {
            return Ok(());
        }
        v.file
            .read(cur.slot, &mut self.buf)
            .map_err(|e| Error::io(format!("volume {}: recovery read", self.name), e))?;
        if check::crc(&self.buf) == cur.crc {
            return Ok(());
        }
        // The new data never reached the disk: go back to the newest durable content.
        let lost = qv.skipped.map_or(seq, |s| s.min(seq));
        self.lost = Some(self.lost.map_or(lost, |l| l.min(lost)));
        self.count += 1;
        let pages = &mut self.pages;
        pages.set_qvalue(db, seq, b, None)?;
        pages.set_free(db, cur.slot, true)?;
        g.free.insert(cur.slot);
        g.unsynced.remove(&b);
        match qv.prev {
            Some(old) => {
                // Live again: no longer a preserved version (if a snapshot kept it).
                self.batch.delete(keys::preserved(v.vid, b, old.seq));
                pages.set_entry(db, b, Some(old))?;
                pages.set_qvalue(db, old.seq, b, Some(QValue::default()))?;
                pages.set_free(db, old.slot, false)?;
                g.free.remove(old.slot);
            }
            None => {
                pages.set_entry(db, b, None)?;
                g.st.allocated_blocks = g.st.allocated_blocks.saturating_sub(1);
            }
        }
        Ok(())
    }
}

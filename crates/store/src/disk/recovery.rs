//! Crash recovery of one volume at store open. See the `disk` module docs.
//!
//! What may be lost in a power cut is what no flush synced: blocks written at seqs above
//! the durable mark (`Q` keys above it) and blocks written at or below it since the last
//! flush (resync copies of older content, `U` keys). Each is verified against its crc; a
//! block whose data did not reach the disk rolls back to the newest durable content it had
//! (kept in its `Q` value), losing the writes in between.
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
use super::volume::{self, VolInner, Volume};
use super::{corrupt_meta, DiskStore};

/// Rolls back blocks whose data did not reach the disk, lowers the replica's claims to the
/// clean prefix it holds, then makes the recovered state durable. Returns how many blocks
/// were rolled back.
pub(super) fn recover(store: &DiskStore, name: &str, v: &Volume) -> Result<u64> {
    let mut g = volume::write(v);
    let durable = g.st.durable_seq;
    let mut r =
        Rollback { store, name, v, batch: Batch::default(), buf: vec![0u8; BLOCK_SIZE as usize], lost: None, count: 0 };
    // Blocks written above the durable mark.
    let from = keys::with_u64(keys::SEQ, v.vid, durable.saturating_add(1));
    for (k, val) in store.scan(&keys::vid_prefix(keys::SEQ, v.vid), Some(&from))? {
        let (Some(seq), Some(b)) = (keys::u64_at(&k, keys::FIELD0), keys::u64_at(&k, keys::FIELD1)) else {
            continue;
        };
        r.check(&mut g, b, seq, &k, &val)?;
    }
    // Blocks written at or below it (resync copies) since the last flush.
    for (k, _) in store.scan(&keys::vid_prefix(keys::UNSYNCED, v.vid), None)? {
        r.batch.delete(&k);
        let Some(b) = keys::u64_at(&k, keys::FIELD0) else { continue };
        let Some(cur) = store.map_range(v.vid, b..b + 1)?.first().map(|(_, e)| *e) else { continue };
        if cur.seq > durable {
            continue; // covered above
        }
        let qk = keys::seq(v.vid, cur.seq, b);
        let val = store.db.get(&qk).map_err(super::meta_err(format!("volume {name}: seq index")))?.unwrap_or_default();
        r.check(&mut g, b, cur.seq, &qk, &val)?;
    }
    let Rollback { mut batch, lost, count, .. } = r;
    if count > 0 {
        tracing::warn!(volume.id = name, blocks = count, "rolled back blocks whose data was lost before a flush");
    }
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
    let free: Vec<u64> = g.free.iter().copied().collect();
    if let Err(e) = super::file::runs(&free, |_, slot, count| v.file.punch(slot, count)) {
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
    buf: Vec<u8>,
    /// The lowest seq lost so far.
    lost: Option<u64>,
    count: u64,
}

impl Rollback<'_> {
    /// Checks block `b` whose current content was written at `seq` (`qk`/`val`: its `Q`
    /// key and value); rolls it back if the data is not what its crc says.
    fn check(&mut self, g: &mut VolInner, b: u64, seq: u64, qk: &[u8], val: &[u8]) -> Result<()> {
        let (store, v) = (self.store, self.v);
        let Some(cur) = store.map_range(v.vid, b..b + 1)?.first().map(|(_, e)| *e) else { return Ok(()) };
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
        let qv = QValue::decode(val).ok_or_else(|| corrupt_meta("seq value"))?;
        let lost = qv.skipped.map_or(seq, |s| s.min(seq));
        self.lost = Some(self.lost.map_or(lost, |l| l.min(lost)));
        self.count += 1;
        let batch = &mut self.batch;
        batch.delete(qk);
        batch.put(keys::free(v.vid, cur.slot), []);
        g.free.insert(cur.slot);
        g.unsynced.remove(&b);
        match qv.prev {
            Some(old) => {
                // Live again: no longer a preserved version (if a snapshot kept it).
                batch.delete(keys::preserved(v.vid, b, old.seq));
                batch.put(keys::map(v.vid, b), old.encode());
                batch.put(keys::seq(v.vid, old.seq, b), QValue::default().encode());
                batch.delete(keys::free(v.vid, old.slot));
                g.free.remove(&old.slot);
            }
            None => {
                batch.delete(keys::map(v.vid, b));
                g.st.allocated_blocks = g.st.allocated_blocks.saturating_sub(1);
            }
        }
        Ok(())
    }
}

//! Crash recovery of one volume at store open. See the `disk` module docs.

use rocksdb::WriteBatch;

use crate::error::{Error, Result};

use super::super::check;
use super::super::record::BLOCK_SIZE;
use super::keys::{self, Entry};
use super::volume::{self, Volume};
use super::DiskStore;

/// Rolls back blocks written after the durable mark whose data did not reach the disk,
/// then makes the recovered state durable. Returns how many blocks were rolled back.
pub(super) fn recover(store: &DiskStore, name: &str, v: &Volume) -> Result<u64> {
    let durable = volume::read(v).st.durable_seq;
    let prefix = keys::vid_prefix(keys::SEQ, v.vid);
    let from = keys::with_u64(keys::SEQ, v.vid, durable.saturating_add(1));
    let mut rolled_back = 0u64;
    let mut batch = WriteBatch::default();
    let mut g = volume::write(v);
    let mut buf = vec![0u8; BLOCK_SIZE as usize];
    for (k, val) in store.scan(&prefix, Some(&from))? {
        let (Some(seq), Some(b)) = (keys::u64_at(&k, keys::FIELD0), keys::u64_at(&k, keys::FIELD1)) else {
            continue;
        };
        let Some(cur) = store.map_range(v.vid, b..b + 1)?.first().map(|(_, e)| *e) else { continue };
        if cur.seq != seq {
            continue;
        }
        v.file.read(cur.slot, &mut buf).map_err(|e| Error::io(format!("volume {name}: recovery read"), e))?;
        if check::crc(&buf) == cur.crc {
            continue;
        }
        // The new data never reached the disk: go back to what the block held before.
        rolled_back += 1;
        batch.delete(&k);
        batch.put(keys::free(v.vid, cur.slot), []);
        g.free.insert(cur.slot);
        match Entry::decode(&val) {
            Some(old) => {
                // Live again: no longer a preserved version (if a snapshot kept it).
                batch.delete(keys::preserved(v.vid, b, old.seq));
                batch.put(keys::map(v.vid, b), old.encode());
                batch.put(keys::seq(v.vid, old.seq, b), []);
                batch.delete(keys::free(v.vid, old.slot));
                g.free.remove(&old.slot);
            }
            None => {
                batch.delete(keys::map(v.vid, b));
                g.st.allocated_blocks = g.st.allocated_blocks.saturating_sub(1);
            }
        }
    }
    if rolled_back > 0 {
        tracing::warn!(volume.id = name, blocks = rolled_back, "rolled back blocks whose data was lost before a flush");
    }
    // Make what we recovered durable before any slot is reused.
    v.file.sync().map_err(|e| Error::io(format!("volume {name}: recovery fdatasync"), e))?;
    g.st.durable_seq = g.st.last_seq;
    batch.put(keys::state(v.vid), g.st.encode());
    store.commit(batch, true, "recovery")?;
    // Free slots may still hold data (freed before the crash, never punched): punch them.
    let free: Vec<u64> = g.free.iter().copied().collect();
    if let Err(e) = super::file::runs(&free, |_, slot, count| v.file.punch(slot, count)) {
        tracing::warn!(volume.id = name, error = %e, "could not punch free slots");
    }
    Ok(rolled_back)
}

//! Format 1 → 2 at open: format 1's per-block records (`M` map entries, `Q` seq-index
//! entries, `F` free slots, `U` unsynced marks) are rewritten into pages (`m`, `q`, `f`,
//! `u`; see [`super::keys`]).
//!
//! The `FORMAT` file says 2 before the first record is rewritten (so a format 1 agent
//! never opens a half-rewritten directory), and every open finishes a rewrite a crash
//! interrupted: each step deletes the per-block records it merged into pages in the same
//! atomic batch, and merging into a page reads what earlier steps wrote there.

use std::collections::BTreeMap;

use rocksdb::{Direction, IteratorMode, ReadOptions};

use hlstore_core::error::Result;

use super::batch::Batch;
use super::keys::{self, Entry, QValue};
use super::pages::Pages;
use super::{corrupt_meta, meta_err, DiskStore};

/// Per-block records rewritten per batch.
const STEP: usize = 64 * 1024;

impl DiskStore {
    /// Rewrites every format 1 record still in the metadata store. Returns how many.
    pub(super) fn upgrade_v1_records(&self) -> Result<u64> {
        let mut done = 0u64;
        for tag in [keys::V1_MAP, keys::V1_SEQ, keys::V1_FREE, keys::V1_UNSYNCED] {
            loop {
                let mut ro = ReadOptions::default();
                ro.set_iterate_upper_bound(vec![tag + 1]);
                let mut items = Vec::new();
                for item in self.db.iterator_opt(IteratorMode::From(&[tag], Direction::Forward), ro).take(STEP) {
                    items.push(item.map_err(meta_err("reading format 1 records"))?);
                }
                if items.is_empty() {
                    break;
                }
                let mut pages: BTreeMap<u32, Pages> = BTreeMap::new();
                let mut batch = Batch::default();
                for (k, val) in &items {
                    let vid = k
                        .get(1..5)
                        .and_then(|b| b.try_into().ok())
                        .map(u32::from_be_bytes)
                        .ok_or_else(|| corrupt_meta("format 1 key"))?;
                    let p = pages.entry(vid).or_insert_with(|| Pages::detached(vid));
                    let field = |at| keys::u64_at(k, at).ok_or_else(|| corrupt_meta("format 1 key"));
                    match tag {
                        keys::V1_MAP => {
                            let e = Entry::decode(val).ok_or_else(|| corrupt_meta("format 1 map entry"))?;
                            p.set_entry(&self.db, field(keys::FIELD0)?, Some(e))?;
                        }
                        keys::V1_SEQ => {
                            let q = QValue::decode(val).ok_or_else(|| corrupt_meta("format 1 seq value"))?;
                            p.set_qvalue(&self.db, field(keys::FIELD0)?, field(keys::FIELD1)?, Some(q))?;
                        }
                        keys::V1_FREE => p.set_free(&self.db, field(keys::FIELD0)?, true)?,
                        _ => p.set_unsynced(&self.db, field(keys::FIELD0)?, true)?,
                    }
                    batch.delete(k);
                }
                for p in pages.into_values() {
                    // Detached pages keep no in-memory state to settle.
                    let _unsettled = p.stage(&mut batch);
                }
                self.commit(batch, false, "rewriting format 1 records")?;
                done += items.len() as u64;
            }
        }
        if done > 0 {
            self.db.flush_wal(true).map_err(meta_err("syncing the rewritten metadata"))?;
            tracing::info!(records = done, "store format 1 upgraded: per-block metadata records rewritten into pages");
        }
        Ok(done)
    }
}

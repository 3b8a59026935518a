//! In-memory state of one volume replica in the disk store.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};

use super::super::history::History;
use super::super::record::{ReplicaState, SnapshotInfo, VolumeRecord, BLOCK_SIZE};
use super::file::SlotFile;
use super::free::FreeSlots;
use super::keys::PersistState;
use super::pages::PageState;

pub struct Volume {
    pub vid: u32,
    pub file: SlotFile,
    pub inner: RwLock<VolInner>,
    /// Serialises flushes of this volume (a flush is: sync data, persist durable mark,
    /// sync WAL, release slots).
    pub flush_lock: Mutex<()>,
}

pub struct VolInner {
    pub record: VolumeRecord,
    pub st: PersistState,
    /// Slots free for reuse now.
    pub free: FreeSlots,
    /// The free slots still allocated in the file (freed by overwrites, not punched); the
    /// rest of `free` are holes.
    pub reusable: BTreeSet<u64>,
    /// Slots freed by the write/trim with the given seq; reusable once that seq is durable.
    /// The flag: freed by a trim (the space is handed back to the filesystem then).
    pub pending: Vec<(u64, u64, bool)>,
    /// Slots freed by a snapshot delete, with the value of `changes` after the batch that
    /// freed them: reusable once a flush covered that count (the batch is in the WAL
    /// before the flush's WAL sync).
    pub reclaimed: Vec<(u64, u64)>,
    /// Snapshots by (seq, name).
    pub snaps: Snaps,
    /// Blocks with a `U` key (content written at or below the durable mark, not synced
    /// since), with the value of `changes` when it was written.
    pub unsynced: BTreeMap<u64, u64>,
    /// Counts unsynced changes (writes, trims, resync chunks)...
    pub changes: u64,
    /// ...and how far a flush covered them: a flush syncs unless the two are equal (seqs
    /// alone cannot tell: resync chunks carry older seqs than the durable mark).
    pub synced_changes: u64,
    /// What metadata batches keep in memory (`pages::Pages`).
    pub pages: PageState,
}

/// A replica's snapshots by (seq, name).
pub type Snaps = BTreeMap<(u64, String), SnapshotInfo>;

/// Whether a block version written at `written` and replaced at `until` is seen by a
/// snapshot (one with `written <= seq < until`), so it must be kept.
pub fn preserves(snaps: &Snaps, written: u64, until: u64) -> bool {
    written < until && snaps.range((written, String::new())..(until, String::new())).next().is_some()
}

/// A slot handed out by the allocator.
#[derive(Debug, Clone, Copy)]
pub struct Alloc {
    pub slot: u64,
    /// Whether it came from the free list (its `F` key must be deleted).
    pub from_free: bool,
}

impl VolInner {
    /// Takes `n` slots, lowest free first (run by run), then from the end of the file.
    ///
    /// Measured against a log-like policy (consecutive writes on consecutive slots, from
    /// the longest free run or the end of the file, fragments last; `benches/README.md`):
    /// that one turned random 4 KiB writes into 15x fewer, larger disk writes, but
    /// writing into holes (block allocation, new page-cache pages) cost more here than
    /// the disk writes it saved: random writes and the 1 MiB writes after them were
    /// slower. The low slots are mostly the reuse pool: allocated and often cached.
    pub fn alloc(&mut self, n: usize) -> Vec<Alloc> {
        let mut out = Vec::with_capacity(n);
        let mut need = n as u64;
        while need > 0 {
            match self.free.take_first(need) {
                Some((start, len)) => {
                    for slot in start..start + len {
                        self.reusable.remove(&slot);
                        out.push(Alloc { slot, from_free: true });
                    }
                    need -= len;
                }
                None => {
                    out.extend((self.st.hwm..self.st.hwm + need).map(|slot| Alloc { slot, from_free: false }));
                    self.st.hwm += need;
                    need = 0;
                }
            }
        }
        out
    }

    /// Gives back slots taken by `alloc` for a write that did not commit.
    pub fn unalloc(&mut self, allocs: &[Alloc], hwm_before: u64) {
        for a in allocs.iter().filter(|a| a.from_free) {
            self.free.insert(a.slot);
        }
        self.st.hwm = hwm_before;
    }

    pub fn new(record: VolumeRecord, st: PersistState, free: FreeSlots, snaps: Snaps) -> Self {
        Self {
            record,
            st,
            free,
            reusable: BTreeSet::new(),
            pending: Vec::new(),
            reclaimed: Vec::new(),
            snaps,
            unsynced: BTreeMap::new(),
            changes: 0,
            synced_changes: 0,
            pages: PageState::default(),
        }
    }

    /// Whether the current content of block `b`, written at `seq`, may not be on disk yet.
    pub fn is_unsynced(&self, b: u64, seq: u64) -> bool {
        seq > self.st.durable_seq || self.unsynced.contains_key(&b)
    }

    pub fn state(&self) -> ReplicaState {
        ReplicaState {
            epoch: self.record.epoch,
            owner: self.record.owner,
            last_seq: self.st.last_seq,
            durable_seq: self.st.durable_seq,
            size: self.record.size,
            allocated_bytes: self.st.allocated_blocks * BLOCK_SIZE,
            resync_from: self.st.resync_from,
            resync_done: self.st.resync_done,
            history: History::from_entries(&self.record.history).unwrap_or_default(),
        }
    }
}

/// Lock helpers: a poisoned lock means a panic mid-update of in-memory state only (the
/// durable state is in RocksDB batches, which are atomic), so we keep going.
pub fn read(v: &Volume) -> RwLockReadGuard<'_, VolInner> {
    v.inner.read().unwrap_or_else(|p| p.into_inner())
}

pub fn write(v: &Volume) -> RwLockWriteGuard<'_, VolInner> {
    v.inner.write().unwrap_or_else(|p| p.into_inner())
}

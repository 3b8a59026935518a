//! The `ReplicaStore` trait: the contract every store implementation keeps.

use std::collections::BTreeMap;

use hlstore_core::error::Result;
use hlstore_core::{Epoch, Offset, Seq};

use super::history::History;
use super::record::{
    ApplyStats, Change, Claim, ReplicaInfo, ReplicaState, ResyncChunk, SnapshotInfo, VolumeRecord, BLOCK_SIZE,
};

/// One write of a group (`ReplicaStore::write_many`): whole blocks at `offset`.
#[derive(Debug, Clone, Copy)]
pub struct BlockWrite<'a> {
    pub seq: Seq,
    pub offset: Offset,
    pub data: &'a [u8],
}

/// A node's store of volume replicas. Methods are blocking (disk I/O); async callers use
/// `spawn_blocking`. See the crate docs for the invariants.
///
/// Epoch rules: `create` stores the record's epoch; `open(e)` raises it to `e` (durably) or
/// fails with `StaleEpoch` if `e` is older. Every other call that carries an epoch fails
/// with `StaleEpoch` if it is older than the stored one, and with `InvalidArgument` if it is
/// newer (the caller must `open` first).
pub trait ReplicaStore: Send + Sync + 'static {
    /// Creates a replica. Idempotent: an existing replica with the same definition is
    /// returned as is; a different one is `AlreadyExists`.
    fn create(&self, record: VolumeRecord) -> Result<ReplicaInfo>;
    /// Deletes a replica and frees its space. Returns whether it existed.
    fn delete(&self, volume: &str) -> Result<bool>;
    fn list(&self) -> Result<Vec<ReplicaInfo>>;
    fn info(&self, volume: &str) -> Result<ReplicaInfo>;
    /// Applies an engine's claim (see [`Claim`] for the rules; durable before it returns).
    fn claim(&self, volume: &str, claim: &Claim) -> Result<ReplicaState>;
    /// Raises the epoch to `epoch` (a `Join` claim by no engine in particular).
    fn open(&self, volume: &str, epoch: Epoch) -> Result<ReplicaState> {
        self.claim(volume, &Claim::raise(epoch.get()))
    }
    fn state(&self, volume: &str) -> Result<ReplicaState>;
    /// Writes whole blocks at `offset`. Returns the durable seq after the write (with
    /// `fua`, at least `seq`).
    fn write(&self, volume: &str, epoch: Epoch, seq: Seq, offset: Offset, data: &[u8], fua: bool) -> Result<Seq>;
    /// Applies `writes` in order, as `write` would one after the other, then with `fua`
    /// makes them durable. Returns the durable seq. This is the group commit of a write
    /// stream: a store may apply the group with one metadata batch (the disk store does).
    /// On error any prefix of the group may have been applied; the caller treats the
    /// stream as failed (the engine resyncs the replica).
    fn write_many(&self, volume: &str, epoch: Epoch, writes: &[BlockWrite<'_>], fua: bool) -> Result<Seq> {
        let mut durable = Seq(0);
        for (i, w) in writes.iter().enumerate() {
            durable = self.write(volume, epoch, w.seq, w.offset, w.data, fua && i + 1 == writes.len())?;
        }
        if writes.is_empty() && fua {
            return self.flush(volume, epoch);
        }
        Ok(durable)
    }
    fn read(&self, volume: &str, epoch: Epoch, offset: Offset, len: u64) -> Result<Vec<u8>>;
    /// [`read`](Self::read) without waiting for a disk for the data: `Ok(None)` where the
    /// blocks are not in the page cache (or the volume is busy with a write batch), so an
    /// async caller can serve cached reads inline and send the rest to a thread that may
    /// block. Same checks and checksum
    /// verification as `read`. Default: always None.
    fn try_read_cached(&self, volume: &str, epoch: Epoch, offset: Offset, len: u64) -> Result<Option<Vec<u8>>> {
        let _ = (volume, epoch, offset, len);
        Ok(None)
    }
    /// Makes every write applied before the call durable; returns the durable seq.
    fn flush(&self, volume: &str, epoch: Epoch) -> Result<Seq>;
    /// Deallocates a range: it reads as zeroes and its space is freed (on disk, once the
    /// trim is durable).
    fn trim(&self, volume: &str, epoch: Epoch, seq: Seq, offset: Offset, len: u64) -> Result<()>;
    /// Grows the replica to `new_size` bytes.
    fn expand(&self, volume: &str, epoch: Epoch, new_size: u64) -> Result<ReplicaInfo>;
    /// Replaces the record's replica set, raising the epoch to `epoch` like `open` (an
    /// older epoch is `StaleEpoch`).
    fn set_replica_set(&self, volume: &str, epoch: Epoch, replica_set: Vec<String>) -> Result<ReplicaInfo>;
    /// Sets labels of the volume record durably: each entry of `labels` is set, or removed
    /// when its value is empty; the other labels stay. Takes no epoch and changes none:
    /// labels describe the volume, not its data, so writing one fences nothing (a label
    /// saying a volume was filled is written after the engine that filled it is gone).
    fn set_labels(&self, volume: &str, labels: BTreeMap<String, String>) -> Result<ReplicaInfo>;
    /// Every trim and block whose current content was written after `since`: trims first
    /// (in seq order), then blocks in offset order.
    fn changes_since(&self, volume: &str, epoch: Epoch, since: Seq) -> Result<Vec<Change>>;
    /// [`changes_since`](Self::changes_since) for a resumed resync: blocks below
    /// `split.0` only when written after `split.1` (they were copied up to there before);
    /// trims and the other blocks as written after `since`.
    fn changes_since_split(&self, volume: &str, epoch: Epoch, since: Seq, split: (u64, u64)) -> Result<Vec<Change>> {
        let (below, after) = split;
        let mut out = self.changes_since(volume, epoch, since)?;
        out.retain(|c| match *c {
            Change::Block { offset, seq } => offset >= below || seq > after,
            Change::Trim { .. } => true,
        });
        Ok(out)
    }
    /// Marks a resync into this replica as started from `from_seq` (durably). With
    /// `resume`, the checkpoint of an unfinished resync from the same `from_seq` taken under
    /// the same epoch (the same engine, so the same history) is kept and reported as
    /// `resync_done`; otherwise it is dropped. A non-empty `history` replaces the record's
    /// in the same durable update (the mark is a point of that history).
    fn begin_resync(
        &self,
        volume: &str,
        epoch: Epoch,
        from_seq: Seq,
        resume: bool,
        history: History,
    ) -> Result<ReplicaState>;
    /// Records the history the replica's data belongs to from now on (durably; the
    /// engine sends it before any write of its activation).
    fn set_history(&self, volume: &str, epoch: Epoch, history: History) -> Result<ReplicaState>;
    /// Flushes, then records that every block below `offset` is complete up to the
    /// durable seq (the resync streams blocks in offset order). Requires a resync mark.
    fn checkpoint_resync(&self, volume: &str, epoch: Epoch, offset: Offset) -> Result<ReplicaState>;
    /// Applies resync chunks; a chunk never replaces a block written at a newer seq.
    fn apply_resync(&self, volume: &str, epoch: Epoch, chunks: &[ResyncChunk]) -> Result<ApplyStats>;
    /// Flushes and clears the resync mark.
    fn end_resync(&self, volume: &str, epoch: Epoch) -> Result<ReplicaState>;

    /// Flushes, then records a snapshot `name` at `seq`: the volume as it is after every
    /// write with seq <= `seq` (the caller orders it after those writes and before later
    /// ones). O(1): later writes keep the versions it sees. Idempotent by name.
    fn create_snapshot(&self, volume: &str, epoch: Epoch, snap: SnapshotInfo) -> Result<SnapshotInfo> {
        let _ = (volume, epoch, snap);
        Err(hlstore_core::Error::Unsupported("snapshots are not supported by this store".into()))
    }
    /// Deletes a snapshot and frees the block versions only it kept. `Ok(false)` if there
    /// was none. Works in bounded steps so writes are not held up for long.
    fn delete_snapshot(&self, volume: &str, epoch: Epoch, name: &str) -> Result<bool> {
        let _ = (volume, epoch, name);
        Err(hlstore_core::Error::Unsupported("snapshots are not supported by this store".into()))
    }
    /// Resync of a snapshot this replica lacks: records `snap` as partial (so writes keep
    /// what it sees from now on), keeps each `(block, content)` (None: zeroes) as the
    /// version it sees, and with `last` marks it complete. Idempotent.
    fn install_snapshot(
        &self,
        volume: &str,
        epoch: Epoch,
        snap: SnapshotInfo,
        blocks: &[(u64, Option<Vec<u8>>)],
        last: bool,
    ) -> Result<SnapshotInfo> {
        let _ = (volume, epoch, snap, blocks, last);
        Err(hlstore_core::Error::Unsupported("snapshots are not supported by this store".into()))
    }
    /// The replica's snapshots, oldest first.
    fn list_snapshots(&self, volume: &str) -> Result<Vec<SnapshotInfo>> {
        let _ = volume;
        Err(hlstore_core::Error::Unsupported("snapshots are not supported by this store".into()))
    }
    /// Reads from snapshot `name` (checksums verified like live reads).
    fn read_snapshot(&self, volume: &str, name: &str, offset: Offset, len: u64) -> Result<Vec<u8>> {
        let _ = (volume, name, offset, len);
        Err(hlstore_core::Error::Unsupported("snapshots are not supported by this store".into()))
    }
    /// Blocks (indices) whose content may differ between snapshot `from` (None: an empty
    /// volume) and snapshot `to` (None: the live volume), ascending.
    fn changed_blocks(&self, volume: &str, from: Option<&str>, to: Option<&str>) -> Result<Vec<u64>> {
        let _ = (volume, from, to);
        Err(hlstore_core::Error::Unsupported("snapshots are not supported by this store".into()))
    }

    /// Writes zeroes to a range keeping it allocated (NBD WRITE_ZEROES with NO_HOLE).
    fn write_zeroes(&self, volume: &str, epoch: Epoch, seq: Seq, offset: Offset, len: u64) -> Result<()> {
        const STEP: u64 = 256 * BLOCK_SIZE;
        let zeroes = vec![0u8; STEP.min(len) as usize];
        let mut at = offset.get();
        let end = offset
            .get()
            .checked_add(len)
            .ok_or_else(|| hlstore_core::Error::InvalidArgument("length overflows".into()))?;
        while at < end {
            let n = STEP.min(end - at);
            self.write(volume, epoch, seq, Offset(at), &zeroes[..n as usize], false)?;
            at += n;
        }
        Ok(())
    }
}

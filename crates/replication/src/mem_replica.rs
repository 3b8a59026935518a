//! [`MemReplica`]: one replica of one volume in memory, for replication tests.
//!
//! A thin [`ReplicaTransport`] over a [`MemStore`], serving it the way the replica service
//! (`rpc/service.rs`) serves a store: the replica rules (epochs, claims, seqs, resync
//! marks, snapshots) are the store's, so there is one in-memory model of a replica. On top
//! sit fault switches: delay every request, make writes fail, take it down (every call
//! fails, open streams break), crash it (down + a power loss of its store), corrupt a block
//! (its reads fail their checksum until the block is rewritten), and a few more for the
//! resync paths. Clones share the same replica, so two engines can talk to one replica.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures::stream::{self, BoxStream, StreamExt};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::transport::{
    ChunkData, Claim, ReplicaTransport, ResyncChunk, SnapshotInfo, WriteAck, WriteReq, WriteStream,
};
use super::types::{block_runs, History, ReplicaSeqs, Seq};
use hlstore_core::error::{Error, Result};
use hlstore_core::{ids, Epoch, Offset};
use hlstore_store::{self as store, Change, MemStore, ReplicaStore, VolumeRecord, BLOCK_SIZE};

/// The volume id of the replica in its store.
const VOLUME: &str = "mem-volume";

/// Counters of what a [`MemReplica`] applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MemStats {
    /// Client writes and trims applied (not resync).
    pub writes: u64,
    /// Resync blocks and trims received (applied or skipped as older).
    pub resync_writes: u64,
    /// Resync checkpoints recorded.
    pub checkpoints: u64,
}

#[derive(Debug, Default)]
struct Switches {
    down: bool,
    fail_writes: bool,
    naive_resync: bool,
    fail_resync_source: bool,
    delay: Duration,
    write_delay: Duration,
    mark_delay: Duration,
    stats: MemStats,
}

/// An in-memory replica. Cheap to clone; clones are the same replica.
#[derive(Clone)]
pub struct MemReplica {
    name: String,
    store: Arc<MemStore>,
    switches: Arc<Mutex<Switches>>,
}

impl std::fmt::Debug for MemReplica {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemReplica").field("name", &self.name).finish_non_exhaustive()
    }
}

impl MemReplica {
    /// A replica of a `size`-byte volume at epoch 0, in a store of its own.
    pub fn new(name: impl Into<String>, size: u64) -> Self {
        let store = Arc::new(MemStore::new());
        store.create(VolumeRecord::new(VOLUME, size)).expect("a valid in-memory volume record");
        Self { name: name.into(), store, switches: Arc::default() }
    }

    fn switches(&self) -> MutexGuard<'_, Switches> {
        self.switches.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Makes every call fail (and open streams break) until `set_down(false)`.
    pub fn set_down(&self, down: bool) {
        self.switches().down = down;
    }
    /// Kill -9 and power loss: down, and everything not durable is lost.
    pub fn crash(&self) {
        self.switches().down = true;
        self.store.crash();
    }
    /// Every write, trim and resync chunk fails with an I/O error.
    pub fn set_fail_writes(&self, fail: bool) {
        self.switches().fail_writes = fail;
    }
    /// Every request waits this long before it is served.
    pub fn set_delay(&self, delay: Duration) {
        self.switches().delay = delay;
    }
    /// Every stream write waits this long before it is applied (reads do not): a replica
    /// that is slow to apply but still answers.
    pub fn set_write_delay(&self, delay: Duration) {
        self.switches().write_delay = delay;
    }
    /// Resync chunks replace blocks whatever their seq (models a replica without the seq
    /// guard, to test the runtime's own ordering guard).
    pub fn set_naive_resync(&self, naive: bool) {
        self.switches().naive_resync = naive;
    }
    /// Every `resync_stream` call fails (a source that breaks during a resync).
    pub fn set_fail_resync_source(&self, fail: bool) {
        self.switches().fail_resync_source = fail;
    }
    /// `begin_resync` waits this long before it takes effect (a slow resync mark, to
    /// test that no write overtakes it).
    pub fn set_mark_delay(&self, delay: Duration) {
        self.switches().mark_delay = delay;
    }
    /// Damages block `block` the way bit rot would (a byte flips, its checksum stays), so
    /// reads (and resync streams) covering it fail with `Corruption` until a write, trim
    /// or resync chunk replaces it. Panics if the block holds no data.
    pub fn corrupt_block(&self, block: u64) {
        assert!(self.store.corrupt(VOLUME, block * BLOCK_SIZE), "block {block} of {} is not allocated", self.name);
    }
    /// Whether block `block` is corrupt.
    pub fn is_corrupt(&self, block: u64) -> bool {
        self.store.stored_block(VOLUME, block).is_some_and(|b| !b.intact)
    }
    /// The seq that wrote block `block` (None: unallocated).
    pub fn block_seq(&self, block: u64) -> Option<Seq> {
        self.store.stored_block(VOLUME, block).map(|b| b.seq)
    }
    pub fn stats(&self) -> MemStats {
        self.switches().stats
    }
    pub fn epoch(&self) -> u64 {
        self.store.state(VOLUME).map_or(0, |s| s.epoch)
    }
    /// The replica's content (zeroes where unallocated), bypassing epochs, checksums and
    /// switches.
    pub fn contents(&self) -> Vec<u8> {
        let size = self.store.state(VOLUME).map_or(0, |s| s.size);
        let mut out = vec![0u8; size as usize];
        for (b, at) in out.chunks_mut(BLOCK_SIZE as usize).enumerate() {
            if let Some(blk) = self.store.stored_block(VOLUME, b as u64) {
                at.copy_from_slice(&blk.data);
            }
        }
        out
    }

    /// What every request goes through first: the delay, then the liveness check.
    async fn enter(&self) -> Result<()> {
        let delay = self.switches().delay;
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        if self.switches().down {
            return Err(Error::Unavailable(format!("replica {} is down", self.name)));
        }
        Ok(())
    }

    /// Serves one request from the store, as the replica service does.
    async fn call<T>(&self, f: impl FnOnce(&MemStore) -> Result<T>) -> Result<T> {
        self.enter().await?;
        f(&self.store)
    }

    /// [`enter`](Self::enter) for a request that changes data.
    async fn enter_write(&self) -> Result<()> {
        self.enter().await?;
        if self.switches().fail_writes {
            return Err(Error::io(format!("replica {}", self.name), std::io::Error::other("injected write failure")));
        }
        Ok(())
    }

    fn count(&self, f: impl FnOnce(&mut MemStats)) {
        f(&mut self.switches().stats);
    }

    async fn write(&self, epoch: u64, req: &WriteReq) -> Result<WriteAck> {
        let delay = self.switches().write_delay;
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        self.enter_write().await?;
        let durable_seq =
            self.store.write(VOLUME, Epoch(epoch), ids::Seq(req.seq), Offset(req.offset), &req.data, req.fua)?;
        self.count(|s| s.writes += 1);
        Ok(WriteAck { seq: req.seq, durable_seq: durable_seq.get() })
    }

    /// Applies resync chunks as plain writes and trims, with no seq guard.
    fn apply_naively(&self, epoch: u64, chunks: &[store::ResyncChunk]) -> Result<u64> {
        for c in chunks {
            match &c.data {
                store::ChunkData::Data(d) => {
                    self.store.write(VOLUME, Epoch(epoch), ids::Seq(c.seq), Offset(c.offset), d, false).map(drop)?
                }
                store::ChunkData::Zero => {
                    self.store.trim(VOLUME, Epoch(epoch), ids::Seq(c.seq), Offset(c.offset), BLOCK_SIZE)?
                }
                store::ChunkData::Trim(len) => {
                    self.store.trim(VOLUME, Epoch(epoch), ids::Seq(c.seq), Offset(c.offset), *len)?
                }
            }
        }
        Ok(chunks.len() as u64)
    }
}

impl ReplicaTransport for MemReplica {
    fn name(&self) -> &str {
        &self.name
    }

    async fn state(&self) -> Result<ReplicaSeqs> {
        self.call(|s| s.state(VOLUME).map(ReplicaSeqs::from)).await
    }

    async fn open(&self, claim: Claim) -> Result<ReplicaSeqs> {
        self.call(|s| s.claim(VOLUME, &claim).map(ReplicaSeqs::from)).await
    }

    async fn ping(&self, epoch: Epoch) -> Result<ReplicaSeqs> {
        let st = self.call(|s| s.state(VOLUME)).await?;
        store::check_epoch(VOLUME, st.epoch, epoch.get())?;
        Ok(st.into())
    }

    async fn write_stream(&self, epoch: Epoch) -> Result<WriteStream> {
        self.ping(epoch).await?;
        // Deeper than the link's in-flight limit: sending never waits for unread acks.
        let depth = 2 * super::link::MAX_IN_FLIGHT;
        let (tx, mut rx) = mpsc::channel::<WriteReq>(depth);
        let (atx, arx) = mpsc::channel::<Result<WriteAck>>(depth);
        let me = self.clone();
        tokio::spawn(async move {
            while let Some(req) = rx.recv().await {
                let res = me.write(epoch.get(), &req).await;
                let failed = res.is_err();
                // After a failed write the stream ends, as the service's does.
                if atx.send(res).await.is_err() || failed {
                    break;
                }
            }
        });
        Ok(WriteStream { requests: tx, acks: ReceiverStream::new(arx).boxed() })
    }

    async fn read(&self, epoch: Epoch, offset: Offset, len: u64) -> Result<Vec<u8>> {
        self.call(|s| s.read(VOLUME, epoch, offset, len)).await
    }

    async fn flush(&self, epoch: Epoch) -> Result<Seq> {
        self.call(|s| s.flush(VOLUME, epoch)).await.map(ids::Seq::get)
    }

    async fn trim(&self, epoch: Epoch, seq: Seq, offset: Offset, len: u64) -> Result<()> {
        self.enter_write().await?;
        self.store.trim(VOLUME, epoch, ids::Seq(seq), offset, len)?;
        self.count(|s| s.writes += 1);
        Ok(())
    }

    async fn resync_stream(
        &self,
        epoch: Epoch,
        since: Seq,
        resume: Option<(u64, Seq)>,
    ) -> Result<BoxStream<'static, Result<ResyncChunk>>> {
        self.enter().await?;
        if self.switches().fail_resync_source {
            return Err(Error::io(format!("replica {}", self.name), std::io::Error::other("injected resync failure")));
        }
        let changes = match resume {
            Some(split) => self.store.changes_since_split(VOLUME, epoch, ids::Seq(since), split)?,
            None => self.store.changes_since(VOLUME, epoch, ids::Seq(since))?,
        };
        // Like the replica service: the stream ends with the first block that fails its
        // checksum.
        let mut chunks = Vec::with_capacity(changes.len());
        for c in changes {
            let chunk = match c {
                Change::Trim { offset, len, seq } => Ok(ResyncChunk { offset, seq, data: ChunkData::Trim(len) }),
                Change::Block { offset, seq } => self
                    .store
                    .read(VOLUME, epoch, Offset(offset), BLOCK_SIZE)
                    .map(|d| ResyncChunk { offset, seq, data: ChunkData::Data(d.into()) }),
            };
            let failed = chunk.is_err();
            chunks.push(chunk);
            if failed {
                break;
            }
        }
        Ok(stream::iter(chunks).boxed())
    }

    async fn begin_resync(
        &self,
        epoch: Epoch,
        from_seq: Seq,
        resume: bool,
        history: History,
    ) -> Result<Option<(u64, Seq)>> {
        let mark_delay = self.switches().mark_delay;
        tokio::time::sleep(mark_delay).await;
        self.call(|s| s.begin_resync(VOLUME, epoch, ids::Seq(from_seq), resume, history)).await.map(|st| st.resync_done)
    }

    async fn set_history(&self, epoch: Epoch, history: History) -> Result<()> {
        self.call(|s| s.set_history(VOLUME, epoch, history).map(drop)).await
    }

    async fn checkpoint_resync(&self, epoch: Epoch, offset: Offset) -> Result<()> {
        self.call(|s| s.checkpoint_resync(VOLUME, epoch, offset)).await?;
        self.count(|s| s.checkpoints += 1);
        Ok(())
    }

    async fn apply_resync(&self, epoch: Epoch, chunks: Vec<ResyncChunk>) -> Result<u64> {
        self.enter_write().await?;
        let chunks: Vec<store::ResyncChunk> = chunks.into_iter().map(store::ResyncChunk::from).collect();
        let applied = if self.switches().naive_resync {
            self.apply_naively(epoch.get(), &chunks)?
        } else {
            self.store.apply_resync(VOLUME, epoch, &chunks)?.applied
        };
        self.count(|s| s.resync_writes += chunks.len() as u64);
        Ok(applied)
    }

    async fn end_resync(&self, epoch: Epoch) -> Result<Seq> {
        self.call(|s| s.end_resync(VOLUME, epoch)).await.map(|st| st.durable_seq)
    }

    async fn create_snapshot(&self, epoch: Epoch, snap: SnapshotInfo) -> Result<SnapshotInfo> {
        self.call(|s| s.create_snapshot(VOLUME, epoch, snap)).await
    }

    async fn delete_snapshot(&self, epoch: Epoch, name: &str) -> Result<bool> {
        self.call(|s| s.delete_snapshot(VOLUME, epoch, name)).await
    }

    async fn list_snapshots(&self) -> Result<Vec<SnapshotInfo>> {
        self.call(|s| s.list_snapshots(VOLUME)).await
    }

    async fn install_snapshot(
        &self,
        epoch: Epoch,
        snap: SnapshotInfo,
        blocks: Vec<(u64, Option<Vec<u8>>)>,
        last: bool,
    ) -> Result<()> {
        self.call(|s| s.install_snapshot(VOLUME, epoch, snap, &blocks, last).map(drop)).await
    }

    async fn expand(&self, epoch: Epoch, new_size: u64) -> Result<()> {
        self.call(|s| s.expand(VOLUME, epoch, new_size).map(drop)).await
    }

    async fn read_snapshot(&self, name: &str, offset: Offset, len: u64) -> Result<Vec<u8>> {
        self.call(|s| s.read_snapshot(VOLUME, name, offset, len)).await
    }

    async fn changed_blocks(&self, from: Option<&str>, to: Option<&str>) -> Result<Vec<(u64, u64)>> {
        Ok(block_runs(self.call(|s| s.changed_blocks(VOLUME, from, to)).await?))
    }
}

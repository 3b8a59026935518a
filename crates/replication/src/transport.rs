//! `ReplicaTransport`: how the runtime talks to one replica of a volume.
//!
//! Two implementations: [`GrpcReplica`] (the replica service over tonic; the real one) and
//! [`MemReplica`] (a `MemStore` served in memory, with switches to delay, fail, kill,
//! crash and corrupt it; for tests of the replication runtime).
//!
//! Ordering contract: requests sent on one [`WriteStream`] are applied in order and
//! answered in order. Unary calls (`trim`, `flush`, `apply_resync`, `end_resync`) are not
//! ordered against the stream; the runtime issues them only when the stream has nothing in
//! flight. A `read` may run beside the stream: it sees every write acked before it was
//! sent, and may or may not see those in flight (the scrub waits for the acks of the ones
//! overlapping its range).

use std::future::Future;

use bytes::Bytes;
use futures::stream::BoxStream;
use tokio::sync::mpsc;

pub use super::grpc_replica::GrpcReplica;
pub use super::local_replica::LocalReplica;
#[cfg(any(test, feature = "testing"))]
pub use super::mem_replica::{MemReplica, MemStats};
use super::types::{History, ReplicaSeqs, Seq};
use hlstore_core::error::Result;
use hlstore_core::{Epoch, Offset};
pub use hlstore_store::{Claim, ClaimMode, SnapshotInfo};

/// One request on a replica's write stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriteReq {
    pub seq: Seq,
    pub offset: u64,
    pub data: Bytes,
    /// Durable before the ack.
    pub fua: bool,
}

/// A replica's answer to one write: it applied everything up to `seq`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriteAck {
    pub seq: Seq,
    pub durable_seq: Seq,
}

/// An open write stream: requests in, one ack per request out, in order. Dropping the
/// sender ends the stream.
pub struct WriteStream {
    pub requests: mpsc::Sender<WriteReq>,
    pub acks: BoxStream<'static, Result<WriteAck>>,
}

/// The payload of a resync chunk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChunkData {
    /// One block of data.
    Data(Bytes),
    /// One block that reads as zeroes (unallocated).
    Zero,
    /// A deallocated range of this many bytes.
    Trim(u64),
}

/// One unit of a resync stream: the current content of a block (or a trimmed range) and
/// the seq that wrote it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResyncChunk {
    pub offset: u64,
    pub seq: Seq,
    pub data: ChunkData,
}

impl From<hlstore_store::ResyncChunk> for ResyncChunk {
    fn from(c: hlstore_store::ResyncChunk) -> Self {
        let data = match c.data {
            hlstore_store::ChunkData::Data(d) => ChunkData::Data(d),
            hlstore_store::ChunkData::Zero => ChunkData::Zero,
            hlstore_store::ChunkData::Trim(len) => ChunkData::Trim(len),
        };
        Self { offset: c.offset, seq: c.seq, data }
    }
}

impl From<ResyncChunk> for hlstore_store::ResyncChunk {
    fn from(c: ResyncChunk) -> Self {
        let data = match c.data {
            ChunkData::Data(d) => hlstore_store::ChunkData::Data(d),
            ChunkData::Zero => hlstore_store::ChunkData::Zero,
            ChunkData::Trim(len) => hlstore_store::ChunkData::Trim(len),
        };
        Self { offset: c.offset, seq: c.seq, data }
    }
}

/// The operations the replication runtime needs from one replica of one volume.
pub trait ReplicaTransport: Send + Sync + 'static {
    /// The replica's node name, for logs.
    fn name(&self) -> &str;
    fn state(&self) -> impl Future<Output = Result<ReplicaSeqs>> + Send;
    /// Claims the replica for an engine (see [`Claim`]): `StaleEpoch` if its epoch is
    /// older than the replica's, `Conflict` if a compare-and-set lost.
    fn open(&self, claim: Claim) -> impl Future<Output = Result<ReplicaSeqs>> + Send;
    /// Checks that the replica still accepts `epoch` (`StaleEpoch` once a newer engine
    /// claimed it). Renews the engine's read lease; no disk I/O.
    fn ping(&self, epoch: Epoch) -> impl Future<Output = Result<ReplicaSeqs>> + Send;
    fn write_stream(&self, epoch: Epoch) -> impl Future<Output = Result<WriteStream>> + Send;
    fn read(&self, epoch: Epoch, offset: Offset, len: u64) -> impl Future<Output = Result<Vec<u8>>> + Send;
    /// Makes everything applied durable; returns the durable seq.
    fn flush(&self, epoch: Epoch) -> impl Future<Output = Result<Seq>> + Send;
    /// Deallocates a range.
    fn trim(&self, epoch: Epoch, seq: Seq, offset: Offset, len: u64) -> impl Future<Output = Result<()>> + Send;
    /// Every trim and block whose content was written after `since` (trims first, then
    /// blocks in offset order); with `resume = Some((below, after))`, blocks below `below`
    /// only if written after `after`.
    fn resync_stream(
        &self,
        epoch: Epoch,
        since: Seq,
        resume: Option<(u64, Seq)>,
    ) -> impl Future<Output = Result<BoxStream<'static, Result<ResyncChunk>>>> + Send;
    /// Marks the replica incomplete from `from_seq` (durably, with `history` unless it is
    /// empty) until `end_resync`. With `resume`, returns the checkpoint `(offset, seq)` an
    /// unfinished resync from the same `from_seq` left (see `checkpoint_resync`).
    fn begin_resync(
        &self,
        epoch: Epoch,
        from_seq: Seq,
        resume: bool,
        history: History,
    ) -> impl Future<Output = Result<Option<(u64, Seq)>>> + Send;
    /// Records (durably) the epoch history the replica's data belongs to from now on.
    /// `Unsupported` from a replica that keeps no history.
    fn set_history(&self, epoch: Epoch, history: History) -> impl Future<Output = Result<()>> + Send;
    /// Flushes, then records that every block below `offset` is complete up to the durable
    /// seq.
    fn checkpoint_resync(&self, epoch: Epoch, offset: Offset) -> impl Future<Output = Result<()>> + Send;
    /// Flushes, then records snapshot `snap` at `snap.seq` (ordered after every write up
    /// to it by the caller). Idempotent by name.
    fn create_snapshot(&self, epoch: Epoch, snap: SnapshotInfo) -> impl Future<Output = Result<SnapshotInfo>> + Send;
    /// Deletes a snapshot; `false` if there was none.
    fn delete_snapshot(&self, epoch: Epoch, name: &str) -> impl Future<Output = Result<bool>> + Send;
    fn list_snapshots(&self) -> impl Future<Output = Result<Vec<SnapshotInfo>>> + Send;
    /// Resync of a snapshot the replica lacks (see `ReplicaStore::install_snapshot`).
    fn install_snapshot(
        &self,
        epoch: Epoch,
        snap: SnapshotInfo,
        blocks: Vec<(u64, Option<Vec<u8>>)>,
        last: bool,
    ) -> impl Future<Output = Result<()>> + Send;
    /// Grows the replica to `new_size`.
    fn expand(&self, epoch: Epoch, new_size: u64) -> impl Future<Output = Result<()>> + Send;
    fn read_snapshot(&self, name: &str, offset: Offset, len: u64) -> impl Future<Output = Result<Vec<u8>>> + Send;
    /// Runs `(first block, count)` that may differ between snapshot `from` (None: empty)
    /// and `to` (None: live).
    fn changed_blocks(
        &self,
        from: Option<&str>,
        to: Option<&str>,
    ) -> impl Future<Output = Result<Vec<(u64, u64)>>> + Send;
    /// Applies copied chunks; a chunk never replaces a block written at a newer seq (see
    /// [`crate`], "Resync ordering"). Returns how many were applied.
    fn apply_resync(&self, epoch: Epoch, chunks: Vec<ResyncChunk>) -> impl Future<Output = Result<u64>> + Send;
    /// Flushes and clears the resync mark; returns the durable seq.
    fn end_resync(&self, epoch: Epoch) -> impl Future<Output = Result<Seq>> + Send;
}

/// One of two transports: a volume's replicas are reached in process ([`LocalReplica`], the
/// engine's own node) or over gRPC ([`GrpcReplica`]), and the runtime takes one type.
#[derive(Debug, Clone)]
pub enum AnyReplica<L, R> {
    Local(L),
    Remote(R),
}

macro_rules! either {
    ($self:ident, $t:ident => $e:expr) => {
        match $self {
            AnyReplica::Local($t) => $e,
            AnyReplica::Remote($t) => $e,
        }
    };
}

impl<L: ReplicaTransport, R: ReplicaTransport> ReplicaTransport for AnyReplica<L, R> {
    fn name(&self) -> &str {
        either!(self, t => t.name())
    }
    async fn state(&self) -> Result<ReplicaSeqs> {
        either!(self, t => t.state().await)
    }
    async fn open(&self, claim: Claim) -> Result<ReplicaSeqs> {
        either!(self, t => t.open(claim).await)
    }
    async fn ping(&self, epoch: Epoch) -> Result<ReplicaSeqs> {
        either!(self, t => t.ping(epoch).await)
    }
    async fn write_stream(&self, epoch: Epoch) -> Result<WriteStream> {
        either!(self, t => t.write_stream(epoch).await)
    }
    async fn read(&self, epoch: Epoch, offset: Offset, len: u64) -> Result<Vec<u8>> {
        either!(self, t => t.read(epoch, offset, len).await)
    }
    async fn flush(&self, epoch: Epoch) -> Result<Seq> {
        either!(self, t => t.flush(epoch).await)
    }
    async fn trim(&self, epoch: Epoch, seq: Seq, offset: Offset, len: u64) -> Result<()> {
        either!(self, t => t.trim(epoch, seq, offset, len).await)
    }
    async fn resync_stream(
        &self,
        epoch: Epoch,
        since: Seq,
        resume: Option<(u64, Seq)>,
    ) -> Result<BoxStream<'static, Result<ResyncChunk>>> {
        either!(self, t => t.resync_stream(epoch, since, resume).await)
    }
    async fn begin_resync(
        &self,
        epoch: Epoch,
        from_seq: Seq,
        resume: bool,
        history: History,
    ) -> Result<Option<(u64, Seq)>> {
        either!(self, t => t.begin_resync(epoch, from_seq, resume, history).await)
    }
    async fn set_history(&self, epoch: Epoch, history: History) -> Result<()> {
        either!(self, t => t.set_history(epoch, history).await)
    }
    async fn checkpoint_resync(&self, epoch: Epoch, offset: Offset) -> Result<()> {
        either!(self, t => t.checkpoint_resync(epoch, offset).await)
    }
    async fn create_snapshot(&self, epoch: Epoch, snap: SnapshotInfo) -> Result<SnapshotInfo> {
        either!(self, t => t.create_snapshot(epoch, snap).await)
    }
    async fn delete_snapshot(&self, epoch: Epoch, name: &str) -> Result<bool> {
        either!(self, t => t.delete_snapshot(epoch, name).await)
    }
    async fn list_snapshots(&self) -> Result<Vec<SnapshotInfo>> {
        either!(self, t => t.list_snapshots().await)
    }
    async fn install_snapshot(
        &self,
        epoch: Epoch,
        snap: SnapshotInfo,
        blocks: Vec<(u64, Option<Vec<u8>>)>,
        last: bool,
    ) -> Result<()> {
        either!(self, t => t.install_snapshot(epoch, snap, blocks, last).await)
    }
    async fn expand(&self, epoch: Epoch, new_size: u64) -> Result<()> {
        either!(self, t => t.expand(epoch, new_size).await)
    }
    async fn read_snapshot(&self, name: &str, offset: Offset, len: u64) -> Result<Vec<u8>> {
        either!(self, t => t.read_snapshot(name, offset, len).await)
    }
    async fn changed_blocks(&self, from: Option<&str>, to: Option<&str>) -> Result<Vec<(u64, u64)>> {
        either!(self, t => t.changed_blocks(from, to).await)
    }
    async fn apply_resync(&self, epoch: Epoch, chunks: Vec<ResyncChunk>) -> Result<u64> {
        either!(self, t => t.apply_resync(epoch, chunks).await)
    }
    async fn end_resync(&self, epoch: Epoch) -> Result<Seq> {
        either!(self, t => t.end_resync(epoch).await)
    }
}

//! [`LocalReplica`]: the replica on the engine's own node, served in process.
//!
//! The same rules as the replica service (`rpc/service.rs`): every call is the store's, on
//! the blocking pool; a write stream is applied with the service's group commit and a
//! resync stream produced by the service's source (both in `serve.rs`), and the node's
//! replica counters count these calls too. What it skips: protobuf encoding, HTTP/2,
//! loopback TCP and one payload copy per write.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use futures::stream::{BoxStream, StreamExt};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::serve::{self, StreamWrite};
use super::transport::{Claim, ReplicaTransport, ResyncChunk, SnapshotInfo, WriteAck, WriteReq, WriteStream};
use super::types::{block_runs, History, ReplicaSeqs, Seq};
use crate::rpc::ServiceStats;
use hlstore_core::error::{Error, Result};
use hlstore_core::{ids, Epoch, Offset};
use hlstore_store::{self as store, ReplicaStore};

/// A replica of `volume` in this process's store.
/// Reads up to this size are tried inline from memory (`ReplicaStore::try_read_cached`).
const INLINE_READ_MAX: u64 = 64 << 10;

pub struct LocalReplica<S> {
    name: String,
    volume: String,
    store: Arc<S>,
    stats: Arc<ServiceStats>,
}

impl<S> Clone for LocalReplica<S> {
    fn clone(&self) -> Self {
        Self {
            name: self.name.clone(),
            volume: self.volume.clone(),
            store: self.store.clone(),
            stats: self.stats.clone(),
        }
    }
}

impl<S> std::fmt::Debug for LocalReplica<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalReplica").field("name", &self.name).field("volume", &self.volume).finish_non_exhaustive()
    }
}

impl<S: ReplicaStore> LocalReplica<S> {
    /// The replica of `volume` on node `name`, in `store`; calls are counted in `stats`
    /// (the node's replica service counters).
    pub fn new(name: impl Into<String>, volume: impl Into<String>, store: Arc<S>, stats: Arc<ServiceStats>) -> Self {
        Self { name: name.into(), volume: volume.into(), store, stats }
    }

    async fn call<T: Send + 'static>(&self, f: impl FnOnce(&S, &str) -> Result<T> + Send + 'static) -> Result<T> {
        let volume = self.volume.clone();
        let res = serve::blocking(&self.store, move |s| f(s, &volume)).await;
        if let Err(e) = &res {
            serve::count_error(&self.stats, e);
        }
        res
    }
}

impl<S: ReplicaStore> ReplicaTransport for LocalReplica<S> {
    fn name(&self) -> &str {
        &self.name
    }

    async fn state(&self) -> Result<ReplicaSeqs> {
        self.call(|s, v| s.state(v).map(ReplicaSeqs::from)).await
    }

    async fn open(&self, claim: Claim) -> Result<ReplicaSeqs> {
        self.call(move |s, v| s.claim(v, &claim).map(ReplicaSeqs::from)).await
    }

    async fn ping(&self, epoch: Epoch) -> Result<ReplicaSeqs> {
        let st = self.call(|s, v| s.state(v)).await?;
        store::check_epoch(&self.volume, st.epoch, epoch.get())?;
        Ok(st.into())
    }

    async fn write_stream(&self, epoch: Epoch) -> Result<WriteStream> {
        let depth = 2 * super::link::MAX_IN_FLIGHT;
        let (tx, rx) = mpsc::channel::<WriteReq>(depth);
        let (atx, arx) = mpsc::channel(depth);
        let volume = self.volume.clone();
        let incoming = ReceiverStream::new(rx).map(move |r| {
            Some(StreamWrite {
                volume: volume.clone(),
                epoch: epoch.get(),
                seq: r.seq,
                offset: r.offset,
                data: r.data,
                fua: r.fua,
            })
        });
        tokio::spawn(serve::apply_write_stream(self.store.clone(), incoming, atx, self.stats.clone()));
        let acks = ReceiverStream::new(arx).map(|a| a.map(|(seq, durable_seq)| WriteAck { seq, durable_seq })).boxed();
        Ok(WriteStream { requests: tx, acks })
    }

    async fn read(&self, epoch: Epoch, offset: Offset, len: u64) -> Result<Vec<u8>> {
        // A small read whose metadata and data are in memory is answered here: a hand-off to
        // the blocking pool and back costs more than the read (thread wake-ups dominated
        // 4 KiB random reads). Anything else, errors included, goes the blocking way.
        if len <= INLINE_READ_MAX {
            if let Ok(Some(data)) = self.store.try_read_cached(&self.volume, epoch, offset, len) {
                self.stats.reads.fetch_add(1, Relaxed);
                self.stats.read_bytes.fetch_add(len, Relaxed);
                return Ok(data);
            }
        }
        let data = self.call(move |s, v| s.read(v, epoch, offset, len)).await?;
        self.stats.reads.fetch_add(1, Relaxed);
        self.stats.read_bytes.fetch_add(len, Relaxed);
        Ok(data)
    }

    async fn flush(&self, epoch: Epoch) -> Result<Seq> {
        let d = self.call(move |s, v| s.flush(v, epoch)).await?;
        self.stats.flushes.fetch_add(1, Relaxed);
        Ok(d.get())
    }

    async fn trim(&self, epoch: Epoch, seq: Seq, offset: Offset, len: u64) -> Result<()> {
        self.call(move |s, v| s.trim(v, epoch, ids::Seq(seq), offset, len)).await?;
        self.stats.trims.fetch_add(1, Relaxed);
        Ok(())
    }

    async fn resync_stream(
        &self,
        epoch: Epoch,
        since: Seq,
        resume: Option<(u64, Seq)>,
    ) -> Result<BoxStream<'static, Result<ResyncChunk>>> {
        let changes = serve::resync_changes(&self.store, &self.volume, epoch.get(), since, resume).await?;
        let chunks =
            serve::resync_source(self.store.clone(), self.volume.clone(), epoch.get(), changes, self.stats.clone());
        Ok(ReceiverStream::new(chunks).map(|c| c.map(ResyncChunk::from)).boxed())
    }

    async fn begin_resync(
        &self,
        epoch: Epoch,
        from_seq: Seq,
        resume: bool,
        history: History,
    ) -> Result<Option<(u64, Seq)>> {
        let st = self.call(move |s, v| s.begin_resync(v, epoch, ids::Seq(from_seq), resume, history)).await?;
        tracing::info!(volume.id = %self.volume, epoch = epoch.get(), from_seq, resume, checkpoint = ?st.resync_done, "resync into this replica begins");
        Ok(st.resync_done)
    }

    async fn set_history(&self, epoch: Epoch, history: History) -> Result<()> {
        self.call(move |s, v| s.set_history(v, epoch, history).map(drop)).await
    }

    async fn checkpoint_resync(&self, epoch: Epoch, offset: Offset) -> Result<()> {
        self.call(move |s, v| s.checkpoint_resync(v, epoch, offset).map(drop)).await
    }

    async fn apply_resync(&self, epoch: Epoch, chunks: Vec<ResyncChunk>) -> Result<u64> {
        let chunks: Vec<store::ResyncChunk> = chunks.into_iter().map(store::ResyncChunk::from).collect();
        let st = self.call(move |s, v| s.apply_resync(v, epoch, &chunks)).await?;
        self.stats.resync_chunks_applied.fetch_add(st.applied, Relaxed);
        Ok(st.applied)
    }

    async fn end_resync(&self, epoch: Epoch) -> Result<Seq> {
        self.call(move |s, v| s.end_resync(v, epoch)).await.map(|st| st.durable_seq)
    }

    async fn create_snapshot(&self, epoch: Epoch, snap: SnapshotInfo) -> Result<SnapshotInfo> {
        self.call(move |s, v| s.create_snapshot(v, epoch, snap)).await
    }

    async fn delete_snapshot(&self, epoch: Epoch, name: &str) -> Result<bool> {
        let name = name.to_string();
        self.call(move |s, v| s.delete_snapshot(v, epoch, &name)).await
    }

    async fn list_snapshots(&self) -> Result<Vec<SnapshotInfo>> {
        self.call(|s, v| s.list_snapshots(v)).await
    }

    async fn install_snapshot(
        &self,
        epoch: Epoch,
        snap: SnapshotInfo,
        blocks: Vec<(u64, Option<Vec<u8>>)>,
        last: bool,
    ) -> Result<()> {
        self.call(move |s, v| s.install_snapshot(v, epoch, snap, &blocks, last).map(drop)).await
    }

    async fn expand(&self, epoch: Epoch, new_size: u64) -> Result<()> {
        self.call(move |s, v| s.expand(v, epoch, new_size).map(drop)).await
    }

    async fn read_snapshot(&self, name: &str, offset: Offset, len: u64) -> Result<Vec<u8>> {
        if len > crate::rpc::MAX_SNAPSHOT_READ {
            return Err(Error::InvalidArgument(format!(
                "read of {len} bytes: at most {} per call",
                crate::rpc::MAX_SNAPSHOT_READ
            )));
        }
        let name = name.to_string();
        self.call(move |s, v| s.read_snapshot(v, &name, offset, len)).await
    }

    async fn changed_blocks(&self, from: Option<&str>, to: Option<&str>) -> Result<Vec<(u64, u64)>> {
        let (from, to) = (from.map(str::to_string), to.map(str::to_string));
        let blocks = self.call(move |s, v| s.changed_blocks(v, from.as_deref(), to.as_deref())).await?;
        Ok(block_runs(blocks))
    }
}

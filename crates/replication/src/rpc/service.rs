//! The tonic implementation of `hlstore.replica.v1.Replica` over a `ReplicaStore`.
//!
//! Store calls are blocking (disk I/O) and run on the blocking pool. Writes on one `Write`
//! stream are applied strictly in arrival order and acknowledged in that order.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use futures::Stream;
use hlstore_core::identity::PeerIdentity;
use hlstore_proto::replica as pb;
use hlstore_proto::replica::replica_server::{Replica, ReplicaServer};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status, Streaming};

use super::convert::{self, volume_id};
use super::status::to_status;
use crate::serve::{self, StreamWrite};
use hlstore_core::error::{Error, Result};
use hlstore_core::{Epoch, Offset, Seq};
use hlstore_store::{ReplicaStore, ResyncChunk, BLOCK_SIZE};

/// Counters of the service, exported as metrics by the node agent.
#[derive(Debug, Default)]
pub struct ServiceStats {
    pub writes: AtomicU64,
    pub write_bytes: AtomicU64,
    pub reads: AtomicU64,
    pub read_bytes: AtomicU64,
    pub flushes: AtomicU64,
    pub trims: AtomicU64,
    pub stale_epoch_rejections: AtomicU64,
    pub corruptions: AtomicU64,
    /// Blocks sent by `Resync` (source side).
    pub resync_blocks_sent: AtomicU64,
    /// Chunks applied by `ApplyResync` (target side).
    pub resync_chunks_applied: AtomicU64,
}

/// The replica service. Cheap to clone.
pub struct ReplicaService<S> {
    store: Arc<S>,
    stats: Arc<ServiceStats>,
    /// Where the store's space is measured, and the bytes reserved there for other uses.
    space: Option<(std::path::PathBuf, u64)>,
}

impl<S> Clone for ReplicaService<S> {
    fn clone(&self) -> Self {
        Self { store: self.store.clone(), stats: self.stats.clone(), space: self.space.clone() }
    }
}

impl<S: ReplicaStore> ReplicaService<S> {
    pub fn new(store: Arc<S>) -> Self {
        Self { store, stats: Arc::default(), space: None }
    }

    /// `ListReplicas` reports the free space of the filesystem holding `dir`, less `reserved`.
    pub fn with_space(mut self, dir: std::path::PathBuf, reserved: u64) -> Self {
        self.space = Some((dir, reserved));
        self
    }

    pub fn stats(&self) -> Arc<ServiceStats> {
        self.stats.clone()
    }

    pub fn store(&self) -> &Arc<S> {
        &self.store
    }

    /// The tonic server of this service, with hlstore's message size limits.
    pub fn into_server(self) -> ReplicaServer<Self> {
        ReplicaServer::new(self)
            .max_decoding_message_size(super::MAX_MESSAGE_BYTES)
            .max_encoding_message_size(super::MAX_MESSAGE_BYTES)
    }

    /// Runs a blocking store call on the blocking pool and maps its error.
    async fn call<T: Send + 'static>(&self, f: impl FnOnce(&S) -> Result<T> + Send + 'static) -> Result<T, Status> {
        serve::blocking(&self.store, f).await.map_err(|e| {
            serve::count_error(&self.stats, &e);
            to_status(&e)
        })
    }
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// A stream fed by a task: `f` gets the sender.
fn async_stream<T: Send + 'static, F>(f: impl FnOnce(mpsc::Sender<Result<T, Status>>) -> F) -> BoxStream<T>
where
    F: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(f(tx));
    Box::pin(ReceiverStream::new(rx))
}

/// An engine claims replicas for its own node only: over TLS the caller's node
/// certificate must name the node the claim is made for (a node cannot take volumes over
/// in another node's name). A release (detach) names no node: it only clears a claim whose
/// exact (epoch, owner) the caller holds. Plaintext callers (`--insecure`) carry no identity.
fn claimant_is_caller(caller: Option<&PeerIdentity>, owner_node: &str, release: bool) -> Result<(), Status> {
    if release && owner_node.is_empty() {
        return Ok(());
    }
    match caller {
        Some(id) if id.node.as_deref() != Some(owner_node) => Err(Status::permission_denied(format!(
            "permission denied: a {id} cannot claim replicas for node {owner_node:?}"
        ))),
        _ => Ok(()),
    }
}

#[tonic::async_trait]
impl<S: ReplicaStore> Replica for ReplicaService<S> {
    async fn create_replica(
        &self,
        req: Request<pb::CreateReplicaRequest>,
    ) -> Result<Response<pb::ReplicaInfo>, Status> {
        let record = convert::record_from_pb(req.into_inner().record)?;
        let info = self.call(move |s| s.create(record)).await?;
        Ok(Response::new(convert::info_to_pb(&info)))
    }

    async fn delete_replica(
        &self,
        req: Request<pb::DeleteReplicaRequest>,
    ) -> Result<Response<pb::DeleteReplicaResponse>, Status> {
        let r = req.into_inner();
        let v = volume_id(&r.volume_id)?.to_string();
        let epoch = r.epoch;
        let existed = self
            .call(move |s| {
                match s.state(&v) {
                    Ok(st) if epoch < st.epoch => {
                        return Err(Error::StaleEpoch { volume: v.clone(), got: epoch, current: st.epoch })
                    }
                    _ => {}
                }
                s.delete(&v)
            })
            .await?;
        Ok(Response::new(pb::DeleteReplicaResponse { existed }))
    }

    async fn list_replicas(
        &self,
        _req: Request<pb::ListReplicasRequest>,
    ) -> Result<Response<pb::ListReplicasResponse>, Status> {
        let list = self.call(|s| s.list()).await?;
        let space = self
            .space
            .as_ref()
            .and_then(|(dir, reserved)| hlstore_core::space::fs_space(dir).map(|s| s.minus_reserved(*reserved)))
            .unwrap_or_default();
        Ok(Response::new(pb::ListReplicasResponse {
            replicas: list.iter().map(convert::info_to_pb).collect(),
            capacity_bytes: space.total,
            available_bytes: space.available,
        }))
    }

    async fn open(&self, req: Request<pb::OpenRequest>) -> Result<Response<pb::ReplicaState>, Status> {
        let caller = req.extensions().get::<PeerIdentity>().cloned();
        let r = req.into_inner();
        let release = r.mode == pb::open_request::Mode::Release as i32;
        claimant_is_caller(caller.as_ref(), &r.owner_node, release)?;
        let v = volume_id(&r.volume_id)?.to_string();
        let vv = v.clone();
        let claim = convert::claim_from_pb(&r)?;
        let st = self.call(move |s| s.claim(&vv, &claim)).await?;
        Ok(Response::new(convert::state_to_pb(&v, &st)))
    }

    async fn ping(&self, req: Request<pb::PingRequest>) -> Result<Response<pb::ReplicaState>, Status> {
        let r = req.into_inner();
        let v = volume_id(&r.volume_id)?.to_string();
        let vv = v.clone();
        let st = self.call(move |s| s.state(&vv)).await?;
        hlstore_store::check_epoch(&v, st.epoch, r.epoch).map_err(|e| to_status(&e))?;
        Ok(Response::new(convert::state_to_pb(&v, &st)))
    }

    async fn state(&self, req: Request<pb::StateRequest>) -> Result<Response<pb::ReplicaState>, Status> {
        let v = volume_id(&req.get_ref().volume_id)?.to_string();
        let vv = v.clone();
        let st = self.call(move |s| s.state(&vv)).await?;
        Ok(Response::new(convert::state_to_pb(&v, &st)))
    }

    type WriteStream = BoxStream<pb::WriteAck>;

    async fn write(&self, req: Request<Streaming<pb::WriteRequest>>) -> Result<Response<Self::WriteStream>, Status> {
        let incoming = req.into_inner().map(|m| {
            m.ok().map(|w| StreamWrite {
                volume: w.volume_id,
                epoch: w.epoch,
                seq: w.seq,
                offset: w.offset,
                data: w.data,
                fua: w.fua,
            })
        });
        let (tx, mut rx) = mpsc::channel(2 * serve::MAX_GROUP_WRITES);
        tokio::spawn(serve::apply_write_stream(self.store.clone(), Box::pin(incoming), tx, self.stats.clone()));
        let acks = async_stream(move |out| async move {
            while let Some(a) = rx.recv().await {
                let msg = a.map(|(seq, durable_seq)| pb::WriteAck { seq, durable_seq }).map_err(|e| to_status(&e));
                if out.send(msg).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(acks))
    }

    async fn read(&self, req: Request<pb::ReadRequest>) -> Result<Response<pb::ReadResponse>, Status> {
        let r = req.into_inner();
        volume_id(&r.volume_id)?;
        let data = self.call(move |s| s.read(&r.volume_id, Epoch(r.epoch), Offset(r.offset), r.length)).await?;
        self.stats.reads.fetch_add(1, Ordering::Relaxed);
        self.stats.read_bytes.fetch_add(data.len() as u64, Ordering::Relaxed);
        Ok(Response::new(pb::ReadResponse { data }))
    }

    async fn flush(&self, req: Request<pb::FlushRequest>) -> Result<Response<pb::FlushResponse>, Status> {
        let r = req.into_inner();
        volume_id(&r.volume_id)?;
        let durable_seq = self.call(move |s| s.flush(&r.volume_id, Epoch(r.epoch))).await?;
        self.stats.flushes.fetch_add(1, Ordering::Relaxed);
        Ok(Response::new(pb::FlushResponse { durable_seq: durable_seq.get() }))
    }

    async fn trim(&self, req: Request<pb::TrimRequest>) -> Result<Response<pb::WriteAck>, Status> {
        let r = req.into_inner();
        volume_id(&r.volume_id)?;
        let (v, seq) = (r.volume_id.clone(), r.seq);
        let st = self
            .call(move |s| {
                s.trim(&r.volume_id, Epoch(r.epoch), Seq(r.seq), Offset(r.offset), r.length)?;
                s.state(&v)
            })
            .await?;
        self.stats.trims.fetch_add(1, Ordering::Relaxed);
        Ok(Response::new(pb::WriteAck { seq, durable_seq: st.durable_seq }))
    }

    async fn expand(&self, req: Request<pb::ExpandRequest>) -> Result<Response<pb::ReplicaInfo>, Status> {
        let r = req.into_inner();
        volume_id(&r.volume_id)?;
        let info = self.call(move |s| s.expand(&r.volume_id, Epoch(r.epoch), r.new_size)).await?;
        Ok(Response::new(convert::info_to_pb(&info)))
    }

    async fn set_replica_set(
        &self,
        req: Request<pb::SetReplicaSetRequest>,
    ) -> Result<Response<pb::ReplicaInfo>, Status> {
        let r = req.into_inner();
        volume_id(&r.volume_id)?;
        if r.replica_set.is_empty() {
            return Err(Status::invalid_argument("replica_set must name at least one node"));
        }
        let info = self.call(move |s| s.set_replica_set(&r.volume_id, Epoch(r.epoch), r.replica_set)).await?;
        Ok(Response::new(convert::info_to_pb(&info)))
    }

    async fn set_labels(&self, req: Request<pb::SetLabelsRequest>) -> Result<Response<pb::ReplicaInfo>, Status> {
        let r = req.into_inner();
        volume_id(&r.volume_id)?;
        let labels = r.labels.into_iter().collect();
        let info = self.call(move |s| s.set_labels(&r.volume_id, labels)).await?;
        Ok(Response::new(convert::info_to_pb(&info)))
    }

    type ResyncStream = BoxStream<pb::ResyncChunk>;

    async fn resync(&self, req: Request<pb::ResyncRequest>) -> Result<Response<Self::ResyncStream>, Status> {
        let r = req.into_inner();
        let v = volume_id(&r.volume_id)?.to_string();
        let (vv, epoch) = (v.clone(), r.epoch);
        let resume = (r.resume_below != 0).then_some((r.resume_below, r.resume_seq));
        let changes = serve::resync_changes(&self.store, &vv, epoch, r.since_seq, resume).await.map_err(|e| {
            serve::count_error(&self.stats, &e);
            to_status(&e)
        })?;
        let mut chunks = serve::resync_source(self.store.clone(), v, epoch, changes, self.stats.clone());
        let out = async_stream(move |out| async move {
            while let Some(c) = chunks.recv().await {
                if out.send(c.map(convert::chunk_to_pb).map_err(|e| to_status(&e))).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(out))
    }

    async fn begin_resync(&self, req: Request<pb::BeginResyncRequest>) -> Result<Response<pb::ReplicaState>, Status> {
        let r = req.into_inner();
        let v = volume_id(&r.volume_id)?.to_string();
        let vv = v.clone();
        let (from_seq, resume, epoch) = (r.from_seq, r.resume, r.epoch);
        let history = convert::history_from_pb(&r.history)?;
        let st = self.call(move |s| s.begin_resync(&vv, Epoch(epoch), Seq(from_seq), resume, history)).await?;
        tracing::info!(volume.id = %v, epoch, from_seq, resume, checkpoint = ?st.resync_done, history = ?st.history, "resync into this replica begins");
        Ok(Response::new(convert::state_to_pb(&v, &st)))
    }

    async fn set_history(&self, req: Request<pb::SetHistoryRequest>) -> Result<Response<pb::ReplicaState>, Status> {
        let r = req.into_inner();
        let v = volume_id(&r.volume_id)?.to_string();
        let vv = v.clone();
        let history = convert::history_from_pb(&r.history)?;
        let st = self.call(move |s| s.set_history(&vv, Epoch(r.epoch), history)).await?;
        tracing::debug!(volume.id = %v, epoch = r.epoch, history = ?st.history, "epoch history recorded");
        Ok(Response::new(convert::state_to_pb(&v, &st)))
    }

    async fn checkpoint_resync(
        &self,
        req: Request<pb::CheckpointResyncRequest>,
    ) -> Result<Response<pb::ReplicaState>, Status> {
        let r = req.into_inner();
        let v = volume_id(&r.volume_id)?.to_string();
        let vv = v.clone();
        let st = self.call(move |s| s.checkpoint_resync(&vv, Epoch(r.epoch), Offset(r.offset))).await?;
        tracing::debug!(volume.id = %v, checkpoint = ?st.resync_done, "resync checkpoint recorded");
        Ok(Response::new(convert::state_to_pb(&v, &st)))
    }

    async fn apply_resync(
        &self,
        req: Request<pb::ApplyResyncRequest>,
    ) -> Result<Response<pb::ApplyResyncResponse>, Status> {
        let r = req.into_inner();
        volume_id(&r.volume_id)?;
        let chunks: Vec<ResyncChunk> = r.chunks.into_iter().map(convert::chunk_from_pb).collect();
        let stats = self.call(move |s| s.apply_resync(&r.volume_id, Epoch(r.epoch), &chunks)).await?;
        self.stats.resync_chunks_applied.fetch_add(stats.applied, Ordering::Relaxed);
        Ok(Response::new(pb::ApplyResyncResponse { applied: stats.applied, skipped_newer: stats.skipped_newer }))
    }

    async fn end_resync(&self, req: Request<pb::EndResyncRequest>) -> Result<Response<pb::ReplicaState>, Status> {
        let r = req.into_inner();
        let v = volume_id(&r.volume_id)?.to_string();
        let vv = v.clone();
        let st = self.call(move |s| s.end_resync(&vv, Epoch(r.epoch))).await?;
        Ok(Response::new(convert::state_to_pb(&v, &st)))
    }

    async fn create_snapshot(
        &self,
        req: Request<pb::CreateSnapshotRequest>,
    ) -> Result<Response<pb::SnapshotInfo>, Status> {
        let r = req.into_inner();
        volume_id(&r.volume_id)?;
        let snap = r.snapshot.ok_or_else(|| Status::invalid_argument("snapshot is required"))?;
        let snap = convert::snapshot_from_pb(snap);
        let got = self.call(move |s| s.create_snapshot(&r.volume_id, Epoch(r.epoch), snap)).await?;
        Ok(Response::new(convert::snapshot_to_pb(got)))
    }

    async fn delete_snapshot(
        &self,
        req: Request<pb::DeleteSnapshotRequest>,
    ) -> Result<Response<pb::DeleteSnapshotResponse>, Status> {
        let r = req.into_inner();
        volume_id(&r.volume_id)?;
        let existed = self.call(move |s| s.delete_snapshot(&r.volume_id, Epoch(r.epoch), &r.name)).await?;
        Ok(Response::new(pb::DeleteSnapshotResponse { existed }))
    }

    async fn list_snapshots(
        &self,
        req: Request<pb::ListSnapshotsRequest>,
    ) -> Result<Response<pb::ListSnapshotsResponse>, Status> {
        let r = req.into_inner();
        volume_id(&r.volume_id)?;
        let list = self.call(move |s| s.list_snapshots(&r.volume_id)).await?;
        Ok(Response::new(pb::ListSnapshotsResponse {
            snapshots: list.into_iter().map(convert::snapshot_to_pb).collect(),
        }))
    }

    async fn install_snapshot(
        &self,
        req: Request<pb::InstallSnapshotRequest>,
    ) -> Result<Response<pb::SnapshotInfo>, Status> {
        let r = req.into_inner();
        volume_id(&r.volume_id)?;
        let snap = r.snapshot.ok_or_else(|| Status::invalid_argument("snapshot is required"))?;
        let snap = convert::snapshot_from_pb(snap);
        let blocks = convert::snapshot_blocks_from_pb(r.blocks);
        let got = self.call(move |s| s.install_snapshot(&r.volume_id, Epoch(r.epoch), snap, &blocks, r.last)).await?;
        Ok(Response::new(convert::snapshot_to_pb(got)))
    }

    async fn read_snapshot(&self, req: Request<pb::ReadSnapshotRequest>) -> Result<Response<pb::ReadResponse>, Status> {
        let r = req.into_inner();
        volume_id(&r.volume_id)?;
        if r.length > super::MAX_SNAPSHOT_READ {
            return Err(Status::invalid_argument(format!(
                "read of {} bytes: at most {} per call",
                r.length,
                super::MAX_SNAPSHOT_READ
            )));
        }
        let data = self.call(move |s| s.read_snapshot(&r.volume_id, &r.name, Offset(r.offset), r.length)).await?;
        Ok(Response::new(pb::ReadResponse { data }))
    }

    async fn changed_blocks(
        &self,
        req: Request<pb::ChangedBlocksRequest>,
    ) -> Result<Response<pb::ChangedBlocksResponse>, Status> {
        let r = req.into_inner();
        volume_id(&r.volume_id)?;
        let (from, to) = (convert::opt_name(r.from), convert::opt_name(r.to));
        let blocks = self.call(move |s| s.changed_blocks(&r.volume_id, from.as_deref(), to.as_deref())).await?;
        Ok(Response::new(pb::ChangedBlocksResponse {
            runs: convert::runs_to_pb(&blocks),
            block_size: BLOCK_SIZE as u32,
        }))
    }
}

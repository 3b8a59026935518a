//! [`GrpcReplica`]: [`ReplicaTransport`] over the replica gRPC service (`proto/replica.proto`).
//!
//! Requests are built here; replies are converted to domain types on arrival by
//! [`crate::rpc::convert`], and statuses to engine errors by
//! [`crate::rpc::status::replica_call_error`] (`FAILED_PRECONDITION` is the replica's
//! fencing answer and becomes `StaleEpoch` with the current epoch the status carries;
//! every status the engine has no rule for becomes `Unavailable` naming the replica and
//! the call).

use futures::stream::{BoxStream, StreamExt};
use hlstore_proto::replica as pb;
use hlstore_proto::replica::replica_client::ReplicaClient;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};

use super::transport::{Claim, ReplicaTransport, ResyncChunk, SnapshotInfo, WriteAck, WriteReq, WriteStream};
use super::types::{ReplicaSeqs, Seq};
use crate::rpc::convert::{self, history_to_pb, snapshot_from_pb, snapshot_to_pb};
use crate::rpc::status::replica_call_error;
use hlstore_core::error::{Error, Result};
use hlstore_core::{Epoch, Offset};
use hlstore_store::History;

/// Depth of the request queue of a write stream (above the link's in-flight limit).
const STREAM_QUEUE: usize = 2 * super::link::MAX_IN_FLIGHT;

/// A replica of `volume` reached over gRPC.
#[derive(Debug, Clone)]
pub struct GrpcReplica {
    name: String,
    volume: String,
    client: ReplicaClient<Channel>,
}

impl GrpcReplica {
    /// A replica at `url` (`http://host:port`); connects on first use and reconnects after
    /// failures.
    pub fn connect_lazy(name: impl Into<String>, volume: impl Into<String>, url: &str) -> Result<Self> {
        let endpoint = Endpoint::from_shared(url.to_string())
            .map_err(|e| Error::InvalidArgument(format!("replica address {url:?}: {e}")))?
            .connect_timeout(std::time::Duration::from_secs(5))
            .tcp_nodelay(true);
        Ok(Self::with_channel(name, volume, endpoint.connect_lazy()))
    }

    pub fn with_channel(name: impl Into<String>, volume: impl Into<String>, channel: Channel) -> Self {
        Self {
            name: name.into(),
            volume: volume.into(),
            client: ReplicaClient::new(channel)
                .max_decoding_message_size(crate::rpc::MAX_MESSAGE_BYTES)
                .max_encoding_message_size(crate::rpc::MAX_MESSAGE_BYTES),
        }
    }

    fn status(&self, call: &str, epoch: u64, s: tonic::Status) -> Error {
        replica_call_error(&self.name, &self.volume, call, epoch, &s)
    }
}

impl ReplicaTransport for GrpcReplica {
    fn name(&self) -> &str {
        &self.name
    }

    async fn state(&self) -> Result<ReplicaSeqs> {
        let req = pb::StateRequest { volume_id: self.volume.clone() };
        let r = self.client.clone().state(req).await.map_err(|s| self.status("state", 0, s))?;
        Ok(convert::seqs_from_pb(r.into_inner()))
    }

    async fn open(&self, claim: Claim) -> Result<ReplicaSeqs> {
        let req = convert::claim_to_pb(&self.volume, &claim);
        let r = self.client.clone().open(req).await.map_err(|s| self.status("open", claim.epoch, s))?;
        Ok(convert::seqs_from_pb(r.into_inner()))
    }

    async fn ping(&self, epoch: Epoch) -> Result<ReplicaSeqs> {
        let epoch = epoch.get();
        let req = pb::PingRequest { volume_id: self.volume.clone(), epoch };
        let r = self.client.clone().ping(req).await.map_err(|s| self.status("ping", epoch, s))?;
        Ok(convert::seqs_from_pb(r.into_inner()))
    }

    async fn write_stream(&self, epoch: Epoch) -> Result<WriteStream> {
        let epoch = epoch.get();
        let (tx, rx) = mpsc::channel::<WriteReq>(STREAM_QUEUE);
        let volume = self.volume.clone();
        let outbound = ReceiverStream::new(rx).map(move |r| pb::WriteRequest {
            volume_id: volume.clone(),
            epoch,
            seq: r.seq,
            offset: r.offset,
            data: r.data,
            fua: r.fua,
        });
        let inbound =
            self.client.clone().write(outbound).await.map_err(|s| self.status("write", epoch, s))?.into_inner();
        let (name, volume) = (self.name.clone(), self.volume.clone());
        let acks = inbound
            .map(move |r| {
                r.map(|a| WriteAck { seq: a.seq, durable_seq: a.durable_seq })
                    .map_err(|s| replica_call_error(&name, &volume, "write", epoch, &s))
            })
            .boxed();
        Ok(WriteStream { requests: tx, acks })
    }

    async fn read(&self, epoch: Epoch, offset: Offset, len: u64) -> Result<Vec<u8>> {
        let epoch = epoch.get();
        let offset = offset.get();
        let req = pb::ReadRequest { volume_id: self.volume.clone(), epoch, offset, length: len };
        let r = self.client.clone().read(req).await.map_err(|s| self.status("read", epoch, s))?.into_inner();
        if r.data.len() as u64 != len {
            return Err(Error::Unavailable(format!(
                "replica {}: read at {offset} returned {} bytes instead of {len}",
                self.name,
                r.data.len()
            )));
        }
        Ok(r.data)
    }

    async fn flush(&self, epoch: Epoch) -> Result<Seq> {
        let epoch = epoch.get();
        let req = pb::FlushRequest { volume_id: self.volume.clone(), epoch };
        let r = self.client.clone().flush(req).await.map_err(|s| self.status("flush", epoch, s))?;
        Ok(r.into_inner().durable_seq)
    }

    async fn trim(&self, epoch: Epoch, seq: Seq, offset: Offset, len: u64) -> Result<()> {
        let epoch = epoch.get();
        let offset = offset.get();
        let req = pb::TrimRequest { volume_id: self.volume.clone(), epoch, seq, offset, length: len };
        self.client.clone().trim(req).await.map_err(|s| self.status("trim", epoch, s))?;
        Ok(())
    }

    async fn resync_stream(
        &self,
        epoch: Epoch,
        since: Seq,
        resume: Option<(u64, Seq)>,
    ) -> Result<BoxStream<'static, Result<ResyncChunk>>> {
        let epoch = epoch.get();
        let (resume_below, resume_seq) = resume.unwrap_or((0, 0));
        let req =
            pb::ResyncRequest { volume_id: self.volume.clone(), epoch, since_seq: since, resume_below, resume_seq };
        let inbound = self.client.clone().resync(req).await.map_err(|s| self.status("resync", epoch, s))?.into_inner();
        let (name, volume) = (self.name.clone(), self.volume.clone());
        Ok(inbound
            .map(move |r| {
                r.map(convert::transport_chunk_from_pb)
                    .map_err(|s| replica_call_error(&name, &volume, "resync", epoch, &s))
            })
            .boxed())
    }

    async fn begin_resync(
        &self,
        epoch: Epoch,
        from_seq: Seq,
        resume: bool,
        history: History,
    ) -> Result<Option<(u64, Seq)>> {
        let epoch = epoch.get();
        let history = history_to_pb(&history);
        let req = pb::BeginResyncRequest { volume_id: self.volume.clone(), epoch, from_seq, resume, history };
        let r = self.client.clone().begin_resync(req).await.map_err(|s| self.status("begin resync", epoch, s))?;
        let s = r.into_inner();
        Ok(s.resync_done_offset.map(|o| (o, s.resync_done_seq)))
    }

    async fn set_history(&self, epoch: Epoch, history: History) -> Result<()> {
        let epoch = epoch.get();
        let req = pb::SetHistoryRequest { volume_id: self.volume.clone(), epoch, history: history_to_pb(&history) };
        self.client.clone().set_history(req).await.map_err(|s| self.status("set history", epoch, s))?;
        Ok(())
    }

    async fn checkpoint_resync(&self, epoch: Epoch, offset: Offset) -> Result<()> {
        let epoch = epoch.get();
        let offset = offset.get();
        let req = pb::CheckpointResyncRequest { volume_id: self.volume.clone(), epoch, offset };
        self.client.clone().checkpoint_resync(req).await.map_err(|s| self.status("checkpoint resync", epoch, s))?;
        Ok(())
    }

    async fn apply_resync(&self, epoch: Epoch, chunks: Vec<ResyncChunk>) -> Result<u64> {
        let epoch = epoch.get();
        let chunks = chunks.into_iter().map(convert::transport_chunk_to_pb).collect();
        let req = pb::ApplyResyncRequest { volume_id: self.volume.clone(), epoch, chunks };
        let r = self.client.clone().apply_resync(req).await.map_err(|s| self.status("apply resync", epoch, s))?;
        Ok(r.into_inner().applied)
    }

    async fn end_resync(&self, epoch: Epoch) -> Result<Seq> {
        let epoch = epoch.get();
        let req = pb::EndResyncRequest { volume_id: self.volume.clone(), epoch };
        let r = self.client.clone().end_resync(req).await.map_err(|s| self.status("end resync", epoch, s))?;
        Ok(r.into_inner().durable_seq)
    }

    async fn create_snapshot(&self, epoch: Epoch, snap: SnapshotInfo) -> Result<SnapshotInfo> {
        let epoch = epoch.get();
        let req =
            pb::CreateSnapshotRequest { volume_id: self.volume.clone(), epoch, snapshot: Some(snapshot_to_pb(snap)) };
        let r = self.client.clone().create_snapshot(req).await.map_err(|s| self.status("create snapshot", epoch, s))?;
        Ok(snapshot_from_pb(r.into_inner()))
    }

    async fn delete_snapshot(&self, epoch: Epoch, name: &str) -> Result<bool> {
        let epoch = epoch.get();
        let req = pb::DeleteSnapshotRequest { volume_id: self.volume.clone(), epoch, name: name.to_string() };
        let r = self.client.clone().delete_snapshot(req).await.map_err(|s| self.status("delete snapshot", epoch, s))?;
        Ok(r.into_inner().existed)
    }

    async fn install_snapshot(
        &self,
        epoch: Epoch,
        snap: SnapshotInfo,
        blocks: Vec<(u64, Option<Vec<u8>>)>,
        last: bool,
    ) -> Result<()> {
        let epoch = epoch.get();
        let req = pb::InstallSnapshotRequest {
            volume_id: self.volume.clone(),
            epoch,
            snapshot: Some(snapshot_to_pb(snap)),
            blocks: convert::snapshot_blocks_to_pb(blocks),
            last,
        };
        self.client.clone().install_snapshot(req).await.map_err(|s| self.status("install snapshot", epoch, s))?;
        Ok(())
    }

    async fn expand(&self, epoch: Epoch, new_size: u64) -> Result<()> {
        let epoch = epoch.get();
        let req = pb::ExpandRequest { volume_id: self.volume.clone(), epoch, new_size };
        self.client.clone().expand(req).await.map_err(|s| self.status("expand", epoch, s))?;
        Ok(())
    }

    async fn list_snapshots(&self) -> Result<Vec<SnapshotInfo>> {
        let req = pb::ListSnapshotsRequest { volume_id: self.volume.clone() };
        let r = self.client.clone().list_snapshots(req).await.map_err(|s| self.status("list snapshots", 0, s))?;
        Ok(r.into_inner().snapshots.into_iter().map(snapshot_from_pb).collect())
    }

    async fn read_snapshot(&self, name: &str, offset: Offset, len: u64) -> Result<Vec<u8>> {
        let offset = offset.get();
        let req =
            pb::ReadSnapshotRequest { volume_id: self.volume.clone(), name: name.to_string(), offset, length: len };
        let r = self.client.clone().read_snapshot(req).await.map_err(|s| self.status("read snapshot", 0, s))?;
        Ok(r.into_inner().data)
    }

    async fn changed_blocks(&self, from: Option<&str>, to: Option<&str>) -> Result<Vec<(u64, u64)>> {
        let req = pb::ChangedBlocksRequest {
            volume_id: self.volume.clone(),
            from: from.unwrap_or_default().to_string(),
            to: to.unwrap_or_default().to_string(),
        };
        let r = self.client.clone().changed_blocks(req).await.map_err(|s| self.status("changed blocks", 0, s))?;
        Ok(convert::runs_from_pb(r.into_inner().runs))
    }
}

//! The tonic implementation of `hlstore.volume.v1.Volumes` over a [`VolumeManager`].
//!
//! Boundary: the volume manager takes and returns domain values ([`crate::model`]); this
//! service validates requests on entry and converts, through [`crate::convert`] only.
//! Errors become statuses through `hlstore_replication::rpc::status`.

use std::sync::Arc;

use hlstore_proto::volume as vpb;
use hlstore_proto::volume::volumes_server::{Volumes, VolumesServer};
use tonic::{Request, Response, Status};

use crate::convert;
use crate::volumes::VolumeManager;
use hlstore_replication::rpc::status::to_status;

#[derive(Clone)]
pub struct VolumeService {
    mgr: Arc<VolumeManager>,
}

impl VolumeService {
    pub fn new(mgr: Arc<VolumeManager>) -> Self {
        Self { mgr }
    }

    /// The tonic server of this service.
    pub fn into_server(self) -> VolumesServer<Self> {
        // A WriteVolume of MAX_WRITE_VOLUME_BYTES plus its envelope must fit.
        VolumesServer::new(self).max_decoding_message_size(MAX_WRITE_VOLUME_BYTES + (64 << 10))
    }
}

/// A volume reply.
fn volume(v: hlstore_core::error::Result<crate::model::Volume>) -> Result<Response<vpb::Volume>, Status> {
    v.map(|v| Response::new(convert::volume_to_pb(v))).map_err(|e| to_status(&e))
}

fn name(n: &str) -> Result<&str, Status> {
    if n.is_empty() {
        Err(Status::invalid_argument("name is required"))
    } else {
        Ok(n)
    }
}

/// Largest `WriteVolume` payload.
const MAX_WRITE_VOLUME_BYTES: usize = 4 << 20;

#[tonic::async_trait]
impl Volumes for VolumeService {
    async fn list_nodes(&self, _r: Request<vpb::ListNodesRequest>) -> Result<Response<vpb::ListNodesResponse>, Status> {
        let nodes = self.mgr.nodes_view().await.into_iter().map(convert::node_to_pb).collect();
        Ok(Response::new(vpb::ListNodesResponse { nodes }))
    }

    async fn create_volume(&self, r: Request<vpb::CreateVolumeRequest>) -> Result<Response<vpb::Volume>, Status> {
        let r = r.into_inner();
        name(&r.name)?;
        if r.size == 0 {
            return Err(Status::invalid_argument("size is required"));
        }
        volume(self.mgr.create(convert::new_volume_from_pb(r)).await)
    }

    async fn delete_volume(
        &self,
        r: Request<vpb::DeleteVolumeRequest>,
    ) -> Result<Response<vpb::DeleteVolumeResponse>, Status> {
        let existed = self.mgr.delete(name(&r.get_ref().name)?).await.map_err(|e| to_status(&e))?;
        Ok(Response::new(vpb::DeleteVolumeResponse { existed }))
    }

    async fn list_volumes(
        &self,
        _r: Request<vpb::ListVolumesRequest>,
    ) -> Result<Response<vpb::ListVolumesResponse>, Status> {
        let volumes = self.mgr.list().await.into_iter().map(convert::volume_to_pb).collect();
        Ok(Response::new(vpb::ListVolumesResponse { volumes }))
    }

    async fn get_volume(&self, r: Request<vpb::GetVolumeRequest>) -> Result<Response<vpb::Volume>, Status> {
        volume(self.mgr.get(name(&r.get_ref().name)?).await)
    }

    async fn attach_volume(&self, r: Request<vpb::AttachVolumeRequest>) -> Result<Response<vpb::Volume>, Status> {
        let r = r.into_inner();
        name(&r.name)?;
        volume(self.mgr.attach(&r.name, &r.node, &r.nbd_listen, r.force).await)
    }

    async fn detach_volume(&self, r: Request<vpb::DetachVolumeRequest>) -> Result<Response<vpb::Volume>, Status> {
        volume(self.mgr.detach(name(&r.get_ref().name)?).await)
    }

    async fn replace_replica(&self, r: Request<vpb::ReplaceReplicaRequest>) -> Result<Response<vpb::Volume>, Status> {
        let r = r.into_inner();
        name(&r.name)?;
        if r.from_node.is_empty() || r.to_node.is_empty() {
            return Err(Status::invalid_argument("from_node and to_node are required"));
        }
        volume(self.mgr.replace(&r.name, &r.from_node, &r.to_node).await)
    }

    async fn list_attachments(
        &self,
        _r: Request<vpb::ListAttachmentsRequest>,
    ) -> Result<Response<vpb::ListAttachmentsResponse>, Status> {
        let volumes = self.mgr.local_attachments().await.into_iter().map(convert::volume_to_pb).collect();
        Ok(Response::new(vpb::ListAttachmentsResponse { volumes }))
    }

    async fn scrub_volume(
        &self,
        r: Request<vpb::ScrubVolumeRequest>,
    ) -> Result<Response<vpb::ScrubVolumeResponse>, Status> {
        let r = r.into_inner();
        name(&r.name)?;
        self.mgr.scrub(&r.name).await.map(|s| Response::new(convert::scrub_to_pb(s))).map_err(|e| to_status(&e))
    }

    async fn expand_volume(&self, r: Request<vpb::ExpandVolumeRequest>) -> Result<Response<vpb::Volume>, Status> {
        let r = r.into_inner();
        name(&r.name)?;
        if r.size == 0 {
            return Err(Status::invalid_argument("size is required"));
        }
        volume(self.mgr.expand(&r.name, r.size).await)
    }

    async fn write_volume(
        &self,
        r: Request<vpb::WriteVolumeRequest>,
    ) -> Result<Response<vpb::WriteVolumeResponse>, Status> {
        let r = r.into_inner();
        name(&r.name)?;
        if r.data.len() > MAX_WRITE_VOLUME_BYTES {
            return Err(Status::invalid_argument(format!(
                "write of {} bytes: at most {MAX_WRITE_VOLUME_BYTES} per call",
                r.data.len()
            )));
        }
        self.mgr.write_local(&r.name, r.offset, r.data, r.fua).await.map_err(|e| to_status(&e))?;
        Ok(Response::new(vpb::WriteVolumeResponse {}))
    }

    async fn flush_volume(
        &self,
        r: Request<vpb::FlushVolumeRequest>,
    ) -> Result<Response<vpb::FlushVolumeResponse>, Status> {
        let r = r.into_inner();
        name(&r.name)?;
        self.mgr.flush_local(&r.name).await.map_err(|e| to_status(&e))?;
        Ok(Response::new(vpb::FlushVolumeResponse {}))
    }

    async fn create_snapshot(&self, r: Request<vpb::CreateSnapshotRequest>) -> Result<Response<vpb::Snapshot>, Status> {
        let r = r.into_inner();
        name(&r.volume)?;
        if r.name.is_empty() {
            return Err(Status::invalid_argument("snapshot name is required"));
        }
        let labels = r.labels.into_iter().collect();
        let snap = self.mgr.create_snapshot(&r.volume, &r.name, labels).await.map_err(|e| to_status(&e))?;
        Ok(Response::new(convert::snapshot_to_pb(snap)))
    }

    async fn delete_snapshot(
        &self,
        r: Request<vpb::DeleteSnapshotRequest>,
    ) -> Result<Response<vpb::DeleteSnapshotResponse>, Status> {
        let who = r.extensions().get::<hlstore_core::identity::PeerIdentity>().cloned();
        let r = r.into_inner();
        name(&r.volume)?;
        if r.name.is_empty() {
            return Err(Status::invalid_argument("snapshot name is required"));
        }
        crate::authz::may_delete_snapshot(who.as_ref(), &r.name).map_err(Status::permission_denied)?;
        let existed = self.mgr.delete_snapshot(&r.volume, &r.name).await.map_err(|e| to_status(&e))?;
        Ok(Response::new(vpb::DeleteSnapshotResponse { existed }))
    }

    async fn list_snapshots(
        &self,
        r: Request<vpb::ListSnapshotsRequest>,
    ) -> Result<Response<vpb::ListSnapshotsResponse>, Status> {
        let r = r.into_inner();
        let snapshots = self.mgr.list_snapshots(&r.volume).await.map_err(|e| to_status(&e))?;
        let snapshots = snapshots.into_iter().map(convert::snapshot_to_pb).collect();
        Ok(Response::new(vpb::ListSnapshotsResponse { snapshots }))
    }

    async fn revert_snapshot(&self, r: Request<vpb::RevertSnapshotRequest>) -> Result<Response<vpb::Volume>, Status> {
        let r = r.into_inner();
        name(&r.volume)?;
        if r.name.is_empty() {
            return Err(Status::invalid_argument("snapshot name is required"));
        }
        volume(self.mgr.revert_snapshot(&r.volume, &r.name).await)
    }

    async fn clone_volume(&self, r: Request<vpb::CloneVolumeRequest>) -> Result<Response<vpb::Volume>, Status> {
        let r = r.into_inner();
        name(&r.source)?;
        name(&r.name)?;
        // The copy runs in its own task: a client that goes away (killed, timed out) does
        // not cut it short; a later call finds it done, or still running.
        let mgr = self.mgr.clone();
        let spec = convert::clone_from_pb(r);
        let copy = tokio::spawn(async move { mgr.clone_volume(spec).await });
        volume(copy.await.unwrap_or_else(|e| Err(hlstore_core::error::Error::Internal(format!("clone task: {e}")))))
    }

    async fn set_volume_labels(
        &self,
        r: Request<vpb::SetVolumeLabelsRequest>,
    ) -> Result<Response<vpb::Volume>, Status> {
        let r = r.into_inner();
        name(&r.name)?;
        volume(self.mgr.set_labels(&r.name, r.labels.into_iter().collect()).await)
    }

    async fn changed_blocks(
        &self,
        r: Request<vpb::ChangedBlocksRequest>,
    ) -> Result<Response<vpb::ChangedBlocksResponse>, Status> {
        let r = r.into_inner();
        name(&r.volume)?;
        let changed = self.mgr.changed_blocks(&r.volume, &r.from, &r.to).await.map_err(|e| to_status(&e))?;
        Ok(Response::new(convert::changed_blocks_to_pb(changed)))
    }

    type ReadSnapshotStream =
        std::pin::Pin<Box<dyn futures::Stream<Item = Result<vpb::ReadSnapshotChunk, Status>> + Send + 'static>>;

    async fn read_snapshot(
        &self,
        r: Request<vpb::ReadSnapshotRequest>,
    ) -> Result<Response<Self::ReadSnapshotStream>, Status> {
        const PIECE: u64 = 1 << 20;
        let r = r.into_inner();
        name(&r.volume)?;
        let mgr = self.mgr.clone();
        // Fail fast on an unknown snapshot or a bad range, before the stream starts.
        let end = r
            .offset
            .checked_add(r.length)
            .ok_or_else(|| Status::invalid_argument(format!("offset {} + length {} overflows", r.offset, r.length)))?;
        let first = PIECE.min(r.length);
        let head = mgr.read_snapshot(&r.volume, &r.name, r.offset, first).await.map_err(|e| to_status(&e))?;
        let (tx, rx) = tokio::sync::mpsc::channel(2);
        tokio::spawn(async move {
            if tx.send(Ok(vpb::ReadSnapshotChunk { offset: r.offset, data: head })).await.is_err() {
                return;
            }
            let mut at = r.offset + first;
            while at < end {
                let n = PIECE.min(end - at);
                let msg = mgr
                    .read_snapshot(&r.volume, &r.name, at, n)
                    .await
                    .map(|data| vpb::ReadSnapshotChunk { offset: at, data })
                    .map_err(|e| to_status(&e));
                let failed = msg.is_err();
                if tx.send(msg).await.is_err() || failed {
                    return;
                }
                at += n;
            }
        });
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
    }
}

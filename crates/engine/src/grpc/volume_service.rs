//! The tonic implementation of `hlstore.volume.v1.Volumes` over a [`VolumeManager`].

use std::sync::Arc;

use hlstore_proto::volume as vpb;
use hlstore_proto::volume::volumes_server::Volumes;
use tonic::{Request, Response, Status};

use super::status::to_status;
use crate::node::volumes::VolumeManager;

#[derive(Clone)]
pub struct VolumeService {
    mgr: Arc<VolumeManager>,
}

impl VolumeService {
    pub fn new(mgr: Arc<VolumeManager>) -> Self {
        Self { mgr }
    }
}

fn name(n: &str) -> Result<&str, Status> {
    if n.is_empty() {
        Err(Status::invalid_argument("name is required"))
    } else {
        Ok(n)
    }
}

#[tonic::async_trait]
impl Volumes for VolumeService {
    async fn list_nodes(&self, _r: Request<vpb::ListNodesRequest>) -> Result<Response<vpb::ListNodesResponse>, Status> {
        Ok(Response::new(vpb::ListNodesResponse { nodes: self.mgr.nodes_view() }))
    }

    async fn create_volume(&self, r: Request<vpb::CreateVolumeRequest>) -> Result<Response<vpb::Volume>, Status> {
        let r = r.into_inner();
        name(&r.name)?;
        if r.size == 0 {
            return Err(Status::invalid_argument("size is required"));
        }
        self.mgr.create(r).await.map(Response::new).map_err(|e| to_status(&e))
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
        Ok(Response::new(vpb::ListVolumesResponse { volumes: self.mgr.list().await }))
    }

    async fn get_volume(&self, r: Request<vpb::GetVolumeRequest>) -> Result<Response<vpb::Volume>, Status> {
        self.mgr.get(name(&r.get_ref().name)?).await.map(Response::new).map_err(|e| to_status(&e))
    }

    async fn attach_volume(&self, r: Request<vpb::AttachVolumeRequest>) -> Result<Response<vpb::Volume>, Status> {
        let r = r.into_inner();
        name(&r.name)?;
        self.mgr.attach(&r.name, &r.node, &r.nbd_listen).await.map(Response::new).map_err(|e| to_status(&e))
    }

    async fn detach_volume(&self, r: Request<vpb::DetachVolumeRequest>) -> Result<Response<vpb::Volume>, Status> {
        self.mgr.detach(name(&r.get_ref().name)?).await.map(Response::new).map_err(|e| to_status(&e))
    }

    async fn replace_replica(&self, r: Request<vpb::ReplaceReplicaRequest>) -> Result<Response<vpb::Volume>, Status> {
        let r = r.into_inner();
        name(&r.name)?;
        if r.from_node.is_empty() || r.to_node.is_empty() {
            return Err(Status::invalid_argument("from_node and to_node are required"));
        }
        self.mgr.replace(&r.name, &r.from_node, &r.to_node).await.map(Response::new).map_err(|e| to_status(&e))
    }

    async fn list_attachments(
        &self,
        _r: Request<vpb::ListAttachmentsRequest>,
    ) -> Result<Response<vpb::ListAttachmentsResponse>, Status> {
        Ok(Response::new(vpb::ListAttachmentsResponse { volumes: self.mgr.local_attachments().await }))
    }

    async fn expand_volume(&self, _r: Request<vpb::ExpandVolumeRequest>) -> Result<Response<vpb::Volume>, Status> {
        Err(Status::unimplemented("volume expand is not implemented yet"))
    }

    async fn create_snapshot(
        &self,
        _r: Request<vpb::CreateSnapshotRequest>,
    ) -> Result<Response<vpb::Snapshot>, Status> {
        Err(Status::unimplemented("snapshots are not implemented yet"))
    }

    async fn delete_snapshot(
        &self,
        _r: Request<vpb::DeleteSnapshotRequest>,
    ) -> Result<Response<vpb::DeleteSnapshotResponse>, Status> {
        Err(Status::unimplemented("snapshots are not implemented yet"))
    }

    async fn list_snapshots(
        &self,
        _r: Request<vpb::ListSnapshotsRequest>,
    ) -> Result<Response<vpb::ListSnapshotsResponse>, Status> {
        Err(Status::unimplemented("snapshots are not implemented yet"))
    }

    async fn revert_snapshot(&self, _r: Request<vpb::RevertSnapshotRequest>) -> Result<Response<vpb::Volume>, Status> {
        Err(Status::unimplemented("snapshots are not implemented yet"))
    }

    async fn clone_volume(&self, _r: Request<vpb::CloneVolumeRequest>) -> Result<Response<vpb::Volume>, Status> {
        Err(Status::unimplemented("volume clone is not implemented yet"))
    }

    type ReadSnapshotStream =
        std::pin::Pin<Box<dyn futures::Stream<Item = Result<vpb::ReadSnapshotChunk, Status>> + Send + 'static>>;

    async fn read_snapshot(
        &self,
        _r: Request<vpb::ReadSnapshotRequest>,
    ) -> Result<Response<Self::ReadSnapshotStream>, Status> {
        Err(Status::unimplemented("snapshots are not implemented yet"))
    }

    async fn changed_blocks(
        &self,
        _r: Request<vpb::ChangedBlocksRequest>,
    ) -> Result<Response<vpb::ChangedBlocksResponse>, Status> {
        Err(Status::unimplemented("changed-block tracking is not implemented yet"))
    }
}

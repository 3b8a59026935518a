//! The CSI Controller service: volumes and snapshots, through any node agent.
//!
//! Each RPC validates its request (INVALID_ARGUMENT before any work), takes the
//! per-volume lock ([`InFlight`]: a concurrent second operation is ABORTED), then asks the
//! agent. Snapshot, clone and expand RPCs of the agent may answer UNIMPLEMENTED; the
//! driver then reports UNIMPLEMENTED too, and ControllerGetCapabilities leaves those
//! capabilities out (see [`crate::agent`]).
//!
//! Files: `volumes.rs` (create/delete/publish/list/validate/expand), `snapshots.rs`,
//! `params.rs` (StorageClass parameters, capacity, paging).

pub mod params;
mod snapshots;
mod volumes;

use hlstore_proto::csi;
use hlstore_proto::csi::controller_server::Controller;
use hlstore_proto::volume as vpb;
use hlstore_proto::volume::volumes_client::VolumesClient;
use tonic::transport::Channel;
use tonic::{Code, Request, Response, Status};

use crate::agent::AgentRpc;
use crate::error::{CsiError, Result};
use crate::inflight::InFlight;

#[derive(Clone)]
pub struct ControllerService {
    agent: VolumesClient<Channel>,
    /// The agent without a per-call time limit, for copies that take as long as the data
    /// takes (a clone runs in one agent call).
    copy_agent: VolumesClient<Channel>,
    locks: InFlight,
    /// The backup repository, for volumes created from `backup:` snapshot handles.
    backups: Option<std::sync::Arc<dyn crate::backups::BackupSource>>,
    restores: crate::backups::Restores,
}

impl ControllerService {
    pub fn new(agent: VolumesClient<Channel>) -> Self {
        Self {
            copy_agent: agent.clone(),
            agent,
            locks: InFlight::default(),
            backups: None,
            restores: Default::default(),
        }
    }

    /// Long copies (clones) go through `agent`, which should have no per-call time limit.
    pub fn with_copy_agent(mut self, agent: VolumesClient<Channel>) -> Self {
        self.copy_agent = agent;
        self
    }

    /// Volumes may be created from backups of `source` (see [`crate::backups`]).
    pub fn with_backups(mut self, source: Option<std::sync::Arc<dyn crate::backups::BackupSource>>) -> Self {
        self.backups = source;
        self
    }

    fn agent(&self) -> VolumesClient<Channel> {
        self.agent.clone()
    }

    fn copy_agent(&self) -> VolumesClient<Channel> {
        self.copy_agent.clone()
    }

    /// The agent's view of volume `id`, or `None` if no reachable node has it.
    async fn get_volume(&self, id: &str) -> Result<Option<vpb::Volume>> {
        match self.agent().get_volume(vpb::GetVolumeRequest { name: id.to_string() }).await {
            Ok(v) => Ok(Some(v.into_inner())),
            Err(s) if s.code() == Code::NotFound => Ok(None),
            Err(s) => Err(CsiError::agent(format!("looking up volume {id}"), s)),
        }
    }

    /// Every cluster member as the agent sees it (reachable or not, with its room).
    async fn nodes(&self) -> Result<Vec<vpb::Node>> {
        let r = self.agent().list_nodes(vpb::ListNodesRequest {}).await;
        Ok(r.map_err(|s| CsiError::agent("listing nodes", s))?.into_inner().nodes)
    }

    /// Volume `id`, or NOT_FOUND.
    async fn require_volume(&self, id: &str) -> Result<vpb::Volume> {
        self.get_volume(id).await?.ok_or_else(|| CsiError::NotFound(format!("volume {id} does not exist")))
    }

    async fn agent_supports(&self, rpc: AgentRpc) -> bool {
        crate::agent::implements(&self.agent, rpc).await
    }
}

/// Published nodes and condition of a volume, from the agent's view.
fn status_of(v: &vpb::Volume) -> (Vec<String>, csi::VolumeCondition) {
    let nodes = if v.attached_node.is_empty() { Vec::new() } else { vec![v.attached_node.clone()] };
    let bad: Vec<String> =
        v.replicas.iter().filter(|r| r.state != "healthy").map(|r| format!("{} {}", r.node, r.state)).collect();
    let condition = csi::VolumeCondition {
        abnormal: v.replicas.iter().any(|r| r.state == "failed"),
        message: if bad.is_empty() { "all replicas healthy".into() } else { format!("replicas: {}", bad.join(", ")) },
    };
    (nodes, condition)
}

fn rpc_cap(t: csi::controller_service_capability::rpc::Type) -> csi::ControllerServiceCapability {
    csi::ControllerServiceCapability {
        r#type: Some(csi::controller_service_capability::Type::Rpc(csi::controller_service_capability::Rpc {
            r#type: t as i32,
        })),
    }
}

fn respond<T>(r: Result<T>) -> std::result::Result<Response<T>, Status> {
    r.map(Response::new).map_err(Status::from)
}

#[tonic::async_trait]
impl Controller for ControllerService {
    async fn create_volume(
        &self,
        r: Request<csi::CreateVolumeRequest>,
    ) -> std::result::Result<Response<csi::CreateVolumeResponse>, Status> {
        respond(self.create(r.into_inner()).await)
    }

    async fn delete_volume(
        &self,
        r: Request<csi::DeleteVolumeRequest>,
    ) -> std::result::Result<Response<csi::DeleteVolumeResponse>, Status> {
        respond(self.delete(r.into_inner()).await)
    }

    async fn controller_publish_volume(
        &self,
        r: Request<csi::ControllerPublishVolumeRequest>,
    ) -> std::result::Result<Response<csi::ControllerPublishVolumeResponse>, Status> {
        respond(self.publish(r.into_inner()).await)
    }

    async fn controller_unpublish_volume(
        &self,
        r: Request<csi::ControllerUnpublishVolumeRequest>,
    ) -> std::result::Result<Response<csi::ControllerUnpublishVolumeResponse>, Status> {
        respond(self.unpublish(r.into_inner()).await)
    }

    async fn validate_volume_capabilities(
        &self,
        r: Request<csi::ValidateVolumeCapabilitiesRequest>,
    ) -> std::result::Result<Response<csi::ValidateVolumeCapabilitiesResponse>, Status> {
        respond(self.validate(r.into_inner()).await)
    }

    async fn list_volumes(
        &self,
        r: Request<csi::ListVolumesRequest>,
    ) -> std::result::Result<Response<csi::ListVolumesResponse>, Status> {
        respond(self.list(r.into_inner()).await)
    }

    async fn get_capacity(
        &self,
        r: Request<csi::GetCapacityRequest>,
    ) -> std::result::Result<Response<csi::GetCapacityResponse>, Status> {
        respond(self.capacity(r.into_inner()).await)
    }

    async fn controller_get_capabilities(
        &self,
        _r: Request<csi::ControllerGetCapabilitiesRequest>,
    ) -> std::result::Result<Response<csi::ControllerGetCapabilitiesResponse>, Status> {
        use csi::controller_service_capability::rpc::Type;
        let mut caps = vec![
            Type::CreateDeleteVolume,
            Type::PublishUnpublishVolume,
            Type::ListVolumes,
            Type::ListVolumesPublishedNodes,
            Type::GetCapacity,
            Type::GetVolume,
            Type::VolumeCondition,
            // SINGLE_NODE_SINGLE_WRITER / SINGLE_NODE_MULTI_WRITER access modes (CSI 1.5).
            Type::SingleNodeMultiWriter,
        ];
        if self.agent_supports(AgentRpc::Snapshots).await {
            caps.extend([Type::CreateDeleteSnapshot, Type::ListSnapshots]);
        }
        if self.agent_supports(AgentRpc::Clone).await {
            caps.push(Type::CloneVolume);
        }
        if self.agent_supports(AgentRpc::Expand).await {
            caps.push(Type::ExpandVolume);
        }
        Ok(Response::new(csi::ControllerGetCapabilitiesResponse {
            capabilities: caps.into_iter().map(rpc_cap).collect(),
        }))
    }

    async fn create_snapshot(
        &self,
        r: Request<csi::CreateSnapshotRequest>,
    ) -> std::result::Result<Response<csi::CreateSnapshotResponse>, Status> {
        respond(self.create_snapshot(r.into_inner()).await)
    }

    async fn delete_snapshot(
        &self,
        r: Request<csi::DeleteSnapshotRequest>,
    ) -> std::result::Result<Response<csi::DeleteSnapshotResponse>, Status> {
        respond(self.delete_snapshot(r.into_inner()).await)
    }

    async fn list_snapshots(
        &self,
        r: Request<csi::ListSnapshotsRequest>,
    ) -> std::result::Result<Response<csi::ListSnapshotsResponse>, Status> {
        respond(self.list_snapshots(r.into_inner()).await)
    }

    async fn controller_expand_volume(
        &self,
        r: Request<csi::ControllerExpandVolumeRequest>,
    ) -> std::result::Result<Response<csi::ControllerExpandVolumeResponse>, Status> {
        respond(self.expand(r.into_inner()).await)
    }

    async fn controller_get_volume(
        &self,
        r: Request<csi::ControllerGetVolumeRequest>,
    ) -> std::result::Result<Response<csi::ControllerGetVolumeResponse>, Status> {
        respond(self.get(r.into_inner()).await)
    }

    async fn controller_modify_volume(
        &self,
        _r: Request<csi::ControllerModifyVolumeRequest>,
    ) -> std::result::Result<Response<csi::ControllerModifyVolumeResponse>, Status> {
        Err(Status::unimplemented("hlstore volumes have no mutable parameters"))
    }
}

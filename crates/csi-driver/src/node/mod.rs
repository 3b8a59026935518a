//! The CSI Node service: attaches a published volume's NBD export as a block device,
//! formats it only when blank, mounts it at the staging path, bind-mounts it into pods,
//! reports usage and grows filesystems.
//!
//! State lives in the kernel only: the staging/target mounts (mount table) and the
//! attached device (found by volume id through the [`Attacher`]). So every RPC first
//! looks at what is already there, which makes repeats no-ops and lets a restarted plugin
//! carry on. Files: `stage.rs`, `publish.rs`, `stats.rs` (stats and expand).

mod publish;
mod stage;
mod stats;

use std::sync::Arc;

use hlstore_proto::csi;
use hlstore_proto::csi::node_server::Node;
use hlstore_proto::volume as vpb;
use hlstore_proto::volume::volumes_client::VolumesClient;
use tonic::transport::Channel;
use tonic::{Code, Request, Response, Status};

use crate::attach::Attacher;
use crate::error::{CsiError, Result};
use crate::inflight::InFlight;

#[derive(Clone)]
pub struct NodeService {
    agent: VolumesClient<Channel>,
    locks: InFlight,
    attacher: Arc<dyn Attacher>,
    node_id: String,
    max_volumes: i64,
}

impl NodeService {
    pub fn new(agent: VolumesClient<Channel>, attacher: Arc<dyn Attacher>, node_id: String, max_volumes: i64) -> Self {
        Self { agent, locks: InFlight::default(), attacher, node_id, max_volumes }
    }

    /// The local agent's view of volume `id` (`None`: no such volume).
    async fn volume(&self, id: &str) -> Result<Option<vpb::Volume>> {
        match self.agent.clone().get_volume(vpb::GetVolumeRequest { name: id.to_string() }).await {
            Ok(v) => Ok(Some(v.into_inner())),
            Err(s) if s.code() == Code::NotFound => Ok(None),
            Err(s) => Err(CsiError::agent(format!("looking up volume {id}"), s)),
        }
    }

    /// NOT_FOUND if the volume does not exist, otherwise `err`.
    async fn not_found_or(&self, id: &str, err: CsiError) -> CsiError {
        match self.volume(id).await {
            Ok(None) => CsiError::NotFound(format!("volume {id} does not exist")),
            _ => err,
        }
    }
}

fn respond<T>(r: Result<T>) -> std::result::Result<Response<T>, Status> {
    r.map(Response::new).map_err(Status::from)
}

fn rpc_cap(t: csi::node_service_capability::rpc::Type) -> csi::NodeServiceCapability {
    csi::NodeServiceCapability {
        r#type: Some(csi::node_service_capability::Type::Rpc(csi::node_service_capability::Rpc { r#type: t as i32 })),
    }
}

#[tonic::async_trait]
impl Node for NodeService {
    async fn node_stage_volume(
        &self,
        r: Request<csi::NodeStageVolumeRequest>,
    ) -> std::result::Result<Response<csi::NodeStageVolumeResponse>, Status> {
        respond(self.stage(r.into_inner()).await)
    }

    async fn node_unstage_volume(
        &self,
        r: Request<csi::NodeUnstageVolumeRequest>,
    ) -> std::result::Result<Response<csi::NodeUnstageVolumeResponse>, Status> {
        respond(self.unstage(r.into_inner()).await)
    }

    async fn node_publish_volume(
        &self,
        r: Request<csi::NodePublishVolumeRequest>,
    ) -> std::result::Result<Response<csi::NodePublishVolumeResponse>, Status> {
        respond(self.publish(r.into_inner()).await)
    }

    async fn node_unpublish_volume(
        &self,
        r: Request<csi::NodeUnpublishVolumeRequest>,
    ) -> std::result::Result<Response<csi::NodeUnpublishVolumeResponse>, Status> {
        respond(self.unpublish(r.into_inner()).await)
    }

    async fn node_get_volume_stats(
        &self,
        r: Request<csi::NodeGetVolumeStatsRequest>,
    ) -> std::result::Result<Response<csi::NodeGetVolumeStatsResponse>, Status> {
        respond(self.stats(r.into_inner()).await)
    }

    async fn node_expand_volume(
        &self,
        r: Request<csi::NodeExpandVolumeRequest>,
    ) -> std::result::Result<Response<csi::NodeExpandVolumeResponse>, Status> {
        respond(self.expand(r.into_inner()).await)
    }

    async fn node_get_capabilities(
        &self,
        _r: Request<csi::NodeGetCapabilitiesRequest>,
    ) -> std::result::Result<Response<csi::NodeGetCapabilitiesResponse>, Status> {
        use csi::node_service_capability::rpc::Type;
        // SINGLE_NODE_MULTI_WRITER: the SINGLE_NODE_SINGLE_WRITER and SINGLE_NODE_MULTI_WRITER
        // access modes (CSI 1.5; Kubernetes' ReadWriteOncePod needs it).
        let mut types =
            vec![Type::StageUnstageVolume, Type::GetVolumeStats, Type::VolumeCondition, Type::SingleNodeMultiWriter];
        if crate::agent::implements(&self.agent, crate::agent::AgentRpc::Expand).await {
            types.push(Type::ExpandVolume);
        }
        let capabilities = types.into_iter().map(rpc_cap).collect();
        Ok(Response::new(csi::NodeGetCapabilitiesResponse { capabilities }))
    }

    async fn node_get_info(
        &self,
        _r: Request<csi::NodeGetInfoRequest>,
    ) -> std::result::Result<Response<csi::NodeGetInfoResponse>, Status> {
        Ok(Response::new(csi::NodeGetInfoResponse {
            node_id: self.node_id.clone(),
            max_volumes_per_node: self.max_volumes,
            accessible_topology: Some(csi::Topology {
                segments: [(crate::TOPOLOGY_NODE_KEY.to_string(), self.node_id.clone())].into_iter().collect(),
            }),
        }))
    }
}

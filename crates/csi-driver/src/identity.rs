//! The CSI Identity service: name, capabilities, and readiness (the node agent answers).

use hlstore_proto::csi;
use hlstore_proto::csi::identity_server::Identity;
use hlstore_proto::volume as vpb;
use hlstore_proto::volume::volumes_client::VolumesClient;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

/// Bound on Probe's question to the agent (the livenessprobe sidecar waits one second).
const PROBE_TIMEOUT: std::time::Duration = std::time::Duration::from_millis(800);

#[derive(Clone)]
pub struct IdentityService {
    agent: VolumesClient<Channel>,
    controller: bool,
}

impl IdentityService {
    pub fn new(agent: VolumesClient<Channel>, controller: bool) -> Self {
        Self { agent, controller }
    }
}

fn service(t: csi::plugin_capability::service::Type) -> csi::PluginCapability {
    csi::PluginCapability {
        r#type: Some(csi::plugin_capability::Type::Service(csi::plugin_capability::Service { r#type: t as i32 })),
    }
}

#[tonic::async_trait]
impl Identity for IdentityService {
    async fn get_plugin_info(
        &self,
        _r: Request<csi::GetPluginInfoRequest>,
    ) -> Result<Response<csi::GetPluginInfoResponse>, Status> {
        Ok(Response::new(csi::GetPluginInfoResponse {
            name: crate::DRIVER_NAME.to_string(),
            vendor_version: env!("CARGO_PKG_VERSION").to_string(),
            manifest: Default::default(),
        }))
    }

    async fn get_plugin_capabilities(
        &self,
        _r: Request<csi::GetPluginCapabilitiesRequest>,
    ) -> Result<Response<csi::GetPluginCapabilitiesResponse>, Status> {
        use csi::plugin_capability::service::Type;
        let mut capabilities = Vec::new();
        if self.controller {
            capabilities.push(service(Type::ControllerService));
        }
        capabilities.push(service(Type::VolumeAccessibilityConstraints));
        if crate::agent::implements(&self.agent, crate::agent::AgentRpc::Expand).await {
            capabilities.push(csi::PluginCapability {
                r#type: Some(csi::plugin_capability::Type::VolumeExpansion(csi::plugin_capability::VolumeExpansion {
                    r#type: csi::plugin_capability::volume_expansion::Type::Online as i32,
                })),
            });
        }
        Ok(Response::new(csi::GetPluginCapabilitiesResponse { capabilities }))
    }

    /// Ready once the node agent answers; not ready (but healthy) while it does not. Asks
    /// the agent something it answers from its own state (its attachments), under the
    /// livenessprobe's one second: a question that fans out to every node would make one
    /// dead node restart every CSI container.
    async fn probe(&self, _r: Request<csi::ProbeRequest>) -> Result<Response<csi::ProbeResponse>, Status> {
        let mut agent = self.agent.clone();
        let ask = agent.list_attachments(vpb::ListAttachmentsRequest {});
        let ready = matches!(tokio::time::timeout(PROBE_TIMEOUT, ask).await, Ok(Ok(_)));
        Ok(Response::new(csi::ProbeResponse { ready: Some(ready) }))
    }
}

//! What the node agent implements. Snapshot, clone and expand RPCs of the agent may
//! answer UNIMPLEMENTED (agents of older versions); the driver then leaves the matching
//! CSI capabilities out instead of advertising what it cannot do. Asked on every
//! capability request, so an upgraded agent is picked up without a restart.

use hlstore_proto::volume as vpb;
use hlstore_proto::volume::volumes_client::VolumesClient;
use tonic::transport::Channel;
use tonic::Code;

/// An optional agent RPC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AgentRpc {
    Snapshots,
    Clone,
    Expand,
}

/// Whether the agent implements `rpc`: anything but UNIMPLEMENTED counts as yes. The
/// probes carry empty names, which an implementation rejects before doing any work.
pub async fn implements(agent: &VolumesClient<Channel>, rpc: AgentRpc) -> bool {
    let mut a = agent.clone();
    let res = match rpc {
        AgentRpc::Snapshots => a.list_snapshots(vpb::ListSnapshotsRequest { volume: String::new() }).await.map(|_| ()),
        AgentRpc::Clone => a.clone_volume(vpb::CloneVolumeRequest::default()).await.map(|_| ()),
        AgentRpc::Expand => a.expand_volume(vpb::ExpandVolumeRequest::default()).await.map(|_| ()),
    };
    !matches!(res, Err(s) if s.code() == Code::Unimplemented)
}

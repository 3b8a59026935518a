//! The node agent's client side of the peers' `Replica` (`hlstore.replica.v1`) and
//! `Volumes` (`hlstore.volume.v1`) services, for the cluster fan-out of the volume manager.
//!
//! Boundary: requests are built and replies converted here (through
//! `hlstore_replication::rpc::convert` and [`crate::convert`]), so callers see domain
//! values only; statuses become engine errors through `hlstore_replication::rpc::status`.
//! Every call is bounded by [`PEER_TIMEOUT`] (an attach by [`ATTACH_TIMEOUT`]), so one
//! dead node never stalls a listing.

use std::collections::BTreeMap;
use std::time::Duration;

use hlstore_proto::replica as rpb;
use hlstore_proto::replica::replica_client::ReplicaClient;
use hlstore_proto::volume as vpb;
use hlstore_proto::volume::volumes_client::VolumesClient;
use hlstore_replication::rpc::convert as rconvert;
use hlstore_replication::rpc::status::from_status;
use tonic::transport::Channel;

use crate::cluster::Cluster;
use crate::convert;
use crate::model::{Snapshot, Volume, VolumeScrub};
use crate::MAX_MESSAGE_BYTES;
use hlstore_core::error::{Error, Result};
use hlstore_core::space::FsSpace;
use hlstore_store::{ReplicaInfo, ReplicaState, SnapshotInfo, VolumeRecord};

/// Deadline of one call to a peer during fan-out.
pub const PEER_TIMEOUT: Duration = Duration::from_secs(3);
/// Deadline of an attach forwarded to another node (it starts an engine there).
pub const ATTACH_TIMEOUT: Duration = Duration::from_secs(60);

/// Runs `f` with the peer deadline; a timeout becomes `Unavailable`.
async fn bounded<T>(node: &str, f: impl std::future::Future<Output = Result<T, tonic::Status>>) -> Result<T> {
    match tokio::time::timeout(PEER_TIMEOUT, f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(s)) => Err(from_status(&s)),
        Err(_) => Err(Error::Unavailable(format!("node {node} did not answer within {PEER_TIMEOUT:?}"))),
    }
}

impl Cluster {
    fn replica_client(&self, node: &str) -> Result<ReplicaClient<Channel>> {
        Ok(ReplicaClient::new(self.channel(node)?)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES))
    }

    fn volumes_client(&self, node: &str) -> Result<VolumesClient<Channel>> {
        Ok(VolumesClient::new(self.channel(node)?))
    }

    // ----- the Replica service of a node -----

    /// The replicas `node` holds (entries without a valid record are left out), and its room
    /// for replicas if its agent reports it.
    pub async fn list_replicas(&self, node: &str) -> Result<(Vec<ReplicaInfo>, Option<FsSpace>)> {
        let mut c = self.replica_client(node)?;
        let r = bounded(node, async move { c.list_replicas(rpb::ListReplicasRequest {}).await }).await?.into_inner();
        let space = (r.capacity_bytes > 0).then_some(FsSpace { total: r.capacity_bytes, available: r.available_bytes });
        Ok((r.replicas.into_iter().filter_map(|i| rconvert::info_from_pb(i).ok()).collect(), space))
    }

    pub async fn create_replica(&self, node: &str, record: &VolumeRecord) -> Result<()> {
        let mut c = self.replica_client(node)?;
        let req = rpb::CreateReplicaRequest { record: Some(rconvert::record_to_pb(record)) };
        bounded(node, async move { c.create_replica(req).await }).await?;
        Ok(())
    }

    /// Deletes the replica of `volume` on `node` (refused if its epoch is newer than
    /// `epoch`). Whether it existed.
    pub async fn delete_replica(&self, node: &str, volume: &str, epoch: u64) -> Result<bool> {
        let mut c = self.replica_client(node)?;
        let req = rpb::DeleteReplicaRequest { volume_id: volume.to_string(), epoch };
        Ok(bounded(node, async move { c.delete_replica(req).await }).await?.into_inner().existed)
    }

    pub async fn replica_state(&self, node: &str, volume: &str) -> Result<ReplicaState> {
        let mut c = self.replica_client(node)?;
        let req = rpb::StateRequest { volume_id: volume.to_string() };
        let r = bounded(node, async move { c.state(req).await }).await?;
        Ok(rconvert::state_from_pb(&r.into_inner()))
    }

    pub async fn set_replica_set(&self, node: &str, volume: &str, epoch: u64, set: Vec<String>) -> Result<()> {
        let mut c = self.replica_client(node)?;
        let req = rpb::SetReplicaSetRequest { volume_id: volume.to_string(), epoch, replica_set: set };
        bounded(node, async move { c.set_replica_set(req).await }).await?;
        Ok(())
    }

    pub async fn set_labels(&self, node: &str, volume: &str, labels: BTreeMap<String, String>) -> Result<()> {
        let mut c = self.replica_client(node)?;
        let req = rpb::SetLabelsRequest { volume_id: volume.to_string(), labels: labels.into_iter().collect() };
        bounded(node, async move { c.set_labels(req).await }).await?;
        Ok(())
    }

    pub async fn replica_snapshots(&self, node: &str, volume: &str) -> Result<Vec<SnapshotInfo>> {
        let mut c = self.replica_client(node)?;
        let req = rpb::ListSnapshotsRequest { volume_id: volume.to_string() };
        let r = bounded(node, async move { c.list_snapshots(req).await }).await?;
        Ok(r.into_inner().snapshots.into_iter().map(rconvert::snapshot_from_pb).collect())
    }

    /// Runs of blocks (`(first block, count)`) that may differ between two views of
    /// `volume` on `node` (empty name: none / the live volume), and the block size.
    pub async fn replica_changed_blocks(
        &self,
        node: &str,
        volume: &str,
        from: &str,
        to: &str,
    ) -> Result<(Vec<(u64, u64)>, u64)> {
        let mut c = self.replica_client(node)?;
        let req = rpb::ChangedBlocksRequest { volume_id: volume.into(), from: from.into(), to: to.into() };
        let r = bounded(node, async move { c.changed_blocks(req).await }).await?.into_inner();
        Ok((rconvert::runs_from_pb(r.runs), u64::from(r.block_size)))
    }

    pub async fn read_replica_snapshot(
        &self,
        node: &str,
        volume: &str,
        snap: &str,
        offset: u64,
        len: u64,
    ) -> Result<Vec<u8>> {
        let mut c = self.replica_client(node)?;
        let req = rpb::ReadSnapshotRequest { volume_id: volume.into(), name: snap.into(), offset, length: len };
        Ok(bounded(node, async move { c.read_snapshot(req).await }).await?.into_inner().data)
    }

    // ----- the Volumes service of a node -----

    pub async fn get_volume(&self, node: &str, name: &str) -> Result<Volume> {
        let mut c = self.volumes_client(node)?;
        let req = vpb::GetVolumeRequest { name: name.to_string() };
        Ok(convert::volume_from_pb(bounded(node, async move { c.get_volume(req).await }).await?.into_inner()))
    }

    /// The engines `node` runs (and the volumes it is attaching).
    pub async fn list_attachments(&self, node: &str) -> Result<Vec<Volume>> {
        let mut c = self.volumes_client(node)?;
        let r = bounded(node, async move { c.list_attachments(vpb::ListAttachmentsRequest {}).await }).await?;
        Ok(r.into_inner().volumes.into_iter().map(convert::volume_from_pb).collect())
    }

    /// Asks `node` to attach `name` (bounded by [`ATTACH_TIMEOUT`]).
    pub async fn attach_volume(&self, node: &str, name: &str, nbd_listen: &str, force: bool) -> Result<Volume> {
        let mut c = self.volumes_client(node)?;
        let req =
            vpb::AttachVolumeRequest { name: name.into(), node: node.into(), nbd_listen: nbd_listen.into(), force };
        match tokio::time::timeout(ATTACH_TIMEOUT, c.attach_volume(req)).await {
            Ok(Ok(v)) => Ok(convert::volume_from_pb(v.into_inner())),
            Ok(Err(s)) => Err(from_status(&s)),
            Err(_) => Err(Error::Unavailable(format!(
                "node {node} did not finish attaching {name} within {}s",
                ATTACH_TIMEOUT.as_secs()
            ))),
        }
    }

    pub async fn detach_volume(&self, node: &str, name: &str) -> Result<Volume> {
        let mut c = self.volumes_client(node)?;
        let req = vpb::DetachVolumeRequest { name: name.to_string() };
        Ok(convert::volume_from_pb(bounded(node, async move { c.detach_volume(req).await }).await?.into_inner()))
    }

    pub async fn create_snapshot(
        &self,
        node: &str,
        volume: &str,
        name: &str,
        labels: BTreeMap<String, String>,
    ) -> Result<Snapshot> {
        let mut c = self.volumes_client(node)?;
        let req = vpb::CreateSnapshotRequest {
            volume: volume.to_string(),
            name: name.to_string(),
            labels: labels.into_iter().collect(),
        };
        Ok(convert::snapshot_from_pb(bounded(node, async move { c.create_snapshot(req).await }).await?.into_inner()))
    }

    /// Whether the snapshot existed.
    pub async fn delete_snapshot(&self, node: &str, volume: &str, name: &str) -> Result<bool> {
        let mut c = self.volumes_client(node)?;
        let req = vpb::DeleteSnapshotRequest { volume: volume.to_string(), name: name.to_string() };
        Ok(bounded(node, async move { c.delete_snapshot(req).await }).await?.into_inner().existed)
    }

    pub async fn scrub_volume(&self, node: &str, name: &str) -> Result<VolumeScrub> {
        let mut c = self.volumes_client(node)?;
        let req = vpb::ScrubVolumeRequest { name: name.to_string() };
        Ok(convert::scrub_from_pb(bounded(node, async move { c.scrub_volume(req).await }).await?.into_inner()))
    }

    pub async fn expand_volume(&self, node: &str, name: &str, size: u64) -> Result<Volume> {
        let mut c = self.volumes_client(node)?;
        let req = vpb::ExpandVolumeRequest { name: name.to_string(), size };
        Ok(convert::volume_from_pb(bounded(node, async move { c.expand_volume(req).await }).await?.into_inner()))
    }
}

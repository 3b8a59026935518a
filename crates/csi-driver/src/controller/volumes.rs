//! Volume RPCs of the controller.

use std::collections::{BTreeMap, HashMap};

use hlstore_proto::csi;
use hlstore_proto::csi::volume_content_source::{SnapshotSource, Type as SourceType, VolumeSource};
use hlstore_proto::volume as vpb;

use super::params::{
    self, DataLocality, Params, AGENT_CLONE_DONE, LABEL_AGENT_CLONE_STATE, LABEL_CSI_NAME, LABEL_DONE_MARKER,
    LABEL_FILLED, LABEL_RESTORED_FROM, LABEL_SOURCE,
};
use super::{status_of, ControllerService};
use crate::backups::{BackupRef, RestoreState, DONE_MARKER};
use crate::capability::{self, Capability};
use crate::error::{required, CsiError, Result};
use crate::ids;

/// What a new volume is created from.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Source {
    Empty,
    /// (volume, snapshot) of a snapshot id.
    Snapshot(String, String),
    Volume(String),
    /// A backup in the repository (a `backup:` snapshot handle, see `crate::backups`).
    Backup(BackupRef),
}

impl Source {
    fn parse(s: Option<&csi::VolumeContentSource>) -> Result<Source> {
        match s.and_then(|s| s.r#type.as_ref()) {
            None => Ok(Source::Empty),
            Some(SourceType::Snapshot(s)) if s.snapshot_id.is_empty() => {
                Err(CsiError::InvalidArgument("volume_content_source.snapshot.snapshot_id is required".into()))
            }
            Some(SourceType::Snapshot(s)) if BackupRef::parse(&s.snapshot_id).is_some() => {
                BackupRef::parse(&s.snapshot_id).unwrap_or_else(|| unreachable!()).map(Source::Backup)
            }
            Some(SourceType::Snapshot(s)) => match ids::parse_snapshot_id(&s.snapshot_id) {
                Ok((v, n)) => Ok(Source::Snapshot(v, n)),
                Err(_) => Err(CsiError::NotFound(format!("snapshot {} does not exist", s.snapshot_id))),
            },
            Some(SourceType::Volume(v)) if v.volume_id.is_empty() => {
                Err(CsiError::InvalidArgument("volume_content_source.volume.volume_id is required".into()))
            }
            Some(SourceType::Volume(v)) => Ok(Source::Volume(v.volume_id.clone())),
        }
    }

    /// (source volume, snapshot name or "") for the agent's CloneVolume.
    fn clone_args(&self) -> Option<(String, String)> {
        match self {
            Source::Empty | Source::Backup(_) => None,
            Source::Snapshot(v, s) => Some((v.clone(), s.clone())),
            Source::Volume(v) => Some((v.clone(), String::new())),
        }
    }

    /// The source in words, for messages.
    fn describe(&self) -> String {
        match self {
            Source::Empty => "nothing".into(),
            Source::Snapshot(v, s) => format!("snapshot {}", ids::snapshot_id(v, s)),
            Source::Volume(v) => format!("volume {v}"),
            Source::Backup(b) => format!("backup {b}"),
        }
    }

    fn label(&self) -> Option<String> {
        match self {
            Source::Empty => None,
            Source::Snapshot(v, s) => Some(format!("snapshot:{}", ids::snapshot_id(v, s))),
            Source::Volume(v) => Some(format!("volume:{v}")),
            // The handle itself (the content source CreateVolume reports).
            Source::Backup(b) => Some(format!("snapshot:{b}")),
        }
    }

    fn from_label(label: Option<&String>) -> Option<csi::VolumeContentSource> {
        let l = label?;
        let t = if let Some(id) = l.strip_prefix("snapshot:") {
            SourceType::Snapshot(SnapshotSource { snapshot_id: id.to_string() })
        } else {
            SourceType::Volume(VolumeSource { volume_id: l.strip_prefix("volume:")?.to_string() })
        };
        Some(csi::VolumeContentSource { r#type: Some(t) })
    }
}

fn csi_volume(v: &vpb::Volume) -> csi::Volume {
    csi::Volume {
        capacity_bytes: v.size as i64,
        volume_id: v.name.clone(),
        volume_context: HashMap::new(),
        content_source: Source::from_label(v.labels.get(LABEL_SOURCE)),
        accessible_topology: Vec::new(),
    }
}

/// The node named by the first topology segment (preferred first, then requisite).
fn preferred_node(t: Option<&csi::TopologyRequirement>) -> Option<String> {
    let t = t?;
    t.preferred.iter().chain(&t.requisite).find_map(|top| top.segments.get(crate::TOPOLOGY_NODE_KEY).cloned())
}

impl ControllerService {
    /// Replica nodes for a new volume: empty (the agent picks the least-used nodes, one
    /// replica per node) unless `dataLocality=best-effort` names a cluster node, which
    /// then gets the first replica and the least-used others the rest.
    async fn placement(&self, p: &Params, top: Option<&csi::TopologyRequirement>) -> Result<Vec<String>> {
        if p.data_locality != DataLocality::BestEffort {
            return Ok(Vec::new());
        }
        let Some(local) = preferred_node(top) else { return Ok(Vec::new()) };
        let nodes = self.nodes().await?;
        let nodes: Vec<vpb::Node> = nodes.into_iter().filter(|n| n.reachable).collect();
        if !nodes.iter().any(|n| n.id == local) {
            return Ok(Vec::new());
        }
        let want = if p.replicas == 0 { nodes.len().min(3) } else { p.replicas as usize };
        let vols = self
            .agent()
            .list_volumes(vpb::ListVolumesRequest {})
            .await
            .map_err(|s| CsiError::agent("listing volumes", s))?
            .into_inner()
            .volumes;
        let mut load: BTreeMap<String, usize> = nodes.iter().map(|n| (n.id.clone(), 0)).collect();
        for v in &vols {
            for n in &v.replica_set {
                if let Some(l) = load.get_mut(n) {
                    *l += 1;
                }
            }
        }
        let mut others: Vec<(usize, String)> =
            load.into_iter().filter(|(n, _)| *n != local).map(|(n, l)| (l, n)).collect();
        others.sort();
        let mut out = vec![local];
        out.extend(others.into_iter().map(|(_, n)| n).take(want.saturating_sub(1)));
        Ok(out)
    }

    pub(super) async fn create(&self, r: csi::CreateVolumeRequest) -> Result<csi::CreateVolumeResponse> {
        required(&r.name, "name")?;
        let caps = capability::parse_all(&r.volume_capabilities)?;
        if let Some(why) = caps.iter().find_map(Capability::unsupported_reason) {
            return Err(CsiError::InvalidArgument(why));
        }
        let p = params::parse_params(&r.parameters)?;
        let source = Source::parse(r.volume_content_source.as_ref())?;
        let range = r.capacity_range.as_ref();
        // A clone without a capacity range keeps its source's size.
        let size = if source != Source::Empty && range.is_none() { 0 } else { params::size_for(range)? };
        let id = ids::name_for(&r.name);
        let _g = self.locks.try_lock(&id, "CreateVolume")?;
        if let Source::Backup(b) = &source {
            return self.create_from_backup(&r, &p, &id, b, &source).await;
        }

        if let Some(v) = self.get_volume(&id).await? {
            if !params::fits(v.size, range)? {
                return Err(CsiError::AlreadyExists(format!(
                    "volume {id} exists with {} bytes, outside the capacity range asked for",
                    v.size
                )));
            }
            if p.replicas != 0 && v.replica_set.len() != p.replicas as usize {
                return Err(CsiError::AlreadyExists(format!(
                    "volume {id} exists with {} replicas, not {}",
                    v.replica_set.len(),
                    p.replicas
                )));
            }
            if v.labels.get(LABEL_SOURCE).cloned() != source.label() {
                return Err(CsiError::AlreadyExists(format!("volume {id} exists with another content source")));
            }
            // `None`: an unfinished copy left by a controller that stopped, now deleted;
            // it is copied again below.
            if let Some(done) = self.clone_progress(&id, &v, &source).await? {
                return Ok(done);
            }
        } else if source.clone_args().is_some() {
            // A copy job creates its volume when it starts, and the agent deletes it again
            // when the copy fails.
            if self.restores.running(&id) {
                return Err(CsiError::Aborted(format!(
                    "volume {id}: copying {} (CreateVolume succeeds when it is done)",
                    source.describe()
                )));
            }
            if let RestoreState::Failed(code, e) = self.restores.poll(&id, &source.label().unwrap_or_default()) {
                return Err(RestoreState::failure(code, &e, &id, &format!("copying {}", source.describe())));
            }
        }

        // The source must exist (NOT_FOUND otherwise), whatever the agent would say.
        let source_size = match &source {
            Source::Empty | Source::Backup(_) => 0,
            Source::Volume(v) => self.require_volume(v).await?.size,
            Source::Snapshot(v, s) => {
                let snaps = match self.agent().list_snapshots(vpb::ListSnapshotsRequest { volume: v.clone() }).await {
                    Ok(r) => r.into_inner().snapshots,
                    Err(st) if st.code() == tonic::Code::NotFound => Vec::new(),
                    Err(st) => return Err(CsiError::agent(format!("listing the snapshots of {v}"), st)),
                };
                match snaps.iter().find(|x| x.name == *s) {
                    Some(x) => x.size,
                    None => {
                        return Err(CsiError::NotFound(format!("snapshot {} does not exist", ids::snapshot_id(v, s))))
                    }
                }
            }
        };
        // A volume from a source is at least the source's size: a limit below it cannot be
        // honoured ("MUST always be honored, even when creating volumes from a source").
        if let Some(rg) = range {
            if rg.limit_bytes > 0 && (rg.limit_bytes as u64) < source_size {
                return Err(CsiError::OutOfRange(format!(
                    "the source holds {source_size} bytes, more than the limit of {} bytes",
                    rg.limit_bytes
                )));
            }
        }
        let nodes = self.placement(&p, r.accessibility_requirements.as_ref()).await?;
        let mut labels: HashMap<String, String> = p.labels.clone().into_iter().collect();
        labels.insert(LABEL_CSI_NAME.into(), r.name.clone());
        if let Some(l) = source.label() {
            labels.insert(LABEL_SOURCE.into(), l);
        }
        let Some((vol, snap)) = source.clone_args() else {
            let req = vpb::CreateVolumeRequest {
                name: id.clone(),
                size,
                replicas: p.replicas,
                nodes,
                write_quorum: 0,
                labels,
            };
            let created = self
                .agent()
                .create_volume(req)
                .await
                .map_err(|s| CsiError::agent(format!("creating volume {id}"), s))?
                .into_inner();
            tracing::info!(volume.id = %id, size = created.size, replicas = ?created.replica_set, "volume created");
            return Ok(csi::CreateVolumeResponse { volume: Some(csi_volume(&created)) });
        };
        // A clone: the agent creates the volume and copies the source into it, which takes
        // as long as the data takes, so it runs in the background (see `clone_progress`).
        // The agent labels the clone done when its copy is complete.
        let req = vpb::CloneVolumeRequest {
            source: vol.clone(),
            name: id.clone(),
            snapshot: snap.clone(),
            replicas: p.replicas,
            nodes,
            labels,
            size,
        };
        let what = source.describe();
        let key = source.label().unwrap_or_default();
        self.restores.forget(&id);
        let mut copier = self.copy_agent();
        let (vid, context) = (id.clone(), format!("creating volume {id} from {what}"));
        let work = Box::pin(async move {
            let v = copier.clone_volume(req).await.map_err(|s| CsiError::agent(context, s))?.into_inner();
            tracing::info!(volume.id = %vid, size = v.size, replicas = ?v.replica_set, "clone copied");
            Ok(())
        });
        self.restores.spawn(id.clone(), key, "copying a clone", work);
        Err(CsiError::Aborted(format!("volume {id}: copying {what} started (CreateVolume succeeds when it is done)")))
    }

    /// For an existing volume created from a volume or a snapshot: `Some` (the answer) when
    /// it is complete, ABORTED while its copy runs, the copy's error once when it failed;
    /// `None` when it is an unfinished copy no job here is running (the controller
    /// restarted, or the copy failed): never handed out, and the caller starts the copy
    /// again (the agent deletes and recopies its own unfinished clones; one of an earlier
    /// controller is deleted here).
    async fn clone_progress(
        &self,
        id: &str,
        v: &vpb::Volume,
        source: &Source,
    ) -> Result<Option<csi::CreateVolumeResponse>> {
        let done = Ok(Some(csi::CreateVolumeResponse { volume: Some(csi_volume(v)) }));
        let agent_state = v.labels.get(LABEL_AGENT_CLONE_STATE);
        let key = source.label().unwrap_or_default();
        let what = source.describe();
        // Never done while this controller's job for it still runs (the agent labels the
        // clone done a moment before the job ends): a DeleteVolume right after a
        // successful CreateVolume must not find the volume still being filled.
        if self.restores.running(id) {
            return Err(CsiError::Aborted(format!(
                "volume {id}: copying {what} (CreateVolume succeeds when it is done)"
            )));
        }
        // The agent labels a clone done once its copy is complete.
        if agent_state.map(String::as_str) == Some(AGENT_CLONE_DONE) || v.labels.contains_key(LABEL_FILLED) {
            return done;
        }
        // Clones of earlier controllers name a marker snapshot instead. Empty volumes are
        // complete when created; so are clones made before copies ran in the background
        // (neither label: the agent copied them inside CreateVolume).
        let marker = v.labels.get(LABEL_DONE_MARKER);
        if agent_state.is_none() && marker.is_none() {
            return done;
        }
        match self.restores.poll(id, &key) {
            RestoreState::Done => done,
            RestoreState::Running => {
                Err(CsiError::Aborted(format!("volume {id}: copying {what} (CreateVolume succeeds when it is done)")))
            }
            RestoreState::Failed(code, e) => Err(RestoreState::failure(code, &e, id, &format!("copying {what}"))),
            RestoreState::Unknown if self.filled(v, marker.map(String::as_str)).await? => done,
            // The agent's clone: its CloneVolume copies it again, or answers that its copy
            // still runs (a copy outlives a controller that stopped).
            RestoreState::Unknown if agent_state.is_some() => Ok(None),
            RestoreState::Unknown => {
                tracing::info!(volume.id = %id, source = %what, "deleting an unfinished copy to start it again");
                match self.agent().delete_volume(vpb::DeleteVolumeRequest { name: id.to_string() }).await {
                    Ok(_) => Ok(None),
                    Err(s) if s.code() == tonic::Code::NotFound => Ok(None),
                    Err(s) => Err(CsiError::agent(format!("deleting {id}, an unfinished copy of {what}"), s)),
                }
            }
        }
    }

    /// CreateVolume from a backup (see `crate::backups`): the volume is created, then
    /// filled in the background; ABORTED until the restore is done.
    async fn create_from_backup(
        &self,
        r: &csi::CreateVolumeRequest,
        p: &Params,
        id: &str,
        b: &BackupRef,
        source: &Source,
    ) -> Result<csi::CreateVolumeResponse> {
        let backups = self.backups.clone().ok_or_else(|| {
            CsiError::FailedPrecondition(format!(
                "volume {id} is to be restored from {b}, but this CSI controller has no backup repository \
                 (hlstore csi --backup-repo, with the repository password in HLSTORE_REPO_PASSWORD)"
            ))
        })?;
        // A volume already restored is returned as is (its backup may be pruned by now).
        if let Some(v) = self.get_volume(id).await? {
            if v.labels.get(LABEL_SOURCE).cloned() == source.label() && self.filled(&v, Some(DONE_MARKER)).await? {
                return Ok(csi::CreateVolumeResponse { volume: Some(csi_volume(&v)) });
            }
        }
        let info =
            backups.resolve(b).await?.ok_or_else(|| CsiError::NotFound(format!("snapshot {b}: no such backup")))?;
        let need = info.size.div_ceil(params::BLOCK) * params::BLOCK;
        let range = r.capacity_range.as_ref();
        if let Some(rg) = range {
            if rg.limit_bytes > 0 && (rg.limit_bytes as u64) < need {
                return Err(CsiError::OutOfRange(format!(
                    "backup {} needs {need} bytes, more than the limit of {} bytes",
                    info.id, rg.limit_bytes
                )));
            }
        }
        let size = need.max(if range.is_some() { params::size_for(range)? } else { 0 });
        let v = match self.get_volume(id).await? {
            Some(v) => {
                if v.labels.get(LABEL_SOURCE).cloned() != source.label() {
                    return Err(CsiError::AlreadyExists(format!("volume {id} exists with another content source")));
                }
                v
            }
            None => {
                // Whatever this controller knew of an earlier volume of that name is stale.
                self.restores.forget(id);
                let nodes = self.placement(p, r.accessibility_requirements.as_ref()).await?;
                let mut labels: HashMap<String, String> = p.labels.clone().into_iter().collect();
                labels.insert(LABEL_CSI_NAME.into(), r.name.clone());
                labels.extend(source.label().map(|l| (LABEL_SOURCE.to_string(), l)));
                labels.insert(LABEL_RESTORED_FROM.into(), info.id.clone());
                let req = vpb::CreateVolumeRequest {
                    name: id.to_string(),
                    size,
                    replicas: p.replicas,
                    nodes,
                    write_quorum: 0,
                    labels,
                };
                let v = self
                    .agent()
                    .create_volume(req)
                    .await
                    .map_err(|s| CsiError::agent(format!("creating volume {id}"), s))?
                    .into_inner();
                tracing::info!(volume.id = %id, backup = %info.id, size, "volume created for a restore");
                v
            }
        };
        // The backup this volume was created for (a `latest` handle may resolve to a newer
        // one by now: the volume keeps the one it started with).
        let backup = v.labels.get(LABEL_RESTORED_FROM).cloned().unwrap_or(info.id);
        match self.restores.poll(id, &backup) {
            RestoreState::Done => Ok(csi::CreateVolumeResponse { volume: Some(csi_volume(&v)) }),
            RestoreState::Running => Err(CsiError::Aborted(format!(
                "volume {id}: restoring backup {backup} (CreateVolume succeeds when it is done)"
            ))),
            // The volume exists and the next call restarts the restore.
            RestoreState::Failed(code, e) => {
                Err(RestoreState::failure(code, &e, id, &format!("restoring backup {backup}")))
            }
            RestoreState::Unknown if self.filled(&v, Some(DONE_MARKER)).await? => {
                Ok(csi::CreateVolumeResponse { volume: Some(csi_volume(&v)) })
            }
            RestoreState::Unknown => {
                self.restores.start(backups, backup.clone(), id.to_string(), self.agent());
                Err(CsiError::Aborted(format!("volume {id}: restore of backup {backup} started")))
            }
        }
    }

    /// Whether volume `v`, filled in the background, is complete: it carries
    /// [`LABEL_FILLED`], or the snapshot `legacy_marker` earlier controllers took instead.
    /// Such a snapshot is replaced by the label and deleted (it kept alive every block it
    /// saw, for as long as the volume lived); if that fails, it still counts.
    async fn filled(&self, v: &vpb::Volume, legacy_marker: Option<&str>) -> Result<bool> {
        if v.labels.contains_key(LABEL_FILLED) {
            return Ok(true);
        }
        let Some(marker) = legacy_marker else { return Ok(false) };
        let id = &v.name;
        let marked = match self.agent().list_snapshots(vpb::ListSnapshotsRequest { volume: id.clone() }).await {
            Ok(r) => r.into_inner().snapshots.iter().any(|s| s.name == marker),
            Err(s) if s.code() == tonic::Code::NotFound => false,
            Err(s) => return Err(CsiError::agent(format!("listing the snapshots of {id}"), s)),
        };
        if marked {
            let retire = async {
                crate::backups::mark_filled(self.agent(), id, &format!("snapshot:{marker}")).await?;
                let req = vpb::DeleteSnapshotRequest { volume: id.clone(), name: marker.to_string() };
                self.agent()
                    .delete_snapshot(req)
                    .await
                    .map_err(|s| CsiError::agent(format!("deleting the marker snapshot of {id}"), s))?;
                Ok::<(), CsiError>(())
            };
            match retire.await {
                Ok(()) => tracing::info!(volume.id = %id, marker, "marker snapshot replaced by a label"),
                Err(e) => tracing::warn!(volume.id = %id, marker, error = %e, "could not replace a marker snapshot"),
            }
        }
        Ok(marked)
    }

    pub(super) async fn delete(&self, r: csi::DeleteVolumeRequest) -> Result<csi::DeleteVolumeResponse> {
        required(&r.volume_id, "volume_id")?;
        let _g = self.locks.try_lock(&r.volume_id, "DeleteVolume")?;
        if self.restores.running(&r.volume_id) {
            return Err(CsiError::Aborted(format!(
                "volume {} is still being filled (a restore or a clone's copy); retry when it is done",
                r.volume_id
            )));
        }
        self.restores.forget(&r.volume_id);
        let Some(v) = self.get_volume(&r.volume_id).await? else { return Ok(csi::DeleteVolumeResponse {}) };
        if !v.attached_node.is_empty() {
            return Err(CsiError::FailedPrecondition(format!(
                "volume {} is published on node {}; unpublish it first",
                v.name, v.attached_node
            )));
        }
        // Snapshots live in the volume's replicas: deleting it would delete the
        // VolumeSnapshots made of it (the spec's "volume in use" FAILED_PRECONDITION).
        let snaps = match self.agent().list_snapshots(vpb::ListSnapshotsRequest { volume: v.name.clone() }).await {
            Ok(r) => r.into_inner().snapshots,
            Err(s) if s.code() == tonic::Code::NotFound => Vec::new(),
            Err(s) => return Err(CsiError::agent(format!("listing the snapshots of {}", v.name), s)),
        };
        let csi_snaps: Vec<String> = snaps
            .iter()
            .filter(|s| s.volume == v.name && s.labels.contains_key(LABEL_CSI_NAME))
            .map(|s| ids::snapshot_id(&s.volume, &s.name))
            .collect();
        if !csi_snaps.is_empty() {
            return Err(CsiError::FailedPrecondition(format!(
                "volume {} has snapshots ({}) that live in its replicas; delete those VolumeSnapshots first",
                v.name,
                csi_snaps.join(", ")
            )));
        }
        match self.agent().delete_volume(vpb::DeleteVolumeRequest { name: v.name.clone() }).await {
            Ok(_) => {}
            Err(s) if s.code() == tonic::Code::NotFound => {}
            Err(s) => return Err(CsiError::agent(format!("deleting volume {}", v.name), s)),
        }
        tracing::info!(volume.id = %v.name, "volume deleted");
        Ok(csi::DeleteVolumeResponse {})
    }

    pub(super) async fn publish(
        &self,
        r: csi::ControllerPublishVolumeRequest,
    ) -> Result<csi::ControllerPublishVolumeResponse> {
        required(&r.volume_id, "volume_id")?;
        required(&r.node_id, "node_id")?;
        Capability::require(r.volume_capability.as_ref())?;
        let _g = self.locks.try_lock(&r.volume_id, "ControllerPublishVolume")?;
        let v = self.require_volume(&r.volume_id).await?;
        if !self.nodes().await?.iter().any(|n| n.id == r.node_id) {
            return Err(CsiError::NotFound(format!("node {} is not a member of the hlstore cluster", r.node_id)));
        }
        let attached = if v.attached_node == r.node_id && !v.nbd_uri.is_empty() {
            v
        } else if !v.attached_node.is_empty() {
            return Err(CsiError::FailedPrecondition(format!(
                "volume {} is published on node {}; a volume is used on one node at a time",
                v.name, v.attached_node
            )));
        } else {
            let req = vpb::AttachVolumeRequest {
                name: v.name.clone(),
                node: r.node_id.clone(),
                nbd_listen: String::new(),
                force: false,
            };
            let a = self
                .agent()
                .attach_volume(req)
                .await
                .map_err(|s| match s.code() {
                    // The replicas name an engine elsewhere (its node unreachable, or it
                    // attached meanwhile): published to another node, as far as anyone knows.
                    tonic::Code::Aborted => {
                        CsiError::FailedPrecondition(format!("volume {} is held elsewhere: {}", v.name, s.message()))
                    }
                    _ => CsiError::agent(format!("starting the engine of {} on {}", v.name, r.node_id), s),
                })?
                .into_inner();
            tracing::info!(volume.id = %a.name, node = %r.node_id, uri = %a.nbd_uri, "volume published");
            a
        };
        let publish_context = HashMap::from([(crate::PUBLISH_NBD_URI.to_string(), attached.nbd_uri)]);
        Ok(csi::ControllerPublishVolumeResponse { publish_context })
    }

    pub(super) async fn unpublish(
        &self,
        r: csi::ControllerUnpublishVolumeRequest,
    ) -> Result<csi::ControllerUnpublishVolumeResponse> {
        required(&r.volume_id, "volume_id")?;
        let _g = self.locks.try_lock(&r.volume_id, "ControllerUnpublishVolume")?;
        // A volume that no longer exists is unpublished from every node: OK, as the spec's
        // idempotency rule asks (the external-attacher retries until it gets it).
        let Some(v) = self.get_volume(&r.volume_id).await? else {
            tracing::info!(volume.id = %r.volume_id, "unpublish of a volume that does not exist: nothing to do");
            return Ok(csi::ControllerUnpublishVolumeResponse {});
        };
        if !r.node_id.is_empty() && !v.attached_node.is_empty() && r.node_id != v.attached_node {
            return Ok(csi::ControllerUnpublishVolumeResponse {});
        }
        if v.attached_node.is_empty() {
            // Attachments are reported by the nodes that hold them: with the node asked about
            // unreachable, "not published there" is not known, and OK would let the volume be
            // published elsewhere while that node may still serve it.
            let nodes = self.nodes().await?;
            let down: Vec<&str> = nodes.iter().filter(|n| !n.reachable).map(|n| n.id.as_str()).collect();
            let unknown = if r.node_id.is_empty() { !down.is_empty() } else { down.contains(&r.node_id.as_str()) };
            if unknown {
                return Err(CsiError::Unavailable(format!(
                    "volume {}: node(s) {} cannot be reached, so whether it is still published there is unknown",
                    v.name,
                    down.join(", ")
                )));
            }
            return Ok(csi::ControllerUnpublishVolumeResponse {});
        }
        self.agent()
            .detach_volume(vpb::DetachVolumeRequest { name: v.name.clone() })
            .await
            .map_err(|s| CsiError::agent(format!("stopping the engine of {}", v.name), s))?;
        tracing::info!(volume.id = %v.name, node = %v.attached_node, "volume unpublished");
        Ok(csi::ControllerUnpublishVolumeResponse {})
    }

    pub(super) async fn validate(
        &self,
        r: csi::ValidateVolumeCapabilitiesRequest,
    ) -> Result<csi::ValidateVolumeCapabilitiesResponse> {
        required(&r.volume_id, "volume_id")?;
        let caps = capability::parse_all(&r.volume_capabilities)?;
        self.require_volume(&r.volume_id).await?;
        let why = caps
            .iter()
            .find_map(Capability::unsupported_reason)
            .or_else(|| params::parse_params(&r.parameters).err().map(|e| e.to_string()));
        Ok(match why {
            Some(message) => csi::ValidateVolumeCapabilitiesResponse { confirmed: None, message },
            None => csi::ValidateVolumeCapabilitiesResponse {
                confirmed: Some(csi::validate_volume_capabilities_response::Confirmed {
                    volume_context: r.volume_context,
                    volume_capabilities: r.volume_capabilities,
                    parameters: r.parameters,
                    mutable_parameters: HashMap::new(),
                }),
                message: String::new(),
            },
        })
    }

    pub(super) async fn list(&self, r: csi::ListVolumesRequest) -> Result<csi::ListVolumesResponse> {
        params::page::<()>(&[], r.max_entries, "")?;
        let mut vols = self
            .agent()
            .list_volumes(vpb::ListVolumesRequest {})
            .await
            .map_err(|s| CsiError::agent("listing volumes", s))?
            .into_inner()
            .volumes;
        vols.sort_by(|a, b| a.name.cmp(&b.name));
        let (page, next_token) = params::page(&vols, r.max_entries, &r.starting_token)?;
        let entries = page
            .iter()
            .map(|v| {
                let (published_node_ids, condition) = status_of(v);
                csi::list_volumes_response::Entry {
                    volume: Some(csi_volume(v)),
                    status: Some(csi::list_volumes_response::VolumeStatus {
                        published_node_ids,
                        volume_condition: Some(condition),
                    }),
                }
            })
            .collect();
        Ok(csi::ListVolumesResponse { entries, next_token })
    }

    pub(super) async fn get(&self, r: csi::ControllerGetVolumeRequest) -> Result<csi::ControllerGetVolumeResponse> {
        required(&r.volume_id, "volume_id")?;
        let v = self.require_volume(&r.volume_id).await?;
        let (published_node_ids, condition) = status_of(&v);
        Ok(csi::ControllerGetVolumeResponse {
            volume: Some(csi_volume(&v)),
            status: Some(csi::controller_get_volume_response::VolumeStatus {
                published_node_ids,
                volume_condition: Some(condition),
            }),
        })
    }

    /// The largest volume whose replicas fit (the agents' placement rule, see
    /// hlstore_node::placement), from the room each reachable node reports; 0 for
    /// capabilities or parameters the driver cannot serve; no limit when an agent does
    /// not report its space.
    ///
    /// With `accessible_topology` (the provisioner's capacity tracking asks per node
    /// segment): 0 for a segment that names no reachable hlstore node; for a StorageClass
    /// with `dataLocality: best-effort`, whose first replica goes to that node, the largest
    /// volume with one replica there and the others on the roomiest other nodes; otherwise
    /// the cluster-wide answer (replicas go anywhere, and the volume is reachable from
    /// every node).
    pub(super) async fn capacity(&self, r: csi::GetCapacityRequest) -> Result<csi::GetCapacityResponse> {
        let caps: Vec<Capability> = r.volume_capabilities.iter().map(Capability::parse).collect::<Result<_>>()?;
        let params = params::parse_params(&r.parameters);
        let servable = caps.iter().all(|c| c.unsupported_reason().is_none());
        let none = csi::GetCapacityResponse {
            available_capacity: 0,
            maximum_volume_size: None,
            minimum_volume_size: Some(params::BLOCK as i64),
        };
        let Ok(p) = params.as_ref().map_err(|_| ()).and_then(|p| if servable { Ok(p) } else { Err(()) }) else {
            return Ok(none);
        };
        let nodes = self.nodes().await?;
        let reachable: Vec<&vpb::Node> = nodes.iter().filter(|n| n.reachable).collect();
        let segment = match r.accessible_topology.as_ref().filter(|t| !t.segments.is_empty()) {
            None => None,
            Some(t) => match t.segments.get(crate::TOPOLOGY_NODE_KEY) {
                Some(n) if t.segments.len() == 1 && reachable.iter().any(|r| r.id == *n) => Some(n.clone()),
                _ => return Ok(none),
            },
        };
        let want = if p.replicas == 0 { reachable.len().min(3) } else { p.replicas as usize };
        let room = |n: &vpb::Node| (n.capacity_bytes > 0).then(|| n.available_bytes.saturating_sub(n.promised_bytes));
        // The `k`-th largest of `rooms` (1-based); `None` (no limit known) if any is unknown.
        let kth = |rooms: Option<Vec<u64>>, k: usize| -> Option<u64> {
            let mut rooms = rooms?;
            rooms.sort_unstable_by(|a, b| b.cmp(a));
            Some(if k == 0 { u64::MAX } else { rooms.get(k - 1).copied().unwrap_or(0) })
        };
        let bytes = match segment {
            Some(local) if p.data_locality == DataLocality::BestEffort && want > 0 => {
                let own = reachable.iter().find(|n| n.id == local).and_then(|n| room(n));
                let others = reachable.iter().filter(|n| n.id != local).map(|n| room(n)).collect();
                match (own, kth(others, want - 1)) {
                    (Some(own), Some(rest)) => Some(own.min(rest)),
                    _ => None,
                }
            }
            _ if want == 0 => Some(0),
            _ => kth(reachable.iter().map(|n| room(n)).collect(), want),
        };
        let available = match bytes {
            // An agent that does not report its space: no limit is known.
            None => i64::MAX,
            // Whole blocks only.
            Some(b) => i64::try_from(b - b % params::BLOCK).unwrap_or(i64::MAX),
        };
        Ok(csi::GetCapacityResponse {
            available_capacity: available,
            maximum_volume_size: (available != i64::MAX).then_some(available),
            minimum_volume_size: Some(params::BLOCK as i64),
        })
    }

    pub(super) async fn expand(
        &self,
        r: csi::ControllerExpandVolumeRequest,
    ) -> Result<csi::ControllerExpandVolumeResponse> {
        required(&r.volume_id, "volume_id")?;
        let range =
            r.capacity_range.as_ref().ok_or_else(|| CsiError::InvalidArgument("capacity_range is required".into()))?;
        let want = params::size_for(Some(range))?;
        if let Some(cap) = r.volume_capability.as_ref() {
            Capability::parse(cap)?;
        }
        let _g = self.locks.try_lock(&r.volume_id, "ControllerExpandVolume")?;
        let v = self.require_volume(&r.volume_id).await?;
        let size = if v.size >= want {
            v.size
        } else {
            let req = vpb::ExpandVolumeRequest { name: v.name.clone(), size: want };
            let e = self
                .agent()
                .expand_volume(req)
                .await
                .map_err(|s| CsiError::agent(format!("expanding volume {} to {want} bytes", v.name), s))?
                .into_inner();
            tracing::info!(volume.id = %v.name, size = e.size, "volume expanded");
            e.size
        };
        // The attached device (and a filesystem on it) must follow on the node.
        Ok(csi::ControllerExpandVolumeResponse { capacity_bytes: size as i64, node_expansion_required: true })
    }
}

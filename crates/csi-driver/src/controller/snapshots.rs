//! Snapshot RPCs of the controller. Snapshot ids are `<volume>@<snapshot>`; snapshot
//! names are unique across volumes (the spec's ALREADY_EXISTS rule for a name reused
//! with another source).

use hlstore_proto::csi;
use hlstore_proto::volume as vpb;
use tonic::Code;

use super::params::{self, LABEL_CSI_NAME};
use super::ControllerService;
use crate::error::{required, CsiError, Result};
use crate::ids;

fn csi_snapshot(s: &vpb::Snapshot) -> csi::Snapshot {
    csi::Snapshot {
        size_bytes: s.size as i64,
        snapshot_id: ids::snapshot_id(&s.volume, &s.name),
        source_volume_id: s.volume.clone(),
        creation_time: Some(prost_types::Timestamp { seconds: s.created, nanos: 0 }),
        ready_to_use: s.ready,
        group_snapshot_id: String::new(),
    }
}

impl ControllerService {
    /// Snapshots of `volume` (every volume when empty); an unknown volume has none.
    async fn snapshots_of(&self, volume: &str) -> Result<Vec<vpb::Snapshot>> {
        match self.agent().list_snapshots(vpb::ListSnapshotsRequest { volume: volume.to_string() }).await {
            Ok(r) => Ok(r.into_inner().snapshots),
            Err(s) if s.code() == Code::NotFound && !volume.is_empty() => Ok(Vec::new()),
            Err(s) => Err(CsiError::agent("listing snapshots", s)),
        }
    }

    pub(super) async fn create_snapshot(&self, r: csi::CreateSnapshotRequest) -> Result<csi::CreateSnapshotResponse> {
        required(&r.source_volume_id, "source_volume_id")?;
        required(&r.name, "name")?;
        if let Some(k) = r.parameters.keys().find(|k| !k.starts_with("csi.storage.k8s.io/")) {
            return Err(CsiError::InvalidArgument(format!("unknown snapshot parameter {k:?}")));
        }
        let name = ids::name_for(&r.name);
        let _g = self.locks.try_lock(&r.source_volume_id, "CreateSnapshot")?;
        self.require_volume(&r.source_volume_id).await?;
        if let Some(s) = self.snapshots_of("").await?.into_iter().find(|s| s.name == name) {
            if s.volume != r.source_volume_id {
                return Err(CsiError::AlreadyExists(format!(
                    "snapshot name {:?} is already used for volume {}",
                    r.name, s.volume
                )));
            }
            return Ok(csi::CreateSnapshotResponse { snapshot: Some(csi_snapshot(&s)) });
        }
        let req = vpb::CreateSnapshotRequest {
            volume: r.source_volume_id.clone(),
            name: name.clone(),
            labels: [(LABEL_CSI_NAME.to_string(), r.name.clone())].into_iter().collect(),
        };
        let s = self
            .agent()
            .create_snapshot(req)
            .await
            .map_err(|s| CsiError::agent(format!("snapshotting volume {}", r.source_volume_id), s))?
            .into_inner();
        tracing::info!(volume.id = %s.volume, snapshot = %s.name, "snapshot created");
        Ok(csi::CreateSnapshotResponse { snapshot: Some(csi_snapshot(&s)) })
    }

    pub(super) async fn delete_snapshot(&self, r: csi::DeleteSnapshotRequest) -> Result<csi::DeleteSnapshotResponse> {
        required(&r.snapshot_id, "snapshot_id")?;
        // A backup handle (a pre-provisioned VolumeSnapshotContent): backups are never
        // deleted through CSI; prune them with the repository's retention.
        if crate::backups::BackupRef::parse(&r.snapshot_id).is_some() {
            return Ok(csi::DeleteSnapshotResponse {});
        }
        // An id this driver never made names no snapshot: deleting it is done.
        let Ok((volume, name)) = ids::parse_snapshot_id(&r.snapshot_id) else {
            return Ok(csi::DeleteSnapshotResponse {});
        };
        let _g = self.locks.try_lock(&volume, "DeleteSnapshot")?;
        match self.agent().delete_snapshot(vpb::DeleteSnapshotRequest { volume, name }).await {
            Ok(_) => Ok(csi::DeleteSnapshotResponse {}),
            Err(s) if s.code() == Code::NotFound => Ok(csi::DeleteSnapshotResponse {}),
            Err(s) => Err(CsiError::agent(format!("deleting snapshot {}", r.snapshot_id), s)),
        }
    }

    /// ListSnapshots of a backup handle: the backup as a ready snapshot, or nothing.
    async fn list_backup_snapshot(&self, b: Result<crate::backups::BackupRef>) -> Result<csi::ListSnapshotsResponse> {
        let Ok(b) = b else { return Ok(csi::ListSnapshotsResponse::default()) };
        let Some(backups) = &self.backups else { return Ok(csi::ListSnapshotsResponse::default()) };
        let Some(info) = backups.resolve(&b).await? else { return Ok(csi::ListSnapshotsResponse::default()) };
        let snap = csi::Snapshot {
            size_bytes: i64::try_from(info.size).unwrap_or(i64::MAX),
            snapshot_id: b.to_string(),
            source_volume_id: String::new(),
            creation_time: Some(prost_types::Timestamp { seconds: i64::try_from(info.time).unwrap_or(0), nanos: 0 }),
            ready_to_use: true,
            group_snapshot_id: String::new(),
        };
        Ok(csi::ListSnapshotsResponse {
            entries: vec![csi::list_snapshots_response::Entry { snapshot: Some(snap) }],
            next_token: String::new(),
        })
    }

    pub(super) async fn list_snapshots(&self, r: csi::ListSnapshotsRequest) -> Result<csi::ListSnapshotsResponse> {
        params::page::<()>(&[], r.max_entries, "")?;
        if let Some(b) = crate::backups::BackupRef::parse(&r.snapshot_id) {
            return self.list_backup_snapshot(b).await;
        }
        let mut snaps = if !r.snapshot_id.is_empty() {
            match ids::parse_snapshot_id(&r.snapshot_id) {
                Ok((v, n)) => self.snapshots_of(&v).await?.into_iter().filter(|s| s.name == n).collect(),
                Err(_) => Vec::new(),
            }
        } else {
            self.snapshots_of(&r.source_volume_id).await?
        };
        if !r.source_volume_id.is_empty() {
            snaps.retain(|s| s.volume == r.source_volume_id);
        }
        // Done markers and a clone's temporary snapshot are no VolumeSnapshots.
        snaps.retain(|s| !crate::backups::internal_snapshot(&s.name, &s.labels));
        let mut entries: Vec<csi::Snapshot> = snaps.iter().map(csi_snapshot).collect();
        entries.sort_by(|a, b| a.snapshot_id.cmp(&b.snapshot_id));
        let (page, next_token) = params::page(&entries, r.max_entries, &r.starting_token)?;
        Ok(csi::ListSnapshotsResponse {
            entries: page.into_iter().map(|s| csi::list_snapshots_response::Entry { snapshot: Some(s) }).collect(),
            next_token,
        })
    }
}

//! Volumes restored from the backup repository, the Kubernetes way: a pre-provisioned
//! VolumeSnapshotContent whose `snapshotHandle` names a backup, a VolumeSnapshot bound to
//! it, and a PVC with that VolumeSnapshot as `dataSource`. All of it can live in git.
//!
//! Handles: `backup:<id>` (a backup id, or a unique prefix) or
//! `backup:latest:<namespace>/<claim>` (the newest backup whose `pvc` label is
//! `<namespace>/<claim>`, resolved when the volume is created).
//!
//! - `ListSnapshots` of such a handle answers from the repository (ready, with the size a
//!   volume needs), so the external-snapshotter marks the VolumeSnapshot ready.
//! - `CreateVolume` from it creates the volume (labelled like any other, its content
//!   source = the handle) and restores the backup into it in the background, through the
//!   agent's authenticated write API; until the restore is done it answers ABORTED
//!   ("pending", the external-provisioner retries), then OK. A finished restore leaves a
//!   snapshot [`DONE_MARKER`] on the volume (durable: a restarted controller, or a repeated
//!   CreateVolume, never writes the backup over a volume already handed out). A failed or
//!   interrupted restore is started again on the next call (writes are idempotent).
//!
//! The repository itself is behind [`BackupSource`], implemented by the hlstore binary
//! over `hlstore_backup` (this crate stays free of it), and configured with
//! `hlstore csi --backup-repo`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::error::{CsiError, Result};

/// Snapshot left on a volume once its restore is complete.
pub const DONE_MARKER: &str = "csi-restore-done";

/// Prefix of snapshot handles that name a backup.
pub const HANDLE_PREFIX: &str = "backup:";

/// A backup named by a snapshot handle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackupRef {
    /// A backup id (or a unique prefix of one).
    Id(String),
    /// The newest backup of a claim.
    Latest { namespace: String, claim: String },
}

impl BackupRef {
    /// Parses a snapshot handle; `None` if it does not name a backup.
    pub fn parse(handle: &str) -> Option<Result<BackupRef>> {
        let rest = handle.strip_prefix(HANDLE_PREFIX)?;
        let bad = || {
            CsiError::InvalidArgument(format!(
                "snapshot handle {handle:?}: expected backup:<id> or backup:latest:<namespace>/<claim>"
            ))
        };
        let ok =
            |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
        Some(match rest.strip_prefix("latest:") {
            Some(claim) => match claim.split_once('/') {
                Some((ns, c)) if ok(ns) && ok(c) => Ok(BackupRef::Latest { namespace: ns.into(), claim: c.into() }),
                _ => Err(bad()),
            },
            None if ok(rest) => Ok(BackupRef::Id(rest.into())),
            None => Err(bad()),
        })
    }
}

impl std::fmt::Display for BackupRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BackupRef::Id(id) => write!(f, "{HANDLE_PREFIX}{id}"),
            BackupRef::Latest { namespace, claim } => write!(f, "{HANDLE_PREFIX}latest:{namespace}/{claim}"),
        }
    }
}

/// A backup as the controller needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupInfo {
    pub id: String,
    /// Bytes a volume needs to hold it.
    pub size: u64,
    /// Seconds since the epoch.
    pub time: u64,
}

/// The backup repository, as the controller uses it.
#[tonic::async_trait]
pub trait BackupSource: Send + Sync + std::fmt::Debug {
    /// The backup `r` names, or `None` if there is none.
    async fn resolve(&self, r: &BackupRef) -> Result<Option<BackupInfo>>;
    /// Writes backup `id` into the existing, detached volume `volume` (through the agent),
    /// and leaves it detached. May take long.
    async fn restore(&self, id: &str, volume: &str) -> Result<()>;
}

/// State of the restores this controller runs, by volume.
#[derive(Clone, Default)]
pub struct Restores {
    jobs: Arc<Mutex<HashMap<String, Job>>>,
}

#[derive(Debug, Clone)]
enum Job {
    Running { backup: String },
    Done { backup: String },
    Failed { backup: String, error: String },
}

/// What [`Restores::poll`] found for a volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RestoreState {
    /// No restore known (never started here, or the controller restarted).
    Unknown,
    Running,
    Done,
    Failed(String),
}

impl Restores {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Job>> {
        self.jobs.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The state of the restore of `backup` into `volume`; a failure is reported once and
    /// forgotten (the next call starts it again).
    pub fn poll(&self, volume: &str, backup: &str) -> RestoreState {
        let mut jobs = self.lock();
        match jobs.get(volume) {
            Some(Job::Running { backup: b }) if b == backup => RestoreState::Running,
            Some(Job::Done { backup: b }) if b == backup => RestoreState::Done,
            Some(Job::Failed { backup: b, error }) if b == backup => {
                let e = error.clone();
                jobs.remove(volume);
                RestoreState::Failed(e)
            }
            _ => RestoreState::Unknown,
        }
    }

    /// Starts restoring `backup` into `volume` in the background; when it is done, the
    /// [`DONE_MARKER`] snapshot is taken through `agent`.
    pub fn start(
        &self,
        source: Arc<dyn BackupSource>,
        backup: String,
        volume: String,
        agent: hlstore_proto::volume::volumes_client::VolumesClient<tonic::transport::Channel>,
    ) {
        self.lock().insert(volume.clone(), Job::Running { backup: backup.clone() });
        let this = self.clone();
        tokio::spawn(async move {
            tracing::info!(volume.id = %volume, backup = %backup, "restoring a backup into a new volume");
            let done = async {
                source.restore(&backup, &volume).await?;
                let req = hlstore_proto::volume::CreateSnapshotRequest {
                    volume: volume.clone(),
                    name: DONE_MARKER.into(),
                    labels: Default::default(),
                };
                let mut agent = agent;
                agent
                    .create_snapshot(req)
                    .await
                    .map_err(|s| CsiError::agent(format!("marking volume {volume} restored"), s))?;
                Ok::<(), CsiError>(())
            };
            let job = match done.await {
                Ok(()) => {
                    tracing::info!(volume.id = %volume, backup = %backup, "backup restored");
                    Job::Done { backup }
                }
                Err(e) => {
                    tracing::warn!(volume.id = %volume, backup = %backup, error = %e, "restoring the backup failed");
                    Job::Failed { backup, error: e.to_string() }
                }
            };
            this.lock().insert(volume, job);
        });
    }

    /// Forgets `volume` (it was deleted).
    pub fn forget(&self, volume: &str) {
        self.lock().remove(volume);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handles_parse_and_print_back() {
        assert!(BackupRef::parse("vol@snap").is_none());
        let id = BackupRef::parse("backup:3f2a9c").unwrap().unwrap();
        assert_eq!(id, BackupRef::Id("3f2a9c".into()));
        assert_eq!(id.to_string(), "backup:3f2a9c");
        let latest = BackupRef::parse("backup:latest:databases/pgdata").unwrap().unwrap();
        assert_eq!(latest, BackupRef::Latest { namespace: "databases".into(), claim: "pgdata".into() });
        assert_eq!(latest.to_string(), "backup:latest:databases/pgdata");
        for bad in ["backup:", "backup:latest:", "backup:latest:ns", "backup:latest:/x", "backup:a b", "backup:../x/y"]
        {
            let e = BackupRef::parse(bad).unwrap().unwrap_err();
            assert_eq!(e.code(), tonic::Code::InvalidArgument, "{bad}");
        }
    }
}

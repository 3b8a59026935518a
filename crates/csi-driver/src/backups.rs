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
//!   ("pending", the external-provisioner retries), then OK. A finished restore leaves the
//!   label `csi.hlstore.io/filled` on the volume (durable: a restarted controller, or a
//!   repeated CreateVolume, never writes the backup over a volume already handed out;
//!   earlier controllers left the snapshot [`DONE_MARKER`], which still counts). A failed
//!   or interrupted restore is started again on the next call (writes are idempotent).
//!
//! The repository itself is behind [`BackupSource`], implemented by the hlstore binary
//! over `hlstore_backup` (this crate stays free of it), and configured with
//! `hlstore csi --backup-repo`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::error::{CsiError, Result};

/// Snapshot earlier controllers left on a volume once its restore was complete (now the
/// label `csi.hlstore.io/filled`; a volume with this snapshot still counts as complete).
pub const DONE_MARKER: &str = "csi-restore-done";

/// Snapshot earlier controllers left on a clone (a volume created from a snapshot or a
/// volume) once its copy was complete (now the agent's `hlstore.io/clone-state` label).
pub const CLONE_DONE_MARKER: &str = "csi-clone-done";

/// Whether a snapshot of that name is one the driver or the agent takes for its own
/// use (done markers, a clone's temporary snapshot), never a VolumeSnapshot.
pub fn internal_snapshot(name: &str, labels: &HashMap<String, String>) -> bool {
    use crate::controller::params::{AGENT_TEMP_CLONE_PREFIX, LABEL_AGENT_TEMPORARY, LABEL_CSI_NAME};
    name == DONE_MARKER
        || name == CLONE_DONE_MARKER
        || labels.contains_key(LABEL_AGENT_TEMPORARY)
        || (name.starts_with(AGENT_TEMP_CLONE_PREFIX) && !labels.contains_key(LABEL_CSI_NAME))
}

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

/// The newest backup of one volume (label `volume`), for the repository metrics.
#[derive(Debug, Clone, PartialEq)]
pub struct VolumeNewest {
    pub volume: String,
    /// The claim the backup names (labels `pvc-namespace`, `pvc-name`, else `pvc`); empty
    /// when it names none.
    pub pvc_namespace: String,
    pub pvc_name: String,
    /// Creation time of the backup, seconds since the epoch (sub-second part included).
    pub time: f64,
}

/// What the repository holds, as its metrics show it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RepoSummary {
    /// Backups in the repository (of volumes or not).
    pub backups: u64,
    /// The newest backup of each volume, by volume name.
    pub newest: Vec<VolumeNewest>,
}

/// The backup repository, as the controller uses it.
#[tonic::async_trait]
pub trait BackupSource: Send + Sync + std::fmt::Debug {
    /// The backup `r` names, or `None` if there is none.
    async fn resolve(&self, r: &BackupRef) -> Result<Option<BackupInfo>>;
    /// Writes backup `id` into the existing, detached volume `volume` (through the agent),
    /// and leaves it detached. May take long.
    async fn restore(&self, id: &str, volume: &str) -> Result<()>;
    /// Lists the repository's backups (read only: no lease, no write) for the metrics
    /// page (`crate::backup_metrics`).
    async fn summary(&self) -> Result<RepoSummary>;
}

/// The background jobs that fill new volumes (backup restores and clone copies) this
/// controller runs, by volume. A job ends with a label on the volume saying it is complete
/// (a restore: `csi.hlstore.io/filled`, set here; a clone: the agent's
/// `hlstore.io/clone-state`): that label, not this in-memory state, is what says a volume
/// is complete (a restarted controller starts with no jobs).
#[derive(Clone, Default)]
pub struct Restores {
    jobs: Arc<Mutex<HashMap<String, Job>>>,
}

#[derive(Debug, Clone)]
enum Job {
    Running { source: String },
    Done { source: String },
    Failed { source: String, code: tonic::Code, error: String },
}

/// What [`Restores::poll`] found for a volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RestoreState {
    /// No job known (never started here, or the controller restarted).
    Unknown,
    Running,
    Done,
    /// The job failed with this code and message.
    Failed(tonic::Code, String),
}

impl RestoreState {
    /// The error CreateVolume answers for a failed job of `what` into `volume`. Transient
    /// failures (the agent unreachable or restarted, an internal error) are ABORTED, so
    /// the CO retries; others keep their code (a source deleted meanwhile is NOT_FOUND,
    /// nodes without room RESOURCE_EXHAUSTED). Either way the next call starts the job
    /// again.
    pub fn failure(code: tonic::Code, error: &str, volume: &str, what: &str) -> CsiError {
        let msg = format!("volume {volume}: {what} failed ({error}); it is started again on the next call");
        match code {
            tonic::Code::NotFound => CsiError::NotFound(msg),
            tonic::Code::InvalidArgument => CsiError::InvalidArgument(msg),
            tonic::Code::FailedPrecondition => CsiError::FailedPrecondition(msg),
            tonic::Code::OutOfRange => CsiError::OutOfRange(msg),
            tonic::Code::ResourceExhausted => CsiError::ResourceExhausted(msg),
            tonic::Code::Unimplemented => CsiError::Unimplemented(msg),
            tonic::Code::AlreadyExists => CsiError::AlreadyExists(msg),
            _ => CsiError::Aborted(msg),
        }
    }
}

impl Restores {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Job>> {
        self.jobs.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The state of the job filling `volume` from `source` (a backup id, or a clone's
    /// source); a failure is reported once and forgotten (the next call starts it again).
    pub fn poll(&self, volume: &str, source: &str) -> RestoreState {
        let mut jobs = self.lock();
        match jobs.get(volume) {
            Some(Job::Running { source: s }) if s == source => RestoreState::Running,
            Some(Job::Done { source: s }) if s == source => RestoreState::Done,
            Some(Job::Failed { source: s, code, error }) if s == source => {
                let st = RestoreState::Failed(*code, error.clone());
                jobs.remove(volume);
                st
            }
            _ => RestoreState::Unknown,
        }
    }

    /// Whether a job filling `volume` is running.
    pub fn running(&self, volume: &str) -> bool {
        matches!(self.lock().get(volume), Some(Job::Running { .. }))
    }

    /// Starts restoring `backup` into `volume` in the background; when it is done, the
    /// label `csi.hlstore.io/filled` is set through `agent`.
    pub fn start(
        &self,
        source: Arc<dyn BackupSource>,
        backup: String,
        volume: String,
        agent: hlstore_proto::volume::volumes_client::VolumesClient<tonic::transport::Channel>,
    ) {
        let (b, v) = (backup.clone(), volume.clone());
        let work = Box::pin(async move {
            source.restore(&b, &v).await?;
            mark_filled(agent, &v, &b).await
        });
        self.spawn(volume, backup, "restoring a backup into a new volume", work);
    }

    /// Runs `work` (which fills `volume` from `source` and marks it complete) in the
    /// background; [`Self::poll`] follows it.
    pub fn spawn(
        &self,
        volume: String,
        source: String,
        what: &'static str,
        work: std::pin::Pin<Box<dyn std::future::Future<Output = Result<()>> + Send>>,
    ) {
        self.lock().insert(volume.clone(), Job::Running { source: source.clone() });
        let this = self.clone();
        tokio::spawn(async move {
            tracing::info!(volume.id = %volume, source = %source, "{what}");
            let job = match work.await {
                Ok(()) => {
                    tracing::info!(volume.id = %volume, source = %source, "volume filled");
                    Job::Done { source }
                }
                Err(e) => {
                    tracing::warn!(volume.id = %volume, source = %source, error = %e, "filling the volume failed");
                    Job::Failed { source, code: e.code(), error: e.to_string() }
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

/// Labels `volume` complete ([`crate::controller::params::LABEL_FILLED`] = `from`), on every
/// replica, once what filled it is durable.
pub async fn mark_filled(
    mut agent: hlstore_proto::volume::volumes_client::VolumesClient<tonic::transport::Channel>,
    volume: &str,
    from: &str,
) -> Result<()> {
    let req = hlstore_proto::volume::SetVolumeLabelsRequest {
        name: volume.to_string(),
        labels: [(crate::controller::params::LABEL_FILLED.to_string(), from.to_string())].into_iter().collect(),
    };
    agent.set_volume_labels(req).await.map_err(|s| CsiError::agent(format!("marking volume {volume} complete"), s))?;
    Ok(())
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

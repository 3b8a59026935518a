//! The CSI controller's view of the backup repository (`hlstore csi --backup-repo`): the
//! `hlstore_csi::backups::BackupSource` over `hlstore_backup`, restoring through the node
//! agent's authenticated write API (`volume_agent::GrpcAgent`), as `hlstore restore
//! --to-volume` does. Repository work runs on blocking threads.

use std::sync::{Arc, Mutex};

use hlstore_backup::volume::VolumeAgent;
use hlstore_backup::{select, Progress, Repository, RestoreOptions, SnapshotMeta};
use hlstore_csi::backups::{BackupInfo, BackupRef, BackupSource};
use hlstore_csi::{CsiError, Result};
use tokio::runtime::Handle;

use super::backup::RepoArgs;
use super::volume_agent::GrpcAgent;

/// The repository and the agent restores write through.
pub struct RepoBackups {
    repo: RepoArgs,
    endpoint: String,
    /// Opened once (opening derives the key from the password: slow on purpose).
    opened: Mutex<Option<Arc<Repository>>>,
}

impl std::fmt::Debug for RepoBackups {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RepoBackups").field("repo", &self.repo.repo).field("endpoint", &self.endpoint).finish()
    }
}

impl RepoBackups {
    pub fn new(repo: RepoArgs, endpoint: String) -> Self {
        RepoBackups { repo, endpoint, opened: Mutex::new(None) }
    }

    fn repository(&self) -> Result<Arc<Repository>> {
        let mut g = self.opened.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(r) = g.as_ref() {
            return Ok(r.clone());
        }
        let r = Arc::new(self.repo.open().map_err(|e| {
            CsiError::FailedPrecondition(format!("opening the backup repository {}: {e:#}", self.repo.repo))
        })?);
        *g = Some(r.clone());
        Ok(r)
    }
}

/// The backup `r` names among `metas`.
fn find(metas: &[SnapshotMeta], r: &BackupRef) -> Option<SnapshotMeta> {
    match r {
        BackupRef::Id(id) => select::by_id_prefix(metas, id),
        BackupRef::Latest { namespace, claim } => select::newest_of_claim(metas, namespace, claim),
    }
    .cloned()
}

fn internal(what: &str, e: impl std::fmt::Display) -> CsiError {
    CsiError::Internal(format!("{what}: {e}"))
}

#[tonic::async_trait]
impl BackupSource for RepoBackups {
    async fn resolve(&self, r: &BackupRef) -> Result<Option<BackupInfo>> {
        let repo = self.repository()?;
        let r = r.clone();
        tokio::task::spawn_blocking(move || {
            let metas = repo.list_snapshots().map_err(|e| internal("listing backups", e))?;
            Ok(find(&metas, &r).map(|m| {
                let size = hlstore_backup::volume::plan::restore_size(&m).unwrap_or(m.size);
                BackupInfo { id: m.id, size, time: m.time }
            }))
        })
        .await
        .map_err(|e| internal("backup lookup task", e))?
    }

    async fn restore(&self, id: &str, volume: &str) -> Result<()> {
        let repo = self.repository()?;
        let (id, volume, endpoint) = (id.to_string(), volume.to_string(), self.endpoint.clone());
        let handle = Handle::current();
        tokio::task::spawn_blocking(move || {
            let agent = GrpcAgent::connect(handle, &endpoint).map_err(|e| internal("connecting to the agent", e))?;
            let uri = agent.attach_volume(&volume).map_err(|e| internal("attaching the volume", e))?;
            let written = (|| {
                let sink = agent.open_writer(&uri)?;
                let opts = RestoreOptions { progress: Progress::hidden(), workers: 4, state_file: None };
                hlstore_backup::restore_into(&repo, &id, sink.as_ref(), opts)
            })();
            let detached = agent.detach_volume(&volume);
            written.map_err(|e| internal(&format!("restoring backup {id} into {volume}"), e))?;
            detached.map_err(|e| internal("detaching the restored volume", e))?;
            Ok(())
        })
        .await
        .map_err(|e| internal("restore task", e))?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(id: &str, time: u64, labels: &[(&str, &str)]) -> SnapshotMeta {
        SnapshotMeta {
            id: id.into(),
            time,
            nanos: 0,
            source: "volume".into(),
            size: 4096,
            host: "h".into(),
            labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            parent: None,
            chunker: Default::default(),
            stats: Default::default(),
        }
    }

    #[test]
    fn ids_by_unique_prefix_and_latest_by_claim() {
        let metas = [
            meta("aa11", 1, &[("pvc", "db/pg")]),
            meta("aa22", 3, &[("pvc-namespace", "db"), ("pvc-name", "pg")]),
            meta("bb33", 2, &[("pvc", "media/lib")]),
        ];
        assert_eq!(find(&metas, &BackupRef::Id("bb".into())).unwrap().id, "bb33");
        assert!(find(&metas, &BackupRef::Id("aa".into())).is_none(), "ambiguous prefix");
        let latest = BackupRef::Latest { namespace: "db".into(), claim: "pg".into() };
        assert_eq!(find(&metas, &latest).unwrap().id, "aa22");
        assert!(find(&metas, &BackupRef::Latest { namespace: "x".into(), claim: "y".into() }).is_none());
    }
}

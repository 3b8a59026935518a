//! The CSI controller's view of the backup repository (`hlstore csi --backup-repo`): the
//! `hlstore_csi::backups::BackupSource` over `hlstore_backup`, restoring through the node
//! agent's authenticated write API (`volume_agent::GrpcAgent`), as `hlstore restore
//! --to-volume` does. Repository work runs on blocking threads.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use hlstore_backup::volume::VolumeAgent;
use hlstore_backup::{select, Progress, Repository, RestoreOptions, SnapshotMeta};
use hlstore_csi::backups::{BackupInfo, BackupRef, BackupSource, RepoSummary, VolumeNewest};
use hlstore_csi::{CsiError, Result};
use tokio::runtime::Handle;

use super::backup::RepoArgs;
use super::volume_agent::GrpcAgent;

/// The repository and the agent restores write through.
pub struct RepoBackups {
    repo: RepoArgs,
    endpoint: String,
    /// Opened once (opening derives the key from the password: slow on purpose).
    opened: Arc<Mutex<Option<Arc<Repository>>>>,
    /// Backup metadata by id, for [`BackupSource::summary`]: a backup never changes, so a
    /// listing loads only the backups it has not seen.
    metas: Arc<Mutex<HashMap<String, SnapshotMeta>>>,
}

impl std::fmt::Debug for RepoBackups {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RepoBackups").field("repo", &self.repo.repo).field("endpoint", &self.endpoint).finish()
    }
}

impl RepoBackups {
    pub fn new(repo: RepoArgs, endpoint: String) -> Self {
        RepoBackups { repo, endpoint, opened: Default::default(), metas: Default::default() }
    }

    fn repository(&self) -> Result<Arc<Repository>> {
        open_once(&self.repo, &self.opened)
    }
}

fn open_once(repo: &RepoArgs, opened: &Mutex<Option<Arc<Repository>>>) -> Result<Arc<Repository>> {
    let mut g = opened.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(r) = g.as_ref() {
        return Ok(r.clone());
    }
    let r =
        Arc::new(repo.open().map_err(|e| {
            CsiError::FailedPrecondition(format!("opening the backup repository {}: {e:#}", repo.repo))
        })?);
    *g = Some(r.clone());
    Ok(r)
}

/// Brings `cache` up to the repository's backups (loading only new ones; reads only) and
/// returns them.
fn list_cached(repo: &Repository, cache: &Mutex<HashMap<String, SnapshotMeta>>) -> Result<Vec<SnapshotMeta>> {
    // A repository that is gone (an unmounted directory, a deleted bucket) may list as
    // empty: its config must still be there, or the listing fails (and the metrics keep
    // their last values) instead of showing no backups.
    repo.backend().get("config").map_err(|e| internal("reading the repository's config", e))?;
    let ids = repo.snapshot_ids().map_err(|e| internal("listing backups", e))?;
    let mut known = std::mem::take(&mut *cache.lock().unwrap_or_else(|e| e.into_inner()));
    let mut fresh = HashMap::with_capacity(ids.len());
    let mut failed = None;
    for id in ids {
        if let Some(m) = known.remove(&id) {
            fresh.insert(id, m);
            continue;
        }
        match repo.load_snapshot(&id) {
            Ok(s) => {
                fresh.insert(id, s.meta);
            }
            Err(hlstore_backup::Error::UnknownSnapshot(_)) => {} // forgotten concurrently
            Err(e) => {
                failed = Some(internal(&format!("reading backup {id}"), e));
                break;
            }
        }
    }
    if failed.is_some() {
        fresh.extend(known); // kept for the next listing
    }
    let metas = fresh.values().cloned().collect();
    *cache.lock().unwrap_or_else(|e| e.into_inner()) = fresh;
    failed.map_or(Ok(metas), Err)
}

/// The metrics' view of `metas`: their number and the newest backup of each volume.
fn summarize(metas: Vec<SnapshotMeta>) -> RepoSummary {
    let backups = metas.len() as u64;
    let newest = select::newest_per(metas, select::VOLUME_LABEL)
        .into_iter()
        .map(|(volume, m)| {
            let (pvc_namespace, pvc_name) = select::claim_of(&m).unwrap_or_default();
            VolumeNewest { volume, pvc_namespace, pvc_name, time: m.time as f64 + f64::from(m.nanos) / 1e9 }
        })
        .collect();
    RepoSummary { backups, newest }
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

    async fn summary(&self) -> Result<RepoSummary> {
        let (repo, opened, cache) = (self.repo.clone(), self.opened.clone(), self.metas.clone());
        tokio::task::spawn_blocking(move || {
            let repo = open_once(&repo, &opened)?;
            Ok(summarize(list_cached(&repo, &cache)?))
        })
        .await
        .map_err(|e| internal("backup listing task", e))?
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

    #[test]
    fn the_summary_has_the_newest_backup_of_each_volume_with_its_claim() {
        let mut late = meta("a3", 30, &[("volume", "pvc-a"), ("pvc-namespace", "db"), ("pvc-name", "pg")]);
        late.nanos = 500_000_000;
        let metas = vec![
            meta("a1", 10, &[("volume", "pvc-a"), ("pvc-namespace", "db"), ("pvc-name", "pg")]),
            late,
            meta("a2", 20, &[("volume", "pvc-a")]),
            meta("b1", 5, &[("volume", "pvc-b"), ("pvc", "media/lib")]),
            meta("c1", 50, &[("volume", "pvc-c")]),
            meta("f1", 99, &[("host", "pi")]),
        ];
        let s = summarize(metas);
        assert_eq!(s.backups, 6, "every backup counts, of a volume or not");
        let got: Vec<(&str, &str, &str, f64)> = s
            .newest
            .iter()
            .map(|v| (v.volume.as_str(), v.pvc_namespace.as_str(), v.pvc_name.as_str(), v.time))
            .collect();
        assert_eq!(got, [("pvc-a", "db", "pg", 30.5), ("pvc-b", "media", "lib", 5.0), ("pvc-c", "", "", 50.0)]);
    }
}

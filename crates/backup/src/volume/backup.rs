//! `backup_volume`: snapshot the volume, back the snapshot up (incrementally when a base
//! exists), then apply snapshot retention. See the module header for the invariants.

use std::collections::BTreeMap;
use std::time::Instant;

use serde::Serialize;

use super::agent::{VolumeAgent, VolumeSnapshot};
use super::plan::{self, SNAPSHOT_LABEL_REPO};
use super::source::VolumeSource;
use crate::backup::{backup, BackupOptions};
use crate::chunk::ChunkerConfig;
use crate::error::{Error, Result};
use crate::progress::Progress;
use crate::repo::Repository;
use crate::snapshot::{now_secs, Snapshot, SnapshotMeta};

/// Options of one volume backup.
#[derive(Clone, Default)]
pub struct VolumeBackupOptions {
    /// Extra labels (the volume labels are added and win).
    pub labels: BTreeMap<String, String>,
    /// Draw a progress bar on a terminal.
    pub progress: bool,
    /// Hash/compress/encrypt threads (0: one per CPU).
    pub workers: usize,
}

/// What a volume backup did.
#[derive(Debug, Clone, Serialize)]
pub struct VolumeBackupReport {
    #[serde(skip)]
    pub backup: Snapshot,
    pub volume: String,
    /// The hlstore snapshot backed up (kept as the next incremental's base).
    pub volume_snapshot: String,
    /// Backup whose chunks were taken over for unchanged ranges.
    pub base: Option<String>,
    /// True when only changed blocks were read.
    pub incremental: bool,
    /// Bytes fetched from the volume snapshot.
    pub bytes_read: u64,
    /// Bytes in the changed extents (incremental) or allocated extents (full).
    pub bytes_changed: u64,
    /// Older backup snapshots deleted by retention.
    pub deleted_snapshots: Vec<String>,
    /// Snapshots retention could not delete (they are retried by the next backup).
    pub retention_errors: Vec<String>,
}

/// Backs up `volume` into `repo` through `agent`.
pub fn backup_volume(
    repo: &Repository,
    agent: &dyn VolumeAgent,
    volume: &str,
    opts: VolumeBackupOptions,
) -> Result<VolumeBackupReport> {
    if volume.is_empty() {
        return Err(Error::Invalid("empty volume name".into()));
    }
    let started = Instant::now();
    let repo_id = repo.config().id.clone();
    let chunker = repo.config().chunker;
    let existing = agent.list_snapshots(volume)?;
    let backups = repo.list_snapshots()?;
    let base = plan::choose_base(&backups, volume, &existing, chunker).cloned();
    tracing::debug!(volume, base = ?base.as_ref().map(|b| &b.id), elapsed = ?started.elapsed(), "base chosen");

    let name = plan::snapshot_name(now_secs(), rand::random());
    let snap_labels: BTreeMap<String, String> = [(SNAPSHOT_LABEL_REPO.to_string(), repo_id.clone())].into();
    let snap = agent.create_snapshot(volume, &name, &snap_labels)?;
    tracing::debug!(volume, snapshot = %snap.name, elapsed = ?started.elapsed(), "snapshot taken");
    if snap.size == 0 {
        let _ = agent.delete_snapshot(volume, &snap.name);
        return Err(Error::Agent(format!("snapshot {} of volume {volume} reports size 0", snap.name)));
    }
    let run = run_backup(repo, agent, &snap, base.as_ref(), chunker, &opts);
    let (backup, bytes_read, bytes_changed, incremental) = match run {
        Ok(r) => r,
        Err(e) => {
            // Keep the old base; the new snapshot would only pin space.
            if let Err(d) = agent.delete_snapshot(volume, &snap.name) {
                tracing::warn!(volume, snapshot = %snap.name, "cannot delete the snapshot of a failed backup: {d}");
            }
            return Err(e);
        }
    };

    tracing::debug!(volume, elapsed = ?started.elapsed(), "backup stored");
    let (deleted_snapshots, retention_errors) = retention(agent, &repo_id, &snap);
    tracing::debug!(volume, elapsed = ?started.elapsed(), "retention done");
    Ok(VolumeBackupReport {
        backup,
        volume: volume.to_string(),
        volume_snapshot: snap.name,
        base: if incremental { base.map(|b| b.id) } else { None },
        incremental,
        bytes_read,
        bytes_changed,
        deleted_snapshots,
        retention_errors,
    })
}

/// Reads `snap` (only its changes since `base` when that is possible) into a backup.
fn run_backup(
    repo: &Repository,
    agent: &dyn VolumeAgent,
    snap: &VolumeSnapshot,
    base: Option<&SnapshotMeta>,
    chunker: ChunkerConfig,
    opts: &VolumeBackupOptions,
) -> Result<(Snapshot, u64, u64, bool)> {
    let volume = snap.volume.as_str();
    // CBT needs chunk boundaries that do not move: fixed chunks and an unchanged size.
    let base = base.filter(|b| b.size == snap.size && matches!(chunker, ChunkerConfig::Fixed { .. }));
    let t = Instant::now();
    // Incremental: read the chunks around the changed extents. Full: read the allocated
    // extents only (the allocation map is not worth its scan for an incremental).
    let (allocated, changed) = match base.and_then(|b| b.labels.get(plan::LABEL_VOLUME_SNAPSHOT)) {
        Some(from) if !from.is_empty() => (None, Some(agent.changed_blocks(volume, from, &snap.name)?)),
        _ => (Some(agent.changed_blocks(volume, "", &snap.name)?), None),
    };
    let incremental = changed.is_some();
    let extents = changed.as_ref().or(allocated.as_ref()).map(|e| e.as_slice()).unwrap_or_default();
    let bytes_changed = plan::total(&plan::merge_ranges(extents, 0, snap.size));
    tracing::debug!(volume, incremental, extents = extents.len(), elapsed = ?t.elapsed(), "extents read");
    let source = VolumeSource::new(agent, volume, &snap.name, snap.size, allocated, changed);
    let total = if incremental { bytes_changed } else { snap.size };
    let progress = if opts.progress { Progress::auto(&format!("backup {volume}"), total) } else { Progress::hidden() };
    let bopts = BackupOptions {
        labels: plan::backup_labels(&opts.labels, volume, snap.size, &snap.name),
        parent: base.map(|b| b.id.clone()),
        progress,
        workers: opts.workers,
        ..BackupOptions::default()
    };
    let backup = backup(repo, &source, bopts)?;
    Ok((backup, source.bytes_read(), bytes_changed, incremental))
}

/// Deletes this repository's backup snapshots of the volume older than `keep`.
fn retention(agent: &dyn VolumeAgent, repo_id: &str, keep: &VolumeSnapshot) -> (Vec<String>, Vec<String>) {
    let existing = match agent.list_snapshots(&keep.volume) {
        Ok(e) => e,
        Err(e) => return (Vec::new(), vec![format!("listing snapshots: {e}")]),
    };
    let mut deleted = Vec::new();
    let mut errors = Vec::new();
    for name in plan::snapshots_to_delete(&existing, repo_id, keep) {
        match agent.delete_snapshot(&keep.volume, &name) {
            Ok(_) => deleted.push(name),
            Err(e) => {
                tracing::warn!(volume = %keep.volume, snapshot = %name, "cannot delete an old backup snapshot: {e}");
                errors.push(format!("{name}: {e}"));
            }
        }
    }
    (deleted, errors)
}

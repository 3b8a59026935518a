//! `backup_volume`: snapshot the volume, back the snapshot up (incrementally when a base
//! exists), then apply snapshot retention. See the module header for the invariants.

use std::borrow::Borrow;
use std::collections::BTreeMap;
use std::ops::Range;
use std::time::Instant;

use serde::Serialize;

use super::agent::{VolumeAgent, VolumeSnapshot};
use super::plan::{self, SNAPSHOT_LABEL_REPO};
use super::source::VolumeSource;
use crate::backup::{backup, BackupOptions};
use crate::chunk::ChunkerConfig;
use crate::error::{Error, Result};
use crate::progress::Progress;
use crate::repo::{RepoConfig, Repository};
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
    backup_volume_opening(|| Ok(repo), repo.config(), agent, volume, opts)
}

/// [`backup_volume`] while the repository is being opened: `open` (the password's key
/// derivation, ~0.1 s of Argon2id) runs on its own thread while the volume is snapshotted
/// and the changes since the likely base are read ahead; `config` is the repository's
/// ([`Repository::read_config`], readable without the key). If `open` fails, the new
/// snapshot is deleted and its error returned.
pub fn backup_volume_opening<R: Borrow<Repository> + Send>(
    open: impl FnOnce() -> Result<R> + Send,
    config: &RepoConfig,
    agent: &dyn VolumeAgent,
    volume: &str,
    opts: VolumeBackupOptions,
) -> Result<VolumeBackupReport> {
    if volume.is_empty() {
        return Err(Error::Invalid("empty volume name".into()));
    }
    let started = Instant::now();
    std::thread::scope(|s| {
        let opening = s.spawn(open);
        let prepared = prepare(agent, volume, config, started);
        let repo = match opening.join() {
            Ok(Ok(repo)) => repo,
            Ok(Err(e)) => {
                if let Ok(p) = &prepared {
                    drop_snapshot(agent, &p.snap, "the repository did not open");
                }
                return Err(e);
            }
            Err(panic) => std::panic::resume_unwind(panic),
        };
        tracing::debug!(volume, elapsed = ?started.elapsed(), "repository open");
        finish(repo.borrow(), agent, prepared?, opts, started)
    })
}

/// The new snapshot, and what could be read before the repository's key was known.
struct Prepared {
    /// The volume's snapshots before the new one.
    existing: Vec<VolumeSnapshot>,
    snap: VolumeSnapshot,
    ahead: Option<ReadAhead>,
}

/// The changes since the volume snapshot the next backup most likely builds on (this
/// repository's newest: retention keeps one), and the changed bytes read ahead.
struct ReadAhead {
    from: String,
    changed: Vec<Range<u64>>,
    data: Prefetched,
}

/// Bytes read ahead, at most this many (the rest is read as the backup goes).
const READ_AHEAD_BYTES: u64 = 64 << 20;

fn prepare(agent: &dyn VolumeAgent, volume: &str, config: &RepoConfig, started: Instant) -> Result<Prepared> {
    let existing = agent.list_snapshots(volume)?;
    let name = plan::snapshot_name(now_secs(), rand::random());
    let snap_labels: BTreeMap<String, String> = [(SNAPSHOT_LABEL_REPO.to_string(), config.id.clone())].into();
    let snap = agent.create_snapshot(volume, &name, &snap_labels)?;
    tracing::debug!(volume, snapshot = %snap.name, elapsed = ?started.elapsed(), "snapshot taken");
    if snap.size == 0 {
        drop_snapshot(agent, &snap, "it reports size 0");
        return Err(Error::Agent(format!("snapshot {} of volume {volume} reports size 0", snap.name)));
    }
    let likely = existing
        .iter()
        .filter(|s| {
            s.volume == volume
                && s.size == snap.size
                && s.name.starts_with(plan::SNAPSHOT_PREFIX)
                && s.labels.get(SNAPSHOT_LABEL_REPO) == Some(&config.id)
        })
        .max_by_key(|s| (s.seq, s.created));
    let ahead = match likely.filter(|_| matches!(config.chunker, ChunkerConfig::Fixed { .. })) {
        Some(from) => match agent.changed_blocks(volume, &from.name, &snap.name) {
            Ok(changed) => {
                let data = Prefetched::read(agent, &snap, &changed, READ_AHEAD_BYTES);
                tracing::debug!(volume, from = %from.name, bytes = data.bytes, elapsed = ?started.elapsed(), "changes read ahead");
                Some(ReadAhead { from: from.name.clone(), changed, data })
            }
            Err(e) => {
                tracing::debug!(volume, from = %from.name, "no read-ahead: {e}");
                None
            }
        },
        None => None,
    };
    Ok(Prepared { existing, snap, ahead })
}

fn finish(
    repo: &Repository,
    agent: &dyn VolumeAgent,
    prepared: Prepared,
    opts: VolumeBackupOptions,
    started: Instant,
) -> Result<VolumeBackupReport> {
    let Prepared { existing, snap, ahead } = prepared;
    let volume = snap.volume.as_str();
    let repo_id = repo.config().id.clone();
    let chunker = repo.config().chunker;
    let run = repo.list_snapshots().and_then(|backups| {
        let base = plan::choose_base(&backups, volume, &existing, chunker).cloned();
        tracing::debug!(volume, base = ?base.as_ref().map(|b| &b.id), elapsed = ?started.elapsed(), "base chosen");
        let r = run_backup(repo, agent, &snap, base.as_ref(), chunker, &opts, ahead)?;
        Ok((r, base))
    });
    let ((backup, bytes_read, bytes_changed, incremental), base) = match run {
        Ok(r) => r,
        Err(e) => {
            // Keep the old base; the new snapshot would only pin space.
            drop_snapshot(agent, &snap, "the backup failed");
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

fn drop_snapshot(agent: &dyn VolumeAgent, snap: &VolumeSnapshot, why: &str) {
    if let Err(d) = agent.delete_snapshot(&snap.volume, &snap.name) {
        tracing::warn!(volume = %snap.volume, snapshot = %snap.name, "cannot delete the snapshot of a backup that did not happen ({why}): {d}");
    }
}

/// Reads `snap` (only its changes since `base` when that is possible) into a backup.
fn run_backup(
    repo: &Repository,
    agent: &dyn VolumeAgent,
    snap: &VolumeSnapshot,
    base: Option<&SnapshotMeta>,
    chunker: ChunkerConfig,
    opts: &VolumeBackupOptions,
    ahead: Option<ReadAhead>,
) -> Result<(Snapshot, u64, u64, bool)> {
    let volume = snap.volume.as_str();
    // CBT needs chunk boundaries that do not move: fixed chunks and an unchanged size.
    let base = base.filter(|b| b.size == snap.size && matches!(chunker, ChunkerConfig::Fixed { .. }));
    let t = Instant::now();
    let from = base.and_then(|b| b.labels.get(plan::LABEL_VOLUME_SNAPSHOT)).filter(|f| !f.is_empty());
    // Bytes read ahead count as read whether the backup uses them or not.
    let read_ahead = ahead.as_ref().map_or(0, |a| a.data.bytes);
    let (ahead_changed, prefetched) = match ahead {
        Some(a) if Some(&a.from) == from => (Some(a.changed), a.data),
        _ => (None, Prefetched::default()),
    };
    // Incremental: read the chunks around the changed extents. Full: read the allocated
    // extents only (the allocation map is not worth its scan for an incremental).
    let (allocated, changed) = match (from, ahead_changed) {
        (Some(_), Some(changed)) => (None, Some(changed)),
        (Some(from), None) => (None, Some(agent.changed_blocks(volume, from, &snap.name)?)),
        _ => (Some(agent.changed_blocks(volume, "", &snap.name)?), None),
    };
    let incremental = changed.is_some();
    let extents = changed.as_ref().or(allocated.as_ref()).map(|e| e.as_slice()).unwrap_or_default();
    let bytes_changed = plan::total(&plan::merge_ranges(extents, 0, snap.size));
    tracing::debug!(volume, incremental, extents = extents.len(), elapsed = ?t.elapsed(), "extents read");
    let source = VolumeSource::new(agent, volume, &snap.name, snap.size, allocated, changed)
        .with_prefetched(prefetched.pieces, read_ahead);
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

/// Changed ranges of a snapshot read ahead: whole merged ranges, in offset order.
#[derive(Default)]
struct Prefetched {
    pieces: Vec<(u64, Vec<u8>)>,
    bytes: u64,
}

impl Prefetched {
    /// Reads the merged `changed` ranges of `snap`, in order, until `budget` bytes
    /// (`PARALLEL_READS` at once); a range that fails to read is left out (the backup
    /// reads it itself, and reports its error).
    fn read(agent: &dyn VolumeAgent, snap: &VolumeSnapshot, changed: &[Range<u64>], budget: u64) -> Prefetched {
        let mut ranges = Vec::new();
        let mut planned = 0;
        for r in plan::merge_ranges(changed, 0, snap.size) {
            if planned + (r.end - r.start) > budget {
                break;
            }
            planned += r.end - r.start;
            ranges.push(r);
        }
        let next = std::sync::atomic::AtomicUsize::new(0);
        let got = std::sync::Mutex::new(Vec::with_capacity(ranges.len()));
        std::thread::scope(|s| {
            for _ in 0..super::source::PARALLEL_READS.min(ranges.len()) {
                s.spawn(|| loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let Some(r) = ranges.get(i) else { break };
                    let mut buf = vec![0u8; (r.end - r.start) as usize];
                    if agent.read_snapshot(&snap.volume, &snap.name, r.start, &mut buf).is_ok() {
                        got.lock().unwrap_or_else(|e| e.into_inner()).push((r.start, buf));
                    }
                });
            }
        });
        let mut pieces = got.into_inner().unwrap_or_else(|e| e.into_inner());
        pieces.sort_unstable_by_key(|p| p.0);
        let bytes = pieces.iter().map(|p| p.1.len() as u64).sum();
        Prefetched { pieces, bytes }
    }
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

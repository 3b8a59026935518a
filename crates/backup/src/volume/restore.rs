//! `restore_to_volume`: create a new volume, write a backup into it through the engine
//! (once; the engine replicates), flush, detach. Never writes into an existing volume.

use serde::Serialize;

use super::agent::VolumeAgent;
use super::plan;
use crate::error::{Error, Result};
use crate::progress::Progress;
use crate::repo::Repository;
use crate::restore::{restore_into, RestoreOptions, RestoreStats};

/// Options of one restore into a new volume.
#[derive(Clone)]
pub struct VolumeRestoreOptions {
    /// Replicas of the new volume.
    pub replicas: u32,
    /// Draw a progress bar on a terminal.
    pub progress: bool,
    /// Parallel pack downloads (0: default 4).
    pub workers: usize,
    /// Resume state: with a file, an interrupted restore keeps its volume and the file
    /// records the packs written; the same restore run again continues where it stopped.
    /// Without one, an interrupted restore deletes its volume.
    pub state_file: Option<std::path::PathBuf>,
}

impl Default for VolumeRestoreOptions {
    fn default() -> Self {
        VolumeRestoreOptions { replicas: 3, progress: false, workers: 0, state_file: None }
    }
}

/// What a restore into a volume did.
#[derive(Debug, Clone, Serialize)]
pub struct VolumeRestoreReport {
    pub volume: String,
    /// Size of the new volume.
    pub volume_size: u64,
    pub replicas: u32,
    #[serde(flatten)]
    pub stats: RestoreStats,
}

/// Restores backup `id` (a unique prefix is enough) into a new volume `volume`.
pub fn restore_to_volume(
    repo: &Repository,
    agent: &dyn VolumeAgent,
    id: &str,
    volume: &str,
    opts: VolumeRestoreOptions,
) -> Result<VolumeRestoreReport> {
    if volume.is_empty() {
        return Err(Error::Invalid("empty volume name".into()));
    }
    let id = repo.resolve_snapshot(id)?;
    let meta = repo.load_snapshot(&id)?.meta;
    let size = plan::restore_size(&meta)?;
    let resumable = opts.state_file.as_deref().is_some_and(|p| crate::restore::has_resume_state(p, &id));
    match agent.volume_size(volume)? {
        // Our own interrupted restore of this backup: continue it.
        Some(have) if resumable && have == size => {
            tracing::info!(volume, backup = %id, "resuming an interrupted restore");
        }
        Some(have) => {
            return Err(Error::Invalid(format!(
                "volume {volume} already exists ({have} bytes); restore into a new volume name (nothing was written)"
            )))
        }
        None => {
            if let Some(p) = &opts.state_file {
                // State of an earlier restore whose volume is gone: start over.
                let _ = std::fs::remove_file(p);
            }
            agent.create_volume(volume, size, opts.replicas)?;
        }
    }
    let written = write_volume(repo, agent, &id, volume, size, &opts);
    let detached = agent.detach_volume(volume);
    match (written, detached) {
        (Ok(stats), Ok(())) => {
            Ok(VolumeRestoreReport { volume: volume.into(), volume_size: size, replicas: opts.replicas, stats })
        }
        (Ok(_), Err(e)) => Err(e),
        (Err(e), _) => match &opts.state_file {
            Some(p) => Err(Error::Invalid(format!(
                "{e}; the partly restored volume {volume} is kept and {} records its progress: run the same restore again to resume",
                p.display()
            ))),
            None => {
                // The volume is new and incomplete: remove it so a rerun can use the name.
                if let Err(d) = agent.delete_volume(volume) {
                    tracing::warn!(volume, "cannot delete the incomplete restored volume: {d}");
                }
                Err(e)
            }
        },
    }
}

fn write_volume(
    repo: &Repository,
    agent: &dyn VolumeAgent,
    id: &str,
    volume: &str,
    size: u64,
    opts: &VolumeRestoreOptions,
) -> Result<RestoreStats> {
    let uri = agent.attach_volume(volume)?;
    let sink = agent.open_writer(&uri)?;
    let progress = if opts.progress { Progress::auto(&format!("restore {volume}"), size) } else { Progress::hidden() };
    let ropts = RestoreOptions { progress, workers: opts.workers, state_file: opts.state_file.clone() };
    restore_into(repo, id, sink.as_ref(), ropts)
}

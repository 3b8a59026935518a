//! `hlstore backup create --volume` and `hlstore restore --to-volume`: options and output;
//! the work is `hlstore_backup::volume`, reaching the node agent through
//! `volume_agent::GrpcAgent`. Runs on a blocking thread (see `backup.rs`).

use std::collections::BTreeMap;

use anyhow::bail;
use hlstore_backup::volume::{backup_volume_opening, restore_to_volume, VolumeBackupOptions, VolumeRestoreOptions};
use hlstore_backup::{RepoConfig, Repository};
use tokio::runtime::Handle;

use super::backup::RestoreArgs;
use super::size::format_size;
use super::volume_agent::GrpcAgent;

/// Backs up `volume`; prints a line, or JSON: the report (`bytes_read`, `incremental`,
/// `base`, `volume_snapshot`, `deleted_snapshots`...) plus the backup's id, size, parent,
/// labels and stats.
/// Whether volume `volume` is due for a backup by its schedule (label
/// `hlstore.io/backup-schedule`, else `default`; neither: always), given the newest backup
/// of it in `r`. Prints why not when it is not (JSON with `json`) and returns false.
pub fn due(r: &Repository, endpoint: &str, volume: &str, default: Option<&str>, json: bool) -> anyhow::Result<bool> {
    use hlstore_core::schedule::{Schedule, LABEL};
    let agent = GrpcAgent::connect(Handle::current(), endpoint)?;
    let labels = agent.volume_labels(volume)?;
    let Some(text) = labels.get(LABEL).map(String::as_str).or(default) else { return Ok(true) };
    let schedule = Schedule::parse(text).map_err(|e| anyhow::anyhow!("volume {volume}: {e}"))?;
    let filter = hlstore_backup::select::Filter::new(Some(volume), &[]);
    let metas = r.list_snapshots()?;
    let last = filter.newest(&filter.apply(metas)).map(|m| m.time);
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    if schedule.due(last, now) {
        return Ok(true);
    }
    let due_at = schedule.due_at(last);
    if json {
        let v = serde_json::json!({"volume": volume, "skipped": true, "schedule": text, "last_backup": last, "due_at": due_at});
        println!("{v}");
    } else {
        let when =
            due_at.map_or("never (schedule: never)".to_string(), |t| format!("in {}", span(t.saturating_sub(now))));
        println!(
            "volume {volume} is not due (schedule {text}, newest backup {} ago); next backup {when}",
            last.map_or("-".to_string(), |t| span(now.saturating_sub(t)))
        );
    }
    Ok(false)
}

/// `secs` as days, hours and minutes ("2d 3h", "3h 12m", "12m").
fn span(secs: u64) -> String {
    let (d, h, m) = (secs / 86_400, secs % 86_400 / 3600, secs % 3600 / 60);
    match (d, h) {
        (0, 0) => format!("{m}m"),
        (0, _) => format!("{h}h {m}m"),
        _ => format!("{d}d {h}h"),
    }
}

pub fn backup<R: std::borrow::Borrow<Repository> + Send>(
    open: impl FnOnce() -> hlstore_backup::Result<R> + Send,
    config: &RepoConfig,
    endpoint: &str,
    volume: &str,
    labels: BTreeMap<String, String>,
    json: bool,
) -> anyhow::Result<hlstore_backup::SnapshotMeta> {
    let agent = GrpcAgent::connect(Handle::current(), endpoint)?;
    let opts = VolumeBackupOptions { labels, progress: true, ..Default::default() };
    let rep = backup_volume_opening(open, config, &agent, volume, opts)?;
    let meta = &rep.backup.meta;
    if json {
        let mut v = serde_json::to_value(&rep)?;
        v["id"] = meta.id.clone().into();
        v["size"] = meta.size.into();
        v["parent"] = serde_json::to_value(&meta.parent)?;
        v["labels"] = serde_json::to_value(&meta.labels)?;
        v["stats"] = serde_json::to_value(&meta.stats)?;
        println!("{v}");
    } else {
        let how = match &rep.base {
            Some(b) => format!("incremental from {b}"),
            None => "full".to_string(),
        };
        println!(
            "backup {} of volume {} ({}, snapshot {}): {how}, read {} ({} changed), {} new, {} stored",
            meta.id,
            volume,
            format_size(meta.size),
            rep.volume_snapshot,
            format_size(rep.bytes_read),
            format_size(rep.bytes_changed),
            format_size(meta.stats.new_bytes),
            format_size(meta.stats.stored_bytes),
        );
        if !rep.deleted_snapshots.is_empty() {
            println!("deleted older backup snapshots: {}", rep.deleted_snapshots.join(", "));
        }
        for e in &rep.retention_errors {
            println!("warning: old backup snapshot not deleted: {e}");
        }
    }
    Ok(meta.clone())
}

/// Restores a backup into the new volume `volume`.
pub fn restore(r: &Repository, args: &RestoreArgs, volume: &str) -> anyhow::Result<()> {
    if !(1..=5).contains(&args.replicas) {
        bail!("--replicas must be between 1 and 5");
    }
    let agent = GrpcAgent::connect(Handle::current(), &args.endpoint)?;
    // Resumable by default: a rerun of the same command continues an interrupted restore.
    let state_file = args
        .state_file
        .clone()
        .unwrap_or_else(|| std::env::temp_dir().join(format!("hlstore-restore-{}.state", volume.replace('/', "_"))));
    let opts = VolumeRestoreOptions {
        replicas: args.replicas,
        progress: true,
        workers: args.parallel.max(1),
        state_file: Some(state_file),
    };
    let rep = restore_to_volume(r, &agent, &args.id, volume, opts)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&rep)?);
    } else {
        println!(
            "restored backup {} into new volume {} ({}, {} replicas): {} written, {} packs fetched, {} resumed",
            rep.stats.snapshot,
            rep.volume,
            format_size(rep.volume_size),
            rep.replicas,
            format_size(rep.stats.bytes_written),
            rep.stats.packs_fetched,
            rep.stats.packs_resumed
        );
    }
    Ok(())
}

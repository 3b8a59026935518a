//! Prometheus metrics of one `hlstore backup create` run, written as a text file
//! (`--metrics-textfile`) for node-exporter's textfile collector or a Pushgateway push from
//! the backup CronJob.
//!
//! Invariant: the file is replaced atomically (write to a temporary file, then rename), so
//! a collector never reads half a page. It is written only after a backup succeeded, so
//! `hlstore_backup_last_success_timestamp_seconds` never advances on a failed run.

use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use hlstore_backup::snapshot::BackupStats;
use hlstore_core::metrics::Page;

/// Every metric name this module writes (the dashboard test checks against this list).
pub const METRIC_NAMES: [&str; 7] = [
    "hlstore_backup_read_bytes",
    "hlstore_backup_skipped_bytes",
    "hlstore_backup_new_bytes",
    "hlstore_backup_uploaded_bytes",
    "hlstore_backup_deduplicated_bytes",
    "hlstore_backup_duration_seconds",
    "hlstore_backup_last_success_timestamp_seconds",
];

/// Renders the page for one finished backup of `source`.
pub fn render(source: &str, stats: &BackupStats, duration: Duration, finished_unix: u64) -> String {
    let l = [("source", source)];
    let mut p = Page::new();
    let dedup = stats.bytes_read.saturating_sub(stats.new_bytes);
    let gauges: [(&str, &str, f64); 7] = [
        (METRIC_NAMES[0], "Bytes read from the source by the last backup", stats.bytes_read as f64),
        (
            METRIC_NAMES[1],
            "Bytes taken over from the parent backup without reading (changed-block hint)",
            stats.bytes_skipped as f64,
        ),
        (METRIC_NAMES[2], "Plaintext bytes of chunks new to the repository", stats.new_bytes as f64),
        (
            METRIC_NAMES[3],
            "Bytes uploaded to the repository (compressed and encrypted packs)",
            stats.stored_bytes as f64,
        ),
        (
            METRIC_NAMES[4],
            "Bytes read that the repository already held or that were all zero (not uploaded)",
            dedup as f64,
        ),
        (METRIC_NAMES[5], "Wall-clock duration of the last backup", duration.as_secs_f64()),
        (METRIC_NAMES[6], "Unix time the last successful backup finished", finished_unix as f64),
    ];
    for (name, help, v) in gauges {
        p.family(name, "gauge", help).sample(name, &l, v);
    }
    p.finish()
}

/// Writes `page` to `path` atomically.
pub fn write_atomic(path: &Path, page: &str) -> anyhow::Result<()> {
    let name = path.file_name().with_context(|| format!("--metrics-textfile {} has no file name", path.display()))?;
    let mut tmp_name = name.to_os_string();
    tmp_name.push(".tmp");
    let tmp = path.with_file_name(tmp_name);
    std::fs::write(&tmp, page).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
    Ok(())
}

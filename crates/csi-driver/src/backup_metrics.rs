//! Backup freshness on the controller's `/metrics`, without a Pushgateway: with
//! `--backup-repo`, the controller lists the repository's backups every
//! `--backup-metrics-interval` (default 5 minutes) through [`BackupSource::summary`] and
//! shows the newest backup of each volume, so the stale-backup alert works wherever the
//! controller is scraped.
//!
//! **Invariants:** listing is read only (no lease, nothing written); a failed listing (the
//! binary's also fails when the repository's config is gone) keeps the last values (a stale
//! view shows as an old `hlstore_backup_repository_last_scrape_timestamp_seconds`, not as
//! missing backups), counts an error, and is logged once per distinct error (and once when
//! it recovers).

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hlstore_core::metrics::Page;

use crate::backups::{BackupSource, RepoSummary};

/// Default time between two listings of the repository.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(300);

/// Every metric name this module renders.
pub const METRIC_NAMES: [&str; 4] = [
    "hlstore_backup_newest_timestamp_seconds",
    "hlstore_backup_repository_backups",
    "hlstore_backup_repository_scrape_errors_total",
    "hlstore_backup_repository_last_scrape_timestamp_seconds",
];

/// What the last listings found.
#[derive(Debug, Default)]
pub struct BackupMetrics {
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// The last successful listing and its Unix time.
    last: Option<(RepoSummary, f64)>,
    errors: u64,
    /// The error last logged (`None`: the last listing succeeded).
    failing: Option<String>,
}

/// What a listing's outcome asks to log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// Nothing new.
    None,
    /// A new error (the first, or one that differs from the last).
    Failed(String),
    /// A listing succeeded after errors.
    Recovered,
}

impl BackupMetrics {
    /// Records a successful listing at Unix time `now`.
    pub fn record_ok(&self, mut summary: RepoSummary, now: f64) -> Change {
        summary.newest.sort_by(|a, b| a.volume.cmp(&b.volume));
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.last = Some((summary, now));
        if s.failing.take().is_some() {
            Change::Recovered
        } else {
            Change::None
        }
    }

    /// Records a failed listing; the last values stay.
    pub fn record_err(&self, error: &str) -> Change {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.errors += 1;
        if s.failing.as_deref() == Some(error) {
            return Change::None;
        }
        s.failing = Some(error.to_string());
        Change::Failed(error.to_string())
    }

    /// Appends the repository's families to `p`. Before the first successful listing only
    /// the error counter is shown.
    pub fn render_into(&self, p: &mut Page) {
        let s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        p.single(
            "hlstore_backup_repository_scrape_errors_total",
            "counter",
            "Listings of the backup repository by the CSI controller that failed",
            s.errors as f64,
        );
        let Some((summary, at)) = &s.last else { return };
        p.single(
            "hlstore_backup_repository_last_scrape_timestamp_seconds",
            "gauge",
            "Unix time of the CSI controller's last successful listing of the backup repository",
            *at,
        );
        p.single(
            "hlstore_backup_repository_backups",
            "gauge",
            "Backups in the repository at the last listing",
            summary.backups as f64,
        );
        let name = "hlstore_backup_newest_timestamp_seconds";
        p.family(name, "gauge", "Creation time of the newest backup of each volume in the repository");
        for v in &summary.newest {
            let labels =
                [("volume", v.volume.as_str()), ("pvc_namespace", &v.pvc_namespace), ("pvc_name", &v.pvc_name)];
            p.sample(name, &labels, v.time);
        }
    }

    /// The page of these metrics alone.
    pub fn render(&self) -> String {
        let mut p = Page::new();
        self.render_into(&mut p);
        p.finish()
    }

    /// One listing: records and logs its outcome.
    pub async fn refresh(&self, source: &dyn BackupSource) {
        let change = match source.summary().await {
            Ok(summary) => {
                tracing::debug!(
                    backups = summary.backups,
                    volumes = summary.newest.len(),
                    "listed the backup repository"
                );
                self.record_ok(summary, unix_now())
            }
            Err(e) => self.record_err(&e.to_string()),
        };
        match change {
            Change::None => {}
            Change::Failed(e) => {
                tracing::warn!(error = %e, "listing the backup repository for its metrics failed (keeping the last values)")
            }
            Change::Recovered => tracing::info!("listing the backup repository works again"),
        }
    }
}

/// Lists the repository now and then every `interval`, for ever (the task is dropped with
/// the server).
pub async fn run(metrics: Arc<BackupMetrics>, source: Arc<dyn BackupSource>, interval: Duration) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        metrics.refresh(source.as_ref()).await;
    }
}

fn unix_now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backups::VolumeNewest;

    fn newest(volume: &str, ns: &str, name: &str, time: f64) -> VolumeNewest {
        VolumeNewest { volume: volume.into(), pvc_namespace: ns.into(), pvc_name: name.into(), time }
    }

    #[test]
    fn the_page_shows_the_newest_backup_per_volume_and_keeps_it_through_errors() {
        let m = BackupMetrics::default();
        assert_eq!(
            m.render(),
            "# HELP hlstore_backup_repository_scrape_errors_total Listings of the backup repository by the \
             CSI controller that failed\n# TYPE hlstore_backup_repository_scrape_errors_total counter\n\
             hlstore_backup_repository_scrape_errors_total 0\n",
            "nothing listed yet: no timestamps, no backup count"
        );
        let summary = RepoSummary {
            backups: 3,
            newest: vec![newest("pvc-b", "", "", 1700000100.0), newest("pvc-a", "db", "pg", 1700000000.5)],
        };
        assert_eq!(m.record_ok(summary, 1700000200.0), Change::None);
        let page = m.render();
        for line in [
            "hlstore_backup_repository_scrape_errors_total 0",
            "hlstore_backup_repository_last_scrape_timestamp_seconds 1700000200",
            "hlstore_backup_repository_backups 3",
            "# TYPE hlstore_backup_newest_timestamp_seconds gauge",
            "hlstore_backup_newest_timestamp_seconds{volume=\"pvc-a\",pvc_namespace=\"db\",pvc_name=\"pg\"} 1700000000.5",
            "hlstore_backup_newest_timestamp_seconds{volume=\"pvc-b\",pvc_namespace=\"\",pvc_name=\"\"} 1700000100",
        ] {
            assert!(page.lines().any(|l| l == line), "{line:?} missing from:\n{page}");
        }
        let a = page.find("volume=\"pvc-a\"").unwrap();
        assert!(a < page.find("volume=\"pvc-b\"").unwrap(), "volumes in name order");

        // Errors: counted every time, logged once per distinct error, last values kept.
        assert_eq!(m.record_err("unreachable"), Change::Failed("unreachable".into()));
        assert_eq!(m.record_err("unreachable"), Change::None);
        assert_eq!(m.record_err("wrong password"), Change::Failed("wrong password".into()));
        let page = m.render();
        assert!(page.contains("hlstore_backup_repository_scrape_errors_total 3\n"), "{page}");
        assert!(page.contains("hlstore_backup_repository_last_scrape_timestamp_seconds 1700000200\n"), "{page}");
        assert!(page.contains("pvc_name=\"pg\"} 1700000000.5\n"), "{page}");
        assert_eq!(m.record_ok(RepoSummary::default(), 1700000300.0), Change::Recovered);
        assert_eq!(m.record_err("unreachable"), Change::Failed("unreachable".into()), "a new episode logs again");
    }
}

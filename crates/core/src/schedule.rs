//! Backup schedules of volumes: the `backupSchedule` StorageClass parameter, kept as the
//! volume label [`LABEL`]. A schedule is the least time between two backups of the
//! volume; the backup job runs often (hourly by default) and backs up the volumes that are
//! due (`hlstore backup create --volume V --if-due`).

use std::time::Duration;

/// The volume label holding a volume's schedule.
pub const LABEL: &str = "hlstore.io/backup-schedule";

/// How often a volume is backed up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Schedule {
    /// Never by the backup job (explicit `hlstore backup create` still works).
    Never,
    /// At least this long between two backups.
    Every(Duration),
}

/// Accepted forms, for error messages.
pub const FORMS: &str = "hourly, daily (or nightly), weekly, never, or an interval such as 30m, 6h, 2d, 1w";

impl Schedule {
    /// Parses `hourly`, `daily`/`nightly`, `weekly`, `never`, or `<N>m|h|d|w` (N >= 1,
    /// at least 5 minutes).
    pub fn parse(s: &str) -> Result<Schedule, String> {
        let t = s.trim().to_ascii_lowercase();
        let hours = |h: u64| Ok(Schedule::Every(Duration::from_secs(h * 3600)));
        match t.as_str() {
            "hourly" => return hours(1),
            "daily" | "nightly" => return hours(24),
            "weekly" => return hours(24 * 7),
            "never" => return Ok(Schedule::Never),
            _ => {}
        }
        let bad = || format!("backup schedule {s:?}: expected {FORMS}");
        let unit = t.chars().last().ok_or_else(bad)?;
        let n: u64 = t[..t.len() - unit.len_utf8()].parse().map_err(|_| bad())?;
        let secs = match unit {
            'm' => n.checked_mul(60),
            'h' => n.checked_mul(3600),
            'd' => n.checked_mul(86_400),
            'w' => n.checked_mul(7 * 86_400),
            _ => None,
        }
        .ok_or_else(bad)?;
        if secs < 300 {
            return Err(format!("backup schedule {s:?}: at least 5 minutes between backups"));
        }
        Ok(Schedule::Every(Duration::from_secs(secs)))
    }

    /// Whether a volume last backed up at `last` (Unix seconds; None: never) is due at
    /// `now`. A backup counts as due a little early (a tenth of the interval, at most 30
    /// minutes), so a job that runs at the same time every interval never skips a turn
    /// because the previous run finished a few seconds later.
    pub fn due(&self, last: Option<u64>, now: u64) -> bool {
        match self {
            Schedule::Never => false,
            Schedule::Every(_) => self.due_at(last).is_some_and(|at| now >= at),
        }
    }

    /// When a volume last backed up at `last` becomes due (Unix seconds; 0 when never
    /// backed up; None: never due).
    pub fn due_at(&self, last: Option<u64>) -> Option<u64> {
        match (self, last) {
            (Schedule::Never, _) => None,
            (Schedule::Every(_), None) => Some(0),
            (Schedule::Every(d), Some(t)) => {
                let slack = (d.as_secs() / 10).min(1800);
                Some(t.saturating_add(d.as_secs() - slack))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forms_parse_and_bad_ones_are_refused() {
        let every = |s| Schedule::Every(Duration::from_secs(s));
        assert_eq!(Schedule::parse("hourly"), Ok(every(3600)));
        assert_eq!(Schedule::parse("Nightly"), Ok(every(86_400)));
        assert_eq!(Schedule::parse("weekly"), Ok(every(604_800)));
        assert_eq!(Schedule::parse("never"), Ok(Schedule::Never));
        assert_eq!(Schedule::parse("30m"), Ok(every(1800)));
        assert_eq!(Schedule::parse("6h"), Ok(every(21_600)));
        assert_eq!(Schedule::parse("2d"), Ok(every(172_800)));
        for bad in ["", "0 2 * * *", "4m", "0h", "h", "-1h", "6x", "99999999999999999999w", "1 h"] {
            assert!(Schedule::parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn due_after_the_interval_less_the_slack() {
        let daily = Schedule::parse("daily").unwrap();
        assert!(daily.due(None, 0));
        assert!(!daily.due(Some(1000), 1000 + 3600));
        // A nightly job whose previous run ended 2 minutes later than this one starts.
        assert!(daily.due(Some(1000), 1000 + 86_400 - 120));
        assert!(!daily.due(Some(1000), 1000 + 86_400 - 3600));
        let hourly = Schedule::parse("hourly").unwrap();
        assert!(hourly.due(Some(0), 3600 - 360));
        assert!(!hourly.due(Some(0), 3600 - 361));
        assert!(!Schedule::Never.due(None, 10));
    }
}

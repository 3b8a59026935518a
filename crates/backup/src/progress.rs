//! Progress reporting: a byte-count bar on a terminal; periodic log lines (bytes, rate,
//! ETA) on stderr otherwise, so CronJob and Job logs show how a long run is going.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

/// Seconds between progress lines when stderr is not a terminal (default).
pub const LOG_INTERVAL_SECS: u64 = 10;
/// Environment knob for that interval (`0` turns the lines off).
pub const LOG_INTERVAL_ENV: &str = "HLSTORE_PROGRESS_INTERVAL_SECS";

/// A progress sink the engine advances; cheap to clone, silent when hidden.
#[derive(Clone)]
pub struct Progress {
    bar: ProgressBar,
    log: Option<Arc<LogState>>,
}

struct LogState {
    message: String,
    total: u64,
    done: AtomicU64,
    started: Instant,
    stop: AtomicBool,
}

impl Default for Progress {
    fn default() -> Self {
        Self::hidden()
    }
}

impl Progress {
    /// A bar on stderr when it is a terminal, progress lines every
    /// [`LOG_INTERVAL_SECS`] otherwise.
    pub fn auto(message: &str, total: u64) -> Self {
        if std::io::stderr().is_terminal() {
            let bar = ProgressBar::new(total);
            if let Ok(style) =
                ProgressStyle::with_template("{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}")
            {
                bar.set_style(style.progress_chars("=> "));
            }
            bar.set_message(message.to_string());
            return Progress { bar, log: None };
        }
        let secs = std::env::var(LOG_INTERVAL_ENV)
            .ok()
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(LOG_INTERVAL_SECS);
        if secs == 0 {
            return Self::hidden();
        }
        Self::log_lines(message, total, Duration::from_secs(secs))
    }

    /// Progress lines on stderr every `every`.
    pub fn log_lines(message: &str, total: u64, every: Duration) -> Self {
        let state = Arc::new(LogState {
            message: message.to_string(),
            total,
            done: AtomicU64::new(0),
            started: Instant::now(),
            stop: AtomicBool::new(false),
        });
        // The thread holds a weak reference: it ends at `finish` or when every clone of
        // the progress is gone, whichever comes first.
        let weak = Arc::downgrade(&state);
        let spawned = std::thread::Builder::new().name("hlstore-progress".into()).spawn(move || {
            let mut next = every;
            loop {
                std::thread::sleep(Duration::from_millis(100));
                let Some(s) = weak.upgrade() else { return };
                if s.stop.load(Ordering::Relaxed) {
                    return;
                }
                if s.started.elapsed() >= next {
                    next += every;
                    eprintln!("{}", s.line());
                }
            }
        });
        match spawned {
            Ok(_) => Progress { bar: ProgressBar::hidden(), log: Some(state) },
            Err(_) => Self::hidden(),
        }
    }

    /// Never draws.
    pub fn hidden() -> Self {
        Progress { bar: ProgressBar::hidden(), log: None }
    }

    /// Adds done bytes.
    pub fn inc(&self, n: u64) {
        self.bar.inc(n);
        if let Some(l) = &self.log {
            l.done.fetch_add(n, Ordering::Relaxed);
        }
    }

    /// Clears the bar, stops the lines.
    pub fn finish(&self) {
        self.bar.finish_and_clear();
        if let Some(l) = &self.log {
            l.stop.store(true, Ordering::Relaxed);
        }
    }
}

impl LogState {
    fn line(&self) -> String {
        let done = self.done.load(Ordering::Relaxed);
        let secs = self.started.elapsed().as_secs_f64().max(0.001);
        let rate = done as f64 / secs;
        let mib = |b: f64| b / 1048576.0;
        let pct = if self.total > 0 { 100.0 * done as f64 / self.total as f64 } else { 0.0 };
        let eta = if rate > 0.0 && self.total > done {
            format!("{:.0}s", (self.total - done) as f64 / rate)
        } else {
            "-".to_string()
        };
        format!(
            "{}: {:.1} of {:.1} MiB ({pct:.0} %), {:.1} MiB/s, eta {eta}",
            self.message,
            mib(done as f64),
            mib(self.total as f64),
            mib(rate)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_line_has_bytes_rate_and_eta() {
        let p = Progress::log_lines("backup x", 100 << 20, Duration::from_secs(3600));
        p.inc(25 << 20);
        let line = p.log.as_ref().unwrap().line();
        assert!(line.starts_with("backup x: 25.0 of 100.0 MiB (25 %), "), "{line}");
        assert!(line.contains("MiB/s, eta "), "{line}");
        p.finish();
    }
}

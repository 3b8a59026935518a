//! Progress reporting: a byte-count bar on a terminal; periodic log lines (bytes, rate,
//! ETA) on stderr otherwise, so CronJob and Job logs show how a long run is going.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

/// Seconds between progress lines when stderr is not a terminal (default).
pub const LOG_INTERVAL_SECS: u64 = 10;
/// Environment knob for that interval in seconds, fractions allowed (`0` turns the lines
/// off).
pub const LOG_INTERVAL_ENV: &str = "HLSTORE_PROGRESS_INTERVAL_SECS";

/// A progress sink the engine advances; cheap to clone, silent when hidden.
#[derive(Clone)]
pub struct Progress {
    bar: ProgressBar,
    log: Option<Arc<LogState>>,
}

struct LogState {
    message: std::sync::Mutex<String>,
    total: AtomicU64,
    done: AtomicU64,
    started: Instant,
    stop: AtomicBool,
    /// Periodic lines printed so far (the closing line is printed when there was one).
    lines: AtomicU64,
}

impl std::fmt::Debug for Progress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mode = if self.log.is_some() {
            "log lines"
        } else if self.bar.is_hidden() {
            "hidden"
        } else {
            "bar"
        };
        f.debug_struct("Progress").field("mode", &mode).finish()
    }
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
        match log_interval() {
            Some(every) => Self::log_lines(message, total, every),
            None => Self::hidden(),
        }
    }

    /// Progress lines on stderr every `every`.
    pub fn log_lines(message: &str, total: u64, every: Duration) -> Self {
        let state = Arc::new(LogState {
            message: std::sync::Mutex::new(message.to_string()),
            total: AtomicU64::new(total),
            done: AtomicU64::new(0),
            started: Instant::now(),
            stop: AtomicBool::new(false),
            lines: AtomicU64::new(0),
        });
        // The thread holds a weak reference: it ends at `finish` or when every clone of
        // the progress is gone, whichever comes first.
        let weak = Arc::downgrade(&state);
        let spawned = std::thread::Builder::new().name("hlstore-progress".into()).spawn(move || {
            let mut next = every;
            let tick = every.min(Duration::from_millis(100));
            loop {
                std::thread::sleep(tick);
                let Some(s) = weak.upgrade() else { return };
                if s.stop.load(Ordering::Relaxed) {
                    return;
                }
                if s.started.elapsed() >= next {
                    next += every;
                    s.lines.fetch_add(1, Ordering::Relaxed);
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

    /// Names the phase that runs now (the bar's message, the lines' prefix).
    pub fn set_message(&self, message: &str) {
        self.bar.set_message(message.to_string());
        if let Some(l) = &self.log {
            if let Ok(mut m) = l.message.lock() {
                *m = message.to_string();
            }
        }
    }

    /// Adds to the total (for work discovered as it runs).
    pub fn inc_length(&self, n: u64) {
        self.bar.inc_length(n);
        if let Some(l) = &self.log {
            l.total.fetch_add(n, Ordering::Relaxed);
        }
    }

    /// Clears the bar, stops the lines. When progress lines were printed, a closing line
    /// says how much was done and how fast, so a log never ends at "57 %".
    pub fn finish(&self) {
        self.bar.finish_and_clear();
        if let Some(l) = &self.log {
            if !l.stop.swap(true, Ordering::Relaxed) && l.lines.load(Ordering::Relaxed) > 0 {
                eprintln!("{}", l.done_line());
            }
        }
    }
}

/// The interval of progress lines from [`LOG_INTERVAL_ENV`] (default
/// [`LOG_INTERVAL_SECS`]); `None` when set to 0. A value that does not parse is ignored
/// with a warning.
fn log_interval() -> Option<Duration> {
    let default = Duration::from_secs(LOG_INTERVAL_SECS);
    let Ok(v) = std::env::var(LOG_INTERVAL_ENV) else {
        return Some(default);
    };
    match v.trim().parse::<f64>() {
        Ok(0.0) => None,
        Ok(s) if s.is_finite() && s > 0.0 => Some(Duration::from_secs_f64(s.max(0.01))),
        _ => {
            tracing::warn!("{LOG_INTERVAL_ENV}={v:?} is not a number of seconds; using {LOG_INTERVAL_SECS}");
            Some(default)
        }
    }
}

const MIB: f64 = 1048576.0;

impl LogState {
    fn message(&self) -> String {
        self.message.lock().map(|m| m.clone()).unwrap_or_default()
    }

    fn line(&self) -> String {
        let done = self.done.load(Ordering::Relaxed);
        let total = self.total.load(Ordering::Relaxed);
        let secs = self.started.elapsed().as_secs_f64().max(0.001);
        let rate = done as f64 / secs;
        let pct = if total > 0 { 100.0 * done as f64 / total as f64 } else { 0.0 };
        let eta =
            if rate > 0.0 && total > done { format!("{:.0}s", (total - done) as f64 / rate) } else { "-".to_string() };
        format!(
            "{}: {:.1} of {:.1} MiB ({pct:.0} %), {:.1} MiB/s, eta {eta}",
            self.message(),
            done as f64 / MIB,
            total as f64 / MIB,
            rate / MIB
        )
    }

    fn done_line(&self) -> String {
        let done = self.done.load(Ordering::Relaxed);
        let secs = self.started.elapsed().as_secs_f64().max(0.001);
        format!(
            "{}: done, {:.1} MiB in {secs:.1} s, {:.1} MiB/s",
            self.message(),
            done as f64 / MIB,
            done as f64 / secs / MIB
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
        p.inc_length(100 << 20);
        let line = p.log.as_ref().unwrap().line();
        assert!(line.starts_with("backup x: 25.0 of 200.0 MiB (12 %), "), "{line}");
        assert!(p.log.as_ref().unwrap().done_line().starts_with("backup x: done, 25.0 MiB in "));
        p.finish();
    }
}

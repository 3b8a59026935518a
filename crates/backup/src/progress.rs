//! Progress reporting: a byte-count bar on a terminal, nothing otherwise.

use std::io::IsTerminal;

use indicatif::{ProgressBar, ProgressStyle};

/// A progress sink the engine advances; cheap to clone, silent when hidden.
#[derive(Clone)]
pub struct Progress {
    bar: ProgressBar,
}

impl Default for Progress {
    fn default() -> Self {
        Self::hidden()
    }
}

impl Progress {
    /// A bar on stderr when it is a terminal, hidden otherwise.
    pub fn auto(message: &str, total: u64) -> Self {
        if std::io::stderr().is_terminal() {
            let bar = ProgressBar::new(total);
            if let Ok(style) =
                ProgressStyle::with_template("{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}")
            {
                bar.set_style(style.progress_chars("=> "));
            }
            bar.set_message(message.to_string());
            Progress { bar }
        } else {
            Self::hidden()
        }
    }

    /// Never draws.
    pub fn hidden() -> Self {
        Progress { bar: ProgressBar::hidden() }
    }

    /// Adds done bytes.
    pub fn inc(&self, n: u64) {
        self.bar.inc(n);
    }

    /// Clears the bar.
    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

//! Per-export (per-volume) I/O counters and latency histograms, for `/metrics`.
//!
//! Invariants: every counter only grows while the name stays exported; a device replaced
//! under the same name keeps its counters (the registry hands the same [`ExportIo`] on). A request
//! is counted once, when its reply is ready, in exactly one op class and one latency bucket;
//! failed requests count as errors, not as ops or bytes.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds (seconds) of the latency histogram buckets; `+Inf` is implied.
pub const LATENCY_BUCKETS: [f64; 12] = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0];

/// Request classes counted separately.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpClass {
    Read,
    Write,
    Flush,
    /// TRIM and WRITE_ZEROES.
    Discard,
}

impl OpClass {
    pub const ALL: [OpClass; 4] = [OpClass::Read, OpClass::Write, OpClass::Flush, OpClass::Discard];

    pub fn label(self) -> &'static str {
        match self {
            OpClass::Read => "read",
            OpClass::Write => "write",
            OpClass::Flush => "flush",
            OpClass::Discard => "discard",
        }
    }
}

/// A latency histogram with fixed buckets (Prometheus semantics: cumulative on render).
#[derive(Debug, Default)]
pub struct Histogram {
    /// Non-cumulative counts; the last slot is `+Inf`.
    buckets: [AtomicU64; LATENCY_BUCKETS.len() + 1],
    count: AtomicU64,
    sum_nanos: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let i = LATENCY_BUCKETS.iter().position(|b| secs <= *b).unwrap_or(LATENCY_BUCKETS.len());
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_nanos.fetch_add(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    /// Cumulative counts per bucket bound (the last is `+Inf`), count and sum in seconds.
    pub fn snapshot(&self) -> (Vec<u64>, u64, f64) {
        let mut acc = 0;
        let cumulative = self
            .buckets
            .iter()
            .map(|b| {
                acc += b.load(Ordering::Relaxed);
                acc
            })
            .collect();
        (cumulative, self.count.load(Ordering::Relaxed), self.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9)
    }
}

/// Counters of one export.
#[derive(Debug, Default)]
pub struct ExportIo {
    ops: [AtomicU64; 4],
    latency: [Histogram; 4],
    pub read_bytes: AtomicU64,
    pub written_bytes: AtomicU64,
    pub errors: AtomicU64,
}

impl ExportIo {
    /// Records a successful request of `class` moving `bytes` payload bytes.
    pub fn record(&self, class: OpClass, bytes: u64, took: Duration) {
        let i = class as usize;
        self.ops[i].fetch_add(1, Ordering::Relaxed);
        self.latency[i].observe(took);
        match class {
            OpClass::Read => self.read_bytes.fetch_add(bytes, Ordering::Relaxed),
            OpClass::Write => self.written_bytes.fetch_add(bytes, Ordering::Relaxed),
            OpClass::Flush | OpClass::Discard => 0,
        };
    }

    pub fn record_error(&self) {
        self.errors.fetch_add(1, Ordering::Relaxed);
    }

    pub fn ops(&self, class: OpClass) -> u64 {
        self.ops[class as usize].load(Ordering::Relaxed)
    }

    pub fn latency(&self, class: OpClass) -> &Histogram {
        &self.latency[class as usize]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_is_cumulative_and_sums() {
        let h = Histogram::default();
        h.observe(Duration::from_micros(100)); // first bucket
        h.observe(Duration::from_millis(3)); // <= 0.005
        h.observe(Duration::from_secs(10)); // +Inf
        let (b, count, sum) = h.snapshot();
        assert_eq!(b.len(), LATENCY_BUCKETS.len() + 1);
        assert_eq!(b[0], 1);
        assert_eq!(b[2], 1, "0.0025 bucket holds only the 100 µs request");
        assert_eq!(b[3], 2);
        assert_eq!(b[LATENCY_BUCKETS.len() - 1], 2);
        assert_eq!(b[LATENCY_BUCKETS.len()], 3);
        assert_eq!(count, 3);
        assert!((sum - 10.0031).abs() < 1e-6, "{sum}");
    }

    #[test]
    fn record_counts_bytes_per_class() {
        let io = ExportIo::default();
        io.record(OpClass::Write, 4096, Duration::from_millis(1));
        io.record(OpClass::Read, 512, Duration::from_millis(1));
        io.record(OpClass::Discard, 1 << 20, Duration::from_millis(1));
        io.record_error();
        assert_eq!(io.ops(OpClass::Write), 1);
        assert_eq!(io.ops(OpClass::Discard), 1);
        assert_eq!(io.ops(OpClass::Flush), 0);
        assert_eq!(io.written_bytes.load(Ordering::Relaxed), 4096);
        assert_eq!(io.read_bytes.load(Ordering::Relaxed), 512);
        assert_eq!(io.errors.load(Ordering::Relaxed), 1);
        assert_eq!(io.latency(OpClass::Read).snapshot().1, 1);
    }
}

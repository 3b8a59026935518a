//! Counters of the NBD server, as plain atomics for the metrics endpoint to read.
//!
//! Every counter only grows except `connections_active`. Byte counters count payload bytes
//! of successful requests; `errors` counts error replies of any cause.

use std::sync::atomic::{AtomicU64, Ordering};

/// Connection and per-operation counters of one [`super::NbdServer`].
#[derive(Debug, Default)]
pub struct NbdStats {
    /// Connections accepted since start.
    pub connections_total: AtomicU64,
    /// Connections open now (handshake or transmission).
    pub connections_active: AtomicU64,
    /// Connections that finished the handshake and entered transmission.
    pub sessions_total: AtomicU64,
    pub reads: AtomicU64,
    pub writes: AtomicU64,
    pub flushes: AtomicU64,
    pub trims: AtomicU64,
    pub write_zeroes: AtomicU64,
    pub read_bytes: AtomicU64,
    pub written_bytes: AtomicU64,
    /// Requests served by read-modify-write (unaligned writes and zeroing of partial blocks).
    pub read_modify_writes: AtomicU64,
    /// Error replies sent (protocol errors and device errors).
    pub errors: AtomicU64,
    /// Connections closed because the client broke the protocol (bad magic, oversized
    /// payload, bad handshake).
    pub protocol_violations: AtomicU64,
}

impl NbdStats {
    pub(crate) fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// Reads a counter (convenience for tests and metrics).
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}

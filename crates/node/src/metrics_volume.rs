//! The per-volume and per-node-capacity parts of the node agent's `/metrics` page:
//! I/O ops, bytes and latency histograms of each volume exported on this node, replica
//! lag behind the engine (resync progress), and the data directory's filesystem capacity.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use hlstore_core::metrics::Page;
use hlstore_nbd::export_io::{OpClass, LATENCY_BUCKETS};
use hlstore_nbd::ExportIo;
use hlstore_replication::HealStats;

use crate::model::Volume;

/// Per-volume I/O families from the NBD exports.
pub fn io(p: &mut Page, exports: &[(String, Arc<ExportIo>)]) {
    p.family("hlstore_volume_io_ops_total", "counter", "Requests served per volume and operation");
    for (v, io) in exports {
        for class in OpClass::ALL {
            p.sample("hlstore_volume_io_ops_total", &[("volume", v), ("op", class.label())], io.ops(class) as f64);
        }
    }
    type Counter = (&'static str, &'static str, fn(&ExportIo) -> u64);
    let counters: [Counter; 3] = [
        ("hlstore_volume_read_bytes_total", "Bytes read from the volume", |io| io.read_bytes.load(Ordering::Relaxed)),
        ("hlstore_volume_written_bytes_total", "Bytes written to the volume", |io| {
            io.written_bytes.load(Ordering::Relaxed)
        }),
        ("hlstore_volume_io_errors_total", "Requests answered with an error", |io| io.errors.load(Ordering::Relaxed)),
    ];
    for (name, help, f) in counters {
        p.family(name, "counter", help);
        for (v, io) in exports {
            p.sample(name, &[("volume", v)], f(io) as f64);
        }
    }
    let h = "hlstore_volume_io_latency_seconds";
    p.family(h, "histogram", "Request latency per volume and operation, until the reply is ready");
    let bucket = format!("{h}_bucket");
    let (sum, count) = (format!("{h}_sum"), format!("{h}_count"));
    for (v, io) in exports {
        for class in OpClass::ALL {
            let (cumulative, n, total) = io.latency(class).snapshot();
            let op = class.label();
            for (i, c) in cumulative.iter().enumerate() {
                let le = LATENCY_BUCKETS.get(i).map(|b| b.to_string()).unwrap_or_else(|| "+Inf".into());
                p.sample(&bucket, &[("volume", v), ("op", op), ("le", &le)], *c as f64);
            }
            p.sample(&sum, &[("volume", v), ("op", op)], total);
            p.sample(&count, &[("volume", v), ("op", op)], n as f64);
        }
    }
}

/// Read repair and scrub counters of each engine on this node (see `replication/heal.rs`).
pub fn heal(p: &mut Page, engines: &[(String, Arc<HealStats>)]) {
    type Counter = (&'static str, &'static str, fn(&HealStats) -> &AtomicU64);
    let counters: [Counter; 6] = [
        (
            "hlstore_volume_read_repairs_total",
            "Corrupt blocks rewritten from a good replica after a read or resync met them",
            |h| &h.read_repairs,
        ),
        ("hlstore_volume_scrub_repairs_total", "Corrupt blocks rewritten from a good replica by the scrub", |h| {
            &h.scrub_repairs
        }),
        ("hlstore_volume_scrub_blocks_total", "Blocks the scrub compared across the in-sync replicas", |h| {
            &h.scrub_blocks
        }),
        ("hlstore_volume_scrub_passes_total", "Scrub passes over the whole volume", |h| &h.scrub_passes),
        (
            "hlstore_volume_divergent_blocks_total",
            "Blocks whose replicas read fine but differ (should never happen)",
            |h| &h.divergent_blocks,
        ),
        (
            "hlstore_volume_unrecoverable_blocks_total",
            "Blocks found corrupt on every in-sync replica (reads fail with EIO)",
            |h| &h.unrecoverable_blocks,
        ),
    ];
    for (name, help, f) in counters {
        p.family(name, "counter", help);
        for (v, h) in engines {
            p.sample(name, &[("volume", v)], HealStats::get(f(h)) as f64);
        }
    }
    let name = "hlstore_volume_write_hold_seconds_total";
    p.family(name, "counter", "Time client requests waited for a replica whose write queue was over half its bound");
    for (v, h) in engines {
        p.sample(name, &[("volume", v)], HealStats::get(&h.held_ms) as f64 / 1000.0);
    }
}

/// Per-replica lag behind the most advanced replica of each attached volume: 0 when in
/// sync; while a replica resyncs it falls towards 0 (resync progress).
pub fn lag(p: &mut Page, attached: &[Volume]) {
    p.family(
        "hlstore_volume_replica_lag_seq",
        "gauge",
        "Write sequence numbers a replica is behind the most advanced replica of the volume",
    );
    for v in attached {
        let head = v.replicas.iter().map(|r| r.last_seq).max().unwrap_or(0);
        for r in &v.replicas {
            let lag = head.saturating_sub(r.last_seq);
            p.sample("hlstore_volume_replica_lag_seq", &[("volume", &v.name), ("node", &r.node)], lag as f64);
        }
    }
}

/// Capacity of the filesystem holding the data directory (what replicas can grow into).
pub fn capacity(p: &mut Page, data_dir: &Path) {
    let Some(hlstore_core::space::FsSpace { total, available: avail }) = hlstore_core::space::fs_space(data_dir) else {
        return;
    };
    p.single(
        "hlstore_node_capacity_bytes",
        "gauge",
        "Size of the filesystem holding the node's data directory",
        total as f64,
    );
    p.single(
        "hlstore_node_available_bytes",
        "gauge",
        "Bytes available to the node agent on that filesystem",
        avail as f64,
    );
}

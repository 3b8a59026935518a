//! The node agent's `/metrics` page (per-volume I/O and capacity parts: `metrics_volume`).

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use hlstore_core::metrics::Page;
use hlstore_replication::rpc::ServiceStats;
use hlstore_store::{DiskStore, ReplicaStore};

use super::volumes::VolumeManager;

fn c(a: &AtomicU64) -> f64 {
    a.load(Ordering::Relaxed) as f64
}

pub async fn render(
    id: &str,
    data_dir: &Path,
    store: &DiskStore,
    stats: &ServiceStats,
    mgr: &VolumeManager,
    tls: Option<&hlstore_tls::TlsState>,
) -> String {
    let mut p = Page::new();
    p.family("hlstore_node_info", "gauge", "Node agent identity").sample("hlstore_node_info", &[("node", id)], 1.0);
    if let Some(tls) = tls {
        // The certificates in use (after any reload): the alerts warn before they expire.
        let name = "hlstore_tls_certificate_expiry_timestamp_seconds";
        p.family(name, "gauge", "When the agent's TLS certificates expire (notAfter, Unix seconds)");
        let e = tls.expiry();
        for (which, at) in [("node", e.certificate), ("ca", e.ca)] {
            if let Some(at) = at {
                p.sample(name, &[("certificate", which)], at as f64);
            }
        }
    }
    p.single("hlstore_replica_writes_total", "counter", "Writes applied", c(&stats.writes));
    p.single("hlstore_replica_write_bytes_total", "counter", "Bytes written", c(&stats.write_bytes));
    p.single("hlstore_replica_reads_total", "counter", "Reads served", c(&stats.reads));
    p.single("hlstore_replica_read_bytes_total", "counter", "Bytes read", c(&stats.read_bytes));
    p.single("hlstore_replica_flushes_total", "counter", "Flushes", c(&stats.flushes));
    p.single("hlstore_replica_trims_total", "counter", "Trims", c(&stats.trims));
    p.single(
        "hlstore_replica_stale_epoch_rejections_total",
        "counter",
        "Requests rejected for a stale epoch (fenced)",
        c(&stats.stale_epoch_rejections),
    );
    p.single("hlstore_replica_corruptions_total", "counter", "Checksum mismatches on read", c(&stats.corruptions));
    p.single(
        "hlstore_replica_resync_blocks_sent_total",
        "counter",
        "Blocks sent to resyncing peers",
        c(&stats.resync_blocks_sent),
    );
    p.single(
        "hlstore_replica_resync_chunks_applied_total",
        "counter",
        "Resync chunks applied to local replicas",
        c(&stats.resync_chunks_applied),
    );
    let u = &mgr.upkeep;
    p.single(
        "hlstore_node_ready",
        "gauge",
        "1 when the agent is ready (no volume with a replica here is degraded; see GET /ready)",
        if u.ready().is_ok() { 1.0 } else { 0.0 },
    );
    p.single(
        "hlstore_node_replica_replacements_total",
        "counter",
        "Replicas of unreachable nodes replaced automatically (--replica-replace-after) by this agent",
        c(&u.replacements),
    );
    p.single(
        "hlstore_node_replica_replacement_failures_total",
        "counter",
        "Automatic replica replacements that failed or found no node with room",
        c(&u.replacement_failures),
    );
    p.single(
        "hlstore_node_stale_replicas_deleted_total",
        "counter",
        "Replicas of this node deleted because their volume moved to other nodes while it was away",
        c(&u.stale_deleted),
    );
    let replicas = store.list().unwrap_or_default();
    type Gauge = (&'static str, &'static str, fn(&hlstore_store::ReplicaInfo) -> u64);
    let gauges: [Gauge; 4] = [
        ("hlstore_replica_size_bytes", "Replica size", |r| r.state.size),
        ("hlstore_replica_allocated_bytes", "Bytes allocated to a replica (thin provisioning)", |r| {
            r.state.allocated_bytes
        }),
        ("hlstore_replica_epoch", "Replica fencing epoch", |r| r.state.epoch),
        ("hlstore_replica_durable_seq", "Highest durable write sequence number", |r| r.state.durable_seq),
    ];
    for (name, help, f) in gauges {
        p.family(name, "gauge", help);
        for r in &replicas {
            p.sample(name, &[("volume", &r.record.volume_id)], f(r) as f64);
        }
    }
    let used: u64 = replicas.iter().map(|r| r.state.allocated_bytes).sum();
    p.single("hlstore_node_used_bytes", "gauge", "Bytes allocated by all replicas on this node", used as f64);
    super::metrics_volume::capacity(&mut p, data_dir);

    let nbd = mgr.nbd_stats();
    p.single("hlstore_nbd_connections", "gauge", "Open NBD connections", c(&nbd.connections_active));
    for (name, help, v) in [
        ("hlstore_nbd_reads_total", "NBD reads", &nbd.reads),
        ("hlstore_nbd_writes_total", "NBD writes", &nbd.writes),
        ("hlstore_nbd_flushes_total", "NBD flushes", &nbd.flushes),
        ("hlstore_nbd_trims_total", "NBD trims", &nbd.trims),
        ("hlstore_nbd_write_zeroes_total", "NBD write-zeroes", &nbd.write_zeroes),
        ("hlstore_nbd_read_bytes_total", "Bytes read over NBD", &nbd.read_bytes),
        ("hlstore_nbd_written_bytes_total", "Bytes written over NBD", &nbd.written_bytes),
        ("hlstore_nbd_errors_total", "NBD requests answered with an error", &nbd.errors),
    ] {
        p.single(name, "counter", help, c(v));
    }
    let attached = mgr.local_attachments().await;
    p.family("hlstore_volume_epoch", "gauge", "Epoch of the volume engines on this node");
    for v in &attached {
        p.sample("hlstore_volume_epoch", &[("volume", &v.name)], v.epoch as f64);
    }
    p.family("hlstore_volume_replica_state", "gauge", "Replica state seen by the engine (1 for the current state)");
    for v in &attached {
        for r in &v.replicas {
            p.sample(
                "hlstore_volume_replica_state",
                &[("volume", &v.name), ("node", &r.node), ("state", &r.state)],
                1.0,
            );
        }
    }
    p.family("hlstore_volume_resync_chunks_total", "counter", "Resync chunks sent to a replica by the engine");
    for v in &attached {
        for r in &v.replicas {
            p.sample(
                "hlstore_volume_resync_chunks_total",
                &[("volume", &v.name), ("node", &r.node)],
                r.resync_chunks as f64,
            );
        }
    }
    super::metrics_volume::lag(&mut p, &attached);
    super::metrics_volume::heal(&mut p, &mgr.heal_stats().await);
    super::metrics_volume::io(&mut p, &mgr.export_io());
    p.finish()
}

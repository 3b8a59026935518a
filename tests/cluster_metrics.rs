//! The node agent's `/metrics` on a real 3-node `hlstore dev` cluster: per-volume I/O
//! counters and latency histograms match the I/O a real NBD client (qemu-io) did, node
//! capacity comes from the data directory's filesystem, replica lag returns to 0, and every
//! node-side metric the Grafana dashboard queries is on the page.

mod support;

use std::collections::BTreeSet;
use std::process::Command;
use std::time::Duration;

use support::cluster::{run_ok, Cluster};

const MIB: f64 = 1024.0 * 1024.0;

/// The value of the sample `name{labels...}` whose label set includes all of `labels`.
fn sample(page: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    page.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (head, value) = l.rsplit_once(' ')?;
        let (n, rest) = head.split_once('{').unwrap_or((head, ""));
        (n == name && labels.iter().all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")))).then(|| value.parse().ok())?
    })
}

fn must(page: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    sample(page, name, labels).unwrap_or_else(|| panic!("no {name}{labels:?} on the page:\n{page}"))
}

#[test]
fn volume_io_node_capacity_and_lag_metrics() {
    let c = Cluster::new();
    let uri = c.up(&["--nodes", "3", "--volume", "m", "--size", "64MiB"]);
    c.wait_all_healthy("m", Duration::from_secs(60));
    run_ok(
        Command::new("qemu-io")
            .args(["-f", "raw", "-c", "write -P 0xab 0 1M", "-c", "flush", "-c", "read -P 0xab 0 1M"])
            .arg(&uri),
        Duration::from_secs(60),
    );
    let page = support::http_get(&c.metrics_addr("n1"), "/metrics");
    let m = [("volume", "m")];

    // Exactly the bytes qemu-io wrote; at least what it read.
    assert_eq!(must(&page, "hlstore_volume_written_bytes_total", &m), MIB);
    assert!(must(&page, "hlstore_volume_read_bytes_total", &m) >= MIB);
    assert_eq!(must(&page, "hlstore_volume_io_errors_total", &m), 0.0);
    for op in ["write", "read", "flush"] {
        let ops = must(&page, "hlstore_volume_io_ops_total", &[("volume", "m"), ("op", op)]);
        assert!(ops >= 1.0, "{op}: {ops} ops");
        // The histogram counts each request once; +Inf holds them all; buckets only grow.
        let l = [("volume", "m"), ("op", op)];
        assert_eq!(must(&page, "hlstore_volume_io_latency_seconds_count", &l), ops, "{op}");
        let inf =
            must(&page, "hlstore_volume_io_latency_seconds_bucket", &[("volume", "m"), ("op", op), ("le", "+Inf")]);
        assert_eq!(inf, ops, "{op}");
        let buckets: Vec<f64> = page
            .lines()
            .filter(|x| {
                x.starts_with("hlstore_volume_io_latency_seconds_bucket{") && x.contains(&format!("op=\"{op}\""))
            })
            .filter(|x| x.contains("volume=\"m\""))
            .map(|x| x.rsplit(' ').next().unwrap().parse().unwrap())
            .collect();
        assert_eq!(buckets.len(), 13, "{op}: 12 bounds and +Inf");
        assert!(buckets.windows(2).all(|w| w[0] <= w[1]), "{op}: buckets not cumulative: {buckets:?}");
        assert!(must(&page, "hlstore_volume_io_latency_seconds_sum", &l) > 0.0);
    }
    assert_eq!(must(&page, "hlstore_volume_io_ops_total", &[("volume", "m"), ("op", "discard")]), 0.0);

    let capacity = must(&page, "hlstore_node_capacity_bytes", &[]);
    let available = must(&page, "hlstore_node_available_bytes", &[]);
    let used = must(&page, "hlstore_node_used_bytes", &[]);
    assert!(capacity > 0.0 && available <= capacity && used >= MIB && used < capacity, "{capacity} {available} {used}");

    // Every replica catches up: lag 0 on all three.
    c.wait_until("replica lag 0", Duration::from_secs(30), || {
        let page = support::http_get(&c.metrics_addr("n1"), "/metrics");
        let lags: Vec<f64> = ["n1", "n2", "n3"]
            .iter()
            .filter_map(|n| sample(&page, "hlstore_volume_replica_lag_seq", &[("volume", "m"), ("node", n)]))
            .collect();
        (lags.len() == 3 && lags.iter().all(|l| *l == 0.0)).then_some(())
    });

    // The certificates' expiry, for the alert: the dev cluster issues them for ten years.
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
    for which in ["node", "ca"] {
        let at = must(&page, "hlstore_tls_certificate_expiry_timestamp_seconds", &[("certificate", which)]);
        assert!(at > now + 3000.0 * 86400.0 && at < now + 3700.0 * 86400.0, "{which} certificate expires at {at}");
    }

    // The dashboard's node-side queries find their metrics on a real page.
    let dashboard = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/components/monitoring/hlstore-dashboard.json"),
    )
    .unwrap();
    let families: BTreeSet<&str> =
        page.lines().filter_map(|l| l.strip_prefix("# TYPE ")).filter_map(|l| l.split(' ').next()).collect();
    let mut used_names = BTreeSet::new();
    for part in dashboard.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
        // Backup metrics come from the backup job, CSI metrics from the CSI driver's page
        // (tests/deploy_objects.rs checks those against the driver's names).
        if part.starts_with("hlstore_") && !part.starts_with("hlstore_backup_") && !part.starts_with("hlstore_csi_") {
            let base = ["_bucket", "_sum", "_count"].iter().find_map(|s| part.strip_suffix(s)).unwrap_or(part);
            used_names.insert(base.to_string());
        }
    }
    assert!(used_names.len() >= 10);
    let missing: Vec<_> = used_names.iter().filter(|n| !families.contains(n.as_str())).collect();
    assert!(missing.is_empty(), "dashboard metrics not on the node's page: {missing:?}");
}

//! `hlstore node`: run a node agent.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Args;
use hlstore_node::cluster::parse_peers;
use hlstore_node::volumes::EngineTimeouts;
use hlstore_node::NodeConfig;

/// Run a node agent: this node's replica store, the replica and volume gRPC services, the
/// engines of the volumes attached here (exported over NBD), and Prometheus metrics.
///
/// One agent runs per node. It keeps the replicas of volumes in DATA_DIR (block data in
/// sparse slot files, metadata in RocksDB). Stop it with SIGTERM or Ctrl-C; kill -9 loses
/// nothing that was flushed.
///
/// Every gRPC hop is mutual TLS: --tls-dir names this node's certificate directory
/// (ca.crt, tls.crt, tls.key; a node certificate for --id, from `hlstore cert issue --role
/// node` or cert-manager). Peers are verified to be the node ids --peers names.
///
/// Example (node n1 of three):
///   hlstore node --id n1 --data-dir /var/lib/hlstore --listen 0.0.0.0:7400 \
///     --tls-dir /etc/hlstore/tls \
///     --peers n1=10.0.0.1:7400,n2=10.0.0.2:7400,n3=10.0.0.3:7400
#[derive(Debug, Args)]
#[command(verbatim_doc_comment)]
pub struct NodeArgs {
    /// Node id (stable; recorded in the data directory at first start).
    #[arg(long, env = "HLSTORE_NODE_ID")]
    pub id: String,
    /// Directory for this node's replicas.
    #[arg(long, env = "HLSTORE_DATA_DIR")]
    pub data_dir: PathBuf,
    /// gRPC listen address (replica and volume services).
    #[arg(long, env = "HLSTORE_LISTEN", default_value = "127.0.0.1:7400")]
    pub listen: SocketAddr,
    /// Prometheus metrics listen address (GET /metrics, /healthz).
    #[arg(long, env = "HLSTORE_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
    /// Default NBD listen address for volumes attached on this node. NBD has no
    /// authentication: loopback only, unless --allow-remote-nbd.
    #[arg(long, env = "HLSTORE_NBD_LISTEN", default_value = "127.0.0.1:10809")]
    pub nbd_listen: SocketAddr,
    /// Let NBD exports (--nbd-listen and the address an attach asks for) bind addresses
    /// other than loopback: anyone who reaches them reads and writes the volume.
    #[arg(long, env = "HLSTORE_ALLOW_REMOTE_NBD", value_parser = clap::builder::BoolishValueParser::new())]
    pub allow_remote_nbd: bool,
    /// Cluster members as ID=HOST:PORT,... (this node may be included).
    #[arg(long, env = "HLSTORE_PEERS", default_value = "")]
    pub peers: String,
    /// A replica slower than this (ms) is left behind; the quorum acks without it.
    #[arg(long, env = "HLSTORE_ACK_TIMEOUT_MS")]
    pub ack_timeout_ms: Option<u64>,
    /// A replica silent for this long (ms) is marked failed and resynced when back.
    #[arg(long, env = "HLSTORE_FAILURE_TIMEOUT_MS")]
    pub failure_timeout_ms: Option<u64>,
    /// A write or flush not acknowledged by a quorum within this time (ms) fails with EIO.
    #[arg(long, env = "HLSTORE_IO_TIMEOUT_MS")]
    pub io_timeout_ms: Option<u64>,
    /// How often (ms) a failed replica is retried.
    #[arg(long, env = "HLSTORE_RETRY_INTERVAL_MS")]
    pub retry_interval_ms: Option<u64>,
    /// Resync copy rate limit per replica in MiB/s, so a rebuild leaves bandwidth to
    /// client I/O on a 1 GbE link (0 = unlimited).
    #[arg(long, env = "HLSTORE_RESYNC_MIBPS", default_value_t = 0)]
    pub resync_mibps: u64,
    /// Resync progress is made durable every this many MiB copied (a resync interrupted
    /// by a crash or a lost connection resumes from there; each checkpoint flushes the
    /// target, so smaller means slower rebuilds).
    #[arg(long, env = "HLSTORE_RESYNC_CHECKPOINT_MIB", default_value_t = 128)]
    pub resync_checkpoint_mib: u64,
    /// Background scrub rate in MiB/s per attached volume: the engine reads every block
    /// from every in-sync replica, compares them and rewrites blocks that fail their
    /// checksum from a good copy (0 = off). Progress and findings are in /metrics
    /// (hlstore_volume_scrub_*).
    #[arg(long, env = "HLSTORE_SCRUB_MIBPS", default_value_t = 1)]
    pub scrub_mibps: u64,
    /// Read lease (ms): an engine serves reads only while a write quorum of replicas
    /// confirmed its epoch within this period, and an engine taking a volume over from one
    /// that cannot be reached waits 1.25 times this before serving. Shorter: faster
    /// failover; longer: fewer lease pings and more tolerance for a slow network. Use the
    /// same value on every node.
    #[arg(long, env = "HLSTORE_LEASE_MS")]
    pub lease_ms: Option<u64>,
    /// Bytes of the data directory's filesystem kept free for other uses (the OS, logs,
    /// images): placement counts only the rest as room for replicas (e.g. 20GiB).
    #[arg(long, env = "HLSTORE_STORAGE_RESERVED", value_parser = super::size::parse_size, default_value = "0")]
    pub storage_reserved: u64,
    /// A replica whose node has not answered for this long is replaced on another node
    /// with room (the new copy is filled from the healthy replicas before the old one is
    /// dropped; the old node's stale copy is deleted when it comes back). Seconds, or with
    /// a unit: 90s, 10m, 1h. 0 = never (replace by hand: hlstore volume replace-replica).
    /// Use the same value on every node.
    #[arg(long, env = "HLSTORE_REPLICA_REPLACE_AFTER", value_parser = parse_duration, default_value = "10m")]
    pub replica_replace_after: std::time::Duration,
}

/// `600`, `600s`, `10m`, `1h`, `1500ms`.
fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("{s:?}: expected a number with an optional unit (ms, s, m, h)"))?;
    let ms = match unit.trim() {
        "ms" => Some(n),
        "" | "s" => n.checked_mul(1000),
        "m" => n.checked_mul(60_000),
        "h" => n.checked_mul(3_600_000),
        other => return Err(format!("{s:?}: unknown unit {other:?} (use ms, s, m or h)")),
    };
    ms.map(std::time::Duration::from_millis).ok_or_else(|| format!("{s:?} is too long"))
}

pub async fn run(args: NodeArgs) -> anyhow::Result<()> {
    let mut timeouts = EngineTimeouts::default();
    if let Some(v) = args.ack_timeout_ms {
        timeouts.ack_ms = v;
    }
    if let Some(v) = args.failure_timeout_ms {
        timeouts.failure_ms = v;
    }
    if let Some(v) = args.io_timeout_ms {
        timeouts.io_ms = v;
    }
    if let Some(v) = args.retry_interval_ms {
        timeouts.retry_ms = v;
    }
    if let Some(v) = args.lease_ms {
        anyhow::ensure!(v > 0, "--lease-ms must be at least 1");
        timeouts.lease_ms = v;
    }
    timeouts.resync_rate =
        args.resync_mibps.checked_mul(1 << 20).ok_or_else(|| anyhow::anyhow!("--resync-mibps is too large"))?;
    anyhow::ensure!(args.resync_checkpoint_mib > 0, "--resync-checkpoint-mib must be at least 1");
    timeouts.resync_checkpoint_blocks = args
        .resync_checkpoint_mib
        .checked_mul(256)
        .ok_or_else(|| anyhow::anyhow!("--resync-checkpoint-mib is too large"))?;
    timeouts.scrub_rate =
        args.scrub_mibps.checked_mul(1 << 20).ok_or_else(|| anyhow::anyhow!("--scrub-mibps is too large"))?;
    let config = NodeConfig {
        id: args.id,
        data_dir: args.data_dir,
        listen: args.listen,
        metrics_listen: args.metrics_listen,
        nbd_listen: args.nbd_listen,
        allow_remote_nbd: args.allow_remote_nbd,
        peers: parse_peers(&args.peers)?,
        timeouts,
        tls: super::tls::state()?,
        storage_reserved: args.storage_reserved,
        replica_replace_after: (!args.replica_replace_after.is_zero()).then_some(args.replica_replace_after),
    };
    let shutdown = async {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(_) => return std::future::pending().await,
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    };
    hlstore_node::run(config, shutdown, |b| {
        // One machine-readable line for scripts and tests that wait for readiness.
        let metrics = b.metrics.map(|m| m.to_string()).unwrap_or_else(|| "-".into());
        println!("listening grpc={} metrics={metrics} nbd={}", b.grpc, b.nbd);
    })
    .await?;
    Ok(())
}

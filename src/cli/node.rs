//! `hlstore node`: run a node agent.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Args;
use hlstore_engine::node::{self, NodeConfig};

/// Run a node agent: the replica store of this node and its gRPC and metrics endpoints.
///
/// One agent runs per node. It keeps the replicas of volumes in DATA_DIR (block data in
/// sparse slot files, metadata in RocksDB) and serves the replica service that volume
/// engines replicate to. Stop it with SIGTERM or Ctrl-C; kill -9 loses nothing that was
/// flushed.
#[derive(Debug, Args)]
pub struct NodeArgs {
    /// Node id (stable; recorded in the data directory at first start).
    #[arg(long, env = "HLSTORE_NODE_ID")]
    pub id: String,
    /// Directory for this node's replicas.
    #[arg(long, env = "HLSTORE_DATA_DIR")]
    pub data_dir: PathBuf,
    /// gRPC listen address.
    #[arg(long, env = "HLSTORE_LISTEN", default_value = "127.0.0.1:7400")]
    pub listen: SocketAddr,
    /// Prometheus metrics listen address (GET /metrics, /healthz).
    #[arg(long, env = "HLSTORE_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
}

pub async fn run(args: NodeArgs) -> anyhow::Result<()> {
    let config = NodeConfig {
        id: args.id,
        data_dir: args.data_dir,
        listen: args.listen,
        metrics_listen: args.metrics_listen,
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
    node::run(config, shutdown, |grpc, metrics| {
        // One machine-readable line for scripts and tests that wait for readiness.
        println!("listening grpc={grpc} metrics={}", metrics.map(|m| m.to_string()).unwrap_or_else(|| "-".into()));
    })
    .await?;
    Ok(())
}

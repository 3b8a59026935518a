//! The node agent: one process per node. Owns the node's replica store and serves the
//! replica gRPC service and the metrics endpoint.
//!
//! Invariant: a data directory belongs to one node id (recorded in `node.json` at first
//! start); starting a different id on it is refused, so replicas cannot change owner.

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use hlstore_proto::replica::replica_server::ReplicaServer;
use serde::{Deserialize, Serialize};
use tokio_stream::wrappers::TcpListenerStream;

use crate::error::{Error, Result};
use crate::grpc::{ReplicaService, ServiceStats};
use crate::metrics::{self, Page};
use crate::replica::{DiskStore, ReplicaStore};

/// Largest gRPC message (a 32 MiB NBD request plus framing).
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

/// How a node agent is started.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub id: String,
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
    pub metrics_listen: Option<SocketAddr>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct NodeIdentity {
    node_id: String,
}

/// Checks (or records) which node owns `data_dir`.
fn claim_data_dir(data_dir: &Path, id: &str) -> Result<()> {
    std::fs::create_dir_all(data_dir).map_err(|e| Error::io(format!("creating {}", data_dir.display()), e))?;
    let path = data_dir.join("node.json");
    match std::fs::read(&path) {
        Ok(bytes) => {
            let ident: NodeIdentity = serde_json::from_slice(&bytes).map_err(|e| {
                Error::InvalidArgument(format!("{} is not a node identity file: {e}", path.display()))
            })?;
            if ident.node_id != id {
                return Err(Error::InvalidArgument(format!(
                    "data directory {} belongs to node {:?}, not {id:?}; use --id {} or another --data-dir",
                    data_dir.display(),
                    ident.node_id,
                    ident.node_id
                )));
            }
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let body = serde_json::to_vec_pretty(&NodeIdentity { node_id: id.to_string() })
                .map_err(|e| Error::Internal(e.to_string()))?;
            std::fs::write(&path, body).map_err(|e| Error::io(format!("writing {}", path.display()), e))
        }
        Err(e) => Err(Error::io(format!("reading {}", path.display()), e)),
    }
}

/// A running node agent's handles.
pub struct Node {
    pub id: String,
    pub store: Arc<DiskStore>,
    pub stats: Arc<ServiceStats>,
}

impl Node {
    /// Opens the node's store (recovering every replica).
    pub async fn open(config: &NodeConfig) -> Result<Self> {
        claim_data_dir(&config.data_dir, &config.id)?;
        let dir = config.data_dir.clone();
        let store = tokio::task::spawn_blocking(move || DiskStore::open(dir))
            .await
            .map_err(|e| Error::Internal(format!("store open task: {e}")))??;
        Ok(Self { id: config.id.clone(), store: Arc::new(store), stats: Arc::default() })
    }

    /// Renders the node's metrics page.
    pub fn render_metrics(id: &str, store: &DiskStore, stats: &ServiceStats) -> String {
        let mut p = Page::new();
        let c = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed) as f64;
        p.family("hlstore_node_info", "gauge", "Node agent identity").sample("hlstore_node_info", &[("node", id)], 1.0);
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
        let replicas = store.list().unwrap_or_default();
        p.family("hlstore_replica_size_bytes", "gauge", "Replica size");
        for r in &replicas {
            p.sample("hlstore_replica_size_bytes", &[("volume", &r.record.volume_id)], r.state.size as f64);
        }
        p.family("hlstore_replica_allocated_bytes", "gauge", "Bytes allocated to a replica (thin provisioning)");
        for r in &replicas {
            p.sample("hlstore_replica_allocated_bytes", &[("volume", &r.record.volume_id)], r.state.allocated_bytes as f64);
        }
        p.family("hlstore_replica_epoch", "gauge", "Replica fencing epoch");
        for r in &replicas {
            p.sample("hlstore_replica_epoch", &[("volume", &r.record.volume_id)], r.state.epoch as f64);
        }
        p.family("hlstore_replica_durable_seq", "gauge", "Highest durable write sequence number");
        for r in &replicas {
            p.sample("hlstore_replica_durable_seq", &[("volume", &r.record.volume_id)], r.state.durable_seq as f64);
        }
        p.finish()
    }
}

/// Runs a node agent until `shutdown` resolves. Prints nothing; logs through tracing.
/// `on_ready` is called with the bound gRPC and metrics addresses once both listen.
pub async fn run(
    config: NodeConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
    on_ready: impl FnOnce(SocketAddr, Option<SocketAddr>),
) -> Result<()> {
    let node = Node::open(&config).await?;
    let svc = ReplicaService::new(node.store.clone());
    let stats = svc.stats();
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|e| Error::io(format!("binding gRPC listener {}", config.listen), e))?;
    let grpc_addr = listener.local_addr().map_err(|e| Error::io("gRPC listener address", e))?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let metrics_addr = match config.metrics_listen {
        Some(addr) => {
            let l = metrics::bind(addr).await.map_err(|e| Error::io(format!("binding metrics listener {addr}"), e))?;
            let bound = l.local_addr().map_err(|e| Error::io("metrics listener address", e))?;
            let (id, store, stats) = (node.id.clone(), node.store.clone(), stats.clone());
            let render = Arc::new(move || Node::render_metrics(&id, &store, &stats));
            let mut rx = stop_rx.clone();
            tokio::spawn(metrics::serve(l, render, async move {
                let _ = rx.wait_for(|s| *s).await;
            }));
            Some(bound)
        }
        None => None,
    };
    tracing::info!(node.id = %config.id, grpc = %grpc_addr, metrics = ?metrics_addr, "node agent ready");
    on_ready(grpc_addr, metrics_addr);
    let server = ReplicaServer::new(svc)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let mut rx = stop_rx;
    let result = tonic::transport::Server::builder()
        .add_service(server)
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async move {
            tokio::select! {
                _ = shutdown => {}
                _ = rx.wait_for(|s| *s) => {}
            }
        })
        .await;
    let _ = stop_tx.send(true);
    result.map_err(|e| Error::Unavailable(format!("gRPC server: {e}")))
}

//! The node agent: one process per node. Owns the node's replica store, serves the replica
//! and volume gRPC services, runs the engines of the volumes attached here (exported over
//! NBD), and serves metrics.
//!
//! Modules: [`cluster`] (static membership, channels, fan-out), [`volumes`] (the
//! `VolumeManager`: create/list/delete/attach/snapshots across the cluster, engines attached
//! here), `service` (the `hlstore.volume.v1` gRPC service over the manager),
//! `metrics_page`/`metrics_volume` (the `/metrics` page).
//!
//! Invariant: a data directory belongs to one node id (recorded in `node.json` at first
//! start, written atomically and durably); starting a different id on it is refused, so
//! replicas cannot change owner. A missing, empty or unreadable `node.json` (an older
//! version's file after a power cut) is re-recorded when the store holds no replica or
//! every replica names this node; otherwise the start is refused (see `adopt_data_dir`).
//!
//! Modules: [`cluster`] (membership and channels), [`volumes`] (the volume manager: the
//! cluster-wide volume operations and the engines attached here), [`model`] (the domain
//! values it takes and returns), `peers.rs` (its calls to other nodes' services),
//! `service.rs` (the `hlstore.volume.v1` service), `metrics_*.rs` (the `/metrics` page).
//!
//! Boundary: generated protobuf types stay in `service.rs` (server side) and `peers.rs`
//! (client side); `hlstore.volume.v1` messages are converted in `convert.rs` only, and
//! `hlstore.replica.v1` ones in `hlstore_replication::rpc::convert`. The volume manager
//! never sees a protobuf type. Errors cross the wire through
//! `hlstore_replication::rpc::status` both ways.

pub mod authz;
pub mod cluster;
mod convert;
mod metrics_page;
mod metrics_volume;
pub mod model;
mod peers;
pub mod placement;
mod service;
pub mod volumes;

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::service::VolumeService;
use cluster::Cluster;
use hlstore_core::durable_file;
use hlstore_core::error::{Error, Result};
use hlstore_core::metrics;
use hlstore_nbd::{ExportRegistry, NbdServer};
use hlstore_replication::rpc::ReplicaService;
use hlstore_store::DiskStore;
use volumes::{EngineTimeouts, VolumeManager};

/// Largest gRPC message (a 32 MiB NBD request plus framing).
pub use hlstore_replication::rpc::MAX_MESSAGE_BYTES;

/// How a node agent is started.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub id: String,
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
    pub metrics_listen: Option<SocketAddr>,
    /// Default NBD listener for attached volumes.
    pub nbd_listen: SocketAddr,
    /// NBD has no authentication: exports (the node's listener and per-volume ones) bind
    /// loopback or unix sockets only, unless this is set.
    pub allow_remote_nbd: bool,
    /// Cluster members (id → gRPC endpoint). This node is added if missing.
    pub peers: BTreeMap<String, String>,
    pub timeouts: EngineTimeouts,
    /// This agent's TLS directory (a `node` certificate for `id`), reloaded when its files
    /// change; `None` serves and dials in plaintext (`--insecure`).
    pub tls: Option<Arc<hlstore_tls::TlsState>>,
    /// Bytes of the data directory's filesystem not counted as room for replicas.
    pub storage_reserved: u64,
    /// Replace a replica whose node has not answered for this long (`None`: never).
    pub replica_replace_after: Option<std::time::Duration>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct NodeIdentity {
    node_id: String,
}

/// What `node.json` says about who owns a data directory.
#[derive(Debug, PartialEq, Eq)]
enum Identity {
    /// It names this node.
    Ours,
    /// It is missing, empty or unreadable (why): a power cut can leave it so when it was
    /// written by an older version without fsync. Decided by [`adopt_data_dir`].
    Unrecorded(String),
}

/// Reads `node.json` of `data_dir` (creating the directory durably if needed). A file
/// naming another node is an error: replicas never change owner.
fn read_identity(data_dir: &Path, id: &str) -> Result<Identity> {
    durable_file::create_dir_all(data_dir)?;
    let path = data_dir.join("node.json");
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Identity::Unrecorded("missing".into())),
        Err(e) => return Err(Error::io(format!("reading {}", path.display()), e)),
    };
    let ident: NodeIdentity = match serde_json::from_slice(&bytes) {
        Ok(i) => i,
        Err(e) if bytes.is_empty() => return Ok(Identity::Unrecorded(format!("empty ({e})"))),
        Err(e) => return Ok(Identity::Unrecorded(format!("unreadable ({} bytes: {e})", bytes.len()))),
    };
    if ident.node_id != id {
        return Err(Error::InvalidArgument(format!(
            "data directory {} belongs to node {:?}, not {id:?}; use --id {} or another --data-dir",
            data_dir.display(),
            ident.node_id,
            ident.node_id
        )));
    }
    Ok(Identity::Ours)
}

/// The rule for a data directory whose `node.json` is missing, empty or unreadable: the
/// node takes it (and records `node.json` again) if the store holds no replica, or if
/// every replica it holds names this node in its replica set — the data says whose it
/// is. Otherwise it refuses, naming the volumes, and the operator decides.
fn adopt_data_dir(data_dir: &Path, id: &str, why: &str, store: &DiskStore) -> Result<()> {
    use hlstore_store::ReplicaStore;
    let held = store.list()?;
    let foreign: Vec<String> = held
        .iter()
        .filter(|r| !r.record.replica_set.iter().any(|n| n == id))
        .map(|r| format!("{} (replicas on {})", r.record.volume_id, r.record.replica_set.join(",")))
        .collect();
    let path = data_dir.join("node.json");
    if !foreign.is_empty() {
        return Err(Error::InvalidArgument(format!(
            "{} is {why} and {} holds replicas that do not name node {id:?}: {}; \
             start the node they belong to with this --data-dir, or write {{\"node_id\": \"<id>\"}} to {} by hand",
            path.display(),
            data_dir.display(),
            foreign.join(", "),
            path.display()
        )));
    }
    if !held.is_empty() || why != "missing" {
        tracing::warn!(
            node.id = id,
            replicas = held.len(),
            "{} is {why}; every replica here names this node, so the directory is taken back",
            path.display()
        );
    }
    let body = serde_json::to_vec_pretty(&NodeIdentity { node_id: id.to_string() })
        .map_err(|e| Error::Internal(e.to_string()))?;
    durable_file::write_atomic(&path, &body)
}

/// Bound addresses of a running node agent.
#[derive(Debug, Clone, Copy)]
pub struct Bound {
    pub grpc: SocketAddr,
    pub metrics: Option<SocketAddr>,
    pub nbd: SocketAddr,
}

fn advertised(addr: SocketAddr) -> String {
    if addr.ip().is_unspecified() {
        format!("127.0.0.1:{}", addr.port())
    } else {
        addr.to_string()
    }
}

/// Runs a node agent until `shutdown` resolves. `on_ready` gets the bound addresses once
/// every listener is up.
pub async fn run(
    config: NodeConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
    on_ready: impl FnOnce(Bound),
) -> Result<()> {
    match &config.tls {
        Some(tls) => {
            check_node_certificate(tls, &config.id)?;
            tls.watch(hlstore_tls::state::RELOAD_INTERVAL);
        }
        None => tracing::warn!(
            "running with --insecure: the gRPC port takes plaintext from anyone who can reach it \
             (any volume can be read, written or deleted); use it only on an isolated test machine"
        ),
    }
    if !config.nbd_listen.ip().is_loopback() && !config.allow_remote_nbd {
        return Err(Error::InvalidArgument(format!(
            "--nbd-listen {} would serve every volume attached here, unauthenticated and in plaintext, to \
             the network; NBD exports stay on loopback (or unix sockets) unless --allow-remote-nbd says otherwise",
            config.nbd_listen
        )));
    }
    let identity = read_identity(&config.data_dir, &config.id)?;
    let dir = config.data_dir.clone();
    let store = tokio::task::spawn_blocking(move || DiskStore::open(dir))
        .await
        .map_err(|e| Error::Internal(format!("store open task: {e}")))??;
    if let Identity::Unrecorded(why) = identity {
        adopt_data_dir(&config.data_dir, &config.id, &why, &store)?;
    }
    let store = Arc::new(store);
    spawn_background_flush(store.clone());
    spawn_memory_release(store.clone());
    let replica_svc = ReplicaService::new(store.clone()).with_space(config.data_dir.clone(), config.storage_reserved);
    let stats = replica_svc.stats();

    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|e| Error::io(format!("binding gRPC listener {}", config.listen), e))?;
    let grpc_addr = listener.local_addr().map_err(|e| Error::io("gRPC listener address", e))?;
    let nbd_listener = tokio::net::TcpListener::bind(config.nbd_listen)
        .await
        .map_err(|e| Error::io(format!("binding NBD listener {}", config.nbd_listen), e))?;
    let nbd_addr = nbd_listener.local_addr().map_err(|e| Error::io("NBD listener address", e))?;

    let mut peers = config.peers.clone();
    peers.entry(config.id.clone()).or_insert_with(|| format!("http://{}", advertised(grpc_addr)));
    let client_tls = match &config.tls {
        Some(t) => hlstore_tls::client::ClientTls::Tls(t.clone()),
        None => hlstore_tls::client::ClientTls::Insecure,
    };
    let cluster = Arc::new(Cluster::new(config.id.clone(), peers, client_tls));
    let nbd = NbdServer::new(ExportRegistry::new());
    let mgr = Arc::new(
        VolumeManager::new(
            cluster,
            nbd.clone(),
            advertised(nbd_addr),
            config.data_dir.join("attachments.json"),
            config.timeouts,
        )
        .allow_remote_nbd(config.allow_remote_nbd)
        .replace_after(config.replica_replace_after)
        .with_local_store(store.clone(), stats.clone()),
    );
    let nbd_shutdown = nbd.shutdown_handle();
    tokio::spawn(async move {
        if let Err(e) = nbd.serve_tcp(nbd_listener).await {
            tracing::error!(error = %e, "NBD listener failed");
        }
    });

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let metrics_addr = match config.metrics_listen {
        Some(addr) => {
            let l = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| Error::io(format!("binding metrics listener {addr}"), e))?;
            let bound = l.local_addr().map_err(|e| Error::io("metrics listener address", e))?;
            let ready_mgr = mgr.clone();
            let (id, store, stats, mgr) = (config.id.clone(), store.clone(), stats.clone(), mgr.clone());
            let (data_dir, tls) = (config.data_dir.clone(), config.tls.clone());
            let render: metrics::Render = Arc::new(move || {
                let (id, store, stats, mgr) = (id.clone(), store.clone(), stats.clone(), mgr.clone());
                let (data_dir, tls) = (data_dir.clone(), tls.clone());
                Box::pin(
                    async move { metrics_page::render(&id, &data_dir, &store, &stats, &mgr, tls.as_deref()).await },
                )
            });
            let mut rx = stop_rx.clone();
            let ready: metrics::Ready = Arc::new(move || ready_mgr.upkeep.ready());
            tokio::spawn(metrics::serve_with_ready(l, render, Some(ready), async move {
                let _ = rx.wait_for(|s| *s).await;
            }));
            Some(bound)
        }
        None => None,
    };
    tracing::info!(node.id = %config.id, grpc = %grpc_addr, nbd = %nbd_addr, metrics = ?metrics_addr, "node agent ready");
    on_ready(Bound { grpc: grpc_addr, metrics: metrics_addr, nbd: nbd_addr });

    let restorer = mgr.clone();
    tokio::spawn(async move {
        restorer.restore_attachments().await;
        restorer.upkeep.restored();
    });
    tokio::spawn(mgr.clone().run_upkeep());

    let server_replica = replica_svc.into_server();
    let server_volumes = VolumeService::new(mgr.clone()).into_server();
    let mut rx = stop_rx;
    // Connections get TCP_NODELAY there (tonic ignores its own setting for a supplied
    // stream; without it small acks wait for delayed ACKs, ~40 ms, on every request).
    let incoming = hlstore_tls::server::incoming(listener, config.tls.clone());
    let policy: hlstore_tls::server::Policy = Arc::new(authz::authorize);
    let result = tonic::transport::Server::builder()
        // HTTP/2 flow control sized for replication: a write stream and a few resync
        // batches in flight per connection (hyper's default is 1 MiB per connection, so a
        // rebuild waited for window updates between batches), in large frames.
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME)
        .layer(hlstore_tls::server::AuthLayer::new(policy))
        .add_service(server_replica)
        .add_service(server_volumes)
        .serve_with_incoming_shutdown(incoming, async move {
            tokio::select! {
                _ = shutdown => {}
                _ = rx.wait_for(|s| *s) => {}
            }
        })
        .await;
    let _ = stop_tx.send(true);
    nbd_shutdown.shutdown();
    result.map_err(|e| Error::Unavailable(format!("gRPC server: {e}")))
}

/// The agent's certificate must be a `node` certificate for this node: peers check that
/// the agent they dial is the node they meant.
fn check_node_certificate(tls: &hlstore_tls::TlsState, id: &str) -> Result<()> {
    let me = tls.identity();
    let cert = tls.dir().join(hlstore_tls::CERT_FILE);
    match (me.role, me.node.as_deref()) {
        (hlstore_tls::Role::Node, Some(n)) if n == id => Ok(()),
        (hlstore_tls::Role::Node, Some(n)) => Err(Error::InvalidArgument(format!(
            "TLS: {} is the certificate of node {n:?}, this agent is node {id:?}",
            cert.display()
        ))),
        _ => Err(Error::InvalidArgument(format!(
            "TLS: {} is a {me}; a node agent needs a node certificate for {id:?} \
             (`hlstore cert issue --role node --node {id}`)",
            cert.display()
        ))),
    }
}

/// HTTP/2 receive window per stream on the agent's gRPC server.
const STREAM_WINDOW: u32 = 8 << 20;
/// HTTP/2 receive window per connection.
const CONNECTION_WINDOW: u32 = 32 << 20;
/// The largest HTTP/2 frame the server accepts.
const MAX_FRAME: u32 = 256 << 10;

/// How often the agent flushes replicas with unflushed changes.
const BACKGROUND_FLUSH: std::time::Duration = std::time::Duration::from_secs(1);
/// How often the agent hands freed heap memory back to the system under load.
const MEMORY_TRIM: std::time::Duration = std::time::Duration::from_secs(10);
/// How often the agent looks whether its store went idle.
const IDLE_LOOK: std::time::Duration = std::time::Duration::from_secs(1);
/// Metadata memtables smaller than this stay in memory when the store goes idle. RocksDB
/// takes memtable memory in 1 MiB blocks, so one write makes a memtable of 1 MiB: below a
/// few blocks, writing it out would only turn a light, bursty load into many small table
/// files to compact.
const IDLE_MEMTABLE_MIN: u64 = 4 << 20;

/// Hands memory back to the system: freed heap every [`MEMORY_TRIM`] (the allocator keeps
/// what bursts of large requests freed — 1 MiB writes, resync batches, across arenas: an
/// agent idle after writing to ten volumes held 192 MiB, 112 MiB after a trim), and once
/// the store saw no change for an [`IDLE_LOOK`], the metadata memtables too (written out,
/// their arenas freed) followed by a trim: an agent's idle footprint is then what its
/// volumes need at rest, not what the last burst left behind.
fn spawn_memory_release(store: Arc<DiskStore>) {
    let weak = Arc::downgrade(&store);
    drop(store);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(IDLE_LOOK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let (mut seen, mut released, mut trimmed) = (None, false, std::time::Instant::now());
        loop {
            tick.tick().await;
            let Some(store) = weak.upgrade() else { return };
            let now = store.activity();
            let idle = seen == Some(now);
            seen = Some(now);
            if !idle {
                released = false;
            }
            let release = idle && !released;
            if !release && trimmed.elapsed() < MEMORY_TRIM {
                continue;
            }
            let res = tokio::task::spawn_blocking(move || {
                let memtables = if release { store.release_idle_memory(IDLE_MEMTABLE_MIN) } else { Ok(0) };
                trim_heap();
                memtables.map(|m| (m, store.activity()))
            })
            .await;
            trimmed = std::time::Instant::now();
            match res {
                Ok(Ok((memtables, after))) => {
                    if release {
                        tracing::debug!(memtable_bytes = memtables, "store idle: memory released");
                        (released, seen) = (true, Some(after));
                    }
                }
                Ok(Err(e)) => tracing::warn!(error = %e, "releasing idle memory failed"),
                Err(e) => tracing::warn!(error = %e, "memory release task failed"),
            }
        }
    });
}

/// Bounds glibc's malloc arenas to one per CPU (at least two) for a long-running agent,
/// unless `MALLOC_ARENA_MAX` says otherwise. Call before any thread starts. glibc's default
/// is eight per CPU, one per thread that meets contention: freed memory stays spread over
/// them, in pieces no trim can hand back. An agent idle after 1 MiB writes to ten volumes
/// held 104 MiB with the default, 73 MiB with two arenas (`benches/agent_memory.sh`).
pub fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        let cpus = std::thread::available_parallelism().map_or(2, |n| n.get()).max(2);
        // SAFETY: mallopt only sets an allocator parameter; no thread runs yet.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, cpus as libc::c_int);
        }
    }
}

/// Returns freed heap memory of every malloc arena to the system.
fn trim_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free memory of glibc's own arenas.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Flushes dirty replicas every [`BACKGROUND_FLUSH`], so slots freed by overwrites are
/// reused (overwrites then land on pages already in the page cache and on disk, instead of
/// growing the slot file) even when no client flushes, and the unsynced bookkeeping stays
/// small. Durability still comes only from flushes; this adds some.
fn spawn_background_flush(store: Arc<DiskStore>) {
    let weak = Arc::downgrade(&store);
    drop(store);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(BACKGROUND_FLUSH);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let Some(store) = weak.upgrade() else { return };
            match tokio::task::spawn_blocking(move || store.flush_dirty()).await {
                Ok(Err(e)) => tracing::warn!(error = %e, "background flush failed"),
                Err(e) => tracing::warn!(error = %e, "background flush task failed"),
                Ok(Ok(_)) => {}
            }
        }
    });
}

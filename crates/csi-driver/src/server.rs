//! Serving the driver: which services run (`--mode`), on which unix socket, talking to
//! which node agent, with which attach backend.

use std::future::Future;
use std::path::PathBuf;

use hlstore_proto::csi::controller_server::ControllerServer;
use hlstore_proto::csi::identity_server::IdentityServer;
use hlstore_proto::csi::node_server::NodeServer;
use hlstore_proto::volume::volumes_client::VolumesClient;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::transport::{Channel, Server};

use crate::attach::{self, AttachKind};
use crate::controller::ControllerService;
use crate::error::{CsiError, Result};
use crate::identity::IdentityService;
use crate::node::NodeService;

/// Which services a process serves (Identity always).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Controller,
    Node,
    All,
}

impl std::str::FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "controller" => Ok(Mode::Controller),
            "node" => Ok(Mode::Node),
            "all" => Ok(Mode::All),
            other => Err(format!("unknown mode {other:?} (use controller, node or all)")),
        }
    }
}

#[derive(Debug, Clone)]
pub struct DriverConfig {
    pub mode: Mode,
    /// `unix:///path/csi.sock`.
    pub csi_endpoint: String,
    pub node_id: String,
    /// Node agent gRPC address (`http://host:port` or `host:port`).
    pub agent: String,
    pub attach: AttachKind,
    /// Where the loop backend keeps its FUSE mounts.
    pub state_dir: PathBuf,
    /// NodeGetInfo's max_volumes_per_node (0 = no limit).
    pub max_volumes: i64,
    /// Serve Prometheus metrics (`/metrics`, `/healthz`) here.
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// How the driver reaches the agent: mutual TLS with its certificate (`admin` for the
    /// controller, the node's `node` certificate for a node plugin), or plaintext.
    pub tls: hlstore_tls::client::ClientTls,
    /// The backup repository volumes may be created from (controller; `None`: not
    /// configured, `backup:` snapshot handles are refused).
    pub backups: Option<std::sync::Arc<dyn crate::backups::BackupSource>>,
    /// How often the controller lists the backup repository for its metrics
    /// (`crate::backup_metrics`; zero: never).
    pub backup_metrics_interval: std::time::Duration,
}

/// Longest an agent call may take (an attach forwarded to another node is bounded by the
/// agent at 60 s; the sidecars' own timeouts are usually shorter and the CO retries).
const AGENT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(150);

/// The agent's volume API. A node plugin talks to the agent on its own node and checks
/// that it is that node's agent; the controller takes any node of the cluster.
/// `limit`: the longest any one call may take (`None` for the channel clones are copied
/// through: a copy takes as long as the data takes).
fn agent_channel(cfg: &DriverConfig, limit: Option<std::time::Duration>) -> Result<VolumesClient<Channel>> {
    let agent = &cfg.agent;
    let mut ep = hlstore_tls::client::endpoint(agent)
        .map_err(|e| CsiError::InvalidArgument(format!("--agent {agent:?}: {e}")))?
        .connect_timeout(std::time::Duration::from_secs(5));
    if let Some(limit) = limit {
        ep = ep.timeout(limit);
    }
    let expect = match cfg.mode {
        Mode::Node => hlstore_tls::Expect::Node(cfg.node_id.clone()),
        Mode::Controller | Mode::All => hlstore_tls::Expect::AnyNode,
    };
    Ok(VolumesClient::new(hlstore_tls::client::lazy(ep, &cfg.tls, expect)))
}

/// Serves until `shutdown` resolves; removes the socket afterwards.
pub async fn serve(cfg: DriverConfig, shutdown: impl Future<Output = ()> + Send + 'static) -> Result<()> {
    if cfg.node_id.is_empty() {
        return Err(CsiError::InvalidArgument("--node-id is required".into()));
    }
    let agent = agent_channel(&cfg, Some(AGENT_TIMEOUT))?;
    let path = crate::client::socket_path(&cfg.csi_endpoint)?;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| CsiError::io(format!("creating {}", dir.display()), e))?;
    }
    match std::fs::remove_file(&path) {
        Ok(()) => tracing::info!(socket = %path.display(), "removed a stale CSI socket"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(CsiError::io(format!("removing {}", path.display()), e)),
    }
    let listener =
        tokio::net::UnixListener::bind(&path).map_err(|e| CsiError::io(format!("binding {}", path.display()), e))?;
    let controller = matches!(cfg.mode, Mode::Controller | Mode::All);
    let node = matches!(cfg.mode, Mode::Node | Mode::All);
    let identity = IdentityService::new(agent.clone(), controller);
    let backups = cfg.backups.clone();
    let ctrl = if controller {
        let copies = agent_channel(&cfg, None)?;
        let svc = ControllerService::new(agent.clone()).with_backups(backups).with_copy_agent(copies);
        Some(ControllerServer::new(svc))
    } else {
        None
    };
    let node_svc = node.then(|| {
        let attacher = attach::attacher(cfg.attach, &cfg.state_dir);
        let (a, node_id) = (agent.clone(), cfg.node_id.clone());
        tokio::spawn(attach::reconnect_monitor(attacher.clone(), move |volume| {
            let (mut a, node_id) = (a.clone(), node_id.clone());
            async move {
                let v = a.get_volume(hlstore_proto::volume::GetVolumeRequest { name: volume }).await.ok()?.into_inner();
                (v.attached_node == node_id && !v.nbd_uri.is_empty()).then_some(v.nbd_uri)
            }
        }));
        NodeServer::new(NodeService::new(agent.clone(), attacher, cfg.node_id.clone(), cfg.max_volumes))
    });
    tracing::info!(
        socket = %path.display(), mode = ?cfg.mode, node = %cfg.node_id, agent = %cfg.agent, attach = ?cfg.attach,
        "CSI driver {} serving", crate::DRIVER_NAME
    );
    let metrics = std::sync::Arc::new(crate::metrics::CsiMetrics::default());
    // The repository's backups on the controller's page (stopped with the server; no page,
    // no listing).
    let list_backups = controller && cfg.metrics_listen.is_some() && !cfg.backup_metrics_interval.is_zero();
    let backup_metrics = match (&cfg.backups, list_backups) {
        (Some(source), true) => {
            let m = std::sync::Arc::new(crate::backup_metrics::BackupMetrics::default());
            let task = tokio::spawn(crate::backup_metrics::run(m.clone(), source.clone(), cfg.backup_metrics_interval));
            Some((m, AbortOnDrop(task)))
        }
        _ => None,
    };
    let (stop_metrics, metrics_stopped) = tokio::sync::oneshot::channel::<()>();
    if let Some(addr) = cfg.metrics_listen {
        let l = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| CsiError::io(format!("binding the metrics listener {addr}"), e))?;
        let m = metrics.clone();
        let b = backup_metrics.as_ref().map(|(b, _)| b.clone());
        let render: hlstore_core::metrics::Render = std::sync::Arc::new(move || {
            let (m, b) = (m.clone(), b.clone());
            Box::pin(async move {
                let mut page = m.render();
                if let Some(b) = b {
                    page.push_str(&b.render());
                }
                page
            })
        });
        tokio::spawn(hlstore_core::metrics::serve(l, render, async move {
            let _ = metrics_stopped.await;
        }));
        tracing::info!(%addr, "CSI metrics on /metrics");
    }
    let res = Server::builder()
        .layer(crate::metrics::MetricsLayer(metrics))
        .add_service(IdentityServer::new(identity))
        .add_optional_service(ctrl)
        .add_optional_service(node_svc)
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown)
        .await;
    let _ = std::fs::remove_file(&path);
    let _ = stop_metrics.send(());
    drop(backup_metrics);
    res.map_err(|e| CsiError::Internal(format!("CSI server: {e}")))
}

/// Aborts a background task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

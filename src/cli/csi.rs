//! `hlstore csi`: the CSI driver (controller, node plugin, or both) on a unix socket.

use std::path::PathBuf;

use anyhow::Context;
use hlstore_csi::attach::AttachKind;
use hlstore_csi::{DriverConfig, Mode};

const EXAMPLE: &str = "\
Examples:
  # controller (a Deployment), talking to any node agent
  hlstore csi --mode controller --csi-endpoint unix:///csi/csi.sock --node-id ctrl \\
    --agent hlstore-agent:7400 --tls-dir /etc/hlstore/tls
  # node plugin (a privileged DaemonSet), talking to the agent on its node
  hlstore csi --mode node --csi-endpoint unix:///csi/csi.sock --node-id $NODE_NAME \\
    --agent 127.0.0.1:7400 --tls-dir /etc/hlstore/tls --attach nbd
  # everything in one process, loop devices instead of kernel NBD (local cluster)
  hlstore csi --mode all --csi-endpoint unix:///tmp/csi.sock --node-id n1 \\
    --agent 127.0.0.1:7400 --tls-dir /tmp/hl/tls/admin --attach loop --state-dir /tmp/hlstore-csi";

/// Arguments of `hlstore csi`.
#[derive(Debug, clap::Args)]
#[command(after_help = EXAMPLE)]
pub struct CsiArgs {
    /// Services to run besides Identity: controller, node or all.
    #[arg(long, env = "HLSTORE_CSI_MODE", default_value = "all")]
    pub mode: Mode,
    /// Where to listen: unix:///path/csi.sock.
    #[arg(long, env = "CSI_ENDPOINT")]
    pub csi_endpoint: String,
    /// This node's id: the hlstore node id of the agent on this machine (NodeGetInfo).
    #[arg(long, env = "HLSTORE_NODE_ID")]
    pub node_id: String,
    /// Node agent gRPC endpoint. The controller may use any agent; the node plugin uses
    /// the agent on its own node.
    #[arg(long, env = "HLSTORE_ENDPOINT", default_value = "127.0.0.1:7400")]
    pub agent: String,
    /// How the node plugin turns a volume into a block device: nbd (kernel NBD over
    /// netlink) or loop (FUSE block file + loop device, for kernels without NBD).
    #[arg(long, env = "HLSTORE_CSI_ATTACH", default_value = "nbd")]
    pub attach: AttachKind,
    /// Directory for the loop backend's FUSE mounts and logs.
    #[arg(long, env = "HLSTORE_CSI_STATE_DIR", default_value = "/var/lib/hlstore-csi")]
    pub state_dir: PathBuf,
    /// Volumes this node accepts (NodeGetInfo max_volumes_per_node; 0 = no limit).
    #[arg(long, default_value_t = 64)]
    pub max_volumes: i64,
    /// Prometheus metrics listen address (GET /metrics, /healthz): calls by method and
    /// gRPC code, and their time.
    #[arg(long, env = "HLSTORE_CSI_METRICS_LISTEN")]
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// Backup repository (file:///path, a path, or s3://bucket/prefix) the controller
    /// restores volumes from: a PVC whose dataSource is a VolumeSnapshot of a
    /// pre-provisioned VolumeSnapshotContent with snapshotHandle backup:<id> or
    /// backup:latest:<namespace>/<claim> is created from that backup. The password comes
    /// from --backup-password-file or $HLSTORE_REPO_PASSWORD, S3 credentials from the
    /// usual AWS_* variables.
    #[arg(long, env = "HLSTORE_BACKUP_REPO")]
    pub backup_repo: Option<String>,
    /// File holding the backup repository's password.
    #[arg(long, requires = "backup_repo")]
    pub backup_password_file: Option<PathBuf>,
    /// S3 endpoint URL of the backup repository (default: $AWS_ENDPOINT_URL; empty: the
    /// default).
    #[arg(long, env = "HLSTORE_BACKUP_S3_ENDPOINT")]
    pub backup_s3_endpoint: Option<String>,
    /// S3 region of the backup repository (default: $AWS_REGION, else us-east-1).
    #[arg(long, requires = "backup_repo")]
    pub backup_s3_region: Option<String>,
    /// Seconds between two listings of the backup repository by the controller, which
    /// shows the newest backup of each volume on its /metrics
    /// (hlstore_backup_newest_timestamp_seconds); 0 = never. Listing takes no lease and
    /// writes nothing.
    #[arg(long, env = "HLSTORE_BACKUP_METRICS_INTERVAL", value_name = "SECS", default_value_t = 300)]
    pub backup_metrics_interval: u64,
}

/// Serves until SIGTERM or Ctrl-C.
pub async fn run(args: CsiArgs) -> anyhow::Result<()> {
    let backups = args.backup_repo.clone().filter(|r| !r.is_empty()).map(|repo| {
        let repo = super::backup::RepoArgs {
            repo,
            password_file: args.backup_password_file.clone(),
            s3_endpoint: args.backup_s3_endpoint.clone().filter(|e| !e.is_empty()),
            s3_region: args.backup_s3_region.clone(),
        };
        let source: std::sync::Arc<dyn hlstore_csi::backups::BackupSource> =
            std::sync::Arc::new(super::csi_backups::RepoBackups::new(repo, args.agent.clone()));
        source
    });
    let cfg = DriverConfig {
        mode: args.mode,
        csi_endpoint: args.csi_endpoint,
        node_id: args.node_id,
        agent: args.agent,
        attach: args.attach,
        state_dir: args.state_dir,
        max_volumes: args.max_volumes,
        metrics_listen: args.metrics_listen,
        tls: match super::tls::state()? {
            Some(s) => {
                // cert-manager renews the mounted certificate: new connections use it.
                s.watch(hlstore_tls::state::RELOAD_INTERVAL);
                hlstore_tls::client::ClientTls::Tls(s)
            }
            None => hlstore_tls::client::ClientTls::Insecure,
        },
        backups,
        backup_metrics_interval: std::time::Duration::from_secs(args.backup_metrics_interval),
    };
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    let shutdown = async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: stopping the CSI server"),
            _ = tokio::signal::ctrl_c() => tracing::info!("interrupted: stopping the CSI server"),
        }
    };
    hlstore_csi::serve(cfg, shutdown).await.context("CSI driver")
}

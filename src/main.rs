//! `hlstore`: one binary for the node agent, the CLI, backups and the CSI driver.

mod cli;

use clap::{Parser, Subcommand};

/// hlstore — replicated block storage and deduplicating backups for homelab Kubernetes.
///
/// Every node runs `hlstore node`; volumes are replicated across nodes with a write quorum
/// and served over NBD; backups go to a deduplicating, encrypted repository on S3 or a
/// directory. Run `hlstore <command> --help` for each command.
#[derive(Debug, Parser)]
#[command(name = "hlstore", version, about, long_about)]
struct Cli {
    /// Log as JSON lines (for Loki and friends) instead of text.
    #[arg(long, global = true, env = "HLSTORE_LOG_JSON", value_parser = clap::builder::BoolishValueParser::new())]
    log_json: bool,
    #[command(flatten)]
    tls: cli::tls::TlsArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a node agent (replica store + replica gRPC service + metrics).
    Node(cli::node::NodeArgs),
    /// Inspect and use the replicas of one node agent directly (the replica service takes
    /// node certificates only: --tls-dir with that node's, e.g. DIR/tls/n1 of a dev cluster).
    Replica {
        #[command(flatten)]
        endpoint: cli::replica::Endpoint,
        #[command(subcommand)]
        command: cli::replica::ReplicaCommand,
    },
    /// Create, list, attach and delete replicated volumes.
    Volume {
        /// Node agent gRPC endpoint (any node of the cluster).
        #[arg(long, env = "HLSTORE_ENDPOINT", default_value = "127.0.0.1:7400", global = true)]
        endpoint: String,
        #[command(subcommand)]
        command: cli::volume::VolumeCommand,
    },
    /// Create, list, delete and revert crash-consistent volume snapshots.
    Snapshot {
        /// Node agent gRPC endpoint (any node of the cluster).
        #[arg(long, env = "HLSTORE_ENDPOINT", default_value = "127.0.0.1:7400", global = true)]
        endpoint: String,
        #[command(subcommand)]
        command: cli::snapshot::SnapshotCommand,
    },
    /// Run a local cluster of node agents on loopback (for trying hlstore out and tests).
    #[command(subcommand)]
    Dev(cli::dev::DevCommand),
    /// Expose an NBD export (a volume) as a file on a FUSE mount, for losetup on kernels
    /// without the NBD module.
    FuseAttach(cli::fuse::FuseArgs),
    /// Run the CSI driver (Identity + Controller and/or Node) on a unix socket.
    Csi(cli::csi::CsiArgs),
    /// Back up files, block devices or volumes to a deduplicating repository.
    #[command(subcommand)]
    Backup(cli::backup::BackupCommand),
    /// Restore a backup to a file, a block device or a new volume.
    Restore(cli::backup::RestoreArgs),
    /// Rebuild a lost cluster's volumes from the backup repository: the newest backup of
    /// every volume, restored under its original name, plus a PersistentVolume + claim
    /// manifest per PVC.
    Recover(cli::recover::RecoverArgs),
    /// Make the cluster's CA and issue node, admin and backup certificates (mutual TLS
    /// between every component).
    #[command(subcommand)]
    Cert(cli::tls::CertCommand),
    /// Diagnostic tools (for tests).
    #[command(subcommand, hide = true)]
    Debug(cli::debug::DebugCommand),
}

fn init_logging(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("HLSTORE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // Processes that serve block devices (the node agent's engines behind kernel NBD, the
    // FUSE block file behind a loop device) must not recurse into block I/O when they
    // allocate memory. PR_SET_IO_FLUSHER is per thread and inherited: set it before the
    // runtime starts its threads.
    let io_flusher =
        matches!(cli.command, Command::Node(_) | Command::FuseAttach(_)).then(hlstore_csi::attach::set_io_flusher);
    if matches!(cli.command, Command::Node(_)) {
        hlstore_node::limit_malloc_arenas();
    }
    tokio::runtime::Builder::new_multi_thread().enable_all().build()?.block_on(run(cli, io_flusher))
}

async fn run(cli: Cli, io_flusher: Option<std::io::Result<()>>) -> anyhow::Result<()> {
    init_logging(cli.log_json);
    cli::tls::init(cli.tls.clone());
    if let Some(Err(e)) = io_flusher {
        tracing::warn!("PR_SET_IO_FLUSHER not set ({e}): needs CAP_SYS_RESOURCE");
    }
    match cli.command {
        Command::Node(args) => cli::node::run(args).await,
        Command::Replica { endpoint, command } => cli::replica::run(endpoint, command).await,
        Command::Volume { endpoint, command } => cli::volume::run(&endpoint, command).await,
        Command::Snapshot { endpoint, command } => cli::snapshot::run(&endpoint, command).await,
        Command::Dev(cmd) => cli::dev::run(cmd).await,
        Command::FuseAttach(args) => cli::fuse::run(args).await,
        Command::Csi(args) => cli::csi::run(args).await,
        Command::Backup(cmd) => cli::backup::run_backup(cmd).await,
        Command::Restore(args) => cli::backup::run_restore(args).await,
        Command::Recover(args) => cli::recover::run(args).await,
        Command::Cert(cmd) => cli::tls::run_cert(cmd),
        Command::Debug(cmd) => tokio::task::spawn_blocking(move || cli::debug::run(cmd)).await?,
    }
}

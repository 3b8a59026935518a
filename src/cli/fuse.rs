//! `hlstore fuse-attach`: exposes an NBD export as one file on a FUSE mount, for kernels
//! without an NBD client. Runs in the foreground until SIGTERM or Ctrl-C, then unmounts.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use hlstore_nbd_client::fuse::{FuseMount, DEFAULT_FILE_NAME};
use hlstore_nbd_client::{ClientOptions, NbdUri, ReconnectPolicy, Reconnecting};

const EXAMPLE: &str = "\
Example (as root; the kernel needs FUSE and loop devices):
  hlstore fuse-attach --nbd nbd://127.0.0.1:10809/vol1 --mountpoint /run/hl/vol1 &
  # prints /run/hl/vol1/disk once mounted
  dev=$(losetup --find --show --direct-io=off /run/hl/vol1/disk)
  mkfs.ext4 -q $dev            # first use only
  mount $dev /mnt/vol1
  ...
  umount /mnt/vol1 && losetup -d $dev && kill %1   # SIGTERM unmounts the file";

/// Arguments of `hlstore fuse-attach`.
#[derive(Debug, clap::Args)]
#[command(after_help = EXAMPLE)]
pub struct FuseArgs {
    /// NBD export: nbd://HOST[:PORT]/NAME or nbd+unix:///NAME?socket=PATH.
    #[arg(long, env = "HLSTORE_NBD_URI")]
    pub nbd: String,
    /// Directory to mount on (created if missing). The file appears as DIR/FILE_NAME.
    #[arg(long)]
    pub mountpoint: PathBuf,
    /// Name of the block file inside the mount point.
    #[arg(long, default_value = DEFAULT_FILE_NAME)]
    pub file_name: String,
    /// Seconds one I/O may wait for the NBD server's answer before the connection is
    /// taken for dead (and replaced, see --reconnect-secs).
    #[arg(long, default_value_t = 30)]
    pub timeout_secs: u64,
    /// When the connection dies (the agent serving the volume restarts, the volume is
    /// re-attached), reconnect and send the unanswered I/O again for up to this many
    /// seconds; the filesystem above only sees slow I/O. Past it, I/O fails with EIO.
    /// 0 = never reconnect (the first dead connection fails every I/O).
    #[arg(long, env = "HLSTORE_RECONNECT_SECS", default_value_t = 120)]
    pub reconnect_secs: u64,
}

/// Mounts, prints the file path on stdout, waits for SIGTERM/Ctrl-C, unmounts.
pub async fn run(args: FuseArgs) -> anyhow::Result<()> {
    let uri = NbdUri::parse(&args.nbd)?;
    if args.timeout_secs == 0 {
        anyhow::bail!("--timeout-secs must be at least 1");
    }
    let opts = ClientOptions { request_timeout: Duration::from_secs(args.timeout_secs), ..ClientOptions::default() };
    let policy = match args.reconnect_secs {
        0 => ReconnectPolicy::NEVER,
        s => ReconnectPolicy::within(Duration::from_secs(s)),
    };
    let client =
        Arc::new(Reconnecting::connect(&uri, opts, policy).await.with_context(|| format!("connecting to {uri}"))?);
    std::fs::create_dir_all(&args.mountpoint)
        .with_context(|| format!("creating mount point {}", args.mountpoint.display()))?;
    let mount = FuseMount::mount(client.clone(), &args.mountpoint, &args.file_name).await?;

    {
        // The path on stdout is the "ready" signal scripts wait for.
        let mut stdout = std::io::stdout().lock();
        writeln!(stdout, "{}", mount.file_path().display())?;
        stdout.flush()?;
    }
    tracing::info!(nbd.uri = %uri, size = client.size(), file = %mount.file_path().display(), "block file ready");

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: unmounting"),
        r = tokio::signal::ctrl_c() => {
            r.context("waiting for Ctrl-C")?;
            tracing::info!("interrupted: unmounting");
        }
    }
    let stats = client.stats();
    tracing::info!(
        reconnects = stats.reconnects.load(std::sync::atomic::Ordering::Relaxed),
        retried_requests = stats.retried_requests.load(std::sync::atomic::Ordering::Relaxed),
        "block file closing"
    );
    let unmounted = mount
        .unmount()
        .await
        .context("unmounting the block file (a loop device still attached keeps it busy: `losetup -d` it first)");
    if let Err(e) = client.disconnect().await {
        tracing::debug!("nbd disconnect: {e}");
    }
    unmounted
}

//! Block-device backends: they turn a volume's NBD export into a local block device.
//!
//! - [`nbd::NbdAttacher`]: kernel NBD configured over generic netlink ([`netlink`] holds
//!   the message encoding). Request and dead-connection timeouts are set, the backend
//!   identifier is the volume id (so a restarted plugin finds its devices in
//!   `/sys/block/nbd*/backend`), and a reconfigure refreshes the size after an expand.
//!   When the engine restarts, the device waits out its dead-connection timeout and the
//!   node plugin's reconnect monitor ([`reconnect_monitor`]) hands it a fresh socket
//!   (NBD_CMD_RECONFIGURE with sockets); the kernel requeues what was in flight.
//! - [`loop_file::LoopAttacher`]: `hlstore fuse-attach` exposes the export as a file on a
//!   FUSE mount under the state directory (`<state>/loop/<volume id>/disk`), and `losetup`
//!   puts a loop device on it. For kernels without the NBD module. fuse-attach reconnects
//!   by itself (`--reconnect-secs`).
//!
//! Invariants (both backends): `attach` is idempotent (an existing device of the volume is
//! returned); `find` needs no memory of earlier calls (it reads the kernel's view);
//! `detach` of a volume with no device is OK.

pub mod loop_file;
pub mod nbd;
pub mod netlink;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::Result;

/// The backend chosen with `--attach`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttachKind {
    Nbd,
    Loop,
}

impl std::str::FromStr for AttachKind {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "nbd" => Ok(AttachKind::Nbd),
            "loop" => Ok(AttachKind::Loop),
            other => Err(format!("unknown attach backend {other:?} (use nbd or loop)")),
        }
    }
}

/// Attaches NBD exports as block devices.
#[tonic::async_trait]
pub trait Attacher: Send + Sync {
    /// Attaches `nbd_uri` (the volume's export) as a block device; returns its path. If the
    /// volume already has a device, returns that one.
    async fn attach(&self, volume_id: &str, nbd_uri: &str) -> Result<PathBuf>;
    /// The volume's device, if it has one.
    async fn find(&self, volume_id: &str) -> Result<Option<PathBuf>>;
    /// Removes the volume's device (none: OK). The caller has unmounted it.
    async fn detach(&self, volume_id: &str) -> Result<()>;
    /// Makes the device show at least `want` bytes (the volume grew); returns its size.
    async fn refresh_size(&self, volume_id: &str, nbd_uri: &str, want: u64) -> Result<u64>;
    /// Why the volume's device cannot serve I/O, if it cannot (its connection to the
    /// engine is gone). `None`: healthy, or no device.
    async fn problem(&self, volume_id: &str) -> Result<Option<String>>;
    /// The volumes whose device lost its connection to the engine (an agent restart) and
    /// waits for a new one. Backends that reconnect by themselves report none.
    fn disconnected(&self) -> Vec<String> {
        Vec::new()
    }
    /// Gives the volume's device a fresh connection to `nbd_uri`. Whether it did.
    async fn reconnect(&self, _volume_id: &str, _nbd_uri: &str) -> Result<bool> {
        Ok(false)
    }
}

/// How often the reconnect monitor looks for devices that lost their connection.
pub const RECONNECT_POLL: std::time::Duration = std::time::Duration::from_secs(1);

/// Gives every device that lost its connection a new one to its volume's current export
/// (`export_of` asks the agent where the volume is exported on this node; `None`: not
/// attached here (any more), left to the dead-connection timeout). Runs forever.
pub async fn reconnect_monitor<F, Fut>(attacher: Arc<dyn Attacher>, export_of: F)
where
    F: Fn(String) -> Fut,
    Fut: std::future::Future<Output = Option<String>>,
{
    loop {
        tokio::time::sleep(RECONNECT_POLL).await;
        for volume in attacher.disconnected() {
            let Some(uri) = export_of(volume.clone()).await else { continue };
            match attacher.reconnect(&volume, &uri).await {
                Ok(true) => {
                    tracing::info!(volume.id = %volume, nbd.uri = %uri, "block device reconnected to its engine")
                }
                Ok(false) => {}
                Err(e) => tracing::warn!(volume.id = %volume, error = %e, "block device reconnect failed; retrying"),
            }
        }
    }
}

/// The backend for `kind`, keeping its files under `state_dir`.
pub fn attacher(kind: AttachKind, state_dir: &Path) -> Arc<dyn Attacher> {
    match kind {
        AttachKind::Nbd => Arc::new(nbd::NbdAttacher::new(nbd::NbdSettings::default())),
        AttachKind::Loop => Arc::new(loop_file::LoopAttacher::new(state_dir.join("loop"))),
    }
}

/// Marks the calling process as an I/O flusher (`PR_SET_IO_FLUSHER`): its memory
/// allocations do not recurse into block I/O, so a process that serves a block device
/// cannot deadlock on writeback of that device. Needs CAP_SYS_RESOURCE; inherited by
/// children and kept across execve.
pub fn set_io_flusher() -> std::io::Result<()> {
    const PR_SET_IO_FLUSHER: libc::c_int = 57;
    // SAFETY: prctl with integer arguments only; it touches no memory of ours.
    let rc = unsafe {
        libc::prctl(PR_SET_IO_FLUSHER, 1 as libc::c_ulong, 0 as libc::c_ulong, 0 as libc::c_ulong, 0 as libc::c_ulong)
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

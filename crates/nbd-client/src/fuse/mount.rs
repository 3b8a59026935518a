//! `FuseMount`: a mounted [`BlockFileFs`] and its unmount, which also runs on drop.
//!
//! Invariants:
//! - While a `FuseMount` exists, its directory is mounted; after `unmount()` returns or the
//!   value is dropped, it is not (a busy mount — a loop device still attached — is retried
//!   for [`UNMOUNT_RETRY`], then detached lazily so nothing stays visible in the tree).
//! - Mounting happens on a blocking thread (it waits for the kernel's INIT), never on a
//!   runtime worker.

use std::ffi::{CString, OsString};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fuser::{BackgroundSession, Config, MountOption, Session, SessionACL};

use super::fs::BlockFileFs;
use crate::Reconnecting;
use hlstore_core::error::{Error, Result};

/// How long a busy mount is retried before it is detached lazily.
pub const UNMOUNT_RETRY: Duration = Duration::from_secs(5);
/// How long the FUSE threads get to finish after the unmount.
const JOIN_TIMEOUT: Duration = Duration::from_secs(5);
/// Threads reading `/dev/fuse` (each only decodes requests; the I/O runs on tokio).
pub const FUSE_THREADS: usize = 4;
/// The file name used when none is given.
pub const DEFAULT_FILE_NAME: &str = "disk";

/// A mounted block file.
#[derive(Debug)]
pub struct FuseMount {
    mountpoint: PathBuf,
    file: PathBuf,
    session: Option<BackgroundSession>,
}

impl FuseMount {
    /// Mounts `client`'s export on `mountpoint` as one file called `file_name`. Must be called
    /// inside a tokio runtime (the filesystem runs its I/O there).
    pub async fn mount(client: Arc<Reconnecting>, mountpoint: &Path, file_name: &str) -> Result<FuseMount> {
        if file_name.is_empty() || file_name == "." || file_name == ".." || file_name.contains('/') {
            return Err(Error::InvalidArgument(format!("block file name {file_name:?} is not a plain file name")));
        }
        let mountpoint = std::fs::canonicalize(mountpoint)
            .map_err(|e| Error::io(format!("mount point {}", mountpoint.display()), e))?;
        if !mountpoint.is_dir() {
            return Err(Error::InvalidArgument(format!("mount point {} is not a directory", mountpoint.display())));
        }
        if !Path::new("/dev/fuse").exists() {
            return Err(Error::Unavailable("/dev/fuse does not exist: the kernel has no FUSE support here".into()));
        }
        let export = client.export().to_string();
        let fs = BlockFileFs::new(client, OsString::from(file_name), tokio::runtime::Handle::current());
        let mut config = Config::default();
        config.mount_options = vec![
            MountOption::FSName(format!("hlstore:{export}")),
            MountOption::Subtype("hlstore".into()),
            MountOption::NoSuid,
            MountOption::NoDev,
            MountOption::NoExec,
            // The kernel checks permissions against the mode bits (0600, owner only).
            MountOption::DefaultPermissions,
        ];
        config.acl = SessionACL::Owner;
        config.n_threads = Some(FUSE_THREADS);
        let at = mountpoint.clone();
        let session = tokio::task::spawn_blocking(move || Session::new(fs, &at, &config).and_then(Session::spawn))
            .await
            .map_err(|e| Error::Internal(format!("mount task failed: {e}")))?
            .map_err(|e| Error::io(format!("mounting FUSE on {}", mountpoint.display()), e))?;
        tracing::info!(fuse.mountpoint = %mountpoint.display(), nbd.export = %export, "block file mounted");
        Ok(FuseMount { file: mountpoint.join(file_name), mountpoint, session: Some(session) })
    }

    /// The mount point (canonical).
    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// The block file's path.
    pub fn file_path(&self) -> &Path {
        &self.file
    }

    /// Unmounts (retrying while busy) and waits for the FUSE threads to stop.
    pub async fn unmount(mut self) -> Result<()> {
        let Some(session) = self.session.take() else { return Ok(()) };
        let at = self.mountpoint.clone();
        tokio::task::spawn_blocking(move || unmount_blocking(&at, session))
            .await
            .map_err(|e| Error::Internal(format!("unmount task failed: {e}")))?
    }
}

impl Drop for FuseMount {
    fn drop(&mut self) {
        if let Some(session) = self.session.take() {
            if let Err(e) = unmount_blocking(&self.mountpoint, session) {
                tracing::warn!(fuse.mountpoint = %self.mountpoint.display(), "{e}");
            }
        }
    }
}

fn unmount_blocking(mountpoint: &Path, session: BackgroundSession) -> Result<()> {
    let what = || format!("unmounting {}", mountpoint.display());
    let path = CString::new(mountpoint.as_os_str().as_bytes())
        .map_err(|_| Error::InvalidArgument(format!("{}: path contains NUL", what())))?;
    // Wait while the mount is busy. `MNT_EXPIRE` only probes: it answers EBUSY while the
    // file is in use and EAGAIN (marking it, not unmounting) once it is not.
    let deadline = Instant::now() + UNMOUNT_RETRY;
    let busy = loop {
        match umount2(&path, libc::MNT_EXPIRE) {
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => break Some(e),
            // EAGAIN (idle), EPERM (unprivileged: the session unmounts through fusermount3),
            // or anything else: let the session's own unmount decide.
            _ => break None,
        }
    };
    if let Some(e) = busy {
        // Still busy (a loop device attached): detach it so the tree is clean; the FUSE
        // threads end when the last user closes the file.
        let detached = umount2(&path, libc::MNT_DETACH);
        drop(session);
        return Err(Error::io(
            format!("{}: still busy after {UNMOUNT_RETRY:?}; detached lazily ({})", what(), ok_str(&detached)),
            e,
        ));
    }
    // The kernel ends the connection on unmount; the threads see ENODEV and return.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(session.umount_and_join());
    });
    match rx.recv_timeout(JOIN_TIMEOUT) {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => {
            let detached = umount2(&path, libc::MNT_DETACH);
            Err(Error::io(format!("{}: detached lazily ({})", what(), ok_str(&detached)), e))
        }
        Err(_) => Err(Error::Unavailable(format!("{}: FUSE threads did not stop within {JOIN_TIMEOUT:?}", what()))),
    }
}

fn ok_str(r: &std::io::Result<()>) -> &'static str {
    if r.is_ok() {
        "ok"
    } else {
        "failed"
    }
}

fn umount2(path: &CString, flags: libc::c_int) -> std::io::Result<()> {
    // SAFETY: `path` is a valid NUL-terminated string that outlives the call.
    let rc = unsafe { libc::umount2(path.as_ptr(), flags) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

//! A read-only FUSE view of a repository (`hlstore backup mount`): backups by time, by
//! label and by id, each a directory with the backup's `image` (byte-identical to what
//! `restore --to-file` writes, so `mount -o loop,ro` opens a filesystem image) and its
//! `backup.json`.
//!
//! - `tree.rs` — the directory layout (pure, built once from the backups' metadata).
//! - `reader.rs` — random-access reads of an image through a decoded-chunk cache.
//! - `fs.rs` — the FUSE filesystem; `RepoMount` (here) mounts and unmounts it.
//!
//! Boundary: the view is the repository as of the mount (backups made later appear after
//! a remount). Reads never write to the repository and take no lease: a prune that
//! repacks a pack an image needs is followed by reloading the index; a backup that prune
//! deleted reads as `EIO`.

mod fs;
mod reader;
mod tree;

pub use fs::RepoFs;
pub use reader::{ChunkSource, ImageReader, DEFAULT_CACHE_BYTES};
pub use tree::{label_name, time_name, NodeKind, Tree, IMAGE_FILE, META_FILE, ROOT};

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use fuser::{BackgroundSession, Config, MountOption, Session, SessionACL};

use crate::error::{Error, Result};
use crate::repo::Repository;

/// Threads serving FUSE requests (each blocks on the backend while it reads a chunk).
pub const FUSE_THREADS: usize = 4;
/// How long a busy mount is retried before it is detached lazily.
pub const BUSY_RETRY: Duration = Duration::from_secs(5);
/// How long the FUSE threads get to stop after the unmount.
const JOIN_TIMEOUT: Duration = Duration::from_secs(10);

/// Options of a mount.
#[derive(Debug, Clone)]
pub struct MountOptions {
    /// Bytes of decoded chunks kept in memory.
    pub cache_bytes: usize,
    /// Let other users than the mounting one in (FUSE `allow_other`; needs root or
    /// `user_allow_other` in /etc/fuse.conf).
    pub allow_other: bool,
}

impl Default for MountOptions {
    fn default() -> Self {
        MountOptions { cache_bytes: DEFAULT_CACHE_BYTES, allow_other: false }
    }
}

/// A mounted repository view; unmounted by [`RepoMount::unmount`] or on drop.
#[derive(Debug)]
pub struct RepoMount {
    mountpoint: PathBuf,
    backups: usize,
    session: Option<BackgroundSession>,
}

impl RepoMount {
    /// Lists the backups, loads the index and mounts the view on `mountpoint` (an existing
    /// directory).
    pub fn mount(repo: Arc<Repository>, mountpoint: &Path, opts: MountOptions) -> Result<RepoMount> {
        let mountpoint = std::fs::canonicalize(mountpoint)
            .map_err(|e| Error::Io { context: format!("mount point {}", mountpoint.display()), source: e })?;
        if !mountpoint.is_dir() {
            return Err(Error::Invalid(format!("mount point {} is not a directory", mountpoint.display())));
        }
        if !Path::new("/dev/fuse").exists() {
            return Err(Error::Invalid("/dev/fuse does not exist: the kernel has no FUSE support here".into()));
        }
        let tree = Tree::build(repo.list_snapshots()?);
        let backups = tree.metas().len();
        let repo_id = repo.config().id.clone();
        let chunks = Arc::new(ChunkSource::new(repo, opts.cache_bytes)?);
        let fs = RepoFs::new(tree, chunks);
        let mut config = Config::default();
        config.mount_options = vec![
            MountOption::FSName(format!("hlstore-backup:{}", &repo_id[..8.min(repo_id.len())])),
            MountOption::Subtype("hlstore".into()),
            MountOption::RO,
            MountOption::NoSuid,
            MountOption::NoDev,
            MountOption::DefaultPermissions,
        ];
        config.acl = if opts.allow_other { SessionACL::All } else { SessionACL::Owner };
        config.n_threads = Some(FUSE_THREADS);
        let session = Session::new(fs, &mountpoint, &config).and_then(Session::spawn).map_err(|e| Error::Io {
            context: format!("mounting the repository on {}", mountpoint.display()),
            source: e,
        })?;
        tracing::info!(mountpoint = %mountpoint.display(), backups, "repository mounted");
        Ok(RepoMount { mountpoint, backups, session: Some(session) })
    }

    /// The mount point (canonical).
    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// Backups shown.
    pub fn backups(&self) -> usize {
        self.backups
    }

    /// Unmounts and waits for the FUSE threads. A mount still busy after
    /// [`BUSY_RETRY`] (an image open or loop-attached) is detached lazily — it leaves the
    /// tree now and goes away when its last user closes it — and reported as an error.
    pub fn unmount(mut self) -> Result<()> {
        let path = self.c_path()?;
        let deadline = std::time::Instant::now() + BUSY_RETRY;
        loop {
            // MNT_EXPIRE only probes: EBUSY while in use, EAGAIN (marks it) once idle.
            // SAFETY: `path` is a valid NUL-terminated string that outlives the call.
            let busy = unsafe { libc::umount2(path.as_ptr(), libc::MNT_EXPIRE) } != 0
                && std::io::Error::last_os_error().raw_os_error() == Some(libc::EBUSY);
            if !busy {
                return self.finish();
            }
            if std::time::Instant::now() >= deadline {
                self.detach();
                let _ = self.finish();
                return Err(Error::Busy(format!(
                    "{} was still in use (an open image or an attached loop device); detached lazily, it goes away when the last user closes it",
                    self.mountpoint.display()
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn c_path(&self) -> Result<CString> {
        CString::new(self.mountpoint.as_os_str().as_bytes())
            .map_err(|_| Error::Invalid(format!("mount point {} contains NUL", self.mountpoint.display())))
    }

    fn finish(&mut self) -> Result<()> {
        let Some(session) = self.session.take() else { return Ok(()) };
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(session.umount_and_join());
        });
        match rx.recv_timeout(JOIN_TIMEOUT) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => {
                self.detach();
                Err(Error::Io {
                    context: format!("unmounting {} (detached lazily)", self.mountpoint.display()),
                    source: e,
                })
            }
            Err(_) => Err(Error::Invalid(format!(
                "unmounting {}: the FUSE threads did not stop within {JOIN_TIMEOUT:?}",
                self.mountpoint.display()
            ))),
        }
    }

    fn detach(&self) {
        if let Ok(path) = self.c_path() {
            // SAFETY: `path` is a valid NUL-terminated string that outlives the call.
            unsafe { libc::umount2(path.as_ptr(), libc::MNT_DETACH) };
        }
    }
}

impl Drop for RepoMount {
    fn drop(&mut self) {
        if self.session.is_some() {
            if let Err(e) = self.finish() {
                tracing::warn!(mountpoint = %self.mountpoint.display(), "{e}");
            }
        }
    }
}

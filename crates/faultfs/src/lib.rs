//! A power-loss harness: a FUSE filesystem, kept in memory, that records per file and per
//! directory what was made durable (fsync, fdatasync, fsyncdir) and throws the rest away at
//! a simulated power cut (the LazyFS idea).
//!
//! Module map:
//! - [`pages`]: `Pages`, sparse copy-on-write file content (4 KiB pages).
//! - [`model`]: `Model`, the whole filesystem, live and durable, and the durability rules
//!   (read its header); no FUSE, unit-tested on its own.
//! - [`fs`]: `FaultFs`, the model served over FUSE (kernel caches off).
//! - [`control`]: the control socket (`cut drop`, `cut torn SEED`, `stats`).
//!
//! [`mount`] puts it all together; `hlstore debug faultfs` runs it as a process.

pub mod control;
pub mod fs;
pub mod model;
pub mod pages;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use fuser::{BackgroundSession, Config, MountOption, Session, SessionACL};

pub use model::{CutMode, CutReport, Model, Stats};

/// Capacity statfs reports unless told otherwise.
pub const DEFAULT_CAPACITY: u64 = 64 << 30;
/// Threads reading `/dev/fuse`.
const FUSE_THREADS: usize = 2;

/// A mounted faultfs; unmounted by [`Mounted::unmount`] or on drop.
pub struct Mounted {
    session: Option<BackgroundSession>,
    mountpoint: PathBuf,
    model: Arc<Mutex<Model>>,
}

/// Mounts an empty faultfs on `dir` reporting `capacity` bytes, with its control socket at
/// `control` (if given).
pub fn mount(dir: &Path, control: Option<&Path>, capacity: u64) -> std::io::Result<Mounted> {
    // SAFETY: getuid/getgid cannot fail and touch no memory.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    let model = Arc::new(Mutex::new(Model::new(capacity, uid, gid)));
    let mut config = Config::default();
    config.mount_options = vec![
        MountOption::FSName("faultfs".into()),
        MountOption::Subtype("hlstore-faultfs".into()),
        MountOption::DefaultPermissions,
    ];
    config.acl = SessionACL::Owner;
    config.n_threads = Some(FUSE_THREADS);
    let session = Session::new(fs::FaultFs::new(model.clone()), dir, &config)?.spawn()?;
    if let Some(path) = control {
        control::spawn(model.clone(), path)?;
    }
    Ok(Mounted { session: Some(session), mountpoint: dir.to_path_buf(), model })
}

impl Mounted {
    pub fn model(&self) -> Arc<Mutex<Model>> {
        self.model.clone()
    }

    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// Whether the session ended (the file system was unmounted from outside).
    pub fn is_finished(&self) -> bool {
        self.session.as_ref().is_none_or(|s| s.guard.is_finished())
    }

    /// Unmounts and waits for the FUSE threads.
    pub fn unmount(mut self) -> std::io::Result<()> {
        match self.session.take() {
            Some(s) => s.umount_and_join(),
            None => Ok(()),
        }
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if let Some(s) = self.session.take() {
            if let Err(e) = s.umount_and_join() {
                tracing::warn!(mountpoint = %self.mountpoint.display(), error = %e, "faultfs unmount failed");
            }
        }
    }
}

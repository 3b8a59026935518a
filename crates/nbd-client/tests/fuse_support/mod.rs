//! Shared parts of the FUSE block-file tests: the preconditions (root, `/dev/fuse`, loop
//! devices: the tests fail with a clear message without them, they never skip), drop guards
//! that undo every mount and loop device even when a test panics, and a client + mount
//! helper.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use hlstore_nbd_client::fuse::FuseMount;
use hlstore_nbd_client::{ClientOptions, NbdClient, NbdUri, ReconnectPolicy, Reconnecting};

use crate::nbd_support::{run_ok, tool};

/// Fails the test (naming what is missing) unless FUSE and loop devices can be used.
pub fn require_fuse_and_loop() {
    // SAFETY: geteuid cannot fail and touches no memory.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(euid, 0, "the FUSE block-file tests mount filesystems and attach loop devices: run them as root");
    assert!(
        Path::new("/dev/fuse").exists(),
        "/dev/fuse is missing: the kernel needs FUSE (modprobe fuse) for the block-file tests"
    );
    assert!(
        Path::new("/dev/loop-control").exists(),
        "/dev/loop-control is missing: the kernel needs loop devices (modprobe loop) for the block-file tests"
    );
}

/// Whether `dir` is a mount point of this process's mount namespace.
pub fn is_mounted(dir: &Path) -> bool {
    let dir = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    let info = std::fs::read_to_string("/proc/self/mountinfo").expect("read /proc/self/mountinfo");
    info.lines().any(|l| l.split(' ').nth(4).is_some_and(|p| Path::new(p) == dir))
}

/// Connects to `uri` and mounts the export as `DIR/disk` (no reconnect).
pub async fn mount_export(uri: &str, dir: &Path, opts: ClientOptions) -> (Arc<Reconnecting>, FuseMount) {
    let client = NbdClient::connect(&NbdUri::parse(uri).expect("uri"), opts).await.expect("nbd connect");
    mount_client(Arc::new(Reconnecting::fixed(client)), dir).await
}

/// Connects to `uri` with `policy` and mounts the export as `DIR/disk`.
pub async fn mount_reconnecting(
    uri: &str,
    dir: &Path,
    opts: ClientOptions,
    policy: ReconnectPolicy,
) -> (Arc<Reconnecting>, FuseMount) {
    let client = Reconnecting::connect(&NbdUri::parse(uri).expect("uri"), opts, policy).await.expect("nbd connect");
    mount_client(Arc::new(client), dir).await
}

async fn mount_client(client: Arc<Reconnecting>, dir: &Path) -> (Arc<Reconnecting>, FuseMount) {
    let mount = FuseMount::mount(client.clone(), dir, "disk").await.expect("mount the block file");
    assert!(is_mounted(dir), "FUSE mount visible in mountinfo");
    (client, mount)
}

/// A loop device attached to a file; detached on drop.
pub struct LoopDevice {
    pub path: PathBuf,
    attached: bool,
}

impl LoopDevice {
    pub async fn attach(file: &Path) -> LoopDevice {
        let out = run_ok(tool("losetup", "util-linux").args(["--find", "--show", "--direct-io=off"]).arg(file)).await;
        LoopDevice { path: PathBuf::from(out.trim()), attached: true }
    }

    pub async fn detach(mut self) {
        run_ok(tool("losetup", "util-linux").arg("-d").arg(&self.path)).await;
        self.attached = false;
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        if self.attached {
            let _ = Command::new("losetup").arg("-d").arg(&self.path).status();
        }
    }
}

/// A filesystem mounted from a device; unmounted on drop.
pub struct Mounted {
    pub dir: PathBuf,
    mounted: bool,
}

impl Mounted {
    pub async fn mount(device: &Path, dir: &Path) -> Mounted {
        run_ok(tool("mount", "mount").args(["-t", "ext4"]).arg(device).arg(dir)).await;
        Mounted { dir: dir.to_path_buf(), mounted: true }
    }

    pub async fn unmount(mut self) {
        run_ok(tool("umount", "mount").arg(&self.dir)).await;
        self.mounted = false;
        assert!(!is_mounted(&self.dir));
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if self.mounted && Command::new("umount").arg(&self.dir).status().map(|s| !s.success()).unwrap_or(true) {
            let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
        }
    }
}

/// Runs blocking file I/O off the runtime workers (the FUSE requests it causes are served
/// by tasks on those workers).
pub async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::time::timeout(Duration::from_secs(30), tokio::task::spawn_blocking(f))
        .await
        .expect("file I/O finished within 30 s")
        .expect("file I/O task did not panic")
}

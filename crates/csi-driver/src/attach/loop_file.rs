//! The FUSE block file + loop device backend (kernels without the NBD module).
//!
//! Layout under the backend's directory (`<state>/loop`): `<volume>/` is the FUSE mount
//! point of `hlstore fuse-attach` and `<volume>/disk` the block file; `<volume>.pid` and
//! `<volume>.log` belong to that process. The loop device is found again from
//! `/sys/block/loop*/loop/backing_file`, so nothing but the kernel remembers an attachment.
//!
//! The fuse-attach process runs in its own process group (it outlives a restart of the
//! plugin) and sets `PR_SET_IO_FLUSHER` itself (it serves the loop device's I/O).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use super::Attacher;
use crate::error::{CsiError, Result};
use crate::mount;

/// How long the FUSE mount may take to appear.
const MOUNT_WAIT: Duration = Duration::from_secs(60);
/// How long fuse-attach may take to exit after SIGTERM.
const STOP_WAIT: Duration = Duration::from_secs(30);
/// NBD request timeout handed to fuse-attach.
const IO_TIMEOUT_SECS: u64 = 30;

pub struct LoopAttacher {
    dir: PathBuf,
}

impl LoopAttacher {
    pub fn new(dir: PathBuf) -> Self {
        Self { dir }
    }

    fn mount_dir(&self, volume_id: &str) -> PathBuf {
        self.dir.join(volume_id)
    }

    fn file(&self, volume_id: &str) -> PathBuf {
        self.mount_dir(volume_id).join(hlstore_nbd_client::fuse::DEFAULT_FILE_NAME)
    }

    fn pid_file(&self, volume_id: &str) -> PathBuf {
        self.dir.join(format!("{volume_id}.pid"))
    }

    /// Pid of the volume's fuse-attach if it runs (checked against its command line).
    fn running_pid(&self, volume_id: &str) -> Option<i32> {
        let pid: i32 = std::fs::read_to_string(self.pid_file(volume_id)).ok()?.trim().parse().ok()?;
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let zombie = stat.rsplit(')').next().is_some_and(|s| s.trim_start().starts_with('Z'));
        let dir = self.mount_dir(volume_id);
        let ours = String::from_utf8_lossy(&cmdline).contains(&*dir.to_string_lossy());
        (ours && !zombie).then_some(pid)
    }

    fn start_fuse(&self, volume_id: &str, nbd_uri: &str) -> Result<()> {
        use std::os::unix::process::CommandExt;
        let dir = self.mount_dir(volume_id);
        std::fs::create_dir_all(&dir).map_err(|e| CsiError::io(format!("creating {}", dir.display()), e))?;
        let log_path = self.dir.join(format!("{volume_id}.log"));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|e| CsiError::io(format!("opening {}", log_path.display()), e))?;
        let exe = std::env::current_exe().map_err(|e| CsiError::io("finding the hlstore executable", e))?;
        let mut cmd = std::process::Command::new(exe);
        cmd.args(["fuse-attach", "--nbd", nbd_uri, "--timeout-secs", &IO_TIMEOUT_SECS.to_string(), "--mountpoint"])
            .arg(&dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| CsiError::io("duplicating the log file", e))?)
            .stderr(log)
            .process_group(0);
        let mut child = cmd.spawn().map_err(|e| CsiError::io("starting hlstore fuse-attach", e))?;
        let pid = child.id();
        std::fs::write(self.pid_file(volume_id), pid.to_string())
            .map_err(|e| CsiError::io("writing the fuse-attach pid file", e))?;
        let deadline = Instant::now() + MOUNT_WAIT;
        loop {
            if mount::mount_at(&dir)?.is_some_and(|m| m.fs_type.starts_with("fuse")) && self.file(volume_id).exists() {
                // Reap it whenever it exits.
                std::thread::spawn(move || {
                    let _ = child.wait();
                });
                return Ok(());
            }
            let exited = !matches!(child.try_wait(), Ok(None));
            if exited || Instant::now() > deadline {
                if !exited {
                    let _ = child.kill();
                }
                let _ = child.wait();
                let log = std::fs::read_to_string(&log_path).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(5).collect();
                return Err(CsiError::Tool(format!(
                    "hlstore fuse-attach of {nbd_uri} did not mount {}: {}",
                    dir.display(),
                    tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
                )));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Loop devices whose backing file is `file`.
    fn loops_on(file: &Path) -> Vec<PathBuf> {
        let Ok(rd) = std::fs::read_dir("/sys/block") else { return Vec::new() };
        let mut out: Vec<PathBuf> = rd
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with("loop"))
            .filter(|e| {
                std::fs::read_to_string(e.path().join("loop/backing_file"))
                    .is_ok_and(|b| Path::new(b.trim_end_matches('\n')) == file)
            })
            .map(|e| Path::new("/dev").join(e.file_name()))
            .collect();
        out.sort();
        out
    }

    async fn stop_fuse(&self, volume_id: &str) -> Result<()> {
        let dir = self.mount_dir(volume_id);
        if let Some(pid) = self.running_pid(volume_id) {
            // SAFETY: kill(2) on a pid whose command line names this volume's mount dir.
            unsafe { libc::kill(pid, libc::SIGTERM) };
            let deadline = Instant::now() + STOP_WAIT;
            while self.running_pid(volume_id).is_some() && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        if mount::mount_at(&dir)?.is_some() {
            // fuse-attach died without unmounting: nothing serves the file any more.
            mount::run_ok("umount", &[std::ffi::OsStr::new("-l"), dir.as_os_str()]).await?;
        }
        let _ = std::fs::remove_file(self.pid_file(volume_id));
        let _ = std::fs::remove_dir(&dir);
        Ok(())
    }
}

#[tonic::async_trait]
impl Attacher for LoopAttacher {
    async fn attach(&self, volume_id: &str, nbd_uri: &str) -> Result<PathBuf> {
        if let Some(dev) = self.find(volume_id).await? {
            return Ok(dev);
        }
        std::fs::create_dir_all(&self.dir).map_err(|e| CsiError::io(format!("creating {}", self.dir.display()), e))?;
        let dir = self.mount_dir(volume_id);
        if mount::mount_at(&dir)?.is_none() || self.running_pid(volume_id).is_none() {
            self.stop_fuse(volume_id).await?;
            let (me, v, u) = (self.dir.clone(), volume_id.to_string(), nbd_uri.to_string());
            tokio::task::spawn_blocking(move || LoopAttacher::new(me).start_fuse(&v, &u))
                .await
                .map_err(|e| CsiError::Internal(format!("fuse-attach start task: {e}")))??;
        }
        let file = self.file(volume_id);
        let dev = mount::run_ok(
            "losetup",
            &[
                std::ffi::OsStr::new("--find"),
                std::ffi::OsStr::new("--show"),
                std::ffi::OsStr::new("--direct-io=off"),
                file.as_os_str(),
            ],
        )
        .await?;
        let dev = PathBuf::from(dev.trim());
        tracing::info!(volume.id = volume_id, device = %dev.display(), "attached through a FUSE block file and a loop device");
        Ok(dev)
    }

    async fn find(&self, volume_id: &str) -> Result<Option<PathBuf>> {
        Ok(Self::loops_on(&self.file(volume_id)).into_iter().next())
    }

    async fn detach(&self, volume_id: &str) -> Result<()> {
        let file = self.file(volume_id);
        for dev in Self::loops_on(&file) {
            mount::run_ok("losetup", &[std::ffi::OsStr::new("-d"), dev.as_os_str()]).await?;
        }
        // The loop driver lets go of the file asynchronously; the FUSE unmount needs it gone.
        let deadline = Instant::now() + STOP_WAIT;
        while !Self::loops_on(&file).is_empty() {
            if Instant::now() > deadline {
                return Err(CsiError::FailedPrecondition(format!(
                    "the loop device of {volume_id} is still busy (in use by a mount or a process?)"
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.stop_fuse(volume_id).await?;
        tracing::info!(volume.id = volume_id, "loop device and FUSE block file detached");
        Ok(())
    }

    async fn problem(&self, volume_id: &str) -> Result<Option<String>> {
        if self.find(volume_id).await?.is_none() {
            return Ok(None);
        }
        Ok(match (self.running_pid(volume_id), mount::mount_at(&self.mount_dir(volume_id))?) {
            (Some(_), Some(_)) => None,
            (None, _) => Some("the FUSE block file's process (hlstore fuse-attach) is not running: I/O fails".into()),
            (Some(_), None) => Some("the FUSE block file is not mounted: I/O fails".into()),
        })
    }

    async fn refresh_size(&self, volume_id: &str, _nbd_uri: &str, want: u64) -> Result<u64> {
        let dev = self
            .find(volume_id)
            .await?
            .ok_or_else(|| CsiError::NotFound(format!("volume {volume_id} has no device on this node")))?;
        let size = mount::device_size(&dev)?;
        if size >= want {
            return Ok(size);
        }
        Err(CsiError::FailedPrecondition(format!(
            "volume {volume_id}: the loop backend cannot grow an attached device ({size} < {want} bytes); unstage and stage the volume again"
        )))
    }
}

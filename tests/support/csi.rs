//! A running `hlstore csi --mode all --attach loop` for the CSI tests, in a private mount
//! namespace, plus a gRPC client over its unix socket.
//!
//! The driver runs as `unshare --mount --propagation private hlstore csi ...`, so every
//! mount it (and the `hlstore fuse-attach` processes it starts) makes lives in that
//! namespace only; the host mount table never sees them. Tests look inside through
//! `/proc/<pid>/root/...` and `/proc/<pid>/mountinfo`. Loop devices are global: dropping
//! [`CsiDriver`] detaches every loop device whose backing file is under its temp dir, kills
//! its fuse-attach processes and the driver, and checks that nothing leaked to the host.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hlstore_proto::csi;
use hlstore_proto::csi::controller_client::ControllerClient;
use hlstore_proto::csi::identity_client::IdentityClient;
use hlstore_proto::csi::node_client::NodeClient;
use tonic::transport::Channel;

use super::cluster::Cluster;

pub struct CsiDriver {
    child: Child,
    pub dir: tempfile::TempDir,
    pub endpoint: String,
    pub node_id: String,
    agent: String,
    /// `host:port` of the driver's `/metrics`.
    pub metrics: String,
    /// The TLS directory the driver reaches the agent with (the dev cluster's admin one).
    tls: std::path::PathBuf,
    /// Extra environment of the driver process (kept across restarts).
    env: Vec<(String, String)>,
}

impl CsiDriver {
    /// Starts the driver for node `node_id` against that node's agent and waits until its
    /// socket answers.
    pub fn start(c: &Cluster, node_id: &str) -> CsiDriver {
        Self::start_with_env(c, node_id, &[])
    }

    /// [`Self::start`] with extra environment variables for the driver.
    pub fn start_with_env(c: &Cluster, node_id: &str, env: &[(&str, &str)]) -> CsiDriver {
        // SAFETY: geteuid cannot fail and touches no memory.
        assert_eq!(unsafe { libc::geteuid() }, 0, "the CSI tests mount filesystems: run them as root");
        assert!(Path::new("/dev/fuse").exists(), "/dev/fuse is missing (modprobe fuse)");
        let dir = tempfile::Builder::new().prefix("hlstore-csi-").tempdir().expect("temp dir");
        let endpoint = format!("unix://{}", dir.path().join("csi.sock").display());
        let agent = c.endpoint(node_id);
        let metrics = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("free port");
            l.local_addr().expect("port").to_string()
        };
        let mut cmd = Command::new("unshare");
        cmd.args(["--mount", "--propagation", "private", "--"]);
        let tls = c.path().join("tls").join("admin");
        let env: Vec<(String, String)> = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let child = Self::spawn(cmd, dir.path(), &endpoint, node_id, &agent, &metrics, &tls, &env);
        let mut d = CsiDriver { child, dir, endpoint, node_id: node_id.to_string(), agent, metrics, tls, env };
        d.wait_ready();
        d
    }

    // The driver's whole command line, spelled out at both call sites (start, restart).
    #[allow(clippy::too_many_arguments)]
    fn spawn(
        mut cmd: Command,
        dir: &Path,
        endpoint: &str,
        node_id: &str,
        agent: &str,
        metrics: &str,
        tls: &Path,
        env: &[(String, String)],
    ) -> Child {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(dir.join("csi.log")).expect("csi.log");
        cmd.arg(env!("CARGO_BIN_EXE_hlstore"))
            .args(["csi", "--mode", "all", "--csi-endpoint", endpoint, "--node-id", node_id])
            .args(["--agent", agent, "--attach", "loop", "--metrics-listen", metrics, "--state-dir"])
            .arg(dir.join("state"))
            .env("HLSTORE_LOG", "info,hlstore_csi=debug")
            .env("HLSTORE_TLS_DIR", tls)
            .env_remove("HLSTORE_INSECURE")
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup log"))
            .stderr(log)
            .spawn()
            .expect("start hlstore csi (util-linux unshare/nsenter)")
    }

    fn wait_ready(&mut self) {
        let sock = self.dir.path().join("csi.sock");
        let deadline = Instant::now() + Duration::from_secs(60);
        // A restarted driver replaces the old socket file: wait for a fresh one.
        while !sock.exists() || std::os::unix::net::UnixStream::connect(&sock).is_err() {
            assert!(Instant::now() < deadline, "CSI socket did not appear; log:\n{}", self.log());
            if let Ok(Some(st)) = self.child.try_wait() {
                panic!("hlstore csi exited with {st}; log:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGKILLs the driver and starts a new one in the same mount namespace (entered
    /// through a fuse-attach process, which keeps it alive), like a plugin pod restart.
    pub fn restart(&mut self) {
        let holder = *self.fuse_pids().first().expect("a fuse-attach process holds the namespace");
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(self.dir.path().join("csi.sock"));
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--mount=/proc/{holder}/ns/mnt")).arg("--");
        self.child = Self::spawn(
            cmd,
            self.dir.path(),
            &self.endpoint,
            &self.node_id,
            &self.agent,
            &self.metrics,
            &self.tls,
            &self.env,
        );
        self.wait_ready();
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("csi.log")).unwrap_or_default()
    }

    /// A path as the driver's mount namespace sees it.
    pub fn in_ns(&self, p: &Path) -> PathBuf {
        PathBuf::from(format!("/proc/{}/root{}", self.pid(), p.display()))
    }

    /// Mount points in the driver's namespace.
    pub fn ns_mounts(&self) -> Vec<(String, String)> {
        let text = std::fs::read_to_string(format!("/proc/{}/mountinfo", self.pid())).expect("driver mountinfo");
        text.lines()
            .filter_map(|l| {
                let f: Vec<&str> = l.split(' ').collect();
                let fstype = l.split(" - ").nth(1)?.split(' ').next()?.to_string();
                Some((f.get(4)?.replace("\\040", " "), fstype))
            })
            .collect()
    }

    /// The filesystem type mounted at `p` in the driver's namespace.
    pub fn ns_mount_type(&self, p: &Path) -> Option<String> {
        let p = p.to_string_lossy().to_string();
        self.ns_mounts().into_iter().rev().find(|(m, _)| *m == p).map(|(_, t)| t)
    }

    /// A directory for staging/target paths (inside the temp dir).
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Loop devices whose backing file is under this driver's temp dir.
    pub fn loop_devices(&self) -> Vec<String> {
        let needle = self.dir.path().to_string_lossy().to_string();
        let Ok(rd) = std::fs::read_dir("/sys/block") else { return Vec::new() };
        rd.flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with("loop"))
            .filter(|e| std::fs::read_to_string(e.path().join("loop/backing_file")).is_ok_and(|b| b.contains(&needle)))
            .map(|e| format!("/dev/{}", e.file_name().to_string_lossy()))
            .collect()
    }

    /// Pids of fuse-attach processes started for this driver.
    pub fn fuse_pids(&self) -> Vec<i32> {
        let needle = self.dir.path().to_string_lossy().to_string();
        let Ok(rd) = std::fs::read_dir("/proc") else { return Vec::new() };
        rd.flatten()
            .filter_map(|e| e.file_name().to_string_lossy().parse::<i32>().ok())
            .filter(|pid| {
                std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
                    let c = String::from_utf8_lossy(&c);
                    c.contains("fuse-attach") && c.contains(&needle)
                })
            })
            .collect()
    }

    pub async fn channel(&self) -> Channel {
        hlstore_csi::client::connect(&self.endpoint).await.expect("connect to the CSI socket")
    }

    pub async fn identity(&self) -> IdentityClient<Channel> {
        IdentityClient::new(self.channel().await)
    }

    pub async fn controller(&self) -> ControllerClient<Channel> {
        ControllerClient::new(self.channel().await)
    }

    pub async fn node(&self) -> NodeClient<Channel> {
        NodeClient::new(self.channel().await)
    }

    /// Host mount entries under this driver's temp dir (must stay empty).
    pub fn host_leaks(&self) -> Vec<String> {
        let needle = self.dir.path().to_string_lossy().to_string();
        std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains(&needle))
            .map(str::to_string)
            .collect()
    }
}

impl Drop for CsiDriver {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("----- csi.log -----\n{}", self.log());
        }
        for dev in self.loop_devices() {
            let _ = Command::new("losetup").arg("-d").arg(&dev).status();
        }
        for pid in self.fuse_pids() {
            // SAFETY: kill(2) on a fuse-attach whose command line names our temp dir.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ----- request builders -----

pub fn mount_cap(fs: &str) -> csi::VolumeCapability {
    use csi::volume_capability::{access_mode::Mode, AccessMode, AccessType, MountVolume};
    csi::VolumeCapability {
        access_type: Some(AccessType::Mount(MountVolume { fs_type: fs.into(), ..Default::default() })),
        access_mode: Some(AccessMode { mode: Mode::SingleNodeWriter as i32 }),
    }
}

pub fn block_cap() -> csi::VolumeCapability {
    use csi::volume_capability::{access_mode::Mode, AccessMode, AccessType, BlockVolume};
    csi::VolumeCapability {
        access_type: Some(AccessType::Block(BlockVolume {})),
        access_mode: Some(AccessMode { mode: Mode::SingleNodeWriter as i32 }),
    }
}

pub fn create_req(name: &str, bytes: i64, cap: csi::VolumeCapability) -> csi::CreateVolumeRequest {
    csi::CreateVolumeRequest {
        name: name.into(),
        capacity_range: Some(csi::CapacityRange { required_bytes: bytes, limit_bytes: 0 }),
        volume_capabilities: vec![cap],
        ..Default::default()
    }
}

/// Asserts that `r` failed with `code`; returns the message.
#[track_caller]
pub fn expect_code<T: std::fmt::Debug>(
    r: Result<tonic::Response<T>, tonic::Status>,
    code: tonic::Code,
    what: &str,
) -> String {
    match r {
        Ok(v) => panic!("{what}: expected {code:?}, got OK {:?}", v.into_inner()),
        Err(s) => {
            assert_eq!(s.code(), code, "{what}: wrong code, message: {}", s.message());
            s.message().to_string()
        }
    }
}

/// Whether the agent answered UNIMPLEMENTED for a feature (prints a note to skip on).
pub fn unimplemented_note(r: &Result<tonic::Response<impl std::fmt::Debug>, tonic::Status>, feature: &str) -> bool {
    if let Err(s) = r {
        if s.code() == tonic::Code::Unimplemented {
            eprintln!("NOTE: skipping the {feature} checks: the node agent answers UNIMPLEMENTED ({})", s.message());
            return true;
        }
    }
    false
}

/// Whether this process may set PR_SET_IO_FLUSHER (CAP_SYS_RESOURCE, bit 24).
pub fn have_cap_sys_resource() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find_map(|l| l.strip_prefix("CapEff:").map(|v| v.trim().to_string())))
        .and_then(|v| u64::from_str_radix(&v, 16).ok())
        .is_some_and(|caps| caps & (1 << 24) != 0)
}

/// Whether process `pid` runs with PR_SET_IO_FLUSHER (PF_MEMALLOC_NOIO in its flags).
pub fn is_io_flusher(pid: i32) -> bool {
    const PF_MEMALLOC_NOIO: u64 = 0x0008_0000;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let flags = stat.rsplit(')').next().and_then(|r| r.split_whitespace().nth(6)).and_then(|f| f.parse::<u64>().ok());
    flags.is_some_and(|f| f & PF_MEMALLOC_NOIO != 0)
}

// ----- node RPC helpers -----

pub fn stage_req(
    id: &str,
    staging: &Path,
    cap: csi::VolumeCapability,
    ctx: &std::collections::HashMap<String, String>,
) -> csi::NodeStageVolumeRequest {
    csi::NodeStageVolumeRequest {
        volume_id: id.into(),
        publish_context: ctx.clone(),
        staging_target_path: staging.to_string_lossy().into(),
        volume_capability: Some(cap),
        ..Default::default()
    }
}

pub fn unstage_req(id: &str, staging: &Path) -> csi::NodeUnstageVolumeRequest {
    csi::NodeUnstageVolumeRequest { volume_id: id.into(), staging_target_path: staging.to_string_lossy().into() }
}

pub fn publish_req(
    id: &str,
    staging: &Path,
    target: &Path,
    cap: csi::VolumeCapability,
) -> csi::NodePublishVolumeRequest {
    csi::NodePublishVolumeRequest {
        volume_id: id.into(),
        staging_target_path: staging.to_string_lossy().into(),
        target_path: target.to_string_lossy().into(),
        volume_capability: Some(cap),
        ..Default::default()
    }
}

pub fn unpublish_req(id: &str, target: &Path) -> csi::NodeUnpublishVolumeRequest {
    csi::NodeUnpublishVolumeRequest { volume_id: id.into(), target_path: target.to_string_lossy().into() }
}

/// Creates `name` and publishes it to the driver's node; returns the publish context.
pub async fn create_and_publish(
    d: &CsiDriver,
    name: &str,
    bytes: i64,
    cap: csi::VolumeCapability,
) -> std::collections::HashMap<String, String> {
    let mut ctl = d.controller().await;
    ctl.create_volume(create_req(name, bytes, cap.clone())).await.expect("create volume");
    let req = csi::ControllerPublishVolumeRequest {
        volume_id: name.into(),
        node_id: d.node_id.clone(),
        volume_capability: Some(cap),
        ..Default::default()
    };
    ctl.controller_publish_volume(req).await.expect("controller publish").into_inner().publish_context
}

pub async fn unpublish_and_delete(d: &CsiDriver, name: &str) {
    let mut ctl = d.controller().await;
    ctl.controller_unpublish_volume(csi::ControllerUnpublishVolumeRequest {
        volume_id: name.into(),
        node_id: d.node_id.clone(),
        ..Default::default()
    })
    .await
    .expect("controller unpublish");
    ctl.delete_volume(csi::DeleteVolumeRequest { volume_id: name.into(), ..Default::default() }).await.expect("delete");
}

pub fn assert_clean(d: &CsiDriver) {
    assert!(d.loop_devices().is_empty(), "loop devices left: {:?}", d.loop_devices());
    assert!(d.fuse_pids().is_empty(), "fuse-attach processes left: {:?}", d.fuse_pids());
    let ours = d.dir.path().to_string_lossy().to_string();
    let ns: Vec<_> = d.ns_mounts().into_iter().filter(|(m, _)| m.contains(&ours)).collect();
    assert!(ns.is_empty(), "mounts left in the driver's namespace: {ns:?}");
    assert!(d.host_leaks().is_empty(), "mounts leaked to the host: {:?}", d.host_leaks());
}

pub async fn stats(node: &mut NodeClient<Channel>, id: &str, path: &Path) -> Vec<csi::VolumeUsage> {
    let req = csi::NodeGetVolumeStatsRequest {
        volume_id: id.into(),
        volume_path: path.to_string_lossy().into(),
        staging_target_path: String::new(),
    };
    node.node_get_volume_stats(req).await.expect("volume stats").into_inner().usage
}

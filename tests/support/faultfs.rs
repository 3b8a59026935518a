//! Power cuts for integration tests: [`FaultDisk`] runs `hlstore debug faultfs` (one
//! process per simulated disk) and sends it cuts; [`PowerCluster`] is a `hlstore dev`
//! cluster whose data lives on such disks — either one disk for the whole cluster dir (one
//! machine) or one disk per node data dir (`DIR/<id>/data`, one disk per machine; `dev up`
//! uses an existing data dir as it is).
//!
//! A cut requires that every process writing to the disk was SIGKILLed first (the agent of
//! that node): [`PowerCluster::power_cut`] does kill, cut, in that order. Dropping a
//! `PowerCluster` kills its agents, then unmounts the disks, then removes the dir.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::cluster::Cluster;

/// One `hlstore debug faultfs` process and its mount.
pub struct FaultDisk {
    child: Option<Child>,
    pub mount: PathBuf,
    pub control: PathBuf,
}

impl FaultDisk {
    /// Mounts a fresh faultfs on `mount` (an existing empty dir), control socket `control`.
    pub fn start(mount: &Path, control: &Path) -> Self {
        std::fs::create_dir_all(mount).expect("create mount point");
        let mut child = Command::new(env!("CARGO_BIN_EXE_hlstore"))
            .args(["debug", "faultfs", "--mount"])
            .arg(mount)
            .arg("--control")
            .arg(control)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start hlstore debug faultfs");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let line = rx.recv_timeout(Duration::from_secs(30)).expect("faultfs did not report its mount");
        assert!(line.starts_with("mounted "), "unexpected faultfs output {line:?}");
        Self { child: Some(child), mount: mount.to_path_buf(), control: control.to_path_buf() }
    }

    /// Sends one control command; returns its JSON answer (panics unless `ok`).
    pub fn command(&self, cmd: &str) -> Value {
        let mut s = UnixStream::connect(&self.control).expect("connect to faultfs control socket");
        writeln!(s, "{cmd}").expect("send control command");
        let mut line = String::new();
        BufReader::new(s).read_line(&mut line).expect("read control answer");
        let v: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("bad control answer {line:?}: {e}"));
        assert_eq!(v["ok"], true, "faultfs refused {cmd:?}: {v}");
        v
    }

    /// `cut drop` or `cut torn SEED`.
    pub fn cut(&self, mode: &Cut) -> Value {
        self.command(&mode.command())
    }

    pub fn stats(&self) -> Value {
        self.command("stats")
    }

    /// Unmounts (SIGTERM to the faultfs process; lazy unmount if it does not end).
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else { return };
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while child.try_wait().ok().flatten().is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                let _ = Command::new("umount").arg("-l").arg(&self.mount).status();
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for FaultDisk {
    fn drop(&mut self) {
        self.stop();
    }
}

/// How a power cut treats what was not synced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cut {
    Drop,
    Torn(u64),
}

impl Cut {
    pub fn command(&self) -> String {
        match self {
            Cut::Drop => "cut drop".into(),
            Cut::Torn(seed) => format!("cut torn {seed}"),
        }
    }
}

/// A dev cluster on faultfs disks.
pub struct PowerCluster {
    pub cluster: Cluster,
    /// Disk by node id; the key "" is the one disk holding the whole cluster dir.
    pub disks: BTreeMap<String, FaultDisk>,
}

impl PowerCluster {
    /// The whole cluster dir (cluster.json and every node) on one disk: one machine.
    pub fn one_disk() -> Self {
        let cluster = Cluster::new();
        let control = cluster.path().with_extension("faultfs.sock");
        let disk = FaultDisk::start(cluster.path(), &control);
        Self { cluster, disks: BTreeMap::from([(String::new(), disk)]) }
    }

    /// One disk per node data dir (`DIR/n<i>/data`), nodes `n1..=n<nodes>`.
    pub fn disk_per_node(nodes: usize) -> Self {
        let cluster = Cluster::new();
        let mut disks = BTreeMap::new();
        for i in 1..=nodes {
            let id = format!("n{i}");
            let disk =
                FaultDisk::start(&cluster.path().join(&id).join("data"), &cluster.path().join(format!("{id}.sock")));
            disks.insert(id, disk);
        }
        Self { cluster, disks }
    }

    /// The disk holding node `id`'s data.
    pub fn disk(&self, id: &str) -> &FaultDisk {
        self.disks.get(id).or_else(|| self.disks.get("")).unwrap_or_else(|| panic!("no disk for node {id}"))
    }

    /// SIGKILLs the agents of `ids`, then cuts the power of their disk(s).
    pub fn power_cut(&self, ids: &[&str], cut: Cut) -> Vec<Value> {
        for id in ids {
            self.cluster.kill9(id);
        }
        if self.disks.contains_key("") {
            return vec![self.disks[""].cut(&cut)];
        }
        ids.iter().map(|id| self.disk(id).cut(&cut)).collect()
    }

    /// Kills every agent of the cluster (pid files checked against their command line).
    fn kill_agents(&self) {
        let dir = self.cluster.path().to_string_lossy().into_owned();
        for id in self.disks.keys().filter(|k| !k.is_empty()).cloned().chain((1..=16).map(|i| format!("n{i}"))) {
            let Ok(s) = std::fs::read_to_string(self.cluster.path().join(&id).join("node.pid")) else { continue };
            let Ok(pid) = s.trim().parse::<i32>() else { continue };
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            if String::from_utf8_lossy(&cmdline).contains(&dir) {
                // SAFETY: kill(2) on a pid whose command line names this cluster's dir.
                unsafe { libc::kill(pid, libc::SIGKILL) };
                let deadline = Instant::now() + Duration::from_secs(10);
                while std::path::Path::new(&format!("/proc/{pid}/cmdline")).exists()
                    && std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| !c.is_empty())
                    && Instant::now() < deadline
                {
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        }
    }
}

impl Drop for PowerCluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for id in ["n1", "n2", "n3"] {
                eprintln!("----- {id}/node.log (tail) -----\n{}", self.cluster.log_tail(id, 60));
            }
        }
        self.kill_agents();
        for d in self.disks.values_mut() {
            d.stop();
        }
    }
}

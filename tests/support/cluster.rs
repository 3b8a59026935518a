//! A local cluster (`hlstore dev up`) for integration tests, and the tools that drive it.
//!
//! [`Cluster`] owns a temp dir holding one `hlstore dev` cluster; dropping it runs
//! `dev down` and SIGKILLs any node agent of that dir still alive (checked against
//! `/proc/<pid>/cmdline`, so a recycled pid is never hit). On a panic it prints the tail of
//! every node log. [`Load`] runs `tests/scripts/nbd_load.py` (python3-libnbd), a writer of
//! self-describing blocks that logs every acknowledged request; [`verify_load`] checks a
//! volume against such logs. [`run_tool`] runs an external client with a deadline, so a
//! hung server fails the test instead of hanging it.
//!
//! Every process listens on 127.0.0.1 only; engine timeouts are shortened (see
//! [`FAST_TIMEOUTS`]) so a test waits seconds, not minutes, for a timeout.

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// Engine timeouts inherited by the node agents `dev up` starts. A killed node is noticed
/// at once (its connections reset), so only the failure timeout is kept well above what one
/// 32 MiB request can take on a busy 2-core machine with a debug build: at 1 s such a
/// request marks every replica failed and fails with EIO.
pub const FAST_TIMEOUTS: [(&str, &str); 5] = [
    ("HLSTORE_ACK_TIMEOUT_MS", "300"),
    ("HLSTORE_FAILURE_TIMEOUT_MS", "3000"),
    ("HLSTORE_IO_TIMEOUT_MS", "5000"),
    ("HLSTORE_RETRY_INTERVAL_MS", "300"),
    ("HLSTORE_LEASE_MS", "1000"),
];

/// `HLSTORE_IO_TIMEOUT_MS` of [`FAST_TIMEOUTS`], in seconds.
pub const IO_TIMEOUT_SECS: f64 = 5.0;

/// Python with the Debian `python3-libnbd` module (also what nbdsh runs).
pub const PYTHON: &str = "/usr/bin/python3";

pub const BLOCK: u64 = 4096;

/// Path of a helper script under `tests/scripts/`.
pub fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/scripts").join(name)
}

/// CLOCK_MONOTONIC in seconds: the clock the load script stamps its requests with.
pub fn monotonic_now() -> f64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9
}

/// Runs `cmd` to completion, killing it (and failing) after `timeout`.
pub fn run_tool(cmd: &mut Command, timeout: Duration) -> Output {
    let desc = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {desc}: {e}"));
    let mut out = child.stdout.take().expect("stdout");
    let mut err = child.stderr.take().expect("stderr");
    let t_out = std::thread::spawn(move || {
        let mut b = Vec::new();
        let _ = out.read_to_end(&mut b);
        b
    });
    let t_err = std::thread::spawn(move || {
        let mut b = Vec::new();
        let _ = err.read_to_end(&mut b);
        b
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait for tool") {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{desc} did not finish within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let out = Output { status, stdout: t_out.join().unwrap_or_default(), stderr: t_err.join().unwrap_or_default() };
    super::keep_log("cli.log", &out.stderr);
    out
}

/// Like [`run_tool`], and panics unless the tool succeeded; returns its stdout.
pub fn run_ok(cmd: &mut Command, timeout: Duration) -> String {
    let desc = format!("{cmd:?}");
    let out = run_tool(cmd, timeout);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{desc} failed ({}):\nstdout:\n{stdout}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat.rsplit(')').next().is_some_and(|s| s.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

fn cmdline_mentions(pid: i32, needle: &str) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline")).map(|b| String::from_utf8_lossy(&b).contains(needle)).unwrap_or(false)
}

/// A `hlstore dev` cluster in its own temp dir; `dev down` + SIGKILL of leftovers on drop.
pub struct Cluster {
    pub dir: tempfile::TempDir,
    /// Extra environment for every command (and so for the node agents it starts).
    pub env: Vec<(String, String)>,
}

impl Default for Cluster {
    fn default() -> Self {
        Self::new()
    }
}

impl Cluster {
    /// An empty cluster dir (nothing runs until [`Cluster::up`]).
    pub fn new() -> Self {
        Self { dir: tempfile::Builder::new().prefix("hlstore-cluster-").tempdir().expect("temp dir"), env: Vec::new() }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    fn dir_str(&self) -> String {
        self.dir.path().to_str().expect("utf-8 temp dir").to_string()
    }

    /// A command running the hlstore binary with the fast engine timeouts.
    pub fn command(&self) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_hlstore"));
        c.envs(FAST_TIMEOUTS).env_remove("HLSTORE_ENDPOINT").env_remove("HLSTORE_INSECURE");
        // The CLI talks to the dev cluster with the admin certificate `dev up` made.
        c.env("HLSTORE_TLS_DIR", self.path().join("tls").join("admin"));
        c.envs(self.env.iter().map(|(k, v)| (k, v)));
        c
    }

    /// Runs the hlstore CLI; panics (with its output) unless it succeeded; returns stdout.
    pub fn cli(&self, args: &[&str]) -> String {
        run_ok(self.command().args(args), Duration::from_secs(120))
    }

    /// Runs the CLI with TLS directory `tls` of the dev cluster (`n1`…: a node's, which
    /// `hlstore replica` needs; `backup`); panics unless it succeeded; returns stdout.
    pub fn cli_as(&self, tls: &str, args: &[&str]) -> String {
        run_ok(
            self.command().env("HLSTORE_TLS_DIR", self.path().join("tls").join(tls)).args(args),
            Duration::from_secs(120),
        )
    }

    /// Runs the hlstore CLI; returns (success, stdout, stderr).
    pub fn try_cli(&self, args: &[&str]) -> (bool, String, String) {
        let out = run_tool(self.command().args(args), Duration::from_secs(120));
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// `hlstore dev up --dir DIR <extra>`; returns its stdout, trimmed (the NBD URI when a
    /// volume was asked for).
    pub fn up(&self, extra: &[&str]) -> String {
        let dir = self.dir_str();
        let mut args = vec!["dev", "up", "--dir", &dir];
        args.extend_from_slice(extra);
        self.cli(&args).trim().to_string()
    }

    /// `hlstore dev down --dir DIR`.
    pub fn down(&self) {
        let dir = self.dir_str();
        self.cli(&["dev", "down", "--dir", &dir]);
    }

    /// `hlstore dev status --dir DIR --json`.
    pub fn status(&self) -> Value {
        let dir = self.dir_str();
        let out = self.cli(&["dev", "status", "--dir", &dir, "--json"]);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("dev status printed invalid JSON ({e}):\n{out}"))
    }

    /// The `nodes[]` entry of `id` in a status.
    pub fn node_of<'a>(status: &'a Value, id: &str) -> &'a Value {
        status["nodes"]
            .as_array()
            .and_then(|n| n.iter().find(|n| n["id"] == id))
            .unwrap_or_else(|| panic!("node {id} missing from status: {status}"))
    }

    /// The `volumes[]` entry of `name` in a status (or `volume show`/`list` output).
    pub fn volume_of<'a>(status: &'a Value, name: &str) -> Option<&'a Value> {
        status["volumes"].as_array().and_then(|v| v.iter().find(|v| v["name"] == name))
    }

    /// The replica entry of `node` in a volume view.
    pub fn replica_of<'a>(volume: &'a Value, node: &str) -> Option<&'a Value> {
        volume["replicas"].as_array().and_then(|r| r.iter().find(|r| r["node"] == node))
    }

    /// gRPC endpoint (`http://...`) of node `id`.
    pub fn endpoint(&self, id: &str) -> String {
        Self::node_of(&self.status(), id)["endpoint"].as_str().expect("endpoint").to_string()
    }

    /// Metrics address (`host:port`) of node `id`.
    pub fn metrics_addr(&self, id: &str) -> String {
        let url = Self::node_of(&self.status(), id)["metrics"].as_str().expect("metrics").to_string();
        url.trim_start_matches("http://").trim_end_matches("/metrics").to_string()
    }

    /// NBD listener (`host:port`) of node `id`.
    pub fn nbd_addr(&self, id: &str) -> String {
        Self::node_of(&self.status(), id)["nbd"].as_str().expect("nbd").to_string()
    }

    /// `hlstore volume show NAME --json --endpoint <node id>`.
    pub fn volume_show(&self, via: &str, name: &str) -> Value {
        let ep = self.endpoint(via);
        let out = self.cli(&["volume", "show", name, "--json", "--endpoint", &ep]);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("volume show printed invalid JSON ({e}):\n{out}"))
    }

    /// Pid of node `id` if it runs.
    pub fn pid(&self, id: &str) -> Option<i32> {
        let st = self.status();
        let n = Self::node_of(&st, id);
        n["running"].as_bool().unwrap_or(false).then(|| n["pid"].as_i64().expect("pid") as i32)
    }

    /// Starts only node `id` (as `dev up` would, with the same ports, peers, data dir, log
    /// and pid file) and waits until its gRPC port accepts connections. `dev up` starts
    /// every stopped node; this brings back one of several.
    pub fn start_one(&self, id: &str) {
        let raw = std::fs::read(self.path().join("cluster.json")).expect("read cluster.json");
        let cj: Value = serde_json::from_slice(&raw).expect("parse cluster.json");
        let nodes = cj["nodes"].as_array().expect("nodes in cluster.json");
        let s = |n: &Value, k: &str| n[k].as_str().unwrap_or_else(|| panic!("{k} in cluster.json")).to_string();
        let peers: Vec<String> = nodes.iter().map(|n| format!("{}={}", s(n, "id"), s(n, "grpc"))).collect();
        let node = nodes.iter().find(|n| n["id"] == id).unwrap_or_else(|| panic!("no node {id} in cluster.json"));
        let ndir = self.path().join(id);
        let log = std::fs::OpenOptions::new().create(true).append(true).open(ndir.join("node.log")).expect("node.log");
        let grpc = s(node, "grpc");
        let mut child = self
            .command()
            .arg("--tls-dir")
            .arg(self.path().join("tls").join(id))
            .args(["node", "--id", id, "--listen", &grpc, "--metrics-listen", &s(node, "metrics")])
            .args(["--nbd-listen", &s(node, "nbd"), "--peers", &peers.join(",")])
            .arg("--data-dir")
            .arg(ndir.join("data"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup log"))
            .stderr(log)
            .process_group(0)
            .spawn()
            .expect("start node agent");
        std::fs::write(ndir.join("node.pid"), child.id().to_string()).expect("write node.pid");
        // Reap it whenever it exits, so a killed node does not linger as a zombie; how it
        // ended goes to its log.
        let log_path = ndir.join("node.log");
        std::thread::spawn(move || {
            if let Ok(st) = child.wait() {
                use std::io::Write;
                if let Ok(mut f) = std::fs::OpenOptions::new().append(true).open(&log_path) {
                    let _ = writeln!(f, "[test harness] agent process exited: {st}");
                }
            }
        });
        self.wait_until(&format!("node {id} listening on {grpc}"), Duration::from_secs(60), || {
            std::net::TcpStream::connect(&grpc).ok()
        });
    }

    /// SIGKILLs node `id` and waits until it is gone.
    pub fn kill9(&self, id: &str) {
        let pid = self.pid(id).unwrap_or_else(|| panic!("node {id} is not running"));
        assert!(cmdline_mentions(pid, &self.dir_str()), "pid {pid} is not a node of this cluster");
        let grpc = self.endpoint(id).trim_start_matches("https://").trim_start_matches("http://").to_string();
        // SAFETY: kill(2) on a pid verified above to be a node agent of this cluster.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while alive(pid) {
            assert!(Instant::now() < deadline, "node {id} (pid {pid}) survived SIGKILL");
            std::thread::sleep(Duration::from_millis(10));
        }
        // The thread group leader turns zombie before its other threads are gone, and they
        // hold the listening sockets until the last one exits: wait until the gRPC port is
        // closed, so a restart binds it and a readiness check does not reach the dead one.
        while std::net::TcpStream::connect(&grpc).is_ok() {
            assert!(Instant::now() < deadline, "node {id}'s gRPC port {grpc} still open after SIGKILL");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Polls `f` every 200 ms until it returns `Some`, at most `timeout`; then panics with
    /// `what` and the cluster status.
    pub fn wait_until<T>(&self, what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(v) = f() {
                return v;
            }
            if Instant::now() > deadline {
                let st = self.try_cli(&["dev", "status", "--dir", &self.dir_str(), "--json"]).1;
                panic!("timed out after {timeout:?} waiting for {what}; status:\n{st}");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Waits until the status shows `volume` with every replica in `healthy` state.
    pub fn wait_all_healthy(&self, volume: &str, timeout: Duration) -> Value {
        self.wait_until(&format!("every replica of {volume} healthy"), timeout, || {
            let st = self.status();
            let v = Self::volume_of(&st, volume)?.clone();
            let reps = v["replicas"].as_array()?;
            (!reps.is_empty() && reps.iter().all(|r| r["state"] == "healthy")).then_some(v)
        })
    }

    /// Node ids that have a directory in the cluster dir.
    fn node_ids(&self) -> Vec<String> {
        let mut ids = Vec::new();
        if let Ok(rd) = std::fs::read_dir(self.path()) {
            for e in rd.flatten() {
                if e.path().join("node.log").exists() || e.path().join("node.pid").exists() {
                    ids.push(e.file_name().to_string_lossy().into_owned());
                }
            }
        }
        ids.sort();
        ids
    }

    /// Last `n` lines of node `id`'s log.
    pub fn log_tail(&self, id: &str, n: usize) -> String {
        let log = std::fs::read_to_string(self.path().join(id).join("node.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// Whole log of node `id`.
    pub fn log(&self, id: &str) -> String {
        std::fs::read_to_string(self.path().join(id).join("node.log")).unwrap_or_default()
    }
}

/// The volume API of the agent at `endpoint` with the certificate in `tls_dir` (mutual TLS,
/// as the CLI talks to it).
pub async fn volumes_client(
    tls_dir: &Path,
    endpoint: &str,
) -> hlstore_proto::volume::volumes_client::VolumesClient<tonic::transport::Channel> {
    let tls = hlstore_tls::client::ClientTls::Tls(hlstore_tls::TlsState::load(tls_dir).expect("TLS directory"));
    let ep = hlstore_tls::client::endpoint(endpoint).expect("endpoint");
    let ch = hlstore_tls::client::connect(ep, &tls, hlstore_tls::Expect::AnyNode).await.expect("connect to the agent");
    hlstore_proto::volume::volumes_client::VolumesClient::new(ch)
}

impl Cluster {
    /// The dev cluster's admin TLS directory (what the CLI uses).
    pub fn admin_tls(&self) -> PathBuf {
        self.path().join("tls").join("admin")
    }

    /// Node `id`'s volume API as the admin.
    pub async fn volumes(
        &self,
        id: &str,
    ) -> hlstore_proto::volume::volumes_client::VolumesClient<tonic::transport::Channel> {
        volumes_client(&self.admin_tls(), &self.endpoint(id)).await
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let dir = self.dir_str();
        if std::thread::panicking() {
            for id in self.node_ids() {
                eprintln!("----- {id}/node.log (tail) -----\n{}", self.log_tail(&id, 60));
            }
        }
        if self.path().join("cluster.json").exists() {
            let _ = run_tool(self.command().args(["dev", "down", "--dir", &dir]), Duration::from_secs(60));
        }
        let run = self.path().file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        for id in self.node_ids() {
            super::keep_log(&format!("{run}-{id}.log"), self.log(&id).as_bytes());
        }
        for id in self.node_ids() {
            let Ok(s) = std::fs::read_to_string(self.path().join(&id).join("node.pid")) else { continue };
            let Ok(pid) = s.trim().parse::<i32>() else { continue };
            if alive(pid) && cmdline_mentions(pid, &dir) {
                // SAFETY: kill(2) on a pid whose command line names this cluster's dir.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }
}

/// One line of the load script's log.
#[derive(Debug, Clone, PartialEq)]
pub enum Op {
    /// A write (`ok`) or a failed write (`errno`).
    Write {
        seq: u64,
        block: u64,
        errno: Option<i32>,
        t0: f64,
        t1: f64,
    },
    /// A flush of everything up to `seq`.
    Flush {
        seq: u64,
        errno: Option<i32>,
        t0: f64,
        t1: f64,
    },
    Connected {
        t: f64,
    },
    Lost {
        t: f64,
    },
}

impl Op {
    fn parse(line: &str) -> Option<Op> {
        let p: Vec<&str> = line.split_whitespace().collect();
        let f = |i: usize| p.get(i).and_then(|s| s.parse::<f64>().ok());
        let u = |i: usize| p.get(i).and_then(|s| s.parse::<u64>().ok());
        let e = |i: usize| p.get(i).and_then(|s| s.parse::<i32>().ok());
        match *p.first()? {
            "W" => Some(Op::Write { seq: u(1)?, block: u(2)?, errno: None, t0: f(3)?, t1: f(4)? }),
            "E" => Some(Op::Write { seq: u(1)?, block: u(2)?, errno: Some(e(3)?), t0: f(4)?, t1: f(5)? }),
            "F" => Some(Op::Flush { seq: u(1)?, errno: None, t0: f(2)?, t1: f(3)? }),
            "FE" => Some(Op::Flush { seq: u(1)?, errno: Some(e(2)?), t0: f(3)?, t1: f(4)? }),
            "C" => Some(Op::Connected { t: f(1)? }),
            "X" => Some(Op::Lost { t: f(1)? }),
            _ => None,
        }
    }
}

/// The load script writing self-describing blocks to an NBD URI; killed on drop.
pub struct Load {
    child: Child,
    pub log: PathBuf,
    stop: PathBuf,
    pub blocks: u64,
}

impl Load {
    /// Starts writing random blocks of the first `blocks` blocks of `uri`. Seqs start at
    /// `seq_base + 1`; a flush follows every `flush_every` writes.
    pub fn start(uri: &str, work: &Path, name: &str, blocks: u64, seq_base: u64, flush_every: u32) -> Self {
        let log = work.join(format!("{name}.log"));
        let stop = work.join(format!("{name}.stop"));
        let file = std::fs::File::create(&log).expect("create load log");
        let errf = std::fs::File::create(work.join(format!("{name}.err"))).expect("create load stderr");
        let child = Command::new(PYTHON)
            .arg(script("nbd_load.py"))
            .args(["write", uri, "--blocks", &blocks.to_string(), "--stop-file"])
            .arg(&stop)
            .args(["--seed", &(seq_base + 7).to_string(), "--seq-base", &seq_base.to_string()])
            .args(["--flush-every", &flush_every.to_string()])
            .stdin(Stdio::null())
            .stdout(file)
            .stderr(errf)
            .spawn()
            .expect("start the load script (needs /usr/bin/python3 with python3-libnbd)");
        Self { child, log, stop, blocks }
    }

    /// Everything logged so far.
    pub fn ops(&self) -> Vec<Op> {
        std::fs::read_to_string(&self.log).unwrap_or_default().lines().filter_map(Op::parse).collect()
    }

    /// Acknowledged writes so far.
    pub fn acked(&self) -> usize {
        self.ops().iter().filter(|o| matches!(o, Op::Write { errno: None, .. })).count()
    }

    /// Waits until `f(ops)` holds; panics after `timeout` (or if the script died).
    pub fn wait_for(&mut self, what: &str, timeout: Duration, f: impl Fn(&[Op]) -> bool) {
        let deadline = Instant::now() + timeout;
        loop {
            let ops = self.ops();
            if f(&ops) {
                return;
            }
            if let Ok(Some(st)) = self.child.try_wait() {
                panic!("load script exited ({st}) while waiting for {what}; stderr:\n{}", self.stderr());
            }
            assert!(
                Instant::now() < deadline,
                "timed out after {timeout:?} waiting for {what}; last ops: {:?}",
                last(&ops)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(self.log.with_extension("err")).unwrap_or_default()
    }

    /// Asks the script to stop (it flushes first) and waits; returns every op.
    pub fn stop(&mut self) -> Vec<Op> {
        std::fs::write(&self.stop, b"").expect("create stop file");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(st) = self.child.try_wait().expect("wait for load script") {
                assert!(st.success(), "load script failed ({st}); stderr:\n{}", self.stderr());
                break;
            }
            assert!(Instant::now() < deadline, "load script did not stop within 30s");
            std::thread::sleep(Duration::from_millis(50));
        }
        self.ops()
    }
}

fn last(ops: &[Op]) -> &[Op] {
    &ops[ops.len().saturating_sub(5)..]
}

impl Drop for Load {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Highest seq in a log (the next writer continues above it).
pub fn max_seq(ops: &[Op]) -> u64 {
    ops.iter()
        .map(|o| match o {
            Op::Write { seq, .. } | Op::Flush { seq, .. } => *seq,
            _ => 0,
        })
        .max()
        .unwrap_or(0)
}

/// Checks the first `blocks` blocks of `uri` against load logs: every block holds a write
/// attempted on it, not older than its newest acknowledged one, or `fill` bytes if never
/// written. Panics with the script's report on any mismatch.
pub fn verify_load(uri: &str, blocks: u64, fill: u8, logs: &[&Path]) -> String {
    verify_load_upto(uri, blocks, fill, None, logs)
}

/// [`verify_load`] where only writes with a seq up to `acked_upto` must have survived
/// (after a crash of every replica: the writes a successful flush covered).
pub fn verify_load_upto(uri: &str, blocks: u64, fill: u8, acked_upto: Option<u64>, logs: &[&Path]) -> String {
    let mut cmd = Command::new(PYTHON);
    cmd.arg(script("nbd_load.py")).args(["verify", uri, "--blocks", &blocks.to_string(), "--fill", &fill.to_string()]);
    if let Some(seq) = acked_upto {
        cmd.args(["--acked-upto", &seq.to_string()]);
    }
    let out = run_tool(cmd.args(logs), Duration::from_secs(120));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "verification of {uri} against {logs:?} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// Sum of every sample of metric `name` in a Prometheus text page.
pub fn metric_sum(page: &str, name: &str) -> f64 {
    page.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.split(['{', ' ']).next() == Some(name))
        .filter_map(|l| l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()))
        .sum()
}

/// Runs qemu-io commands (`write -P 0x5a 0 1M`, `read -P ...`) on an NBD URI; panics if
/// it fails or reports a failure (a pattern mismatch). Returns its output.
pub fn qemu_io(uri: &str, cmds: &[&str]) -> String {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw"]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    c.arg(uri);
    let out = run_ok(&mut c, Duration::from_secs(120));
    assert!(!out.contains("fail"), "qemu-io reported a failure:\n{out}");
    out
}

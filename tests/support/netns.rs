//! A cluster of real node agents, each in its own network namespace, for partition tests.
//!
//! Layout of one [`NetCluster`] (names carry the test process id and a counter, so tests
//! run in parallel; the root namespace is never touched):
//!
//! ```text
//!   hlnet-<pid>-<k>-n1          hlnet-<pid>-<k>-sw            hlnet-<pid>-<k>-n2 ...
//!   hlstore node (n1)           bridge br0                    hlstore node (n2)
//!   lo: NBD 127.0.0.1:10809,    ├─ veth "n1" ───────── veth "hl0" 10.231.0.1/24
//!       metrics :9400           ├─ veth "n2" ───────── veth "hl0" 10.231.0.2/24
//!   hl0: gRPC 10.231.0.1:7400   └─ ...
//! ```
//!
//! Each namespace is isolated, so every cluster uses the same private addresses. Clients
//! (the CLI, NBD clients, the load script) run inside a node's namespace through
//! `ip netns exec` ([`NetCluster::command`]); the NBD export of an engine on node N is
//! `nbd://127.0.0.1:10809/<volume>` inside N's namespace only.
//!
//! Faults: [`NetCluster::cut`] takes a node's switch port down (full partition; open TCP
//! connections stall, as on a real network), [`NetCluster::drop_inbound`] /
//! [`NetCluster::drop_outbound`] drop one direction with iptables in the node's namespace,
//! [`NetCluster::degrade`] adds delay and loss (tc netem; where the kernel has no netem,
//! loss by iptables `statistic` and a tbf bandwidth cap instead — the returned text says
//! which), [`NetCluster::heal`] undoes all of them. Dropping the cluster kills every
//! process in its namespaces and deletes them, also on panic (then it prints the node
//! logs); namespaces left by a killed test process are removed by the next cluster.

use std::io::{Read, Seek, SeekFrom};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::cluster::{run_ok, run_tool, script, FAST_TIMEOUTS, PYTHON};

pub const GRPC_PORT: u16 = 7400;
pub const NBD_PORT: u16 = 10809;
pub const METRICS_PORT: u16 = 9400;
/// The node-side interface in every node namespace.
pub const IFACE: &str = "hl0";
const NS_PREFIX: &str = "hlnet-";

static COUNTER: AtomicUsize = AtomicUsize::new(0);
static REAP_STALE: std::sync::Once = std::sync::Once::new();

/// Why this machine cannot run namespace tests, or None when it can.
pub fn unavailable() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("network namespace tests need root".into());
    }
    match Command::new("ip").arg("-V").output() {
        Ok(o) if o.status.success() => None,
        _ => Some("network namespace tests need `ip` (iproute2)".into()),
    }
}

/// True when iptables runs (one-way drops and the loss fallback need it).
pub fn has_iptables() -> bool {
    Command::new("iptables").arg("--version").output().map(|o| o.status.success()).unwrap_or(false)
}

/// Prints why a test is skipped; panics instead when HLSTORE_REQUIRE_NETNS is set (CI),
/// so a machine that lost root or iproute2 does not turn these tests into silent passes.
pub fn skip(reason: &str) {
    if std::env::var_os("HLSTORE_REQUIRE_NETNS").is_some() {
        panic!("HLSTORE_REQUIRE_NETNS is set but {reason}");
    }
    eprintln!("SKIPPED: {reason}");
}

fn sh(args: &[&str]) -> Result<(), String> {
    let out =
        Command::new(args[0]).args(&args[1..]).stdin(Stdio::null()).output().map_err(|e| format!("{args:?}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("{args:?} failed: {}", String::from_utf8_lossy(&out.stderr).trim()))
    }
}

fn sh_ok(args: &[&str]) {
    if let Err(e) = sh(args) {
        panic!("{e}");
    }
}

fn pids_in(ns: &str) -> Vec<i32> {
    Command::new("ip")
        .args(["netns", "pids", ns])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).split_whitespace().filter_map(|p| p.parse().ok()).collect())
        .unwrap_or_default()
}

/// Kills every process in `ns` (all started by the cluster owning it) and deletes it.
fn destroy_ns(ns: &str) {
    for _ in 0..50 {
        let pids = pids_in(ns);
        if pids.is_empty() {
            break;
        }
        for pid in pids {
            // SAFETY: kill(2) on a process inside a namespace private to this harness.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = sh(&["ip", "netns", "del", ns]);
}

/// Deletes namespaces of earlier test processes that died without cleaning up.
fn reap_stale() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else { return };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Some(name) = line.split_whitespace().next() else { continue };
        let Some(rest) = name.strip_prefix(NS_PREFIX) else { continue };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else { continue };
        if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
            eprintln!("removing namespace {name} left by dead test process {pid}");
            destroy_ns(name);
        }
    }
}

/// One node agent of a [`NetCluster`].
pub struct NetNode {
    pub id: String,
    pub ns: String,
    pub ip: String,
    child: Mutex<Option<Child>>,
}

impl NetNode {
    pub fn endpoint(&self) -> String {
        format!("http://{}:{GRPC_PORT}", self.ip)
    }
}

/// N node agents in N network namespaces on one bridge; see the module docs.
pub struct NetCluster {
    pub dir: tempfile::TempDir,
    pub switch: String,
    pub nodes: Vec<NetNode>,
    /// Extra environment for node agents and CLI commands.
    pub env: Vec<(String, String)>,
    namespaces: Vec<String>,
}

impl NetCluster {
    /// Starts `n` node agents, or returns None (after printing why) when this machine
    /// cannot run namespace tests.
    pub fn start(n: usize) -> Option<Self> {
        Self::start_with_env(n, &[])
    }

    /// [`NetCluster::start`] with extra environment for the node agents.
    pub fn start_with_env(n: usize, env: &[(&str, &str)]) -> Option<Self> {
        if let Some(reason) = unavailable() {
            skip(&reason);
            return None;
        }
        REAP_STALE.call_once(reap_stale);
        let k = COUNTER.fetch_add(1, Ordering::SeqCst);
        let base = format!("{NS_PREFIX}{}-{k}", std::process::id());
        let dir = tempfile::Builder::new().prefix("hlstore-netns-").tempdir().expect("temp dir");
        let mut c = NetCluster {
            dir,
            switch: format!("{base}-sw"),
            nodes: (1..=n)
                .map(|i| NetNode {
                    id: format!("n{i}"),
                    ns: format!("{base}-n{i}"),
                    ip: format!("10.231.0.{i}"),
                    child: Mutex::new(None),
                })
                .collect(),
            env: env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            namespaces: Vec::new(),
        };
        c.build_network();
        c.make_certificates();
        for i in 0..n {
            let id = c.nodes[i].id.clone();
            c.start_node(&id);
        }
        Some(c)
    }

    /// The cluster's CA (`DIR/tls/`), a node certificate per node (`DIR/tls/<id>/`) and an
    /// admin certificate for the CLI (`DIR/tls/admin/`): every hop is mutual TLS, as
    /// deployed.
    fn make_certificates(&self) {
        let tls = self.path().join("tls");
        let bin = env!("CARGO_BIN_EXE_hlstore");
        let t = tls.to_str().expect("utf-8 path");
        run_ok(Command::new(bin).args(["cert", "init", "--dir", t]), Duration::from_secs(30));
        let out = |name: &str| tls.join(name).to_str().expect("utf-8 path").to_string();
        run_ok(
            Command::new(bin).args(["cert", "issue", "--ca-dir", t, "--role", "admin", "--out", &out("admin")]),
            Duration::from_secs(30),
        );
        for n in &self.nodes {
            run_ok(
                Command::new(bin).args(["cert", "issue", "--ca-dir", t, "--role", "node", "--node", &n.id]).args([
                    "--ip",
                    &n.ip,
                    "--out",
                    &out(&n.id),
                ]),
                Duration::from_secs(30),
            );
        }
    }

    fn add_ns(&mut self, ns: &str) {
        sh_ok(&["ip", "netns", "add", ns]);
        self.namespaces.push(ns.to_string());
        sh_ok(&["ip", "-n", ns, "link", "set", "lo", "up"]);
    }

    fn build_network(&mut self) {
        let sw = self.switch.clone();
        self.add_ns(&sw);
        sh_ok(&["ip", "-n", &sw, "link", "add", "br0", "type", "bridge"]);
        sh_ok(&["ip", "-n", &sw, "link", "set", "br0", "up"]);
        let nodes: Vec<(String, String, String)> =
            self.nodes.iter().map(|n| (n.id.clone(), n.ns.clone(), n.ip.clone())).collect();
        for (id, ns, ip) in nodes {
            self.add_ns(&ns);
            // Both ends are created directly in their namespaces: no name ever appears in
            // the root namespace, so parallel clusters cannot collide.
            sh_ok(&["ip", "link", "add", IFACE, "netns", &ns, "type", "veth", "peer", "name", &id, "netns", &sw]);
            sh_ok(&["ip", "-n", &ns, "addr", "add", &format!("{ip}/24"), "dev", IFACE]);
            sh_ok(&["ip", "-n", &ns, "link", "set", IFACE, "up"]);
            sh_ok(&["ip", "-n", &sw, "link", "set", &id, "master", "br0"]);
            sh_ok(&["ip", "-n", &sw, "link", "set", &id, "up"]);
        }
    }

    pub fn node(&self, id: &str) -> &NetNode {
        self.nodes.iter().find(|n| n.id == id).unwrap_or_else(|| panic!("no node {id}"))
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// A work file path inside the cluster's temp dir (visible from every namespace).
    pub fn file(&self, name: &str) -> PathBuf {
        self.path().join(name)
    }

    fn log_path(&self, id: &str) -> PathBuf {
        self.path().join(id).join("node.log")
    }

    /// `ip netns exec <ns of id> <program>`, with the fast engine timeouts, the cluster's
    /// environment and HLSTORE_ENDPOINT set to that node's agent.
    pub fn command(&self, id: &str, program: &str) -> Command {
        let n = self.node(id);
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &n.ns, program]);
        c.envs(FAST_TIMEOUTS).env("HLSTORE_ENDPOINT", n.endpoint());
        c.env("HLSTORE_TLS_DIR", self.path().join("tls").join("admin")).env_remove("HLSTORE_INSECURE");
        c.envs(self.env.iter().map(|(k, v)| (k, v)));
        c
    }

    /// The hlstore binary inside node `id`'s namespace.
    pub fn hlstore(&self, id: &str) -> Command {
        self.command(id, env!("CARGO_BIN_EXE_hlstore"))
    }

    /// Python (with python3-libnbd) inside node `id`'s namespace.
    pub fn python(&self, id: &str) -> Command {
        self.command(id, PYTHON)
    }

    /// Runs the CLI on node `id` with that node's certificate (what `hlstore replica`
    /// needs); panics unless it succeeded.
    pub fn node_cli(&self, id: &str, args: &[&str]) -> String {
        let mut cmd = self.hlstore(id);
        cmd.env("HLSTORE_TLS_DIR", self.path().join("tls").join(id));
        run_ok(cmd.args(args), Duration::from_secs(120))
    }

    /// Runs the CLI on node `id` (talking to its own agent); panics unless it succeeded.
    pub fn cli(&self, id: &str, args: &[&str]) -> String {
        run_ok(self.hlstore(id).args(args), Duration::from_secs(120))
    }

    /// Runs the CLI on node `id`; returns (success, stdout, stderr, seconds it took).
    pub fn try_cli(&self, id: &str, args: &[&str]) -> (bool, String, String, f64) {
        let t = Instant::now();
        let out = run_tool(self.hlstore(id).args(args), Duration::from_secs(120));
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
            t.elapsed().as_secs_f64(),
        )
    }

    /// `hlstore volume show NAME --json` through node `via`.
    pub fn volume_show(&self, via: &str, name: &str) -> Value {
        let out = self.cli(via, &["volume", "show", name, "--json"]);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("volume show printed invalid JSON ({e}):\n{out}"))
    }

    /// Like [`NetCluster::volume_show`], None when the command fails.
    pub fn try_volume_show(&self, via: &str, name: &str) -> Option<Value> {
        let (ok, out, _, _) = self.try_cli(via, &["volume", "show", name, "--json"]);
        ok.then(|| serde_json::from_str(&out).ok()).flatten()
    }

    /// Starts (or restarts) node `id` and waits until it reports that it listens.
    // The child is kept in the node and killed and reaped by kill9/Drop.
    #[allow(clippy::zombie_processes)]
    pub fn start_node(&self, id: &str) {
        let n = self.node(id);
        let ndir = self.path().join(id);
        std::fs::create_dir_all(&ndir).expect("node dir");
        let log_path = self.log_path(id);
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&log_path).expect("node.log");
        let from = log.metadata().map(|m| m.len()).unwrap_or(0);
        let peers: Vec<String> = self.nodes.iter().map(|p| format!("{}={}:{GRPC_PORT}", p.id, p.ip)).collect();
        let child = self
            .hlstore(id)
            .arg("--tls-dir")
            .arg(self.path().join("tls").join(id))
            .args(["node", "--id", id, "--listen", &format!("{}:{GRPC_PORT}", n.ip)])
            .args(["--metrics-listen", &format!("127.0.0.1:{METRICS_PORT}")])
            .args(["--nbd-listen", &format!("127.0.0.1:{NBD_PORT}"), "--peers", &peers.join(",")])
            .arg("--data-dir")
            .arg(ndir.join("data"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup log"))
            .stderr(log)
            .process_group(0)
            .spawn()
            .expect("start node agent in its namespace");
        *n.child.lock().unwrap() = Some(child);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let mut f = std::fs::File::open(&log_path).expect("open node.log");
            let mut s = String::new();
            let _ = f.seek(SeekFrom::Start(from)).and_then(|_| f.read_to_string(&mut s));
            if s.lines().any(|l| l.starts_with("listening grpc=")) {
                return;
            }
            if let Some(st) = n.child.lock().unwrap().as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                panic!("node {id} exited ({st}) during start:\n{}", self.log_tail(id, 40));
            }
            assert!(Instant::now() < deadline, "node {id} did not start within 60s:\n{}", self.log_tail(id, 40));
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGKILLs node `id`'s agent and reaps it.
    pub fn kill9(&self, id: &str) {
        if let Some(mut c) = self.node(id).child.lock().unwrap().take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    // ----- faults -----

    /// Full partition of node `id`: its switch port goes down.
    pub fn cut(&self, id: &str) {
        sh_ok(&["ip", "-n", &self.switch, "link", "set", id, "down"]);
    }

    /// Node `id` receives nothing from the network (it can still send).
    pub fn drop_inbound(&self, id: &str) {
        sh_ok(&["ip", "netns", "exec", &self.node(id).ns, "iptables", "-A", "INPUT", "-i", IFACE, "-j", "DROP"]);
    }

    /// Node `id` sends nothing to the network (it still receives).
    pub fn drop_outbound(&self, id: &str) {
        sh_ok(&["ip", "netns", "exec", &self.node(id).ns, "iptables", "-A", "OUTPUT", "-o", IFACE, "-j", "DROP"]);
    }

    /// Delay (each direction) and loss on node `id`'s link. Uses netem when the kernel has
    /// it; otherwise drops `loss_pct` of packets each way with iptables and caps the link
    /// with tbf (queueing delay under load). Returns what was applied.
    pub fn degrade(&self, id: &str, delay_ms: u32, loss_pct: f64) -> String {
        let ns = &self.node(id).ns;
        let delay = format!("{delay_ms}ms");
        let loss = format!("{loss_pct}%");
        let netem = sh(&[
            "ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", IFACE, "root", "netem", "delay", &delay, "loss",
            &loss,
        ]);
        if netem.is_ok() {
            sh_ok(&[
                "ip",
                "netns",
                "exec",
                &self.switch,
                "tc",
                "qdisc",
                "add",
                "dev",
                id,
                "root",
                "netem",
                "delay",
                &delay,
                "loss",
                &loss,
            ]);
            return format!("netem delay {delay} loss {loss} each way on {id}");
        }
        let p = format!("{}", loss_pct / 100.0);
        for (chain, dir) in [("INPUT", "-i"), ("OUTPUT", "-o")] {
            sh_ok(&[
                "ip",
                "netns",
                "exec",
                ns,
                "iptables",
                "-A",
                chain,
                dir,
                IFACE,
                "-m",
                "statistic",
                "--mode",
                "random",
                "--probability",
                &p,
                "-j",
                "DROP",
            ]);
        }
        sh_ok(&[
            "ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", IFACE, "root", "tbf", "rate", "20mbit", "burst",
            "32kbit", "latency", &delay,
        ]);
        format!("no netem in this kernel: loss {loss} each way (iptables statistic) and a 20 Mbit/s tbf cap (queue ≤ {delay}) on {id}")
    }

    /// Undoes every fault on node `id`.
    pub fn heal(&self, id: &str) {
        let ns = &self.node(id).ns;
        sh_ok(&["ip", "-n", &self.switch, "link", "set", id, "up"]);
        if has_iptables() {
            for chain in ["INPUT", "OUTPUT"] {
                sh_ok(&["ip", "netns", "exec", ns, "iptables", "-F", chain]);
            }
        }
        let _ = sh(&["ip", "netns", "exec", ns, "tc", "qdisc", "del", "dev", IFACE, "root"]);
        let _ = sh(&["ip", "netns", "exec", &self.switch, "tc", "qdisc", "del", "dev", id, "root"]);
    }

    // ----- reading state -----

    /// Last `n` lines of node `id`'s log.
    pub fn log_tail(&self, id: &str, n: usize) -> String {
        let log = std::fs::read_to_string(self.log_path(id)).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// Copies the first `blocks` blocks of the NBD export `uri` (in node `id`'s namespace)
    /// to `out`.
    pub fn dump_export(&self, id: &str, uri: &str, blocks: u64, out: &Path) {
        let mut cmd = self.python(id);
        cmd.arg(script("nbd_load.py")).args(["dump", uri, "--blocks", &blocks.to_string(), "--out"]).arg(out);
        run_ok(&mut cmd, Duration::from_secs(60));
    }

    /// Copies the first `blocks` blocks of node `id`'s own replica of `volume` to `out`
    /// (`hlstore replica read`, no replication involved).
    pub fn dump_replica(&self, id: &str, volume: &str, blocks: u64, out: &Path) {
        let len = (blocks * super::cluster::BLOCK).to_string();
        let mut cmd = self.hlstore(id);
        // The replica service takes node certificates: this node's own.
        cmd.env("HLSTORE_TLS_DIR", self.path().join("tls").join(id));
        cmd.args(["replica", "read", volume, "--length", &len, "--output"]).arg(out);
        run_ok(&mut cmd, Duration::from_secs(60));
    }

    /// Waits until `via` reports every replica of `volume` healthy at one last_seq (the
    /// replicas converged); returns the volume view.
    pub fn wait_converged(&self, via: &str, volume: &str, timeout: Duration) -> Value {
        let deadline = Instant::now() + timeout;
        let mut last = Value::Null;
        loop {
            if let Some(v) = self.try_volume_show(via, volume) {
                let reps = v["replicas"].as_array().cloned().unwrap_or_default();
                let seqs: std::collections::BTreeSet<u64> =
                    reps.iter().filter_map(|r| r["last_seq"].as_u64()).collect();
                if !reps.is_empty() && reps.iter().all(|r| r["state"] == "healthy") && seqs.len() == 1 {
                    return v;
                }
                last = v;
            }
            assert!(
                Instant::now() < deadline,
                "replicas of {volume} did not converge within {timeout:?}; last view:\n{last:#}"
            );
            std::thread::sleep(Duration::from_millis(300));
        }
    }
}

impl Drop for NetCluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for n in &self.nodes {
                eprintln!("----- {} node.log (tail) -----\n{}", n.id, self.log_tail(&n.id, 80));
            }
        }
        for n in &self.nodes {
            if let Some(mut c) = n.child.lock().map(|mut g| g.take()).unwrap_or(None) {
                let _ = c.kill();
                let _ = c.wait();
            }
            let run = self.path().file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default();
            super::keep_log(&format!("{run}-{}.log", n.id), &std::fs::read(self.log_path(&n.id)).unwrap_or_default());
        }
        for ns in self.namespaces.iter().rev() {
            destroy_ns(ns);
        }
    }
}

//! Logging NBD clients and the history checker, for fault tests.
//!
//! [`Client`] runs `tests/scripts/nbd_load.py` (a writer of self-describing blocks, or a
//! reader that logs what every read returned) through any command prefix — e.g. inside a
//! node's network namespace — and is killed on drop. [`Check`] runs
//! `tests/scripts/history_check.py` over the logs, the final content and replica copies,
//! and returns its [`Verdict`].

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::cluster::{run_tool, script, PYTHON};

/// One logged request of a [`Client`].
#[derive(Debug, Clone, PartialEq)]
pub struct Ev {
    /// `W`, `E`, `F`, `FE` (writer) or `R`, `RB`, `RE` (reader).
    pub kind: String,
    pub t0: f64,
    pub t1: f64,
    pub errno: Option<i32>,
}

impl Ev {
    fn parse(line: &str) -> Option<Ev> {
        let p: Vec<&str> = line.split_whitespace().collect();
        let f = |i: usize| p.get(i).and_then(|s| s.parse::<f64>().ok());
        let e = |i: usize| p.get(i).and_then(|s| s.parse::<i32>().ok());
        let (t0, t1, errno) = match *p.first()? {
            "W" => (f(3)?, f(4)?, None),
            "E" => (f(4)?, f(5)?, Some(e(3)?)),
            "F" => (f(2)?, f(3)?, None),
            "FE" => (f(3)?, f(4)?, Some(e(2)?)),
            "R" => (f(3)?, f(4)?, None),
            "RB" => (f(2)?, f(3)?, None),
            "RE" => (f(3)?, f(4)?, Some(e(2)?)),
            _ => return None,
        };
        Some(Ev { kind: p[0].to_string(), t0, t1, errno })
    }

    pub fn is(&self, kind: &str) -> bool {
        self.kind == kind
    }
}

/// Options of a [`Client`] (see `nbd_load.py --help`).
#[derive(Debug, Clone)]
pub struct ClientOpts {
    pub blocks: u64,
    pub seq_base: u64,
    pub seed: u64,
    pub flush_every: u32,
    pub count: u64,
    pub sequential: bool,
    /// Seconds per request; 0 = wait forever.
    pub op_timeout: f64,
    /// Stop after this many seconds; 0 = never.
    pub duration: f64,
    /// Reader: stop after this many failed reads; 0 = never.
    pub max_errors: u32,
    pub pause_ms: f64,
}

impl ClientOpts {
    pub fn new(blocks: u64) -> Self {
        ClientOpts {
            blocks,
            seq_base: 0,
            seed: 7,
            flush_every: 16,
            count: 0,
            sequential: false,
            op_timeout: 20.0,
            duration: 0.0,
            max_errors: 0,
            pause_ms: 0.0,
        }
    }
}

/// A running `nbd_load.py write|read`, killed on drop.
pub struct Client {
    child: Child,
    pub log: PathBuf,
    stop: PathBuf,
    err: PathBuf,
}

impl Client {
    /// Starts a writer on `uri`; `python` is the command that runs Python with libnbd
    /// (e.g. [`super::netns::NetCluster::python`] or `Command::new(PYTHON)`).
    pub fn writer(python: Command, uri: &str, work: &Path, name: &str, o: &ClientOpts) -> Self {
        let mut args = vec!["write".to_string(), uri.to_string()];
        args.extend(["--seq-base".into(), o.seq_base.to_string(), "--flush-every".into(), o.flush_every.to_string()]);
        Self::spawn(python, args, work, name, o)
    }

    /// Starts a reader on `uri`.
    pub fn reader(python: Command, uri: &str, work: &Path, name: &str, o: &ClientOpts) -> Self {
        let mut args = vec!["read".to_string(), uri.to_string()];
        if o.max_errors > 0 {
            args.extend(["--max-errors".into(), o.max_errors.to_string()]);
        }
        Self::spawn(python, args, work, name, o)
    }

    fn spawn(mut python: Command, mut args: Vec<String>, work: &Path, name: &str, o: &ClientOpts) -> Self {
        let log = work.join(format!("{name}.log"));
        let stop = work.join(format!("{name}.stop"));
        let err = work.join(format!("{name}.err"));
        args.extend(["--blocks".into(), o.blocks.to_string(), "--seed".into(), o.seed.to_string()]);
        args.extend(["--count".into(), o.count.to_string(), "--op-timeout".into(), o.op_timeout.to_string()]);
        args.extend(["--duration".into(), o.duration.to_string(), "--pause-ms".into(), o.pause_ms.to_string()]);
        if o.sequential {
            args.push("--sequential".into());
        }
        let child = python
            .arg(script("nbd_load.py"))
            .args(&args)
            .arg("--stop-file")
            .arg(&stop)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&log).expect("create client log"))
            .stderr(std::fs::File::create(&err).expect("create client stderr"))
            .spawn()
            .expect("start nbd_load.py (needs python3-libnbd)");
        Client { child, log, stop, err }
    }

    /// Every request logged so far.
    pub fn events(&self) -> Vec<Ev> {
        std::fs::read_to_string(&self.log).unwrap_or_default().lines().filter_map(Ev::parse).collect()
    }

    /// Requests of `kind` that started after `t`.
    pub fn count_after(&self, kind: &str, t: f64) -> usize {
        self.events().iter().filter(|e| e.is(kind) && e.t0 > t).count()
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.err).unwrap_or_default()
    }

    /// Waits until `f(events)` holds; panics after `timeout` or if the client died.
    pub fn wait_for(&mut self, what: &str, timeout: Duration, f: impl Fn(&[Ev]) -> bool) {
        let deadline = Instant::now() + timeout;
        loop {
            let ev = self.events();
            if f(&ev) {
                return;
            }
            if let Ok(Some(st)) = self.child.try_wait() {
                let ev = self.events();
                if f(&ev) {
                    return;
                }
                panic!(
                    "client {} exited ({st}) while waiting for {what}; stderr:\n{}",
                    self.log.display(),
                    self.stderr()
                );
            }
            assert!(
                Instant::now() < deadline,
                "timed out after {timeout:?} waiting for {what}; last events: {:?}",
                &ev[ev.len().saturating_sub(5)..]
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until the client exits by itself (--count / --duration / --max-errors).
    pub fn wait_exit(&mut self, timeout: Duration) -> Vec<Ev> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.child.try_wait().expect("wait for client") {
                assert!(st.success(), "client {} failed ({st}); stderr:\n{}", self.log.display(), self.stderr());
                return self.events();
            }
            assert!(Instant::now() < deadline, "client {} did not finish within {timeout:?}", self.log.display());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Asks the client to stop (a writer flushes first) and waits for it.
    pub fn stop(&mut self) -> Vec<Ev> {
        std::fs::write(&self.stop, b"").expect("create stop file");
        self.wait_exit(Duration::from_secs(60))
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Inputs of one run of the history checker.
#[derive(Debug, Default, Clone)]
pub struct Check {
    pub blocks: u64,
    pub fill: u8,
    /// (engine label, writer log)
    pub writers: Vec<(String, PathBuf)>,
    /// (label, reader log)
    pub readers: Vec<(String, PathBuf)>,
    /// Engines oldest first (for the double-writer rule); empty = unknown.
    pub engine_order: Vec<String>,
    pub final_image: Option<PathBuf>,
    /// (node, raw copy of its replica)
    pub replicas: Vec<(String, PathBuf)>,
    pub flushed_only: bool,
}

/// The checker's result.
#[derive(Debug, Clone)]
pub struct Verdict {
    pub json: Value,
    pub table: String,
}

impl Verdict {
    pub fn ok(&self) -> bool {
        self.json["ok"].as_bool().unwrap_or(false)
    }

    /// Count of `key` (a violation kind or a statistic such as `acked_writes`).
    pub fn get(&self, key: &str) -> u64 {
        self.json[key].as_u64().unwrap_or_else(|| panic!("no {key} in verdict {}", self.json))
    }

    pub fn assert_ok(&self, what: &str) {
        assert!(self.ok(), "history check failed ({what}):\n{}", self.table);
    }
}

impl Check {
    pub fn new(blocks: u64) -> Self {
        Check { blocks, ..Default::default() }
    }

    pub fn writer(mut self, engine: &str, c: &Client) -> Self {
        self.writers.push((engine.into(), c.log.clone()));
        self
    }

    pub fn reader(mut self, label: &str, c: &Client) -> Self {
        self.readers.push((label.into(), c.log.clone()));
        self
    }

    pub fn order(mut self, engines: &[&str]) -> Self {
        self.engine_order = engines.iter().map(|e| e.to_string()).collect();
        self
    }

    pub fn final_content(mut self, path: &Path) -> Self {
        self.final_image = Some(path.to_path_buf());
        self
    }

    pub fn replica(mut self, node: &str, path: &Path) -> Self {
        self.replicas.push((node.into(), path.to_path_buf()));
        self
    }

    fn command(&self) -> Command {
        let mut c = Command::new(PYTHON);
        c.arg(script("history_check.py")).args([
            "--blocks",
            &self.blocks.to_string(),
            "--fill",
            &self.fill.to_string(),
        ]);
        for (e, p) in &self.writers {
            c.arg("--writer").arg(format!("{e}={}", p.display()));
        }
        for (l, p) in &self.readers {
            c.arg("--reader").arg(format!("{l}={}", p.display()));
        }
        if !self.engine_order.is_empty() {
            c.args(["--engine-order", &self.engine_order.join(",")]);
        }
        if let Some(f) = &self.final_image {
            c.arg("--final").arg(f);
        }
        for (n, p) in &self.replicas {
            c.arg("--replica").arg(format!("{n}={}", p.display()));
        }
        if self.flushed_only {
            c.arg("--flushed-only");
        }
        c
    }

    /// Runs the checker; panics on bad input (exit status 2), not on violations.
    pub fn run(&self) -> Verdict {
        let table_out = run_tool(&mut self.command(), Duration::from_secs(120));
        let table = String::from_utf8_lossy(&table_out.stdout).into_owned();
        let err = String::from_utf8_lossy(&table_out.stderr).into_owned();
        assert!(table_out.status.code().is_some_and(|c| c <= 1), "history checker failed on its input: {err}");
        let json_out = run_tool(self.command().arg("--json"), Duration::from_secs(120));
        let json: Value = serde_json::from_slice(&json_out.stdout).expect("checker JSON");
        eprintln!("history check:\n{table}");
        Verdict { json, table }
    }
}

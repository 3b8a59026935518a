//! Helpers shared by the root integration tests: running real `hlstore` processes.
#![allow(dead_code)]

pub mod backup;
pub mod cluster;
pub mod csi;
pub mod faultfs;
pub mod help;
pub mod history;
pub mod netns;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Appends `bytes` to `name` in $HLSTORE_TEST_LOG_DIR when it is set: `scripts/test.sh`
/// collects every agent log and CLI stderr of a full run there and scans them for secrets
/// (`tests/scripts/scan_secrets.sh`).
pub fn keep_log(name: &str, bytes: &[u8]) {
    use std::io::Write;
    let Some(dir) = std::env::var_os("HLSTORE_TEST_LOG_DIR") else { return };
    let dir = std::path::PathBuf::from(dir);
    if std::fs::create_dir_all(&dir).is_err() {
        return;
    }
    if let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).open(dir.join(name)) {
        let _ = f.write_all(bytes);
    }
}

/// A running `hlstore node` process, killed on drop.
pub struct NodeProc {
    pub child: Child,
    pub grpc: String,
    pub metrics: String,
}

impl NodeProc {
    /// Starts `hlstore node` on free loopback ports and waits until it listens.
    pub fn start(id: &str, data_dir: &Path) -> Self {
        Self::start_on(id, data_dir, "127.0.0.1:0")
    }

    // The child is owned by the returned guard, whose Drop kills and reaps it.
    #[allow(clippy::zombie_processes)]
    pub fn start_on(id: &str, data_dir: &Path, listen: &str) -> Self {
        // These agents are driven by raw gRPC clients (the replica protocol itself):
        // plaintext. TLS is exercised by the dev and namespace clusters and tests/security.rs.
        let mut child = Command::new(env!("CARGO_BIN_EXE_hlstore"))
            .args([
                "--insecure",
                "node",
                "--id",
                id,
                "--listen",
                listen,
                "--metrics-listen",
                "127.0.0.1:0",
                "--nbd-listen",
                "127.0.0.1:0",
                "--data-dir",
            ])
            .arg(data_dir)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start hlstore node");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = rx.recv_timeout(left).expect("node agent did not report readiness");
            if let Some(rest) = line.strip_prefix("listening ") {
                let mut grpc = String::new();
                let mut metrics = String::new();
                for kv in rest.split_whitespace() {
                    if let Some(v) = kv.strip_prefix("grpc=") {
                        grpc = format!("http://{v}");
                    } else if let Some(v) = kv.strip_prefix("metrics=") {
                        metrics = v.to_string();
                    }
                }
                return Self { child, grpc, metrics };
            }
        }
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn terminate(&mut self) {
        // SAFETY: kill(2) on our own child's pid with a valid signal.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}

impl Drop for NodeProc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// `GET path` over plain HTTP/1.1 on `addr`; returns the body.
pub fn http_get(addr: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("connect to metrics endpoint");
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default()
}

/// Runs the hlstore CLI; returns (success, stdout, stderr).
pub fn hlstore(args: &[&str]) -> (bool, String, String) {
    // Talks to a `NodeProc` agent (plaintext) when it talks to one at all.
    let out = Command::new(env!("CARGO_BIN_EXE_hlstore"))
        .env("HLSTORE_INSECURE", "1")
        .args(args)
        .output()
        .expect("run hlstore");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

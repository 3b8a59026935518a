//! Shared harness of the NBD tests: an in-process server on 127.0.0.1:0 and a unix socket in
//! a temp dir, real client tools as child processes, and a minimal raw protocol client.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::Arc;
use std::time::Duration;

use hlstore_nbd::proto::*;
use hlstore_nbd::request::RequestHeader;
use hlstore_nbd::{ExportRegistry, MemDevice, NbdServer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UnixListener};
use tokio::task::JoinHandle;

pub const MIB: u64 = 1024 * 1024;
/// Upper bound for one client tool run.
pub const TOOL_TIMEOUT: Duration = Duration::from_secs(90);

pub fn mem(name: &str, size: u64) -> Arc<MemDevice> {
    Arc::new(MemDevice::new(name, size).expect("valid memory device"))
}

/// A running server listening on TCP and on a unix socket.
pub struct Harness {
    pub server: NbdServer<MemDevice>,
    pub tcp: SocketAddr,
    pub unix: PathBuf,
    pub dir: tempfile::TempDir,
    tasks: Vec<JoinHandle<std::io::Result<()>>>,
}

impl Harness {
    pub async fn start(exports: &[(&str, Arc<MemDevice>)]) -> Harness {
        let registry = ExportRegistry::new();
        for (name, dev) in exports {
            registry.insert(*name, dev.clone());
        }
        let server = NbdServer::new(registry);
        let dir = tempfile::tempdir().expect("temp dir");
        let unix = dir.path().join("nbd.sock");
        let tcp_listener = TcpListener::bind("127.0.0.1:0").await.expect("bind tcp");
        let tcp = tcp_listener.local_addr().expect("tcp addr");
        let unix_listener = UnixListener::bind(&unix).expect("bind unix");
        let s1 = server.clone();
        let s2 = server.clone();
        let tasks = vec![
            tokio::spawn(async move { s1.serve_tcp(tcp_listener).await }),
            tokio::spawn(async move { s2.serve_unix(unix_listener).await }),
        ];
        Harness { server, tcp, unix, dir, tasks }
    }

    pub fn uri(&self, export: &str) -> String {
        format!("nbd://{}/{}", self.tcp, export)
    }

    pub fn unix_uri(&self, export: &str) -> String {
        format!("nbd+unix:///{}?socket={}", export, self.unix.display())
    }

    /// Shuts down and waits for both listeners and all connections to finish.
    pub async fn shutdown(mut self) {
        self.server.shutdown_handle().shutdown();
        for task in self.tasks.drain(..) {
            tokio::time::timeout(Duration::from_secs(10), task)
                .await
                .expect("server shut down within 10 s")
                .expect("server task did not panic")
                .expect("server returned Ok");
        }
    }

    pub fn stat(&self, f: impl Fn(&hlstore_nbd::NbdStats) -> &std::sync::atomic::AtomicU64) -> u64 {
        f(&self.server.stats()).load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.server.shutdown_handle().shutdown();
    }
}

fn on_path(program: &str) -> bool {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path).any(|d| d.join(program).is_file())
}

/// A command for a required client tool; fails the test naming the Debian package if the
/// tool is missing.
pub fn tool(program: &str, package: &str) -> tokio::process::Command {
    assert!(
        on_path(program),
        "`{program}` is not installed: this test needs the Debian package `{package}` (apt-get install {package})"
    );
    let mut cmd = tokio::process::Command::new(program);
    cmd.kill_on_drop(true).stdin(std::process::Stdio::null());
    if program == "nbdsh" {
        // nbdsh runs `python3 -m nbd`: Debian's python3 has the libnbd bindings.
        let path = std::env::var("PATH").unwrap_or_default();
        cmd.env("PATH", format!("/usr/bin:{path}"));
    }
    cmd
}

/// Runs a tool to completion (bounded by [`TOOL_TIMEOUT`]) and returns its output.
pub async fn run(cmd: &mut tokio::process::Command) -> Output {
    let what = format!("{:?}", cmd.as_std());
    tokio::time::timeout(TOOL_TIMEOUT, cmd.output())
        .await
        .unwrap_or_else(|_| panic!("{what} did not finish within {TOOL_TIMEOUT:?}"))
        .unwrap_or_else(|e| panic!("{what} failed to start: {e}"))
}

/// Runs a tool and asserts it succeeded; returns stdout.
pub async fn run_ok(cmd: &mut tokio::process::Command) -> String {
    let what = format!("{:?}", cmd.as_std());
    let out = run(cmd).await;
    assert!(
        out.status.success(),
        "{what} failed with {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Deterministic pseudo-random bytes.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

pub fn write_file(dir: &Path, name: &str, data: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, data).expect("write test file");
    p
}

/// A minimal NBD client speaking the raw protocol, for malformed-request tests.
pub struct RawClient {
    pub s: TcpStream,
}

/// One option reply.
#[derive(Debug)]
pub struct OptReply {
    pub option: u32,
    pub kind: u32,
    pub data: Vec<u8>,
}

impl RawClient {
    /// Connects and completes the greeting with the given client flags.
    pub async fn connect(addr: SocketAddr, client_flags: u32) -> RawClient {
        let mut s = TcpStream::connect(addr).await.expect("connect");
        assert_eq!(s.read_u64().await.unwrap(), NBD_MAGIC);
        assert_eq!(s.read_u64().await.unwrap(), IHAVEOPT);
        let flags = s.read_u16().await.unwrap();
        assert_eq!(flags, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
        s.write_u32(client_flags).await.unwrap();
        RawClient { s }
    }

    pub async fn send_option(&mut self, code: u32, data: &[u8]) {
        let mut out = IHAVEOPT.to_be_bytes().to_vec();
        out.extend_from_slice(&code.to_be_bytes());
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        out.extend_from_slice(data);
        self.s.write_all(&out).await.unwrap();
    }

    pub async fn read_opt_reply(&mut self) -> OptReply {
        assert_eq!(self.s.read_u64().await.unwrap(), OPTION_REPLY_MAGIC);
        let option = self.s.read_u32().await.unwrap();
        let kind = self.s.read_u32().await.unwrap();
        let len = self.s.read_u32().await.unwrap();
        let mut data = vec![0u8; len as usize];
        self.s.read_exact(&mut data).await.unwrap();
        OptReply { option, kind, data }
    }

    /// Sends an option and collects replies up to the final ACK or error.
    pub async fn option(&mut self, code: u32, data: &[u8]) -> Vec<OptReply> {
        self.send_option(code, data).await;
        let mut replies = Vec::new();
        loop {
            let r = self.read_opt_reply().await;
            assert_eq!(r.option, code);
            let last = r.kind == REP_ACK || r.kind & (1 << 31) != 0;
            replies.push(r);
            if last {
                return replies;
            }
        }
    }

    pub fn go_payload(name: &str, infos: &[u16]) -> Vec<u8> {
        let mut p = (name.len() as u32).to_be_bytes().to_vec();
        p.extend_from_slice(name.as_bytes());
        p.extend_from_slice(&(infos.len() as u16).to_be_bytes());
        for i in infos {
            p.extend_from_slice(&i.to_be_bytes());
        }
        p
    }

    /// Connects and enters transmission on `export` with NBD_OPT_GO.
    pub async fn go(addr: SocketAddr, export: &str) -> RawClient {
        let mut c = RawClient::connect(addr, FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).await;
        let replies = c.option(OPT_GO, &Self::go_payload(export, &[INFO_BLOCK_SIZE])).await;
        assert_eq!(replies.last().unwrap().kind, REP_ACK, "GO {export}: {replies:?}");
        c
    }

    pub async fn send_request(
        &mut self,
        command: u16,
        flags: u16,
        cookie: u64,
        offset: u64,
        length: u32,
        payload: &[u8],
    ) {
        let h = RequestHeader { flags, command, cookie, offset, length };
        let mut out = h.encode().to_vec();
        out.extend_from_slice(payload);
        self.s.write_all(&out).await.unwrap();
    }

    /// Reads a simple reply header: (errno, cookie).
    pub async fn read_reply(&mut self) -> (u32, u64) {
        let magic = self.s.read_u32().await.expect("reply header");
        assert_eq!(magic, SIMPLE_REPLY_MAGIC);
        let errno = self.s.read_u32().await.unwrap();
        let cookie = self.s.read_u64().await.unwrap();
        (errno, cookie)
    }

    pub async fn read_data(&mut self, len: usize) -> Vec<u8> {
        let mut d = vec![0u8; len];
        self.s.read_exact(&mut d).await.unwrap();
        d
    }

    /// One request, waiting for its reply; returns (errno, data) (data only for a
    /// successful read of `length`).
    pub async fn call(&mut self, command: u16, flags: u16, offset: u64, length: u32, payload: &[u8]) -> (u32, Vec<u8>) {
        self.send_request(command, flags, 42, offset, length, payload).await;
        let (errno, cookie) = self.read_reply().await;
        assert_eq!(cookie, 42);
        let data = if command == CMD_READ && errno == 0 { self.read_data(length as usize).await } else { Vec::new() };
        (errno, data)
    }

    /// True once the server closed the connection (EOF within 5 s).
    pub async fn closed_by_server(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(tokio::time::timeout(Duration::from_secs(5), self.s.read(&mut b)).await, Ok(Ok(0)) | Ok(Err(_)))
    }
}

/// Waits (up to 5 s) until a counter reaches `want`; returns its last value.
pub async fn wait_for_stat(
    h: &Harness,
    f: impl Fn(&hlstore_nbd::NbdStats) -> &std::sync::atomic::AtomicU64,
    want: u64,
) -> u64 {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let v = h.stat(&f);
        if v >= want || tokio::time::Instant::now() > deadline {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

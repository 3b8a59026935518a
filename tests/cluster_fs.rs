//! A real filesystem on a replicated volume, without kernel NBD: `hlstore fuse-attach`
//! (FUSE block file over the volume's NBD export) → `losetup` → `mkfs.ext4` → mount, while a
//! replica node is killed with SIGKILL. Needs root, `/dev/fuse` and loop devices (Debian:
//! fuse3, util-linux, e2fsprogs, mount); fails with a clear message without them.
//!
//! Drop guards undo the mount, the loop device and the FUSE attach (in that order) even
//! when the test panics; the cluster guard then stops the nodes.

mod support;

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use support::cluster::{run_ok, run_tool, Cluster};

const TOOL_TIMEOUT: Duration = Duration::from_secs(120);

fn require_fuse_and_loop() {
    // SAFETY: geteuid cannot fail and touches no memory.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(euid, 0, "this test mounts filesystems and attaches loop devices: run it as root");
    assert!(Path::new("/dev/fuse").exists(), "/dev/fuse is missing: the kernel needs FUSE (modprobe fuse)");
    assert!(Path::new("/dev/loop-control").exists(), "/dev/loop-control is missing: modprobe loop");
}

fn is_mounted(dir: &Path) -> bool {
    let dir = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    let info = std::fs::read_to_string("/proc/self/mountinfo").expect("read /proc/self/mountinfo");
    info.lines().any(|l| l.split(' ').nth(4).is_some_and(|p| Path::new(p) == dir))
}

/// A running `hlstore fuse-attach`; SIGTERM (it unmounts), then SIGKILL + lazy unmount.
struct FuseAttach {
    child: Child,
    dir: PathBuf,
    file: PathBuf,
}

impl FuseAttach {
    fn start(c: &Cluster, uri: &str, dir: &Path) -> FuseAttach {
        let mut child = c
            .command()
            .args(["fuse-attach", "--nbd", uri, "--timeout-secs", "30", "--mountpoint"])
            .arg(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(dir.with_extension("log")).expect("fuse-attach log"))
            .spawn()
            .expect("start hlstore fuse-attach");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let mut f = FuseAttach { child, dir: dir.to_path_buf(), file: PathBuf::new() };
        let line = rx.recv_timeout(Duration::from_secs(60)).expect("fuse-attach did not print the block file path");
        f.file = PathBuf::from(line.trim());
        assert!(is_mounted(dir), "FUSE mount of {} not in mountinfo", dir.display());
        f
    }

    fn stop(mut self) {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let st = self.child.wait().expect("wait for fuse-attach");
        assert!(st.success(), "fuse-attach exited with {st} after SIGTERM");
        assert!(!is_mounted(&self.dir), "FUSE mount left behind");
    }
}

impl Drop for FuseAttach {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            // SAFETY: kill(2) on our own child.
            unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
            for _ in 0..100 {
                if let Ok(Some(_)) = self.child.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if is_mounted(&self.dir) {
            let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
        }
    }
}

/// A loop device on a file; detached on drop.
struct LoopDev {
    path: PathBuf,
    attached: bool,
}

impl LoopDev {
    fn attach(file: &Path) -> LoopDev {
        let out = run_ok(Command::new("losetup").args(["--find", "--show", "--direct-io=off"]).arg(file), TOOL_TIMEOUT);
        LoopDev { path: PathBuf::from(out.trim()), attached: true }
    }

    fn detach(mut self) {
        run_ok(Command::new("losetup").arg("-d").arg(&self.path), TOOL_TIMEOUT);
        self.attached = false;
    }
}

impl Drop for LoopDev {
    fn drop(&mut self) {
        if self.attached {
            let _ = Command::new("losetup").arg("-d").arg(&self.path).status();
        }
    }
}

/// An ext4 mount; unmounted (lazily if busy) on drop.
struct Mounted {
    dir: PathBuf,
    mounted: bool,
}

impl Mounted {
    fn mount(dev: &Path, dir: &Path) -> Mounted {
        run_ok(Command::new("mount").args(["-t", "ext4"]).arg(dev).arg(dir), TOOL_TIMEOUT);
        Mounted { dir: dir.to_path_buf(), mounted: true }
    }

    fn unmount(mut self) {
        run_ok(Command::new("umount").arg(&self.dir), TOOL_TIMEOUT);
        self.mounted = false;
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if self.mounted && Command::new("umount").arg(&self.dir).status().map(|s| !s.success()).unwrap_or(true) {
            let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
        }
    }
}

/// Deterministic content of file `seed` (xorshift64*).
fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Files: name, length, seed. The first three are written before the SIGKILL, the rest after.
const BEFORE: [(&str, usize, u64); 3] = [("a.bin", 4 << 20, 1), ("b.bin", 1 << 20, 2), ("odd.bin", 123_457, 3)];
const AFTER: [(&str, usize, u64); 2] = [("c.bin", 6 << 20, 4), ("tiny.txt", 17, 5)];

fn write_files(dir: &Path, files: &[(&str, usize, u64)]) {
    std::fs::create_dir_all(dir.join("sub")).expect("mkdir on ext4");
    for &(name, len, seed) in files {
        let mut f = std::fs::File::create(dir.join("sub").join(name)).expect("create on ext4");
        f.write_all(&pattern(len, seed)).expect("write on ext4");
        f.sync_all().expect("fsync on ext4");
    }
}

fn verify_files(dir: &Path, files: &[(&str, usize, u64)]) {
    for &(name, len, seed) in files {
        let got = std::fs::read(dir.join("sub").join(name)).expect("read back from ext4");
        assert_eq!(got.len(), len, "{name}: length");
        assert!(got == pattern(len, seed), "{name}: content differs");
    }
}

#[test]
fn ext4_on_a_volume_survives_a_replica_sigkill() {
    require_fuse_and_loop();
    let c = Cluster::new();
    let uri = c.up(&["--nodes", "3", "--volume", "fs", "--size", "128MiB"]);
    let work = tempfile::Builder::new().prefix("hlstore-fs-").tempdir().expect("temp dir");
    let (fuse_dir, mnt) = (work.path().join("fuse"), work.path().join("mnt"));
    std::fs::create_dir_all(&mnt).expect("mkdir mnt");

    // Declared in this order so they drop in reverse: ext4, loop device, FUSE.
    let fuse = FuseAttach::start(&c, &uri, &fuse_dir);
    assert_eq!(std::fs::metadata(&fuse.file).expect("block file").len(), 128 << 20);
    let lo = LoopDev::attach(&fuse.file);
    run_ok(Command::new("mkfs.ext4").args(["-F", "-q"]).arg(&lo.path), TOOL_TIMEOUT);
    let m = Mounted::mount(&lo.path, &mnt);
    write_files(&mnt, &BEFORE);

    // A replica node dies; the filesystem keeps working on the write quorum.
    c.kill9("n3");
    write_files(&mnt, &AFTER);
    verify_files(&mnt, &BEFORE);
    m.unmount();

    let fsck = run_tool(Command::new("fsck.ext4").args(["-n", "-f"]).arg(&lo.path), TOOL_TIMEOUT);
    assert!(
        fsck.status.success(),
        "fsck.ext4 -n -f found problems ({}):\n{}{}",
        fsck.status,
        String::from_utf8_lossy(&fsck.stdout),
        String::from_utf8_lossy(&fsck.stderr)
    );
    let m = Mounted::mount(&lo.path, &mnt);
    verify_files(&mnt, &BEFORE);
    verify_files(&mnt, &AFTER);
    m.unmount();
    lo.detach();
    fuse.stop();

    // n3 comes back and catches up; the volume's data is the filesystem's (ext4 magic).
    c.up(&[]);
    c.wait_all_healthy("fs", Duration::from_secs(90));
    let out = run_ok(Command::new("qemu-io").args(["-f", "raw", "-c", "read -v 1080 2", &uri]), TOOL_TIMEOUT);
    assert!(out.contains("53 ef"), "ext4 superblock magic not on the volume:\n{out}");
}

/// Restarts of the agent that runs the volume's engine are invisible to the application:
/// `fuse-attach` reconnects and sends the unanswered I/O again, the restarted agent
/// re-attaches the volume. fio (`verify=crc32c`, fsyncs) on ext4 on the volume must finish
/// without an error while the agent is SIGKILLed and restarted ten times; the I/O latency
/// around the restarts (fio's completion latency) is printed.
#[test]
fn ext4_and_fio_see_no_error_across_engine_agent_restarts() {
    require_fuse_and_loop();
    let c = Cluster::new();
    let uri = c.up(&["--nodes", "3", "--volume", "fs", "--size", "256MiB"]);
    let engine_node = c.volume_show("n1", "fs")["attached_node"].as_str().expect("attached_node").to_string();
    let work = tempfile::Builder::new().prefix("hlstore-restart-").tempdir().expect("temp dir");
    let (fuse_dir, mnt) = (work.path().join("fuse"), work.path().join("mnt"));
    std::fs::create_dir_all(&mnt).expect("mkdir mnt");

    let fuse = FuseAttach::start(&c, &uri, &fuse_dir);
    let lo = LoopDev::attach(&fuse.file);
    run_ok(Command::new("mkfs.ext4").args(["-F", "-q"]).arg(&lo.path), TOOL_TIMEOUT);
    let m = Mounted::mount(&lo.path, &mnt);
    write_files(&mnt, &BEFORE);

    // fio: random 4 KiB writes with checksums, an fsync every 16 writes, verified after
    // each pass; loops until the restarts are done.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let fio_out = work.path().join("fio");
    let fio = {
        let (stop, mnt, fio_out) = (stop.clone(), mnt.clone(), fio_out.clone());
        std::thread::spawn(move || {
            let mut runs = Vec::new();
            let mut i = 0;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) || i < 2 {
                let out = fio_out.with_extension(format!("{i}.json"));
                let st = Command::new("fio")
                    .args([
                        "--name=restart",
                        "--rw=randwrite",
                        "--bs=4k",
                        "--size=16M",
                        "--ioengine=psync",
                        "--direct=1",
                    ])
                    .args(["--numjobs=2", "--fsync=16", "--verify=crc32c", "--verify_fatal=1", "--do_verify=1"])
                    .args(["--output-format=json", "--group_reporting"])
                    .arg(format!("--directory={}", mnt.display()))
                    .arg(format!("--output={}", out.display()))
                    .status()
                    .expect("run fio");
                runs.push((st, out));
                if !runs.last().expect("run").0.success() {
                    break;
                }
                i += 1;
            }
            runs
        })
    };

    let mut restart_ms = Vec::new();
    for round in 0..10 {
        std::thread::sleep(Duration::from_millis(1500));
        let t = std::time::Instant::now();
        c.kill9(&engine_node);
        c.start_one(&engine_node);
        // Back when the engine serves again: the re-attach after restart.
        c.wait_until(&format!("round {round}: volume re-attached on {engine_node}"), Duration::from_secs(60), || {
            let v = c.volume_show(&engine_node, "fs");
            (v["attached_node"] == engine_node.as_str() && !v["nbd_uri"].as_str().unwrap_or("").is_empty())
                .then_some(())
        });
        restart_ms.push(t.elapsed().as_millis());
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let runs = fio.join().expect("fio thread");
    let mut max_lat_ms = 0.0f64;
    let mut p99_ms = 0.0f64;
    for (st, out) in &runs {
        let text = std::fs::read_to_string(out).unwrap_or_default();
        assert!(
            st.success(),
            "fio failed ({st}) while the engine's agent restarted:\n{text}\nfuse-attach log:\n{}",
            std::fs::read_to_string(fuse_dir.with_extension("log")).unwrap_or_default()
        );
        let j: serde_json::Value = serde_json::from_str(text.trim_start_matches(|c| c != '{')).expect("fio JSON");
        for lat in [&j["jobs"][0]["write"]["clat_ns"], &j["jobs"][0]["sync"]["lat_ns"]] {
            max_lat_ms = max_lat_ms.max(lat["max"].as_f64().unwrap_or(0.0) / 1e6);
            p99_ms = p99_ms.max(lat["percentile"]["99.000000"].as_f64().unwrap_or(0.0) / 1e6);
        }
    }
    eprintln!(
        "agent restarts: {} fio runs, every one verified; restart → serving again (ms): {restart_ms:?}; \
         write and fsync latency: worst run's p99 {p99_ms:.1} ms, max {max_lat_ms:.0} ms",
        runs.len()
    );
    let log = std::fs::read_to_string(fuse_dir.with_extension("log")).unwrap_or_default();
    assert!(log.contains("nbd connection re-established"), "fuse-attach never reconnected:\n{log}");

    verify_files(&mnt, &BEFORE);
    m.unmount();
    let fsck = run_tool(Command::new("fsck.ext4").args(["-n", "-f"]).arg(&lo.path), TOOL_TIMEOUT);
    assert!(fsck.status.success(), "fsck.ext4 after the restarts:\n{}", String::from_utf8_lossy(&fsck.stdout));
    lo.detach();
    fuse.stop();
}

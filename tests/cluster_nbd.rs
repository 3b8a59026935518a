//! A replicated volume of a 3-node `hlstore dev` cluster, used through real NBD clients:
//! nbdinfo, qemu-io, qemu-img, nbdcopy and fio's nbd engine. Each test runs its own cluster
//! on loopback in a temp dir.

mod support;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use rand::RngCore;
use support::cluster::{run_ok, run_tool, Cluster};

const MIB: u64 = 1024 * 1024;
const TOOL_TIMEOUT: Duration = Duration::from_secs(120);

/// A 3-node cluster with volume `name` of `size` attached on n1; returns its NBD URI.
fn cluster_with_volume(name: &str, size: &str) -> (Cluster, String) {
    let c = Cluster::new();
    let uri = c.up(&["--nodes", "3", "--volume", name, "--size", size]);
    assert!(uri.starts_with("nbd://127.0.0.1:") && uri.ends_with(&format!("/{name}")), "unexpected URI {uri:?}");
    (c, uri)
}

/// Runs qemu-io with `cmds` (each a `-c` command) on `uri`; panics unless every command
/// succeeded (qemu-io exits non-zero on a failed request or pattern mismatch).
fn qemu_io(uri: &str, cmds: &[&str]) -> String {
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "raw"]);
    for c in cmds {
        cmd.args(["-c", c]);
    }
    let out = run_ok(cmd.arg(uri), TOOL_TIMEOUT);
    assert!(!out.contains("Pattern verification failed"), "qemu-io {cmds:?}:\n{out}");
    out
}

/// qemu-io that must fail (a pattern that is not there).
fn qemu_io_mismatch(uri: &str, cmd: &str) {
    let out = run_tool(Command::new("qemu-io").args(["-f", "raw", "-c", cmd, uri]), TOOL_TIMEOUT);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success() && text.contains("Pattern verification failed"), "{cmd} should mismatch:\n{text}");
}

/// `len` random bytes with a zero hole of `hole` bytes in the middle.
fn image_with_hole(path: &Path, len: u64, hole: u64) -> Vec<u8> {
    let mut data = vec![0u8; len as usize];
    rand::thread_rng().fill_bytes(&mut data);
    let start = ((len - hole) / 2) as usize;
    data[start..start + hole as usize].fill(0);
    std::fs::write(path, &data).expect("write image");
    data
}

fn assert_same(what: &str, got: &[u8], want: &[u8]) {
    assert_eq!(got.len(), want.len(), "{what}: length differs");
    if let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) {
        panic!("{what}: first difference at byte {i} (got {:#04x}, want {:#04x})", got[i], want[i]);
    }
}

/// `dev up --json` and `dev down --json` print what they did.
#[test]
fn dev_up_and_down_print_json() {
    let c = Cluster::new();
    let dir = c.path().to_str().expect("utf-8 temp dir").to_string();
    let out = c.cli(&["dev", "up", "--dir", &dir, "--nodes", "3", "--volume", "j", "--size", "16MiB", "--json"]);
    let up: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("dev up --json ({e}):\n{out}"));
    assert_eq!(up["nodes"].as_array().map(Vec::len), Some(3), "{up}");
    assert_eq!(up["endpoint"], c.endpoint("n1"), "{up}");
    assert_eq!(up["volume"]["name"], "j", "{up}");
    assert_eq!(up["volume"]["size"], 16 * MIB, "{up}");
    let uri = up["volume"]["nbd_uri"].as_str().expect("nbd_uri").to_string();
    qemu_io(&uri, &["write -P 0x5a 0 64k", "read -P 0x5a 0 64k"]);
    let out = c.cli(&["dev", "down", "--dir", &dir, "--json"]);
    let down: serde_json::Value =
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("dev down --json ({e}):\n{out}"));
    assert_eq!(down, serde_json::json!({"stopped": ["n1", "n2", "n3"]}));
}

#[test]
fn nbdinfo_reports_size_and_capabilities() {
    let (_c, uri) = cluster_with_volume("info", "48MiB");
    let out = run_ok(Command::new("nbdinfo").args(["--json", &uri]), TOOL_TIMEOUT);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("nbdinfo JSON ({e}):\n{out}"));
    let e = &v["exports"][0];
    assert_eq!(e["export-name"], "info");
    assert_eq!(e["export-size"], 48 * MIB);
    assert_eq!(e["is_read_only"], false);
    for cap in ["can_flush", "can_fua", "can_multi_conn", "can_trim", "can_zero"] {
        assert_eq!(e[cap], true, "{cap} in {e}");
    }
    assert_eq!(e["block_size_preferred"], 4096);
    // An export that does not exist is refused by name.
    let missing = uri.replace("/info", "/nope");
    let out = run_tool(Command::new("nbdinfo").arg(&missing), TOOL_TIMEOUT);
    assert!(!out.status.success(), "nbdinfo on a missing export succeeded");
}

#[test]
fn qemu_io_aligned_and_unaligned_patterns_read_back() {
    let (_c, uri) = cluster_with_volume("qio", "32MiB");
    qemu_io(&uri, &["write -P 0xab 0 1M", "write -P 0xcd 31M 1M", "flush", "read -P 0xab 0 1M"]);
    // Unaligned writes inside and across 4 KiB blocks (read-modify-write in the frontend).
    qemu_io(&uri, &["write -P 0x5a 1000 5000", "write -P 0x77 8191 2", "write -P 0x33 12289 20477", "flush"]);
    // A new connection sees everything, neighbours untouched.
    qemu_io(
        &uri,
        &[
            "read -P 0xab 0 1000",
            "read -P 0x5a 1000 5000",
            "read -P 0xab 6000 2191",
            "read -P 0x77 8191 2",
            "read -P 0xab 8193 4096",
            "read -P 0x33 12289 20477",
            "read -P 0xab 32766 1015810",
            "read -P 0 1M 30M",
            "read -P 0xcd 31M 1M",
        ],
    );
    // The check itself can fail.
    qemu_io_mismatch(&uri, "read -P 0xab 1000 1");
}

#[test]
fn qemu_img_convert_in_and_out_is_byte_identical() {
    let (_c, uri) = cluster_with_volume("conv", "32MiB");
    let work = tempfile::tempdir().expect("temp dir");
    let src = work.path().join("in.raw");
    let data = image_with_hole(&src, 32 * MIB, 4 * MIB);
    // Old content everywhere, so the zero hole has to be written, not skipped.
    qemu_io(&uri, &["write -P 0xee 0 32M", "flush"]);
    run_ok(
        Command::new("qemu-img").args(["convert", "-n", "-f", "raw", "-O", "raw"]).arg(&src).arg(&uri),
        TOOL_TIMEOUT,
    );
    let dst = work.path().join("out.raw");
    run_ok(Command::new("qemu-img").args(["convert", "-f", "raw", "-O", "raw", &uri]).arg(&dst), TOOL_TIMEOUT);
    assert_same("qemu-img round trip", &std::fs::read(&dst).expect("read out.raw"), &data);
}

#[test]
fn nbdcopy_with_four_connections_in_and_out() {
    let (_c, uri) = cluster_with_volume("copy", "32MiB");
    let work = tempfile::tempdir().expect("temp dir");
    let src = work.path().join("in.raw");
    let data = image_with_hole(&src, 32 * MIB, 4 * MIB);
    qemu_io(&uri, &["write -P 0xee 0 32M", "flush"]);
    run_ok(Command::new("nbdcopy").args(["--connections=4", "--requests=16"]).arg(&src).arg(&uri), TOOL_TIMEOUT);
    let dst = work.path().join("out.raw");
    run_ok(Command::new("nbdcopy").args(["--connections=4", &uri]).arg(&dst), TOOL_TIMEOUT);
    assert_same("nbdcopy round trip", &std::fs::read(&dst).expect("read out.raw"), &data);
}

/// Allocated bytes of every replica, as `hlstore volume show --json` reports them.
fn allocated(c: &Cluster, name: &str) -> Vec<u64> {
    let v = c.volume_show("n1", name);
    v["replicas"].as_array().expect("replicas").iter().map(|r| r["allocated_bytes"].as_u64().expect("bytes")).collect()
}

fn wait_allocated(c: &Cluster, name: &str, what: &str, ok: impl Fn(u64) -> bool) -> Vec<u64> {
    c.wait_until(what, Duration::from_secs(30), || {
        let a = allocated(c, name);
        (a.len() == 3 && a.iter().all(|&b| ok(b))).then_some(a)
    })
}

#[test]
fn trim_and_write_zeroes_free_space_and_read_zero() {
    let (c, uri) = cluster_with_volume("thin", "64MiB");
    assert_eq!(allocated(&c, "thin"), vec![0, 0, 0], "a new volume allocates nothing");
    qemu_io(&uri, &["write -P 0x11 0 8M", "flush"]);
    wait_allocated(&c, "thin", "8 MiB allocated on every replica", |b| (8 * MIB..=9 * MIB).contains(&b));

    // TRIM of the first 4 MiB: space comes back, the range reads as zeroes.
    qemu_io(&uri, &["discard 0 4M", "flush"]);
    wait_allocated(&c, "thin", "4 MiB left after TRIM", |b| (4 * MIB..=5 * MIB).contains(&b));
    qemu_io(&uri, &["read -P 0 0 4M", "read -P 0x11 4M 4M"]);

    // WRITE_ZEROES that may punch holes (qemu-io -u) frees space as well.
    qemu_io(&uri, &["write -z -u 4M 2M", "flush"]);
    wait_allocated(&c, "thin", "2 MiB left after WRITE_ZEROES", |b| (2 * MIB..=3 * MIB).contains(&b));
    // WRITE_ZEROES without may-trim: reads zero too.
    qemu_io(&uri, &["write -z 6M 1M", "flush"]);
    qemu_io(&uri, &["read -P 0 0 7M", "read -P 0x11 7M 1M", "read -P 0 8M 56M"]);
    qemu_io_mismatch(&uri, "read -P 0 7M 4k");
}

/// Runs one fio job on `uri` with crc32c verification; returns the parsed job result.
fn fio(uri: &str, name: &str, args: &[&str]) -> serde_json::Value {
    let mut cmd = Command::new("fio");
    cmd.args([&format!("--name={name}"), "--ioengine=nbd", &format!("--uri={uri}")])
        .args(["--verify=crc32c", "--do_verify=1", "--verify_fatal=1", "--runtime=90", "--output-format=json"])
        .arg("--verify_state_save=0")
        .current_dir(std::env::temp_dir())
        .args(args);
    let out = run_ok(&mut cmd, Duration::from_secs(150));
    let json = &out[out.find('{').unwrap_or_else(|| panic!("no JSON from fio:\n{out}"))..];
    let v: serde_json::Value = serde_json::from_str(json).unwrap_or_else(|e| panic!("fio JSON ({e}):\n{out}"));
    v["jobs"][0].clone()
}

#[test]
fn fio_nbd_engine_random_4k_and_sequential_1m_verify() {
    let (_c, uri) = cluster_with_volume("fio", "64MiB");
    let job = fio(&uri, "rand4k", &["--rw=randwrite", "--bs=4k", "--size=8m", "--iodepth=16"]);
    assert_eq!(job["error"], 0, "{job}");
    assert_eq!(job["write"]["io_bytes"], 8 * MIB, "random 4k job wrote everything");
    assert_eq!(job["read"]["io_bytes"], 8 * MIB, "verify phase read everything back");

    let job = fio(&uri, "seq1m", &["--rw=write", "--bs=1m", "--offset=16m", "--size=32m", "--iodepth=4"]);
    assert_eq!(job["error"], 0, "{job}");
    assert_eq!(job["write"]["io_bytes"], 32 * MIB, "sequential 1m job wrote everything");
    assert_eq!(job["read"]["io_bytes"], 32 * MIB, "verify phase read everything back");
}

/// Peak resident memory (VmHWM) of a process, in bytes.
fn vm_hwm(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM line");
    kib * 1024
}

#[test]
fn write_zeroes_keeping_allocation_is_bounded_in_memory() {
    const LEN: u64 = 256 * MIB;
    let (c, uri) = cluster_with_volume("zeroes", "1GiB");
    qemu_io(&uri, &["write -P 0x5a 0 4M", "write -P 0x5b 255M 1M"]);
    let pid = c.pid("n1").expect("n1 runs");
    let before = vm_hwm(pid);
    // `write -z` without -u: WRITE_ZEROES with NO_HOLE (the range stays allocated).
    qemu_io(&uri, &[&format!("write -z 0 {LEN}")]);
    let grew = vm_hwm(pid).saturating_sub(before);
    assert!(grew < 64 * MIB, "the agent's peak memory grew by {} MiB for a {} MiB WRITE_ZEROES", grew / MIB, LEN / MIB);
    qemu_io(&uri, &[&format!("read -P 0 0 {LEN}")]);
}

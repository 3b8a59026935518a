//! An interrupted resync resumes instead of starting over (design §3, resync): a replica
//! node comes back after missing 32 MiB of writes, is SIGKILLed again in the middle of its
//! (rate-limited) resync, and comes back once more. The second pass must copy only the
//! blocks past the checkpoint the first pass left, and the replica must end byte-identical.
//!
//! The resync rate limit (`HLSTORE_RESYNC_MIBPS`) makes the copy take seconds, so the kill
//! lands mid-copy on any machine; it is also the knob operators use on 1 GbE.

mod support;

use std::time::Duration;

use serde_json::Value;
use support::cluster::{run_ok, Cluster};

const VOLUME: &str = "resume";
const MIB: u64 = 1 << 20;
const BS: u64 = 4096;
/// Blocks the returning replica misses (32 MiB).
const MISSED: u64 = 8192;
/// Blocks between checkpoints (`HLSTORE_RESYNC_CHECKPOINT_MIB=16` below).
const CHECKPOINT_EVERY: u64 = 4096;
const WAIT: Duration = Duration::from_secs(120);

fn replica(c: &Cluster, node: &str) -> Value {
    let st = c.status();
    let v = Cluster::volume_of(&st, VOLUME).unwrap_or_else(|| panic!("no volume in {st}"));
    Cluster::replica_of(v, node).unwrap_or_else(|| panic!("no replica on {node} in {v}")).clone()
}

fn chunks(r: &Value) -> u64 {
    r["resync_chunks"].as_u64().unwrap_or_else(|| panic!("no resync_chunks in {r}"))
}

fn qemu_io(uri: &str, cmd: &str) {
    run_ok(std::process::Command::new("qemu-io").args(["-f", "raw", "-c", cmd, uri]), Duration::from_secs(120));
}

#[test]
fn an_interrupted_resync_resumes_past_its_checkpoint() {
    let mut c = Cluster::new();
    c.env.push(("HLSTORE_RESYNC_MIBPS".into(), "4".into()));
    c.env.push(("HLSTORE_RESYNC_CHECKPOINT_MIB".into(), (CHECKPOINT_EVERY * BS / MIB).to_string()));
    let uri = c.up(&["--nodes", "3", "--volume", VOLUME, "--size", "64MiB"]);
    let engine = c.status()["volumes"][0]["attached_node"].as_str().expect("attached").to_string();
    let target = ["n1", "n2", "n3"].into_iter().find(|n| *n != engine).expect("a replica node").to_string();

    qemu_io(&uri, "write -P 0x11 0 32M");
    c.wait_all_healthy(VOLUME, WAIT);
    c.kill9(&target);
    qemu_io(&uri, "write -P 0x22 0 32M");
    c.wait_until("target marked failed", WAIT, || (replica(&c, &target)["state"] == "failed").then_some(()));
    let start = chunks(&replica(&c, &target));

    // First pass: killed once past the first checkpoint (4096 blocks = 16 MiB, ~4 s at 4 MiB/s).
    c.start_one(&target);
    c.wait_until("first resync pass past a checkpoint", WAIT, || {
        (chunks(&replica(&c, &target)) >= start + CHECKPOINT_EVERY + 1024).then_some(())
    });
    c.kill9(&target);
    let after_first = c.wait_until("target marked failed again", WAIT, || {
        let r = replica(&c, &target);
        (r["state"] == "failed").then(|| chunks(&r))
    });
    let first = after_first - start;
    assert!(first < MISSED, "the first pass finished ({first} chunks) before the kill; the test proves nothing");

    // Second pass: resumes from the checkpoint.
    c.start_one(&target);
    c.wait_all_healthy(VOLUME, WAIT);
    let r = replica(&c, &target);
    let resumed = r["resync_resumed_from"].as_u64().expect("resync_resumed_from") / BS;
    let second = chunks(&r) - after_first;
    assert!(resumed >= CHECKPOINT_EVERY, "resumed from block {resumed} after a first pass of {first} blocks");
    assert_eq!(second, MISSED - resumed, "the second pass copies exactly the blocks past the checkpoint");

    // The target's own replica holds every block of the second write.
    let ep = c.endpoint(&target);
    let want = vec![0x22u8; (2 * MIB) as usize];
    for off in (0..32 * MIB).step_by((2 * MIB) as usize) {
        let out = c
            .command()
            .env("HLSTORE_TLS_DIR", c.path().join("tls").join(&target))
            .args(["replica", "read", VOLUME, "--endpoint", &ep, "--offset", &off.to_string()])
            .args(["--length", &(2 * MIB).to_string(), "--output", "-"])
            .output()
            .expect("run hlstore replica read");
        assert!(out.status.success(), "replica read failed: {}", String::from_utf8_lossy(&out.stderr));
        assert!(out.stdout == want, "replica on {target} differs in the 2 MiB at {off}");
    }
}

//! Failure tests of the replicated data path (design §3) on a 3-node `hlstore dev` cluster:
//! node agents are separate processes killed with SIGKILL while a real NBD client
//! (python3-libnbd, `tests/scripts/nbd_load.py`) writes self-describing blocks and logs
//! every acknowledged request. Afterwards every acknowledged write must read back.
//!
//! The volume (3 replicas, write quorum 2) is attached on n1; engine timeouts are short
//! (`support::cluster::FAST_TIMEOUTS`: I/O timeout 5 s, failure timeout 3 s).

mod support;

use std::collections::BTreeSet;
use std::process::Command;
use std::time::Duration;

use support::cluster::{
    max_seq, metric_sum, monotonic_now, run_ok, run_tool, verify_load, verify_load_upto, Cluster, Load, Op,
    IO_TIMEOUT_SECS,
};

const VOLUME: &str = "chaos";
const SIZE: &str = "128MiB";
/// The load writes random blocks of the first 8 MiB.
const REGION_BLOCKS: u64 = 2048;
const FLUSH_EVERY: u32 = 16;
const EIO: i32 = 5;
const WAIT: Duration = Duration::from_secs(90);

fn cluster() -> (Cluster, String) {
    let c = Cluster::new();
    let uri = c.up(&["--nodes", "3", "--volume", VOLUME, "--size", SIZE]);
    assert!(uri.starts_with("nbd://127.0.0.1:"), "unexpected URI {uri:?}");
    (c, uri)
}

fn work_dir() -> tempfile::TempDir {
    tempfile::Builder::new().prefix("hlstore-load-").tempdir().expect("temp dir")
}

fn acked_after(ops: &[Op], t: f64) -> usize {
    ops.iter().filter(|o| matches!(o, Op::Write { errno: None, t0, .. } if *t0 > t)).count()
}

fn acked(ops: &[Op]) -> usize {
    acked_after(ops, f64::MIN)
}

/// State of `node`'s replica of the volume, as `dev status` shows it.
fn replica_state(c: &Cluster, node: &str) -> Option<(String, u64)> {
    let st = c.status();
    let v = Cluster::volume_of(&st, VOLUME)?;
    let r = Cluster::replica_of(v, node)?;
    Some((r["state"].as_str()?.to_string(), r["resync_chunks"].as_u64()?))
}

fn attached_node(v: &serde_json::Value) -> String {
    v["attached_node"].as_str().unwrap_or("").to_string()
}

fn epoch(v: &serde_json::Value) -> u64 {
    v["epoch"].as_u64().unwrap_or_else(|| panic!("no epoch in {v}"))
}

/// Distinct blocks written (acknowledged or not) by writes with a seq above `seq`.
fn blocks_written_after(ops: &[Op], seq: u64) -> usize {
    ops.iter()
        .filter_map(|o| match o {
            Op::Write { seq: s, block, .. } if *s > seq => Some(*block),
            _ => None,
        })
        .collect::<BTreeSet<_>>()
        .len()
}

#[test]
fn replica_sigkill_under_load_loses_nothing_and_resyncs_incrementally() {
    let (c, uri) = cluster();
    // Fill the first 64 MiB, so a full copy of the replica would be 16384 blocks.
    // (1 MiB requests, so no single slow request gets n3 marked failed before it holds the fill.)
    let mut fill = Command::new("qemu-io");
    fill.args(["-f", "raw"]);
    for i in 0..64 {
        fill.args(["-c", &format!("write -P 0xee {i}M 1M")]);
    }
    run_ok(fill.args(["-c", "flush", &uri]), WAIT);
    c.wait_all_healthy(VOLUME, WAIT);
    let work = work_dir();
    let mut load = Load::start(&uri, work.path(), "a", REGION_BLOCKS, 0, FLUSH_EVERY);
    load.wait_for("200 acknowledged writes", WAIT, |ops| acked(ops) >= 200);
    // The test is about a replica that was in sync when it died. resync_chunks counts
    // since the attach (n3 may have been caught up then, if it answered late).
    c.wait_all_healthy(VOLUME, WAIT);
    let (_, chunks_before) = replica_state(&c, "n3").expect("n3 in status");

    c.kill9("n3");
    let t_kill = monotonic_now();
    let ops = load.ops();
    // Flushes acknowledged before the kill. n3 was in sync, so its durable point is at or
    // after one of the last ones; the third newest leaves margin for a little lag.
    let flushes: Vec<u64> = ops
        .iter()
        .filter_map(|o| match o {
            Op::Flush { seq, errno: None, t1, .. } if *t1 < t_kill => Some(*seq),
            _ => None,
        })
        .collect();
    let durable_before = flushes.len().checked_sub(3).map(|i| flushes[i]).unwrap_or(0);

    // I/O goes on with n1 + n2.
    load.wait_for("300 writes acknowledged after the kill", WAIT, |ops| acked_after(ops, t_kill) >= 300);
    c.wait_until("the engine to mark n3 failed", WAIT, || {
        replica_state(&c, "n3").filter(|(s, _)| s == "failed").map(|_| ())
    });

    c.up(&[]);
    let resynced = c.wait_until("n3 healthy again after a resync", WAIT, || {
        replica_state(&c, "n3").filter(|(s, chunks)| s == "healthy" && *chunks > chunks_before).map(|(_, n)| n)
    });
    let t_healthy = monotonic_now();
    load.wait_for("100 more writes with n3 back", WAIT, |ops| acked_after(ops, t_healthy) >= 100);
    let ops = load.stop();

    let failed: Vec<&Op> = ops.iter().filter(|o| matches!(o, Op::Write { errno: Some(_), .. })).collect();
    assert!(failed.is_empty(), "one replica down must not fail a write: {:?}", &failed[..failed.len().min(5)]);
    assert!(
        !ops.iter().any(|o| matches!(o, Op::Flush { errno: Some(_), .. })),
        "one replica down must not fail a flush"
    );

    // Incremental: the resync copied what changed since n3's durable point, not the volume.
    let status = c.status();
    let v = Cluster::volume_of(&status, VOLUME).expect("volume in status");
    assert!(v["replicas"].as_array().expect("replicas").iter().all(|r| r["state"] == "healthy"), "{v}");
    let total = Cluster::replica_of(v, "n3").expect("n3")["resync_chunks"].as_u64().expect("resync_chunks");
    assert!(total >= resynced, "resync_chunks went down: {resynced} -> {total}");
    let chunks = total - chunks_before;
    let changed = blocks_written_after(&ops, durable_before);
    assert!(
        chunks as usize <= changed,
        "resync sent {chunks} chunks but only {changed} blocks changed since n3's durable point (seq {durable_before})"
    );
    assert!(chunks < 16384 / 4, "resync sent {chunks} chunks: that is a full copy, not an incremental one");
    let page = support::http_get(&c.metrics_addr("n3"), "/metrics");
    let applied = metric_sum(&page, "hlstore_replica_resync_chunks_applied_total");
    eprintln!(
        "writes acked {}, resync chunks sent {chunks}, applied on n3 {applied}, blocks changed since n3's durable point {changed}",
        acked(&ops)
    );
    assert!(applied > 0.0 && applied <= changed as f64, "n3 applied {applied} resync chunks ({changed} changed)");

    // Every acknowledged write reads back, the untouched rest of the fill too.
    verify_load(&uri, REGION_BLOCKS, 0xee, &[&load.log]);
    run_ok(
        Command::new("qemu-io").args(["-f", "raw", "-c", "read -P 0xee 8M 56M", "-c", "read -P 0 64M 64M", &uri]),
        WAIT,
    );
    // n3's own copy: an engine on n3 reads from its local, in-sync replica.
    let ep3 = c.endpoint("n3");
    let (ok, _, err) = c.try_cli(&["volume", "attach", VOLUME, "--node", "n3", "--endpoint", &ep3]);
    assert!(!ok && err.contains("detach it first"), "attached on n1: attach on n3 must be refused: {err}");
    c.cli(&["volume", "detach", VOLUME, "--endpoint", &ep3]);
    let uri3 = c.cli(&["volume", "attach", VOLUME, "--node", "n3", "--endpoint", &ep3]).trim().to_string();
    assert_eq!(attached_node(&c.volume_show("n3", VOLUME)), "n3");
    verify_load(&uri3, REGION_BLOCKS, 0xee, &[&load.log]);
    run_ok(Command::new("qemu-io").args(["-f", "raw", "-c", "read -P 0xee 8M 56M", &uri3]), WAIT);
}

#[test]
fn two_of_three_down_stops_acks_until_one_returns() {
    let (c, uri) = cluster();
    let work = work_dir();
    let mut load = Load::start(&uri, work.path(), "b", REGION_BLOCKS, 0, FLUSH_EVERY);
    load.wait_for("200 acknowledged writes", WAIT, |ops| acked(ops) >= 200);

    c.kill9("n2");
    c.kill9("n3");
    let t_kill = monotonic_now();
    // Writes issued from now on must fail with EIO after the I/O timeout.
    load.wait_for("two writes failed without a quorum", WAIT, |ops| {
        ops.iter().filter(|o| matches!(o, Op::Write { errno: Some(_), t0, .. } if *t0 > t_kill)).count() >= 2
    });
    let t_up = monotonic_now();
    c.start_one("n2");

    load.wait_for("writes acknowledged again with n2 back", WAIT, |ops| acked_after(ops, t_up) >= 100);
    let ops = load.stop();
    let down: Vec<f64> = ops
        .iter()
        .filter_map(|o| match o {
            Op::Write { errno: Some(_), t0, t1, .. } if *t0 > t_kill && *t1 < t_up => Some(t1 - t0),
            _ => None,
        })
        .collect();
    eprintln!("writes failed while two nodes were down: {}, durations {down:.2?}", down.len());
    for o in &ops {
        match *o {
            Op::Write { errno: None, t0, t1, seq, .. } if t0 > t_kill => {
                assert!(t1 > t_up, "write seq {seq} was acknowledged at {t1:.3} with two of three nodes down (since {t_kill:.3}, back at {t_up:.3})");
            }
            Op::Flush { errno: None, t0, t1, seq } if t0 > t_kill => {
                assert!(t1 > t_up, "flush at seq {seq} was acknowledged with two of three nodes down");
            }
            Op::Write { errno: Some(e), t0, t1, seq, .. } if t0 > t_kill && t1 < t_up => {
                assert_eq!(e, EIO, "write seq {seq} failed with errno {e}, not EIO");
                assert!(
                    t1 - t0 <= IO_TIMEOUT_SECS + 3.0,
                    "write seq {seq} hung {:.1}s, longer than the I/O timeout ({IO_TIMEOUT_SECS}s)",
                    t1 - t0
                );
            }
            _ => {}
        }
    }

    // Nothing acknowledged is lost: read through the engine now backed by n1 + n2 ...
    verify_load(&uri, REGION_BLOCKS, 0, &[&load.log]);
    // ... and again once n3 is back and everything converged.
    c.up(&[]);
    c.wait_all_healthy(VOLUME, WAIT);
    verify_load(&uri, REGION_BLOCKS, 0, &[&load.log]);
}

#[test]
fn engine_node_failover_keeps_acknowledged_writes_and_is_not_taken_back() {
    let (c, uri) = cluster();
    let epoch1 = epoch(&c.volume_show("n1", VOLUME));
    let work = work_dir();
    let mut load = Load::start(&uri, work.path(), "c1", REGION_BLOCKS, 0, FLUSH_EVERY);
    load.wait_for("300 acknowledged writes", WAIT, |ops| acked(ops) >= 300);

    c.kill9("n1");
    let t_kill = monotonic_now();
    load.wait_for("the client to see its server gone", WAIT, |ops| {
        ops.iter().any(|o| matches!(o, Op::Lost { t } if *t > t_kill))
    });
    let ops1 = load.stop();

    // n1 cannot be asked to detach: it is "unknown", so a plain attach elsewhere is refused
    // and says how to proceed; --force takes over (the epoch bump fences n1's engine).
    let ep2 = c.endpoint("n2");
    let (ok, _, err) = c.try_cli(&["volume", "attach", VOLUME, "--node", "n2", "--endpoint", &ep2]);
    assert!(!ok && err.contains("--force"), "attach while the holder is unreachable must be refused: {err}");
    let uri2 = c.cli(&["volume", "attach", VOLUME, "--node", "n2", "--force", "--endpoint", &ep2]).trim().to_string();
    assert_eq!(uri2, format!("nbd://{}/{VOLUME}", c.nbd_addr("n2")));
    let v = c.volume_show("n2", VOLUME);
    assert_eq!(attached_node(&v), "n2", "{v}");
    let epoch2 = epoch(&v);
    assert!(epoch2 > epoch1, "new engine epoch {epoch2} is not above the old one {epoch1}");
    eprintln!("failover: epoch {epoch1} -> {epoch2}, {} writes acknowledged by the old engine", acked(&ops1));

    // The new engine serves every write the old one acknowledged.
    verify_load(&uri2, REGION_BLOCKS, 0, &[&load.log]);

    let mut load2 = Load::start(&uri2, work.path(), "c2", REGION_BLOCKS, max_seq(&ops1) + 1000, FLUSH_EVERY);
    load2.wait_for("200 writes acknowledged by the new engine", WAIT, |ops| acked(ops) >= 200);

    // n1 comes back: its replica catches up, but it does not take the volume back.
    c.up(&[]);
    c.wait_until("n1's replica healthy under the new engine", WAIT, || {
        let v = c.volume_show("n2", VOLUME);
        let r = Cluster::replica_of(&v, "n1")?;
        (r["state"] == "healthy" && attached_node(&v) == "n2").then_some(())
    });
    let t_back = monotonic_now();
    load2.wait_for("100 more writes with n1 back", WAIT, |ops| acked_after(ops, t_back) >= 100);
    let ops2 = load2.stop();
    assert!(!ops2.iter().any(|o| matches!(o, Op::Write { errno: Some(_), .. })), "a write failed after failover");

    let ep1 = c.endpoint("n1");
    let via_n1: serde_json::Value =
        serde_json::from_str(&c.cli(&["volume", "show", VOLUME, "--json", "--endpoint", &ep1])).expect("json");
    for v in [&c.volume_show("n2", VOLUME), &via_n1] {
        assert_eq!(attached_node(v), "n2", "the restarted node took the volume back: {v}");
        assert_eq!(epoch(v), epoch2, "the epoch moved after n1 restarted: {v}");
    }
    // n1 does not export the volume any more.
    let old = run_tool(Command::new("nbdinfo").arg(&uri), Duration::from_secs(30));
    assert!(!old.status.success(), "n1 still exports {VOLUME} after failover");

    verify_load(&uri2, REGION_BLOCKS, 0, &[&load.log, &load2.log]);
}

#[test]
fn restart_of_every_node_brings_the_volume_back_with_its_data() {
    let (c, uri) = cluster();
    let work = work_dir();
    let mut load = Load::start(&uri, work.path(), "d", REGION_BLOCKS, 0, FLUSH_EVERY);
    load.wait_for("300 acknowledged writes", WAIT, |ops| acked(ops) >= 300);
    let ops = load.stop();
    assert!(matches!(ops.last(), Some(Op::Flush { errno: None, .. })), "the load did not end with a flush: {ops:?}");
    let epoch1 = epoch(&c.volume_show("n1", VOLUME));

    c.down();
    let st = c.status();
    for id in ["n1", "n2", "n3"] {
        assert_eq!(Cluster::node_of(&st, id)["running"], false, "{id} still runs after dev down");
    }

    // Nothing but the node agents' disks describes the volume now. The peers come up
    // first (the other order is `engine_node_restarting_before_its_peers_...` below).
    c.start_one("n2");
    c.start_one("n3");
    c.up(&[]);
    let v = c.wait_until("the volume attached again on n1", WAIT, || {
        let st = c.status();
        let v = Cluster::volume_of(&st, VOLUME)?.clone();
        (attached_node(&v) == "n1" && v["nbd_uri"].is_string()).then_some(v)
    });
    assert_eq!(v["nbd_uri"], uri.as_str(), "{v}");
    assert_eq!(v["size"], 128u64 << 20, "{v}");
    assert!(epoch(&v) >= epoch1, "{v}");
    c.wait_all_healthy(VOLUME, WAIT);
    verify_load(&uri, REGION_BLOCKS, 0, &[&load.log]);
}

#[test]
fn sigkill_of_every_node_keeps_every_flushed_write() {
    let (c, uri) = cluster();
    let work = work_dir();
    let mut load = Load::start(&uri, work.path(), "e", REGION_BLOCKS, 0, FLUSH_EVERY);
    load.wait_for("300 acknowledged writes", WAIT, |ops| acked(ops) >= 300);
    // Every replica crashes: only what a flush made durable on a quorum must survive.
    for id in ["n1", "n2", "n3"] {
        c.kill9(id);
    }
    let ops = load.stop();
    let flushed = ops
        .iter()
        .filter_map(|o| match o {
            Op::Flush { seq, errno: None, .. } => Some(*seq),
            _ => None,
        })
        .max()
        .expect("no flush was acknowledged before the crash");

    // Peers first (the test below covers the other order).
    c.start_one("n2");
    c.start_one("n3");
    c.up(&[]);
    c.wait_until("the volume attached again on n1", WAIT, || {
        let st = c.status();
        let v = Cluster::volume_of(&st, VOLUME)?.clone();
        (attached_node(&v) == "n1" && v["nbd_uri"] == uri.as_str()).then_some(())
    });
    c.wait_all_healthy(VOLUME, WAIT);
    verify_load_upto(&uri, REGION_BLOCKS, 0, Some(flushed), &[&load.log]);
}

/// The node holding the attachment restarts before its peers listen: its first re-attach
/// attempts fail (no majority answers), and it must keep retrying until the peers are back
/// instead of leaving the volume detached for good.
#[test]
fn engine_node_restarting_before_its_peers_reattaches_the_volume() {
    let (c, uri) = cluster();
    let work = work_dir();
    let mut load = Load::start(&uri, work.path(), "f", REGION_BLOCKS, 0, FLUSH_EVERY);
    load.wait_for("100 acknowledged writes", WAIT, |ops| acked(ops) >= 100);
    load.stop();
    c.down();

    c.start_one("n1");
    std::thread::sleep(Duration::from_millis(1500)); // n1 probes its peers while they are down
    c.up(&[]);
    c.wait_until("the volume attached again on n1", Duration::from_secs(60), || {
        let st = c.status();
        let v = Cluster::volume_of(&st, VOLUME)?.clone();
        (attached_node(&v) == "n1" && v["nbd_uri"] == uri.as_str()).then_some(())
    });
    c.wait_all_healthy(VOLUME, WAIT);
    verify_load(&uri, REGION_BLOCKS, 0, &[&load.log]);
}

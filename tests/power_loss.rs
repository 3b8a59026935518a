//! Power cuts (design §3.8): node agents of a 3-node `hlstore dev` cluster keep their data
//! on faultfs disks (`hlstore debug faultfs`, see `tests/support/faultfs.rs`), which forget
//! everything not fsynced when the power is cut. Each test is a small fixed schedule; the
//! seeded soak is `tests/soak/power_cuts.sh`.
//!
//! Checked after every cut: the nodes restart without manual repair, every write
//! acknowledged before an acknowledged FLUSH... and indeed every acknowledged write, since
//! at most one replica loses power at a time (quorum 2 of 3) — survives, and the replicas
//! converge to identical content.

mod support;

use std::time::Duration;

use support::cluster::{max_seq, run_ok, verify_load, Cluster, Load, Op};
use support::faultfs::{Cut, PowerCluster};

const VOLUME: &str = "pl";
const SIZE: u64 = 16 << 20;
/// The load writes random blocks of the first 2 MiB.
const REGION_BLOCKS: u64 = 512;
const FLUSH_EVERY: u32 = 8;
const WAIT: Duration = Duration::from_secs(90);

fn work_dir() -> tempfile::TempDir {
    tempfile::Builder::new().prefix("hlstore-power-").tempdir().expect("temp dir")
}

fn flushes(ops: &[Op]) -> usize {
    ops.iter().filter(|o| matches!(o, Op::Flush { errno: None, .. })).count()
}

/// Waits until every node answers and `volume` is attached on `node` with every replica
/// healthy.
fn wait_attached_healthy(c: &Cluster, volume: &str, node: &str) -> serde_json::Value {
    c.wait_until(&format!("{volume} attached on {node}, every replica healthy"), WAIT, || {
        let st = c.status();
        let v = Cluster::volume_of(&st, volume)?.clone();
        let reps = v["replicas"].as_array()?;
        let healthy = reps.len() == 3 && reps.iter().all(|r| r["state"] == "healthy");
        (healthy && v["attached_node"] == node).then_some(v)
    })
}

/// Reads the whole replica of `volume` on every node and asserts they are identical.
fn assert_replicas_identical(c: &Cluster, volume: &str) {
    let mut first: Option<(String, Vec<u8>)> = None;
    for id in ["n1", "n2", "n3"] {
        let ep = c.endpoint(id);
        let mut cmd = c.command();
        cmd.args(["replica", "read", volume, "--endpoint", &ep, "--offset", "0", "--length", &SIZE.to_string()]);
        let data = run_ok(cmd.args(["--output", "-"]), Duration::from_secs(60)).into_bytes();
        assert_eq!(data.len() as u64, SIZE, "replica read on {id} returned {} bytes", data.len());
        match &first {
            None => first = Some((id.to_string(), data)),
            Some((fid, fdata)) => {
                let diff = (0..SIZE as usize / 4096).find(|b| fdata[b * 4096..(b + 1) * 4096] != data[b * 4096..(b + 1) * 4096]);
                assert!(diff.is_none(), "replicas on {fid} and {id} differ first at block {}", diff.unwrap_or(0));
            }
        }
    }
}

/// Schedule (a): the power of the whole machine (all three agents and `cluster.json` on
/// one disk) is cut right after `dev up` created and attached a volume; `dev up` must
/// bring every node back with the volume, without manual repair. Once with nothing
/// unsynced kept, once with a torn prefix kept (empty-but-present files, the case seen
/// on a real VM).
#[test]
fn whole_cluster_power_cut_right_after_dev_up() {
    for cut in [Cut::Drop, Cut::Torn(3)] {
        let pc = PowerCluster::one_disk();
        let c = &pc.cluster;
        let size = SIZE.to_string();
        let uri = c.up(&["--nodes", "3", "--volume", VOLUME, "--size", &size]);
        assert!(uri.starts_with("nbd://"), "unexpected URI {uri:?}");
        let report = pc.power_cut(&["n1", "n2", "n3"], cut);
        eprintln!("{cut:?}: {report:?}");
        let (ok, out, err) = c.try_cli(&["dev", "up", "--dir", c.path().to_str().unwrap()]);
        assert!(ok, "{cut:?}: `dev up` after the power cut failed:\n{out}\n{err}");
        let v = wait_attached_healthy(c, VOLUME, "n1");
        assert_eq!(v["size"].as_u64(), Some(SIZE), "{cut:?}: volume came back with the wrong size: {v}");
    }
}

/// Runs the load on n1's engine and cuts the power of `victims` one after another while it
/// writes; each comes back, resyncs, and the next is cut. Then checks every acknowledged
/// write and the replicas.
fn cut_during_writes(schedule: &[(&str, Cut)]) {
    let pc = PowerCluster::disk_per_node(3);
    let c = &pc.cluster;
    let size = SIZE.to_string();
    let uri = c.up(&["--nodes", "3", "--volume", VOLUME, "--size", &size]);
    let work = work_dir();
    let mut load = Load::start(&uri, work.path(), "w", REGION_BLOCKS, 0, FLUSH_EVERY);
    load.wait_for("4 acknowledged flushes", WAIT, |ops| flushes(ops) >= 4);
    for (victim, cut) in schedule {
        let before = flushes(&load.ops());
        let report = pc.power_cut(&[victim], *cut);
        eprintln!("cut {victim} {cut:?}: {report:?}");
        let dropped = report[0]["dropped_file_ops"].as_u64().unwrap_or(0);
        assert!(dropped > 0, "the cut of {victim} threw nothing away; the schedule tests nothing");
        c.start_one(victim);
        load.wait_for("writes to go on after the restart", WAIT, |ops| flushes(ops) >= before + 4);
        wait_attached_healthy(c, VOLUME, "n1");
    }
    let ops = load.stop();
    let acked = ops.iter().filter(|o| matches!(o, Op::Write { errno: None, .. })).count();
    assert!(acked > 50, "only {acked} writes acknowledged");
    eprintln!("acknowledged writes: {acked}, last seq {}", max_seq(&ops));
    wait_attached_healthy(c, VOLUME, "n1");
    let report = verify_load(&uri, REGION_BLOCKS, 0, &[&load.log]);
    eprintln!("{report}");
    assert_replicas_identical(c, VOLUME);
}

/// Schedule (b): writes + flushes through NBD; the power of one replica node (not the
/// engine's) is cut, all unsynced state dropped; it restarts, resyncs; the other replica
/// is cut with a torn prefix kept.
#[test]
fn replica_power_cuts_during_writes() {
    cut_during_writes(&[("n2", Cut::Drop), ("n3", Cut::Torn(11))]);
}

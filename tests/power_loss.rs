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

use support::cluster::{max_seq, run_tool, verify_load, Cluster, Load, Op};
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

/// Reads the whole replica of `volume` on every node of its replica set (after a replace,
/// not the node it left) and asserts they are identical.
fn assert_replicas_identical(c: &Cluster, volume: &str) {
    let st = c.status();
    let v = Cluster::volume_of(&st, volume).unwrap_or_else(|| panic!("no volume {volume} in {st}"));
    let set: Vec<String> = v["replica_set"]
        .as_array()
        .unwrap_or_else(|| panic!("no replica_set in {v}"))
        .iter()
        .map(|n| n.as_str().expect("node id").to_string())
        .collect();
    assert_eq!(set.len(), 3, "{v}");
    let mut first: Option<(String, Vec<u8>)> = None;
    for id in &set {
        let ep = c.endpoint(id);
        let mut cmd = c.command();
        cmd.env("HLSTORE_TLS_DIR", c.path().join("tls").join(id));
        cmd.args(["replica", "read", volume, "--endpoint", &ep, "--offset", "0", "--length", &SIZE.to_string()]);
        let out = run_tool(cmd.args(["--output", "-"]), Duration::from_secs(60));
        assert!(out.status.success(), "replica read on {id} failed: {}", String::from_utf8_lossy(&out.stderr));
        let data = out.stdout;
        assert_eq!(data.len() as u64, SIZE, "replica read on {id} returned {} bytes", data.len());
        match &first {
            None => first = Some((id.clone(), data)),
            Some((fid, fdata)) => {
                let diff = (0..SIZE as usize / 4096)
                    .find(|b| fdata[b * 4096..(b + 1) * 4096] != data[b * 4096..(b + 1) * 4096]);
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

/// One row of the soak table.
struct SoakRow {
    seed: u64,
    what: String,
    acked: usize,
    lost: u64,
    divergent: bool,
    verdict: String,
}

/// splitmix64, so a seed names the same schedule everywhere.
fn mix(x: &mut u64) -> u64 {
    *x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *x;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// One seeded schedule: a random replica node, a random cut mode, cut during writes, during
/// the resync that follows a first cut, or during a snapshot create. Returns the row
/// instead of panicking on a lost write, so the soak goes on.
fn soak_schedule(seed: u64) -> SoakRow {
    let mut r = seed;
    let victim = ["n2", "n3"][(mix(&mut r) % 2) as usize];
    let cut = if mix(&mut r) % 2 == 0 { Cut::Drop } else { Cut::Torn(mix(&mut r) % 1000) };
    let when = ["writes", "resync", "snapshot", "snapshot-delete", "expand", "replace"][(mix(&mut r) % 6) as usize];
    let what = format!("{victim} {} during {when}", cut.command());
    // A replace needs a spare node; the volume's replicas are on n1-n3 either way.
    let nodes = if when == "replace" { 4 } else { 3 };
    let pc = PowerCluster::disk_per_node(nodes);
    let c = &pc.cluster;
    let uri = c.up(&["--nodes", &nodes.to_string(), "--volume", VOLUME, "--size", &SIZE.to_string()]);
    let background = |args: &[&str]| {
        let mut cmd = c.command();
        cmd.args(args).args(["--endpoint", &c.endpoint("n1")]);
        cmd.stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null()).spawn()
    };
    let work = work_dir();
    let mut load = Load::start(&uri, work.path(), "w", REGION_BLOCKS, 0, FLUSH_EVERY);
    let warmup = 2 + (mix(&mut r) % 6) as usize;
    load.wait_for("warm-up flushes", WAIT, |ops| flushes(ops) >= warmup);
    match when {
        "resync" => {
            // A first cut, then a second one while the victim catches up.
            pc.power_cut(&[victim], Cut::Drop);
            std::thread::sleep(Duration::from_millis(500 + mix(&mut r) % 1500));
            c.start_one(victim);
            std::thread::sleep(Duration::from_millis(mix(&mut r) % 1000));
            pc.power_cut(&[victim], cut);
        }
        "snapshot" | "snapshot-delete" | "expand" => {
            if when == "snapshot-delete" {
                c.cli(&["snapshot", "create", VOLUME, "soak", "--endpoint", &c.endpoint("n1")]);
            }
            let size = (SIZE * 2).to_string();
            let args: &[&str] = match when {
                "snapshot" => &["snapshot", "create", VOLUME, "soak"],
                "snapshot-delete" => &["snapshot", "delete", VOLUME, "soak"],
                _ => &["volume", "expand", VOLUME, "--size", &size],
            };
            let child = background(args);
            std::thread::sleep(Duration::from_millis(mix(&mut r) % 300));
            pc.power_cut(&[victim], cut);
            if let Ok(mut ch) = child {
                let _ = ch.wait();
            }
        }
        "replace" => {
            // The victim's node dies; its replica is rebuilt on n4, whose power is cut
            // while it is being filled.
            pc.power_cut(&[victim], Cut::Drop);
            let child = background(&["volume", "replace-replica", VOLUME, "--from", victim, "--to", "n4"]);
            std::thread::sleep(Duration::from_millis(200 + mix(&mut r) % 800));
            if let Ok(mut ch) = child {
                let _ = ch.wait();
            }
            pc.power_cut(&["n4"], cut);
            c.start_one("n4");
        }
        _ => {
            pc.power_cut(&[victim], cut);
        }
    }
    c.start_one(victim);
    let before = flushes(&load.ops());
    load.wait_for("writes after the restart", WAIT, |ops| flushes(ops) >= before + 4);
    wait_attached_healthy(c, VOLUME, "n1");
    let ops = load.stop();
    let acked = ops.iter().filter(|o| matches!(o, Op::Write { errno: None, .. })).count();
    let mut cmd = std::process::Command::new(support::cluster::PYTHON);
    cmd.arg(support::cluster::script("nbd_load.py")).args(["verify", &uri, "--blocks", &REGION_BLOCKS.to_string()]);
    let out = run_tool(cmd.arg(&load.log), Duration::from_secs(120));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let lost = text
        .lines()
        .find_map(|l| l.strip_prefix("CHECKED ").and_then(|r| r.split_whitespace().nth(2)).and_then(|n| n.parse().ok()))
        .unwrap_or(u64::MAX);
    let divergent =
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| assert_replicas_identical(c, VOLUME))).is_err();
    let verdict = if lost == 0 && !divergent { "ok" } else { "FAIL" }.to_string();
    SoakRow { seed, what, acked, lost, divergent, verdict }
}

/// The seeded soak (`tests/soak/power_cuts.sh` runs it): seeds from `HLSTORE_SOAK_SEEDS`
/// (`FIRST..END`, default `1..4`); prints one table row per schedule; fails if any failed.
#[test]
#[ignore = "soak: run through tests/soak/power_cuts.sh"]
fn soak_power_cuts() {
    let spec = std::env::var("HLSTORE_SOAK_SEEDS").unwrap_or_else(|_| "1..4".into());
    let (a, b) = spec.split_once("..").expect("HLSTORE_SOAK_SEEDS is FIRST..END");
    let seeds = a.parse::<u64>().expect("first seed")..b.parse::<u64>().expect("end seed");
    let mut rows = Vec::new();
    for seed in seeds {
        let row = std::panic::catch_unwind(|| soak_schedule(seed)).unwrap_or_else(|_| SoakRow {
            seed,
            what: "(schedule panicked; see the log above)".into(),
            acked: 0,
            lost: 0,
            divergent: false,
            verdict: "FAIL".into(),
        });
        println!(
            "SOAK seed={} what={:?} acked={} lost={} divergent={} verdict={}",
            row.seed, row.what, row.acked, row.lost, row.divergent, row.verdict
        );
        rows.push(row);
    }
    println!("{:<6} {:<36} {:>7} {:>5} {:>9} verdict", "seed", "cut", "acked", "lost", "divergent");
    for r in &rows {
        println!("{:<6} {:<36} {:>7} {:>5} {:>9} {}", r.seed, r.what, r.acked, r.lost, r.divergent, r.verdict);
    }
    let failed = rows.iter().filter(|r| r.verdict != "ok").count();
    assert_eq!(failed, 0, "{failed} of {} schedules failed", rows.len());
}

//! Snapshots, revert, clone and online expand on a 3-node `hlstore dev` cluster, checked
//! with real NBD clients (qemu-io patterns, nbdinfo) through the volume's export.

mod support;

use std::process::Command;
use std::time::Duration;

use serde_json::Value;
use support::cluster::{run_ok, run_tool, Cluster};

const VOLUME: &str = "snap";
const MIB: u64 = 1 << 20;
const TOOL_TIMEOUT: Duration = Duration::from_secs(120);

fn qemu_io(uri: &str, cmds: &[&str]) {
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "raw"]);
    for c in cmds {
        cmd.args(["-c", c]);
    }
    let out = run_ok(cmd.arg(uri), TOOL_TIMEOUT);
    assert!(!out.contains("Pattern verification failed"), "qemu-io {cmds:?}:\n{out}");
}

fn json(c: &Cluster, args: &[&str]) -> Value {
    let out = c.cli(args);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{args:?} printed invalid JSON ({e}):\n{out}"))
}

/// Runs the hlstore CLI against the agent at `ep`; returns stdout.
fn via(c: &Cluster, ep: &str, args: &[&str]) -> String {
    let mut a = args.to_vec();
    a.extend(["--endpoint", ep]);
    c.cli(&a)
}

fn export_size(uri: &str) -> u64 {
    let out = run_ok(Command::new("nbdinfo").args(["--size", uri]), TOOL_TIMEOUT);
    out.trim().parse().unwrap_or_else(|_| panic!("nbdinfo --size printed {out:?}"))
}

#[test]
fn snapshot_revert_clone_expand() {
    let c = Cluster::new();
    let uri = c.up(&["--nodes", "3", "--volume", VOLUME, "--size", "64MiB"]);
    let ep = c.endpoint("n1");
    let cli = |args: &[&str]| via(&c, &ep, args);

    qemu_io(&uri, &["write -P 0x11 0 8M"]);
    cli(&["snapshot", "create", VOLUME, "s1", "--label", "purpose=test"]);
    qemu_io(&uri, &["write -P 0x22 4M 8M", "discard 0 1M"]);
    cli(&["snapshot", "create", VOLUME, "s2"]);
    // Idempotent by name: the same snapshot, not a new point.
    let again = json(&c, &["snapshot", "create", VOLUME, "s1", "--json", "--endpoint", &ep]);
    let list = json(&c, &["snapshot", "list", VOLUME, "--json", "--endpoint", &ep]);
    let names: Vec<&str> = list.as_array().expect("list").iter().map(|s| s["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["s1", "s2"], "{list}");
    assert_eq!(again["seq"], list[0]["seq"]);
    assert!(list.as_array().unwrap().iter().all(|s| s["ready"] == true), "every replica holds both: {list}");
    assert_eq!(list[0]["labels"]["purpose"], "test");

    // Changed blocks between the two: exactly the 8 MiB rewritten plus the discarded 1 MiB.
    let diff = json(&c, &["snapshot", "diff", VOLUME, "s1", "s2", "--json", "--endpoint", &ep]);
    assert_eq!(diff["bytes"].as_u64(), Some(9 * MIB), "{diff}");
    let none = json(&c, &["snapshot", "diff", VOLUME, "s2", "--json", "--endpoint", &ep]);
    assert_eq!(none["bytes"].as_u64(), Some(0), "nothing written since s2: {none}");

    // A snapshot reads back while the volume keeps being written: clone s1.
    qemu_io(&uri, &["write -P 0x33 32M 1M"]);
    let clone = json(&c, &["volume", "clone", VOLUME, "c1", "--snapshot", "s1", "--json", "--endpoint", &ep]);
    assert_eq!((clone["name"].as_str(), clone["size"].as_u64()), (Some("c1"), Some(64 * MIB)), "{clone}");
    let attached = json(&c, &["volume", "attach", "c1", "--node", "n2", "--json", "--endpoint", &ep]);
    assert_eq!(attached["attached_node"], "n2", "{attached}");
    let c1 = attached["nbd_uri"].as_str().expect("nbd_uri").to_string();
    qemu_io(&c1, &["read -P 0x11 0 8M", "read -P 0 8M 56M"]);
    let detached = json(&c, &["volume", "detach", "c1", "--json", "--endpoint", &ep]);
    assert_eq!(detached, serde_json::json!({"volume": "c1", "detached": true}));

    // Online expand: a new connection sees the new size and can use it.
    let expanded = json(&c, &["volume", "expand", VOLUME, "--size", "128MiB", "--json", "--endpoint", &ep]);
    assert_eq!(expanded["size"].as_u64(), Some(128 * MIB), "{expanded}");
    assert_eq!(export_size(&uri), 128 * MIB);
    qemu_io(&uri, &["write -P 0x44 100M 1M", "read -P 0x44 100M 1M"]);
    let (ok, _, err) = c.try_cli(&["volume", "expand", VOLUME, "--size", "64MiB", "--endpoint", &ep]);
    assert!(!ok && err.contains("at least the current size"), "shrinking must be refused: {err}");

    // Revert needs a detached volume, then restores s1 everywhere it differs.
    let (ok, _, err) = c.try_cli(&["snapshot", "revert", VOLUME, "s1", "--endpoint", &ep]);
    assert!(!ok && err.contains("detach it first"), "revert while attached: {err}");
    cli(&["volume", "detach", VOLUME]);
    let reverted = json(&c, &["snapshot", "revert", VOLUME, "s1", "--json", "--endpoint", &ep]);
    assert_eq!(reverted, serde_json::json!({"volume": VOLUME, "reverted_to": "s1"}));
    let uri = cli(&["volume", "attach", VOLUME, "--node", "n1"]).trim().to_string();
    qemu_io(&uri, &["read -P 0x11 0 8M", "read -P 0 8M 120M"]);

    // Delete: gone from every replica; unknown names are reported, not errors.
    let deleted = json(&c, &["snapshot", "delete", VOLUME, "s2", "--json", "--endpoint", &ep]);
    assert_eq!(deleted, serde_json::json!({"volume": VOLUME, "snapshot": "s2", "existed": true}));
    let list = json(&c, &["snapshot", "list", VOLUME, "--json", "--endpoint", &ep]);
    assert_eq!(list.as_array().unwrap().len(), 1, "{list}");
    assert!(cli(&["snapshot", "delete", VOLUME, "s2"]).contains("did not exist"));
    let (ok, _, err) = c.try_cli(&["snapshot", "revert", VOLUME, "nope", "--endpoint", &ep]);
    assert!(!ok && !err.is_empty(), "revert to an unknown snapshot must fail");
    let gone = json(&c, &["volume", "delete", "c1", "--json", "--endpoint", &ep]);
    assert_eq!(gone, serde_json::json!({"volume": "c1", "existed": true}));
    let again = json(&c, &["volume", "delete", "c1", "--json", "--endpoint", &ep]);
    assert_eq!(again, serde_json::json!({"volume": "c1", "existed": false}));
    let out = run_tool(Command::new(env!("CARGO_BIN_EXE_hlstore")).args(["snapshot", "--help"]), TOOL_TIMEOUT);
    assert!(String::from_utf8_lossy(&out.stdout).contains("revert"));
}

/// The bytes of `snap` on `node`'s own replica (not through an engine).
fn replica_snapshot(c: &Cluster, node: &str, snap: &str, len: u64) -> Vec<u8> {
    let ep = c.endpoint(node);
    let mut out = Vec::new();
    for off in (0..len).step_by((2 * MIB) as usize) {
        let o = c
            .command()
            .env("HLSTORE_TLS_DIR", c.path().join("tls").join(node))
            .args(["replica", "read", VOLUME, "--snapshot", snap, "--endpoint", &ep])
            .args(["--offset", &off.to_string(), "--length", &(2 * MIB).to_string()])
            .output()
            .expect("run hlstore replica read");
        assert!(o.status.success(), "replica read on {node}: {}", String::from_utf8_lossy(&o.stderr));
        out.extend(o.stdout);
    }
    out
}

/// A replica node that is SIGKILLed around snapshot create and delete ends up with exactly
/// the snapshots of its peers, byte-identical, once it has resynced.
#[test]
fn snapshots_survive_a_replica_sigkill() {
    let c = Cluster::new();
    let uri = c.up(&["--nodes", "3", "--volume", VOLUME, "--size", "64MiB"]);
    let ep = c.endpoint("n1");
    let cli = |args: &[&str]| via(&c, &ep, args);
    qemu_io(&uri, &["write -P 0x11 0 16M"]);
    cli(&["snapshot", "create", VOLUME, "k0"]);
    qemu_io(&uri, &["write -P 0x12 0 4M"]);

    // Killed while snapshots are being taken (the kill lands during the fifth create):
    // every create that succeeded must end up on every replica.
    let pid = c.pid("n3").expect("n3 runs");
    let mut killer = None;
    let mut taken = Vec::new();
    for i in 0..12 {
        if i == 4 {
            killer = Some(std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(20));
                // SAFETY: kill(2) on the pid of this test's own node agent.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }));
        }
        let name = format!("k{}", i + 1);
        let (ok, _, _) = c.try_cli(&["snapshot", "create", VOLUME, &name, "--endpoint", &ep]);
        if ok {
            taken.push(name);
        }
        qemu_io(&uri, &[&format!("write -P {} {}M 1M", 0x20 + i, i)]);
    }
    killer.expect("killer started").join().expect("killer thread");
    assert!(taken.len() >= 10, "snapshots must keep working with one replica down: {taken:?}");
    c.wait_until("n3 marked failed", Duration::from_secs(60), || {
        let v = c.volume_show("n1", VOLUME);
        (Cluster::replica_of(&v, "n3")?["state"] == "failed").then_some(())
    });
    // Deleted while n3 is down: n3 must drop it when it comes back.
    assert!(cli(&["snapshot", "delete", VOLUME, "k0"]).contains("deleted"));
    qemu_io(&uri, &["write -P 0x77 32M 8M"]);

    c.start_one("n3");
    c.wait_all_healthy(VOLUME, Duration::from_secs(120));
    let list = json(&c, &["snapshot", "list", VOLUME, "--json", "--endpoint", &ep]);
    let names: Vec<&str> = list.as_array().unwrap().iter().map(|s| s["name"].as_str().unwrap()).collect();
    for t in &taken {
        assert!(names.contains(&t.as_str()), "{t} lost: {list}");
    }
    assert!(!names.contains(&"k0"), "k0 was deleted: {list}");
    assert!(list.as_array().unwrap().iter().all(|s| s["ready"] == true), "every replica holds every snapshot: {list}");
    for snap in [taken.first().unwrap(), taken.last().unwrap()] {
        let want = replica_snapshot(&c, "n1", snap, 48 * MIB);
        assert!(replica_snapshot(&c, "n3", snap, 48 * MIB) == want, "{snap} differs on n3");
        assert!(replica_snapshot(&c, "n2", snap, 48 * MIB) == want, "{snap} differs on n2");
    }
}

/// Reads through the agent's ReadSnapshot, as backups do (`len` bytes at 0).
fn agent_read(c: &Cluster, node: &str, snap: &str, len: u64) -> Result<Vec<u8>, tonic::Status> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    rt.block_on(async {
        let mut vc = c.volumes(node).await;
        let req = hlstore_proto::volume::ReadSnapshotRequest {
            volume: VOLUME.into(),
            name: snap.into(),
            offset: 0,
            length: len,
        };
        let mut stream = vc.read_snapshot(req).await?.into_inner();
        let mut out = Vec::new();
        while let Some(chunk) = stream.message().await? {
            out.extend_from_slice(&chunk.data);
        }
        Ok(out)
    })
}

/// The agent remembers which node holds a snapshot it is asked to read (a backup reads one
/// in hundreds of requests): a snapshot deleted, or deleted and taken again under the same
/// name, must never be answered from what was remembered.
#[test]
fn snapshot_reads_follow_deletes_and_retakes() {
    let c = Cluster::new();
    let uri = c.up(&["--nodes", "3", "--volume", VOLUME, "--size", "16MiB"]);
    let ep = c.endpoint("n1");
    let cli = |args: &[&str]| via(&c, &ep, args);
    qemu_io(&uri, &["write -P 0x31 0 1M"]);
    cli(&["snapshot", "create", VOLUME, "again"]);
    for node in ["n1", "n2"] {
        let got = agent_read(&c, node, "again", MIB).expect("read the snapshot");
        assert!(got.iter().all(|&b| b == 0x31), "{node}: first snapshot");
    }
    qemu_io(&uri, &["write -P 0x32 0 1M"]);
    cli(&["snapshot", "delete", VOLUME, "again"]);
    for node in ["n1", "n2"] {
        let err = agent_read(&c, node, "again", MIB).expect_err("a deleted snapshot reads");
        assert_eq!(err.code(), tonic::Code::NotFound, "{node}: {err:?}");
    }
    cli(&["snapshot", "create", VOLUME, "again"]);
    for node in ["n1", "n2"] {
        let got = agent_read(&c, node, "again", MIB).expect("read the new snapshot");
        assert!(got.iter().all(|&b| b == 0x32), "{node}: the retaken snapshot shows the old content");
    }
}

/// `volume clone` hands out a clone only once its copy is complete: a clone cut short (the
/// agent copying it killed, or a half copy left behind) is copied again by the next call,
/// never returned as done; a clone too old to say is refused; a leftover temporary
/// snapshot of an interrupted clone is replaced, and deleted after the copy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clone_cut_short_is_copied_again_never_returned_as_done() {
    use hlstore_proto::volume as vpb;
    let c = Cluster::new();
    let uri = c.up(&["--nodes", "3", "--volume", VOLUME, "--size", "64MiB"]);
    let (ep1, ep2) = (c.endpoint("n1"), c.endpoint("n2"));
    qemu_io(&uri, &["write -P 0x3d 0 64M"]);
    let mut agent = c.volumes("n2").await;
    let state = |v: &Value| v["labels"]["hlstore.io/clone-state"].as_str().unwrap_or("").to_string();

    // ----- a half copy left behind: the labels a copy starts with, part of the data -----
    let labels = [("hlstore.io/clone-of", VOLUME), ("hlstore.io/clone-state", "copying:0123456789abcdef")];
    let req = vpb::CreateVolumeRequest {
        name: "half".into(),
        size: 64 * MIB,
        labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        ..Default::default()
    };
    agent.create_volume(req).await.expect("half-copied volume");
    let half = via(&c, &ep1, &["volume", "attach", "half", "--node", "n1"]).trim().to_string();
    qemu_io(&half, &["write -P 0x3d 0 2M", "write -P 0xee 30M 2M"]);
    via(&c, &ep1, &["volume", "detach", "half"]);
    let cloned = json(&c, &["volume", "clone", VOLUME, "half", "--json", "--endpoint", &ep2]);
    assert_eq!(state(&cloned), "done", "{cloned}");
    let again = json(&c, &["volume", "clone", VOLUME, "half", "--json", "--endpoint", &ep1]);
    assert_eq!((again["name"].as_str(), state(&again).as_str()), (Some("half"), "done"), "a done clone is returned");
    let half = via(&c, &ep1, &["volume", "attach", "half", "--node", "n2"]).trim().to_string();
    qemu_io(&half, &["read -P 0x3d 0 64M"]);
    via(&c, &ep1, &["volume", "detach", "half"]);

    // ----- a clone made before clones recorded their state: refused, not guessed -----
    let req = vpb::CreateVolumeRequest {
        name: "legacy".into(),
        size: 64 * MIB,
        labels: [("hlstore.io/clone-of".to_string(), VOLUME.to_string())].into_iter().collect(),
        ..Default::default()
    };
    agent.create_volume(req).await.expect("legacy clone");
    let (ok, _, err) = c.try_cli(&["volume", "clone", VOLUME, "legacy", "--endpoint", &ep1]);
    assert!(!ok && err.contains("may be incomplete") && err.contains("volume delete legacy"), "{err}");

    // ----- a leftover temporary snapshot holds older content: the clone gets today's -----
    via(&c, &ep1, &["snapshot", "create", VOLUME, "clone-fresh"]);
    qemu_io(&uri, &["write -P 0x4e 8M 4M"]);
    json(&c, &["volume", "clone", VOLUME, "fresh", "--json", "--endpoint", &ep1]);
    let fresh = via(&c, &ep1, &["volume", "attach", "fresh", "--node", "n2"]).trim().to_string();
    qemu_io(&fresh, &["read -P 0x3d 0 8M", "read -P 0x4e 8M 4M", "read -P 0x3d 12M 52M"]);
    via(&c, &ep1, &["volume", "detach", "fresh"]);
    let snaps = json(&c, &["snapshot", "list", VOLUME, "--json", "--endpoint", &ep1]);
    assert_eq!(snaps.as_array().map(Vec::len), Some(0), "the temporary snapshot is gone: {snaps}");

    // ----- the agent that copies is SIGKILLed mid-copy -----
    let mut cli = c.command();
    cli.args(["volume", "clone", VOLUME, "killed", "--endpoint", &ep1]).stdout(std::process::Stdio::null());
    let mut child = cli.stderr(std::process::Stdio::null()).spawn().expect("clone");
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while agent.get_volume(vpb::GetVolumeRequest { name: "killed".into() }).await.is_err() {
        assert!(std::time::Instant::now() < deadline, "the clone never created its volume");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    c.kill9("n1");
    let _ = child.wait();
    let left = agent.get_volume(vpb::GetVolumeRequest { name: "killed".into() }).await.expect("killed").into_inner();
    let left_state = left.labels.get("hlstore.io/clone-state").cloned().unwrap_or_default();
    eprintln!("after the kill: clone state {left_state:?}");
    assert!(left_state.starts_with("copying") || left_state == "done", "{left_state:?}");
    c.start_one("n1");
    // The copy again (or, had it finished before the kill, the clone as it is).
    let cloned = c.wait_until("the clone copied again", Duration::from_secs(120), || {
        let (ok, out, _) = c.try_cli(&["volume", "clone", VOLUME, "killed", "--json", "--endpoint", &ep2]);
        ok.then(|| serde_json::from_str::<Value>(&out).expect("JSON"))
    });
    assert_eq!(state(&cloned), "done", "{cloned}");
    let killed = via(&c, &ep2, &["volume", "attach", "killed", "--node", "n2"]).trim().to_string();
    qemu_io(&killed, &["read -P 0x3d 0 8M", "read -P 0x4e 8M 4M", "read -P 0x3d 12M 52M"]);
    via(&c, &ep2, &["volume", "detach", "killed"]);
    let snaps = json(&c, &["snapshot", "list", VOLUME, "--json", "--endpoint", &ep2]);
    assert_eq!(snaps.as_array().map(Vec::len), Some(0), "no temporary snapshot left: {snaps}");
}

//! Concurrent control operations (design §3.1, §3.8) on node agents in network namespaces
//! (`support::netns`): racing attaches of one volume on two nodes, and a replica
//! replacement while another replica lags. Data is checked with the history checker.

mod support;

use std::sync::Barrier;
use std::time::Duration;

use support::history::{Check, Client, ClientOpts};
use support::netns::NetCluster;

const BLOCKS: u64 = 256;
const WAIT: Duration = Duration::from_secs(60);

/// Two `hlstore volume attach` of one volume, on n2 and on n3, released at the same moment
/// (first on a detached volume, then as a takeover from n1): at most one succeeds, and a
/// writer on each node (whatever the attaches answered) never sees two engines
/// acknowledging writes in overlapping periods.
#[test]
fn simultaneous_attaches_leave_at_most_one_writing_engine() {
    let Some(c) = NetCluster::start(3) else { return };
    let work = c.path().to_path_buf();
    let mut problems = Vec::new();
    for (round, takeover) in [(0u64, false), (1, true)] {
        let vol = format!("race{round}");
        c.cli("n1", &["volume", "create", &vol, "--size", "64MiB", "--replicas", "3"]);
        if takeover {
            c.cli("n1", &["volume", "attach", &vol, "--node", "n1"]);
        }
        let barrier = Barrier::new(2);
        let results: Vec<(String, bool, String)> = std::thread::scope(|s| {
            let hs: Vec<_> = ["n2", "n3"]
                .iter()
                .map(|node| {
                    let (c, barrier, vol) = (&c, &barrier, &vol);
                    s.spawn(move || {
                        barrier.wait();
                        let (ok, out, err, secs) = c.try_cli(node, &["volume", "attach", vol, "--node", node]);
                        eprintln!(
                            "round {round}: attach on {node}: ok={ok} after {secs:.1}s {}{}",
                            out.trim(),
                            err.trim()
                        );
                        (node.to_string(), ok, out)
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().expect("attach thread")).collect()
        });
        // A writer on each racing node, whatever the attaches said.
        let uri = format!("nbd://127.0.0.1:10809/{vol}");
        let mut o = ClientOpts::new(BLOCKS);
        o.duration = 6.0;
        o.op_timeout = 10.0;
        let mut writers = Vec::new();
        for (i, node) in ["n2", "n3"].iter().enumerate() {
            o.seq_base = (round * 10 + i as u64 + 1) * 1_000_000;
            o.seed = o.seq_base;
            writers.push((node.to_string(), Client::writer(c.python(node), &uri, &work, &format!("{vol}-{node}"), &o)));
        }
        for (_, w) in &mut writers {
            w.wait_exit(WAIT);
        }
        let mut check = Check::new(BLOCKS);
        for (node, w) in &writers {
            check = check.writer(node, w);
        }
        let v = check.run();
        let won = results.iter().filter(|(_, ok, _)| *ok).count();
        if won > 1 {
            problems.push(format!("round {round}: both racing attaches succeeded: {results:?}"));
        }
        if v.get("double_writer") > 0 {
            problems.push(format!("round {round}: two engines acknowledged writes at once:\n{}", v.table));
        }
        if v.get("acked_writes") == 0 && won > 0 {
            problems.push(format!("round {round}: an attach succeeded but no writer got an acknowledgement"));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// `hlstore volume replace-replica` while another replica of the volume lags behind (it
/// missed writes and is still being resynced) must refuse: replacing a healthy replica then
/// would leave a single up-to-date copy. Afterwards the data is intact everywhere.
#[test]
fn replace_replica_refuses_while_another_replica_lags() {
    // A slow resync keeps n2 behind long enough to ask for the replacement.
    let Some(c) = NetCluster::start_with_env(4, &[("HLSTORE_RESYNC_MIBPS", "1")]) else { return };
    let vol = "lag";
    c.cli("n1", &["volume", "create", vol, "--size", "64MiB", "--replicas", "3", "--nodes", "n1,n2,n3"]);
    let uri = c.cli("n1", &["volume", "attach", vol, "--node", "n1"]).trim().to_string();
    c.cut("n2");
    let write =
        c.command("n1", "qemu-io").args(["-f", "raw", "-c", "write -P 0x5a 0 8M", "-c", "flush", &uri]).output();
    assert!(write.as_ref().is_ok_and(|o| o.status.success()), "qemu-io write failed: {write:?}");
    // n2 is behind when the engine says so or holds an older last_seq than the others.
    let lagging = |v: &serde_json::Value| {
        let reps = v["replicas"].as_array().cloned().unwrap_or_default();
        let newest = reps.iter().filter_map(|r| r["last_seq"].as_u64()).max().unwrap_or(0);
        reps.iter()
            .find(|r| r["node"] == "n2")
            .is_some_and(|r| r["state"] != "healthy" || r["last_seq"].as_u64() < Some(newest))
    };
    let deadline = std::time::Instant::now() + WAIT;
    while c.volume_show("n1", vol)["replicas"]
        .as_array()
        .and_then(|r| r.iter().find(|r| r["node"] == "n2"))
        .is_none_or(|r| r["state"] != "failed")
    {
        assert!(std::time::Instant::now() < deadline, "the engine never marked the cut-off n2 failed");
        std::thread::sleep(Duration::from_millis(300));
    }
    c.heal("n2");
    let v = c.volume_show("n1", vol);
    assert!(lagging(&v), "n2 should lag after missing 8 MiB of writes: {v}");

    let (ok, out, err, secs) = c.try_cli("n1", &["volume", "replace-replica", vol, "--from", "n3", "--to", "n4"]);
    eprintln!("replace-replica n3 -> n4 while n2 lags: ok={ok} after {secs:.1}s\n{out}{err}");
    let after = c.wait_converged("n1", vol, WAIT);
    let uri = after["nbd_uri"].as_str().unwrap_or(&uri).to_string();
    let via = after["attached_node"].as_str().unwrap_or("n1").to_string();
    let read = c.command(&via, "qemu-io").args(["-f", "raw", "-c", "read -P 0x5a 0 8M", &uri]).output();
    assert!(
        read.as_ref().is_ok_and(
            |o| o.status.success() && !String::from_utf8_lossy(&o.stdout).contains("Pattern verification failed")
        ),
        "data written before the replace does not read back: {read:?}"
    );
    let set: Vec<String> = after["replica_set"]
        .as_array()
        .expect("replica_set")
        .iter()
        .filter_map(|n| n.as_str().map(String::from))
        .collect();
    let mut check = Check::new(2048);
    check.fill = 0x5a;
    for n in &set {
        let p = c.file(&format!("replica-{n}.img"));
        c.dump_replica(n, vol, 2048, &p);
        check = check.replica(n, &p);
    }
    check.run().assert_ok("replicas after the refused replacement");
    assert!(!ok, "replace-replica was accepted while n2 was behind (replica set now {set:?})");
    assert_eq!(set, ["n1", "n2", "n3"], "a refused replacement must leave the replica set alone");
    assert!(!err.trim().is_empty(), "the refusal must say why");
}

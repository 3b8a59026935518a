//! Replacing a replica on a dead node with one on a new node: the new replica gets a full,
//! sparse copy (only allocated blocks), the volume stays attached where it was, and the
//! new replica alone serves every byte that was written.

mod support;

use std::time::Duration;

use support::cluster::{qemu_io, Cluster};

const WAIT: Duration = Duration::from_secs(90);
const MIB: u64 = 1 << 20;

#[test]
fn replica_on_a_dead_node_is_replaced_by_a_sparse_full_copy_on_a_new_node() {
    let c = Cluster::new();
    let uri = c.up(&["--nodes", "4", "--volume", "r", "--size", "256MiB", "--replicas", "3"]);
    let st = c.status();
    let v = Cluster::volume_of(&st, "r").expect("volume r").clone();
    assert_eq!(v["replica_set"], serde_json::json!(["n1", "n2", "n3"]), "{v}");
    // 12 MiB of data in a 256 MiB volume.
    qemu_io(&uri, &["write -P 0x5a 0 8M", "write -P 0x33 128M 4M"]);
    // A snapshot, then 1 MiB overwritten: the rebuilt replica must carry the snapshot with
    // the version it saw.
    let ep = c.endpoint("n1");
    c.cli(&["snapshot", "create", "r", "before", "--endpoint", &ep]);
    qemu_io(&uri, &["write -P 0x66 0 1M"]);
    c.kill9("n3");

    let out = c.cli(&["volume", "replace-replica", "r", "--from", "n3", "--to", "n4", "--endpoint", &ep]);
    assert!(out.contains("replicas now n1, n2, n4"), "{out}");
    let v = c.wait_all_healthy("r", WAIT);
    assert_eq!(v["replica_set"], serde_json::json!(["n1", "n2", "n4"]), "{v}");
    assert_eq!(v["attached_node"], "n1", "the volume stays attached where it was: {v}");
    assert_eq!(v["nbd_uri"], uri.as_str());
    let n4 = Cluster::replica_of(&v, "n4").expect("n4 replica").clone();
    let allocated = n4["allocated_bytes"].as_u64().unwrap();
    assert_eq!(allocated, 12 * MIB, "the copy holds exactly the allocated blocks (sparse): {n4}");

    // Writes during and after the move reach the new replica too.
    qemu_io(&uri, &["write -P 0x77 64M 1M"]);

    // The new replica must hold everything: with n1 stopped, attach on n4 (n2 + n4 are a
    // majority) and read; reads go to the engine's local replica, n4's.
    c.cli(&["volume", "detach", "r", "--endpoint", &ep]);
    c.kill9("n1");
    let ep4 = c.endpoint("n4");
    let uri4 = c.cli(&["volume", "attach", "r", "--node", "n4", "--endpoint", &ep4]).trim().to_string();
    qemu_io(
        &uri4,
        &["read -P 0x66 0 1M", "read -P 0x5a 1M 7M", "read -P 0x33 128M 4M", "read -P 0x77 64M 1M", "read -P 0 8M 56M"],
    );
    // And read n4's replica directly, bypassing the engine: live data and the snapshot.
    let reads = [
        ("0", MIB, 0x66_u8, None),
        ("1MiB", 7 * MIB, 0x5a, None),
        ("128MiB", 4 * MIB, 0x33, None),
        ("64MiB", MIB, 0x77, None),
        ("0", 2 * MIB, 0x5a, Some("before")),
        ("64MiB", MIB, 0, Some("before")),
    ];
    for (offset, len, fill, snap) in reads {
        let out = c.path().join("direct.bin");
        let (len_s, out_s) = (len.to_string(), out.to_str().unwrap().to_string());
        let mut args = vec!["replica", "read", "r", "--offset", offset, "--length", &len_s, "--output", &out_s];
        args.extend(["--endpoint", &ep4]);
        if let Some(s) = snap {
            args.extend(["--snapshot", s]);
        }
        c.cli_as("n4", &args);
        let data = std::fs::read(&out).unwrap();
        assert_eq!(data.len() as u64, len);
        assert!(data.iter().all(|&b| b == fill), "n4's replica ({snap:?}) at {offset} does not hold 0x{fill:02x}");
    }

    // The old node comes back: it is not part of the volume any more and does not take
    // it back.
    c.up(&[]);
    let st = c.status();
    let v = Cluster::volume_of(&st, "r").expect("volume r").clone();
    assert_eq!(v["replica_set"], serde_json::json!(["n1", "n2", "n4"]), "{v}");
    assert_eq!(v["attached_node"], "n4", "{v}");
    let (ok, _, err) = c.try_cli(&["volume", "replace-replica", "r", "--from", "n3", "--to", "n4", "--endpoint", &ep4]);
    assert!(!ok && err.contains("no replica on node n3"), "{err}");
}

#[test]
fn replace_refuses_while_another_replica_is_behind_and_deletes_the_old_one_only_once_the_new_one_is_filled() {
    let c = Cluster::new();
    let uri = c.up(&["--nodes", "4", "--volume", "q", "--size", "64MiB", "--replicas", "3"]);
    qemu_io(&uri, &["write -P 0x5a 0 4M"]);
    let ep = c.endpoint("n1");
    // n2 goes down and misses writes: replacing n3 now would leave acknowledged writes on
    // n1 alone (n4 counts for nothing until its copy is done).
    c.kill9("n2");
    qemu_io(&uri, &["write -P 0x5b 4M 1M"]);
    let (ok, _, err) = c.try_cli(&["volume", "replace-replica", "q", "--from", "n3", "--to", "n4", "--endpoint", &ep]);
    assert!(!ok, "replace must be refused while n2 is behind");
    assert!(err.contains("another replica is behind") && err.contains("n2"), "{err}");
    let v = c.volume_show("n1", "q");
    assert_eq!(v["replica_set"], serde_json::json!(["n1", "n2", "n3"]), "nothing changed: {v}");

    // Once n2 caught up, the replace goes ahead; n3's replica is deleted only after n4's
    // copy is done.
    c.start_one("n2");
    c.wait_all_healthy("q", WAIT);
    let out = c.cli(&["volume", "replace-replica", "q", "--from", "n3", "--to", "n4", "--endpoint", &ep]);
    assert!(out.contains("replicas now n1, n2, n4"), "{out}");
    let v = c.wait_all_healthy("q", WAIT);
    assert_eq!(v["replica_set"], serde_json::json!(["n1", "n2", "n4"]), "{v}");
    let ep3 = c.endpoint("n3");
    c.wait_until("the replaced replica on n3 is deleted", WAIT, || {
        let list: serde_json::Value =
            serde_json::from_str(&c.cli_as("n3", &["replica", "list", "--json", "--endpoint", &ep3])).ok()?;
        list.as_array()?.iter().all(|r| r["volume_id"] != "q").then_some(())
    });
    qemu_io(&uri, &["read -P 0x5a 0 4M", "read -P 0x5b 4M 1M"]);
}

#[test]
fn a_stale_replica_on_the_new_node_is_dropped_and_the_new_one_starts_empty() {
    let c = Cluster::new();
    let uri = c.up(&["--nodes", "4", "--volume", "s", "--size", "64MiB", "--replicas", "3"]);
    qemu_io(&uri, &["write -P 0x5a 0 4M"]);
    let (ep, ep4) = (c.endpoint("n1"), c.endpoint("n4"));
    // n4 holds a replica of s outside its set (left by an earlier replace, or a stray),
    // with data where the volume has none.
    c.cli_as("n4", &["replica", "create", "s", "--size", "64MiB", "--endpoint", &ep4]);
    let junk = c.path().join("junk.bin");
    std::fs::write(&junk, vec![0xee_u8; MIB as usize]).unwrap();
    c.cli_as(
        "n4",
        &["replica", "write", "s", "--offset", "32MiB", "--input", junk.to_str().unwrap(), "--endpoint", &ep4],
    );

    let out = c.cli(&["volume", "replace-replica", "s", "--from", "n3", "--to", "n4", "--endpoint", &ep]);
    assert!(out.contains("replicas now n1, n2, n4"), "{out}");
    let v = c.wait_all_healthy("s", WAIT);
    assert_eq!(v["replica_set"], serde_json::json!(["n1", "n2", "n4"]), "{v}");
    assert_eq!(v["attached_node"], "n1", "the volume stays attached where it was: {v}");
    let n4 = Cluster::replica_of(&v, "n4").expect("n4 replica").clone();
    assert_eq!(n4["allocated_bytes"].as_u64().unwrap(), 4 * MIB, "n4 holds the volume's blocks only: {n4}");
    // n4's replica, read directly: the volume's data, and zeroes where the stray had junk.
    for (offset, fill) in [("0", 0x5a_u8), ("32MiB", 0)] {
        let out = c.path().join("direct.bin");
        let out_s = out.to_str().unwrap().to_string();
        let args = ["replica", "read", "s", "--offset", offset, "--length", "1048576", "--output", &out_s];
        c.cli_as("n4", &[&args[..], &["--endpoint", &ep4]].concat());
        let data = std::fs::read(&out).unwrap();
        assert!(data.iter().all(|&b| b == fill), "n4's replica at {offset} does not hold 0x{fill:02x}");
    }
    qemu_io(&uri, &["read -P 0x5a 0 4M", "read -P 0 32M 1M"]);
}

//! Self-healing on a real 3-node `hlstore dev` cluster: a block damaged in a replica's slot
//! file on disk (bit rot) is read through NBD with the right content, the replica stays in
//! service, the block is rewritten on that replica, and the node's metrics count it;
//! `hlstore volume scrub` then repairs a block no client reads. A second cluster runs the
//! background scrub, which finds and repairs such a block by itself.

mod support;

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use support::cluster::{run_ok, Cluster};

const BLOCK: usize = 4096;

/// The slot file of the only volume on node `id`.
fn slot_file(c: &Cluster, id: &str) -> PathBuf {
    let dir = c.path().join(id).join("data").join("volumes");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "slots"))
        .collect();
    assert_eq!(files.len(), 1, "one slot file expected in {}: {files:?}", dir.display());
    files.remove(0)
}

/// File offsets of every slot holding exactly `want`.
fn slots_holding(path: &Path, want: &[u8]) -> Vec<u64> {
    let data = std::fs::read(path).expect("read slot file");
    data.chunks(BLOCK).enumerate().filter(|(_, s)| *s == want).map(|(i, _)| (i * BLOCK) as u64).collect()
}

/// Flips bytes in the middle of the slot holding `want` (through the page cache, as bit rot
/// under a running agent would look once the cache is dropped). Returns the slot's offset.
fn corrupt_slot(path: &Path, want: &[u8]) -> u64 {
    let found = slots_holding(path, want);
    assert_eq!(found.len(), 1, "the block should be stored once in {}", path.display());
    let f = std::fs::OpenOptions::new().write(true).open(path).expect("open slot file");
    f.write_all_at(&[!want[100]; 16], found[0] + 100).expect("damage the slot");
    f.sync_all().expect("sync");
    found[0]
}

fn metric(c: &Cluster, node: &str, name: &str) -> f64 {
    let page = support::http_get(&c.metrics_addr(node), "/metrics");
    page.lines()
        .find(|l| l.starts_with(&format!("{name}{{volume=\"h\"}}")))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no {name} for volume h on {node}:\n{page}"))
}

fn qemu_io(uri: &str, cmds: &[&str]) -> String {
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "raw"]);
    for c in cmds {
        cmd.args(["-c", c]);
    }
    let out = run_ok(cmd.arg(uri), Duration::from_secs(60));
    assert!(!out.contains("Pattern verification failed") && !out.contains("failed"), "qemu-io {cmds:?}:\n{out}");
    out
}

fn engine_node(c: &Cluster) -> String {
    let v = c.volume_show("n1", "h");
    v["attached_node"].as_str().expect("attached").to_string()
}

#[test]
fn a_block_damaged_on_disk_is_served_from_another_replica_and_rewritten() {
    let mut c = Cluster::new();
    c.env.push(("HLSTORE_SCRUB_MIBPS".into(), "0".into()));
    let uri = c.up(&["--nodes", "3", "--volume", "h", "--size", "16MiB"]);
    c.wait_all_healthy("h", Duration::from_secs(60));
    qemu_io(&uri, &["write -P 0x5a 1M 4k", "flush"]);
    let want = vec![0x5au8; BLOCK];
    // The engine reads its local replica first: damage that one.
    let node = engine_node(&c);
    let file = slot_file(&c, &node);
    let bad_slot = corrupt_slot(&file, &want);

    qemu_io(&uri, &["read -P 0x5a 1M 4k"]);

    c.wait_until("the repair counted", Duration::from_secs(30), || {
        (metric(&c, &node, "hlstore_volume_read_repairs_total") == 1.0).then_some(())
    });
    let page = support::http_get(&c.metrics_addr(&node), "/metrics");
    assert!(support::cluster::metric_sum(&page, "hlstore_replica_corruptions_total") >= 1.0);
    assert_eq!(metric(&c, &node, "hlstore_volume_unrecoverable_blocks_total"), 0.0);
    // The replica stayed in service.
    let v = c.volume_show("n1", "h");
    for r in v["replicas"].as_array().expect("replicas") {
        assert_eq!(r["state"], "healthy", "{v}");
    }
    // Rewritten on that replica's disk (copy-on-write: a new slot holds the good block)
    // and readable from the replica itself.
    let good = slots_holding(&file, &want);
    assert!(good.iter().any(|&s| s != bad_slot), "no intact copy in {}: {good:?}", file.display());
    let ep = c.endpoint(&node);
    let out = c.path().join("replica-block");
    let out_s = out.to_str().expect("utf-8");
    c.cli_as(
        &node,
        &["replica", "read", "h", "--offset", "1MiB", "--length", "4KiB", "--output", out_s, "--endpoint", &ep],
    );
    assert_eq!(std::fs::read(&out).expect("replica read output"), want);
    // And reads keep working from every path.
    qemu_io(&uri, &["read -P 0x5a 1M 4k", "write -P 0x33 1M 4k", "read -P 0x33 1M 4k", "flush"]);

    // `volume scrub` finds and repairs a damaged block on a replica no read touches.
    let want = vec![0x33u8; BLOCK];
    let victim = ["n1", "n2", "n3"].into_iter().find(|n| *n != node).expect("another node");
    let vfile = slot_file(&c, victim);
    corrupt_slot(&vfile, &want);
    let ep1 = c.endpoint("n1");
    let out = c.cli(&["volume", "scrub", "h", "--json", "--endpoint", &ep1]);
    let r: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(r["replicas"], 3, "{r}");
    assert_eq!(r["blocks"], 16 * 256, "every block of 16 MiB compared: {r}");
    assert_eq!((r["corrupt"].as_u64(), r["repaired"].as_u64()), (Some(1), Some(1)), "{r}");
    assert_eq!((r["divergent"].as_u64(), r["unrecoverable"].as_u64()), (Some(0), Some(0)), "{r}");
    assert!(!slots_holding(&vfile, &want).is_empty(), "the good block is back on {victim}");
    let out = c.cli(&["volume", "scrub", "h", "--json", "--endpoint", &ep1]);
    let r: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(r["corrupt"], 0, "a second pass finds nothing: {r}");
}

#[test]
fn the_scrub_repairs_a_damaged_block_nobody_reads() {
    let mut c = Cluster::new();
    c.env.push(("HLSTORE_SCRUB_MIBPS".into(), "64".into()));
    let uri = c.up(&["--nodes", "3", "--volume", "h", "--size", "8MiB"]);
    c.wait_all_healthy("h", Duration::from_secs(60));
    qemu_io(&uri, &["write -P 0x6b 3M 4k", "flush"]);
    let want = vec![0x6bu8; BLOCK];
    let engine = engine_node(&c);
    // A replica that serves no reads: not the engine's own.
    let victim = ["n1", "n2", "n3"].into_iter().find(|n| *n != engine).expect("another node");
    let file = slot_file(&c, victim);
    corrupt_slot(&file, &want);
    c.wait_until("the scrub repaired it", Duration::from_secs(60), || {
        (metric(&c, &engine, "hlstore_volume_scrub_repairs_total") >= 1.0).then_some(())
    });
    c.wait_until("a whole pass", Duration::from_secs(60), || {
        (metric(&c, &engine, "hlstore_volume_scrub_passes_total") >= 1.0).then_some(())
    });
    // 8 MiB = 2048 blocks compared per pass.
    assert!(metric(&c, &engine, "hlstore_volume_scrub_blocks_total") >= 2048.0);
    assert_eq!(metric(&c, &engine, "hlstore_volume_divergent_blocks_total"), 0.0);
    assert_eq!(metric(&c, &engine, "hlstore_volume_read_repairs_total"), 0.0);
    assert!(!slots_holding(&file, &want).is_empty(), "the good block is back on {victim}");
}

//! Differential test: the same random sequence of unaligned writes, zeroings and discards,
//! sent by qemu-io to nbdkit's memory plugin and to this server, must leave identical images.

mod nbd_support;

use std::path::Path;
use std::time::Duration;

use nbd_support::*;

const SIZE: u64 = 8 * MIB;

/// A deterministic op sequence: unaligned writes and zeroings, block-aligned discards (the
/// contents of a partially discarded block are unspecified by the protocol).
fn commands(seed: u64, n: usize) -> Vec<String> {
    let r = pattern(n * 16, seed);
    let word = |i: usize| u64::from_le_bytes(r[i * 16..i * 16 + 8].try_into().unwrap());
    (0..n)
        .map(|i| {
            let w = word(i);
            let kind = w % 10;
            let offset = (w >> 8) % (SIZE - 300_000);
            let len = 1 + (w >> 40) % 200_000;
            match kind {
                0..=5 => format!("write -P {} {offset} {len}", (w >> 32) as u8),
                6 => format!("write -z {offset} {len}"),
                7 => format!("write -z -u {offset} {len}"),
                _ => format!("discard {} {}", offset / 4096 * 4096, (len / 4096 + 1) * 4096),
            }
        })
        .collect()
}

async fn start_nbdkit(sock: &Path) -> tokio::process::Child {
    let child = tool("nbdkit", "nbdkit")
        .args(["--foreground", "--exit-with-parent", "--unix"])
        .arg(sock)
        .args(["memory", &SIZE.to_string()])
        .spawn()
        .expect("start nbdkit");
    for _ in 0..200 {
        if sock.exists() {
            return child;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("nbdkit did not create {}", sock.display());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_ops_same_image_as_nbdkit() {
    let dev = mem("vol", SIZE);
    let h = Harness::start(&[("vol", dev.clone())]).await;
    let kit_sock = h.dir.path().join("nbdkit.sock");
    let _nbdkit = start_nbdkit(&kit_sock).await;
    let kit_uri = format!("nbd+unix:///?socket={}", kit_sock.display());

    let cmds = commands(2024, 150);
    for uri in [h.uri("vol"), kit_uri.clone()] {
        let mut q = tool("qemu-io", "qemu-utils");
        q.args(["-f", "raw"]);
        for c in &cmds {
            q.args(["-c", c]);
        }
        run_ok(q.arg(&uri)).await;
    }
    let ours = h.dir.path().join("ours.raw");
    let theirs = h.dir.path().join("theirs.raw");
    run_ok(tool("nbdcopy", "libnbd-bin").arg(h.uri("vol")).arg(&ours)).await;
    run_ok(tool("nbdcopy", "libnbd-bin").arg(&kit_uri).arg(&theirs)).await;
    let (a, b) = (std::fs::read(&ours).unwrap(), std::fs::read(&theirs).unwrap());
    assert_eq!(a.len(), b.len());
    if let Some(at) = a.iter().zip(&b).position(|(x, y)| x != y) {
        panic!("images differ first at byte {at}: ours {:#04x}, nbdkit {:#04x}", a[at], b[at]);
    }
    assert!(a.iter().any(|&x| x != 0), "the ops wrote data");
    assert!(h.stat(|s| &s.read_modify_writes) > 50);
    h.shutdown().await;
}

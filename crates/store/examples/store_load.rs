//! A fixed store workload for profiling (`perf record`, `valgrind --tool=callgrind`):
//! `cargo run --release -p hlstore-store --example store_load -- [MiB]`.
//!
//! On a fresh store in `$TMPDIR`: fills a volume of MiB (default 256) with 1 MiB writes,
//! rewrites it once with 1 MiB writes (flush every 64 MiB), then 4 KiB writes at scattered
//! offsets (as many as the volume has blocks / 4), then 4 KiB and 1 MiB reads. Prints the
//! time and rate of each phase.

use std::time::Instant;

use hlstore_core::{Epoch, Offset, Seq};
use hlstore_store::{DiskStore, ReplicaStore, VolumeRecord};

fn main() {
    let mib: u64 = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(256);
    let size = mib << 20;
    let dir = tempfile::tempdir().expect("tempdir");
    let store = DiskStore::open(dir.path()).expect("open");
    store.create(VolumeRecord::new("load", size)).expect("create");
    store.open("load", Epoch(1)).expect("open volume");
    let big: Vec<u8> = (0..(1u64 << 20)).map(|i| (i * 31 % 251) as u8).collect();
    let small: Vec<u8> = (0..4096u64).map(|i| (i * 7 % 253) as u8).collect();
    let mut seq = 0u64;
    let phase = |label: &str, ops: u64, bytes: u64, t: Instant| {
        let s = t.elapsed().as_secs_f64();
        println!(
            "{label:<24} {ops:>8} ops {s:>8.3} s {:>10.0} ops/s {:>8.1} MiB/s",
            ops as f64 / s,
            bytes as f64 / s / 1048576.0
        );
    };
    for pass in ["fill 1MiB", "rewrite 1MiB"] {
        let t = Instant::now();
        for i in 0..mib {
            seq += 1;
            store.write("load", Epoch(1), Seq(seq), Offset(i << 20), &big, false).expect("write");
            if i % 64 == 63 {
                store.flush("load", Epoch(1)).expect("flush");
            }
        }
        store.flush("load", Epoch(1)).expect("flush");
        phase(pass, mib, size, t);
    }
    let blocks = size / 4096;
    let n = blocks / 4;
    let t = Instant::now();
    for i in 0..n {
        seq += 1;
        let b = i.wrapping_mul(7919) % blocks;
        store.write("load", Epoch(1), Seq(seq), Offset(b * 4096), &small, false).expect("write");
        if i % 4096 == 4095 {
            store.flush("load", Epoch(1)).expect("flush");
        }
    }
    store.flush("load", Epoch(1)).expect("flush");
    phase("rewrite 4KiB scattered", n, n * 4096, t);
    let t = Instant::now();
    for i in 0..n {
        let b = i.wrapping_mul(104729) % blocks;
        std::hint::black_box(store.read("load", Epoch(1), Offset(b * 4096), 4096).expect("read"));
    }
    phase("read 4KiB scattered", n, n * 4096, t);
    let t = Instant::now();
    for i in 0..mib {
        std::hint::black_box(store.read("load", Epoch(1), Offset(i << 20), 1 << 20).expect("read"));
    }
    phase("read 1MiB", mib, size, t);
}

//! A fixed store workload for profiling (`perf record`, `valgrind --tool=callgrind`):
//! `cargo run --release -p hlstore-store --example store_load -- [MiB]`.
//!
//! On a fresh store in `$TMPDIR`: fills a volume of MiB (default 256) with 1 MiB writes,
//! rewrites it once with 1 MiB writes (flush every 64 MiB), then 4 KiB writes at scattered
//! offsets (as many as the volume has blocks / 4; flush every 4,096), then 1 MiB writes
//! again (each replacing blocks of many scattered writes), then 4 KiB and 1 MiB reads. Prints the time and rate of each phase. Each phase is its own function,
//! so a callgrind profile gives each phase's instruction count (`callgrind_annotate
//! --inclusive=yes`, the `phase_*` functions): counts repeat from run to run where times
//! on a shared machine do not.

use std::time::Instant;

use hlstore_core::{Epoch, Offset, Seq};
use hlstore_store::{DiskStore, ReplicaStore, VolumeRecord};

const E: Epoch = Epoch(1);

fn report(label: &str, ops: u64, bytes: u64, t: Instant) {
    let s = t.elapsed().as_secs_f64();
    println!(
        "{label:<24} {ops:>8} ops {s:>8.3} s {:>10.0} ops/s {:>8.1} MiB/s",
        ops as f64 / s,
        bytes as f64 / s / 1048576.0
    );
}

#[inline(never)]
fn phase_write_1mib(store: &DiskStore, mib: u64, seq: &mut u64, data: &[u8]) {
    for i in 0..mib {
        *seq += 1;
        store.write("load", E, Seq(*seq), Offset(i << 20), data, false).expect("write");
        if i % 64 == 63 {
            store.flush("load", E).expect("flush");
        }
    }
    store.flush("load", E).expect("flush");
}

#[inline(never)]
fn phase_write_4kib(store: &DiskStore, blocks: u64, n: u64, seq: &mut u64, data: &[u8]) {
    for i in 0..n {
        *seq += 1;
        let b = i.wrapping_mul(7919) % blocks;
        store.write("load", E, Seq(*seq), Offset(b * 4096), data, false).expect("write");
        if i % 4096 == 4095 {
            store.flush("load", E).expect("flush");
        }
    }
    store.flush("load", E).expect("flush");
}

#[inline(never)]
fn phase_read_4kib(store: &DiskStore, blocks: u64, n: u64) {
    for i in 0..n {
        let b = i.wrapping_mul(104729) % blocks;
        std::hint::black_box(store.read("load", E, Offset(b * 4096), 4096).expect("read"));
    }
}

#[inline(never)]
fn phase_read_1mib(store: &DiskStore, mib: u64) {
    for i in 0..mib {
        std::hint::black_box(store.read("load", E, Offset(i << 20), 1 << 20).expect("read"));
    }
}

fn main() {
    let mib: u64 = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(256);
    let size = mib << 20;
    let dir = tempfile::tempdir().expect("tempdir");
    let store = DiskStore::open(dir.path()).expect("open");
    store.create(VolumeRecord::new("load", size)).expect("create");
    store.open("load", E).expect("open volume");
    let big: Vec<u8> = (0..(1u64 << 20)).map(|i| (i * 31 % 251) as u8).collect();
    let small: Vec<u8> = (0..4096u64).map(|i| (i * 7 % 253) as u8).collect();
    let mut seq = 0u64;
    for pass in ["fill 1MiB", "rewrite 1MiB"] {
        let t = Instant::now();
        phase_write_1mib(&store, mib, &mut seq, &big);
        report(pass, mib, size, t);
    }
    let blocks = size / 4096;
    let n = blocks / 4;
    let t = Instant::now();
    phase_write_4kib(&store, blocks, n, &mut seq, &small);
    report("rewrite 4KiB scattered", n, n * 4096, t);
    // Each 1 MiB now replaces blocks written by many different writes (seqs).
    let t = Instant::now();
    phase_write_1mib(&store, mib, &mut seq, &big);
    report("rewrite 1MiB after 4KiB", mib, size, t);
    let t = Instant::now();
    phase_read_4kib(&store, blocks, n);
    report("read 4KiB scattered", n, n * 4096, t);
    let t = Instant::now();
    phase_read_1mib(&store, mib);
    report("read 1MiB", mib, size, t);
}

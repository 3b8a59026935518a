//! Replica store throughput: 4 KiB and 1 MiB writes and reads, with and without flush, on
//! the on-disk store in a temporary directory (set TMPDIR to bench another disk).
//!
//! Run: `cargo bench --bench store`. Criterion prints time per operation and throughput.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use hlstore_core::{Epoch, Offset, Seq};
use hlstore_store::{DiskStore, ReplicaStore, VolumeRecord, BLOCK_SIZE};

const VOLUME_BYTES: u64 = 1 << 30;

fn setup() -> (tempfile::TempDir, DiskStore) {
    let dir = tempfile::tempdir().unwrap();
    let store = DiskStore::open(dir.path()).unwrap();
    store.create(VolumeRecord::new("bench", VOLUME_BYTES)).unwrap();
    store.open("bench", Epoch(1)).unwrap();
    (dir, store)
}

fn writes(c: &mut Criterion) {
    let mut g = c.benchmark_group("write");
    for (label, size) in [("4KiB", 4096u64), ("1MiB", 1 << 20)] {
        for flush in [false, true] {
            let (_dir, store) = setup();
            let data: Vec<u8> = (0..size).map(|i| (i * 31 % 251) as u8).collect();
            let slots = VOLUME_BYTES / size;
            let mut seq = 0u64;
            g.throughput(Throughput::Bytes(size));
            let name = if flush { format!("{label}+flush") } else { label.to_string() };
            g.bench_function(BenchmarkId::from_parameter(name), |b| {
                b.iter(|| {
                    seq += 1;
                    // Scatter 4 KiB writes; 1 MiB writes go sequentially.
                    let slot = if size == BLOCK_SIZE { seq.wrapping_mul(7919) % slots } else { seq % slots };
                    store.write("bench", Epoch(1), Seq(seq), Offset(slot * size), &data, false).unwrap();
                    if flush {
                        store.flush("bench", Epoch(1)).unwrap();
                    }
                })
            });
        }
    }
    g.finish();
}

fn reads(c: &mut Criterion) {
    let mut g = c.benchmark_group("read");
    let (_dir, store) = setup();
    // 64 MiB of data written sequentially in 1 MiB writes.
    let chunk: Vec<u8> = (0..(1u64 << 20)).map(|i| (i % 253) as u8).collect();
    for i in 0..64u64 {
        store.write("bench", Epoch(1), Seq(i + 1), Offset(i << 20), &chunk, false).unwrap();
    }
    store.flush("bench", Epoch(1)).unwrap();
    for (label, size) in [("4KiB", 4096u64), ("1MiB", 1 << 20)] {
        let span = (64u64 << 20) / size;
        let mut i = 0u64;
        g.throughput(Throughput::Bytes(size));
        g.bench_function(BenchmarkId::from_parameter(label), |b| {
            b.iter(|| {
                i += 1;
                let at = (i.wrapping_mul(7919) % span) * size;
                criterion::black_box(store.read("bench", Epoch(1), Offset(at), size).unwrap());
            })
        });
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(30).measurement_time(std::time::Duration::from_secs(4));
    targets = writes, reads
}
criterion_main!(benches);

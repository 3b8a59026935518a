//! Self-healing over in-memory replicas: read repair, the scrub, and resyncs whose source
//! holds a corrupt block (see `replication/heal.rs`).

use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

use bytes::Bytes;
use hlstore_core::Epoch;
use hlstore_core::{BlockDevice, ErrorKind};
use hlstore_replication::{
    ChunkData, HealStats, MachineConfig, MemReplica, ReplicaStatus, ReplicaTransport, ReplicatedVolume, ResyncChunk,
    VolumeConfig,
};

const BS: u64 = 4096;
const SIZE: u64 = 256 * BS;

fn config(scrub_rate: u64) -> VolumeConfig {
    let mut m = MachineConfig::new(3);
    m.ack_timeout_ms = 150;
    m.failure_timeout_ms = 600;
    m.io_timeout_ms = 1_500;
    m.attach_timeout_ms = 3_000;
    m.retry_interval_ms = 100;
    let mut c = VolumeConfig::new("vol-heal", SIZE, m);
    c.tick = Duration::from_millis(20);
    c.scrub_rate = scrub_rate;
    c
}

fn replicas() -> Vec<MemReplica> {
    (0..3).map(|i| MemReplica::new(format!("node-{i}"), SIZE)).collect()
}

fn block(tag: u8, i: u64) -> Vec<u8> {
    let mut b = vec![tag; BS as usize];
    b[..8].copy_from_slice(&i.to_le_bytes());
    b
}

fn get(c: &AtomicU64) -> u64 {
    HealStats::get(c)
}

#[track_caller]
fn assert_same(got: &[u8], want: &[u8], what: &str) {
    if let Some(i) = (0..want.len() / BS as usize).find(|&i| {
        let r = i * BS as usize..(i + 1) * BS as usize;
        got[r.clone()] != want[r]
    }) {
        let at = i * BS as usize;
        panic!("{what}: block {i} differs: got {:?}.., want {:?}..", &got[at..at + 16], &want[at..at + 16]);
    }
}

async fn until(what: &str, secs: u64, pred: impl Fn() -> bool) {
    let start = Instant::now();
    while !pred() {
        assert!(start.elapsed() < Duration::from_secs(secs), "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn attached(cfg: VolumeConfig, reps: &[MemReplica], blocks: u64) -> ReplicatedVolume {
    let vol = ReplicatedVolume::attach(cfg, reps.to_vec()).await.expect("attach");
    for i in 0..blocks {
        vol.write(i * BS, block(1, i), false).await.unwrap();
    }
    vol.flush().await.unwrap();
    let last = vol.replicas()[0].acked_seq;
    until("every replica applied every write", 10, || {
        vol.replicas().iter().all(|r| r.status == ReplicaStatus::Healthy && r.acked_seq >= last)
    })
    .await;
    vol
}

fn all_healthy(vol: &ReplicatedVolume) -> bool {
    vol.replicas().iter().all(|r| r.status == ReplicaStatus::Healthy)
}

#[tokio::test]
async fn a_corrupt_block_is_read_from_another_replica_and_repaired_in_place() {
    let reps = replicas();
    let vol = attached(config(0), &reps, 8).await;
    // Replica 0 is local: reads go there first.
    reps[0].corrupt_block(3);
    let got = vol.read(2 * BS, 4 * BS).await.expect("the read is served by a good replica");
    let want: Vec<u8> = (2..6).flat_map(|i| block(1, i)).collect();
    assert_eq!(got, want);
    let h = vol.heal_stats();
    until("block 3 rewritten on replica 0", 10, || !reps[0].is_corrupt(3)).await;
    until("the repair counted", 10, || get(&h.read_repairs) == 1).await;
    assert!(all_healthy(&vol), "the corrupt replica stays in service: {:?}", vol.replicas());
    assert_same(&reps[0].contents(), &reps[1].contents(), "replica 0 after the repair");
    assert_eq!(get(&h.unrecoverable_blocks), 0);
    // The volume keeps working and reads from the repaired replica.
    vol.write(3 * BS, block(2, 3), false).await.unwrap();
    assert_eq!(vol.read(3 * BS, BS).await.unwrap(), block(2, 3));
    vol.close().await;
}

#[tokio::test]
async fn a_block_corrupt_on_every_replica_fails_the_read_and_nothing_else() {
    let reps = replicas();
    let vol = attached(config(0), &reps, 8).await;
    for r in &reps {
        r.corrupt_block(5);
    }
    let err = vol.read(4 * BS, 2 * BS).await.expect_err("no replica holds good data");
    assert_eq!(err.kind(), ErrorKind::Corruption, "{err}");
    assert_eq!(vol.read(6 * BS, BS).await.unwrap(), block(1, 6));
    let h = vol.heal_stats();
    until("the loss counted", 10, || get(&h.unrecoverable_blocks) >= 1).await;
    assert!(all_healthy(&vol), "{:?}", vol.replicas());
    // Rewriting the block heals it everywhere.
    vol.write(5 * BS, block(3, 5), false).await.unwrap();
    assert_eq!(vol.read(5 * BS, BS).await.unwrap(), block(3, 5));
    vol.close().await;
}

/// A write to the block lands while the repair's reads are in flight: the repair must not
/// put the older content back over it.
#[tokio::test]
async fn a_repair_never_overwrites_a_newer_write() {
    let reps = replicas();
    let vol = attached(config(0), &reps, 8).await;
    reps[0].corrupt_block(3);
    reps[1].set_delay(Duration::from_millis(150));
    reps[2].set_delay(Duration::from_millis(150));
    assert_eq!(vol.read(3 * BS, BS).await.unwrap(), block(1, 3));
    // The repair check started when the read returned; its reads take 150 ms.
    vol.write(3 * BS, block(9, 3), false).await.unwrap();
    reps[1].set_delay(Duration::ZERO);
    reps[2].set_delay(Duration::ZERO);
    vol.flush().await.unwrap();
    // Let any repair land.
    tokio::time::sleep(Duration::from_millis(500)).await;
    for (i, r) in reps.iter().enumerate() {
        assert!(!r.is_corrupt(3));
        let got = &r.contents()[3 * BS as usize..4 * BS as usize];
        assert!(got == &block(9, 3)[..], "replica {i} block 3: got {:?}.., want the newer write", &got[..16]);
    }
    assert_eq!(vol.read(3 * BS, BS).await.unwrap(), block(9, 3));
    vol.close().await;
}

#[tokio::test]
async fn the_scrub_repairs_corrupt_blocks_and_reports_divergence() {
    let reps = replicas();
    // 1 MiB volume at 16 MiB/s: a pass every ~64 ms.
    let vol = attached(config(16 << 20), &reps, 16).await;
    let h = vol.heal_stats();
    reps[1].corrupt_block(7);
    reps[2].corrupt_block(12);
    until("the scrub rewrote both blocks", 10, || !reps[1].is_corrupt(7) && !reps[2].is_corrupt(12)).await;
    until("repairs counted", 10, || get(&h.scrub_repairs) == 2).await;
    until("a pass completed", 10, || get(&h.scrub_passes) >= 1 && get(&h.scrub_blocks) >= 256).await;
    assert_same(&reps[1].contents(), &reps[0].contents(), "replica 1 after the scrub");
    assert_same(&reps[2].contents(), &reps[0].contents(), "replica 2 after the scrub");
    assert_eq!(get(&h.divergent_blocks), 0);
    assert_eq!(get(&h.read_repairs), 0);
    // A replica whose block differs without a checksum error is reported, not "fixed".
    let epoch = vol.epoch();
    let stray = ResyncChunk { offset: 9 * BS, seq: 1, data: ChunkData::Data(Bytes::from(block(7, 9))) };
    reps[2].set_naive_resync(true);
    reps[2].apply_resync(Epoch(epoch), vec![stray]).await.unwrap();
    until("divergence reported", 10, || get(&h.divergent_blocks) >= 1).await;
    assert!(all_healthy(&vol), "{:?}", vol.replicas());
    vol.close().await;
}

async fn resync_with_corrupt_source(corrupt_on: &[usize]) -> (Vec<MemReplica>, ReplicatedVolume) {
    let reps = replicas();
    let vol = attached(config(0), &reps, 16).await;
    reps[2].set_down(true);
    for i in 0..8 {
        vol.write(i * BS, block(2, i), false).await.unwrap();
    }
    until("replica 2 failed", 10, || vol.replicas()[2].status == ReplicaStatus::Failed).await;
    for &r in corrupt_on {
        reps[r].corrupt_block(5);
    }
    // Replica 0 must be the source.
    reps[1].set_fail_resync_source(true);
    reps[2].set_down(false);
    until("replica 2 resynced", 15, || all_healthy(&vol)).await;
    (reps, vol)
}

#[tokio::test]
async fn a_resync_source_with_a_corrupt_block_gets_it_from_another_replica() {
    let (reps, vol) = resync_with_corrupt_source(&[0]).await;
    let h = vol.heal_stats();
    assert_same(&reps[2].contents(), &reps[1].contents(), "replica 2 after the resync");
    until("the source's block rewritten", 10, || !reps[0].is_corrupt(5)).await;
    assert_same(&reps[0].contents(), &reps[1].contents(), "replica 0 after the repair");
    until("the repair counted", 10, || get(&h.read_repairs) == 1).await;
    assert_eq!(vol.read(5 * BS, BS).await.unwrap(), block(2, 5));
    vol.close().await;
}

#[tokio::test]
async fn a_resync_skips_a_block_corrupt_on_every_in_sync_replica_without_looping() {
    let (reps, vol) = resync_with_corrupt_source(&[0, 1]).await;
    let h = vol.heal_stats();
    until("the loss counted", 10, || get(&h.unrecoverable_blocks) >= 1).await;
    // Every other changed block arrived; the skipped one keeps the target's copy.
    let (want, got) = (reps[1].contents(), reps[2].contents());
    for i in (0..16u64).filter(|&i| i != 5) {
        let r = (i * BS) as usize..((i + 1) * BS) as usize;
        assert_eq!(got[r.clone()], want[r], "block {i}");
    }
    assert_eq!(&got[5 * BS as usize..6 * BS as usize], &block(1, 5)[..]);
    // It resynced once: still healthy a while later, the sources too.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(all_healthy(&vol), "{:?}", vol.replicas());
    vol.close().await;
}

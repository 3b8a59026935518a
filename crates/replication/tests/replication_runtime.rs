//! The replicated volume runtime over in-memory replicas: quorum survival, no-quorum
//! timeouts, incremental resync, fencing, failover.

use std::time::{Duration, Instant};

use hlstore_core::Offset;
use hlstore_core::{BlockDevice, ErrorKind};
use hlstore_replication::{MachineConfig, MemReplica, ReplicaStatus, ReplicatedVolume, VolumeConfig};

const BS: u64 = 4096;
const SIZE: u64 = 256 * BS;
const IO_TIMEOUT_MS: u64 = 1_500;

fn config(n: usize, w: Option<usize>) -> VolumeConfig {
    let mut m = MachineConfig::new(n);
    m.write_quorum = w;
    m.ack_timeout_ms = 150;
    m.failure_timeout_ms = 600;
    m.io_timeout_ms = IO_TIMEOUT_MS;
    m.attach_timeout_ms = 3_000;
    m.retry_interval_ms = 100;
    let mut c = VolumeConfig::new("vol-test", SIZE, m);
    c.tick = Duration::from_millis(20);
    c
}

fn replicas(n: usize) -> Vec<MemReplica> {
    (0..n).map(|i| MemReplica::new(format!("node-{i}"), SIZE)).collect()
}

fn block(tag: u8, i: u64) -> Vec<u8> {
    let mut b = vec![tag; BS as usize];
    b[..8].copy_from_slice(&i.to_le_bytes());
    b
}

/// Compares two volume images, reporting the first differing block (not the whole image).
#[track_caller]
fn assert_same(got: &[u8], want: &[u8], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: sizes differ");
    if let Some(i) = (0..got.len() / BS as usize).find(|&i| {
        let r = i * BS as usize..(i + 1) * BS as usize;
        got[r.clone()] != want[r]
    }) {
        let at = i * BS as usize;
        panic!("{what}: block {i} differs: got {:?}.., want {:?}..", &got[at..at + 16], &want[at..at + 16]);
    }
}

async fn attach(c: VolumeConfig, reps: &[MemReplica]) -> ReplicatedVolume {
    ReplicatedVolume::attach(c, reps.to_vec()).await.expect("attach")
}

/// Waits until `pred` holds on the volume's replica states.
async fn wait_for(vol: &ReplicatedVolume, what: &str, pred: impl Fn(&[hlstore_replication::ReplicaHealth]) -> bool) {
    let start = Instant::now();
    loop {
        let r = vol.replicas();
        if pred(&r) {
            return;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "timed out waiting for {what}: {r:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn attach_bumps_the_epoch_on_every_replica() {
    let reps = replicas(3);
    let vol = attach(config(3, None), &reps).await;
    assert_eq!(vol.epoch(), 1);
    wait_for(&vol, "all healthy", |r| r.iter().all(|i| i.status == ReplicaStatus::Healthy)).await;
    assert!(reps.iter().all(|r| r.epoch() == 1));
    vol.close().await;
}

async fn survive_minority_loss(n: usize, w: Option<usize>, kill: &[usize]) {
    let reps = replicas(n);
    let vol = attach(config(n, w), &reps).await;
    let mut expect = vec![0u8; SIZE as usize];
    for i in 0..32 {
        vol.write(i * BS, block(1, i), false).await.unwrap();
        expect[(i * BS) as usize..((i + 1) * BS) as usize].copy_from_slice(&block(1, i));
    }
    for &k in kill {
        reps[k].set_down(true);
    }
    let start = Instant::now();
    for i in 16..64 {
        vol.write(i * BS, block(2, i), false).await.unwrap();
        expect[(i * BS) as usize..((i + 1) * BS) as usize].copy_from_slice(&block(2, i));
    }
    vol.flush().await.unwrap();
    assert!(start.elapsed() < Duration::from_millis(IO_TIMEOUT_MS), "writes waited for the dead replicas");
    assert_same(&vol.read(0, SIZE).await.unwrap(), &expect, "volume read");
    wait_for(&vol, "killed replicas failed", |r| kill.iter().all(|&k| r[k].status == ReplicaStatus::Failed)).await;
    // Every acknowledged write is on every surviving replica.
    for (i, r) in reps.iter().enumerate() {
        if !kill.contains(&i) {
            assert_same(&r.contents(), &expect, &format!("replica {i}"));
        }
    }
    vol.close().await;
}

#[tokio::test]
async fn writes_survive_losing_one_of_three() {
    survive_minority_loss(3, None, &[1]).await;
}

#[tokio::test]
async fn writes_survive_losing_two_of_five() {
    survive_minority_loss(5, Some(3), &[0, 3]).await;
}

#[tokio::test]
async fn without_quorum_writes_and_flushes_fail_after_the_deadline() {
    let reps = replicas(3);
    let vol = attach(config(3, None), &reps).await;
    vol.write(0, block(1, 0), false).await.unwrap();
    reps[1].set_down(true);
    reps[2].set_down(true);
    let start = Instant::now();
    let err = vol.write(BS, block(2, 1), false).await.unwrap_err();
    let waited = start.elapsed();
    assert_eq!(err.kind(), ErrorKind::Unavailable, "{err}");
    assert!(waited >= Duration::from_millis(IO_TIMEOUT_MS - 50), "failed after {waited:?}");
    assert!(waited < Duration::from_millis(IO_TIMEOUT_MS * 3), "hung for {waited:?}");
    let err = vol.flush().await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unavailable);
    // The surviving replica still serves every acknowledged write.
    assert_eq!(vol.read(0, BS).await.unwrap(), block(1, 0));
    // Quorum back: writes work again once a replica resynced.
    reps[1].set_down(false);
    wait_for(&vol, "replica 1 healthy", |r| r[1].status == ReplicaStatus::Healthy).await;
    vol.write(2 * BS, block(3, 2), false).await.unwrap();
    vol.close().await;
}

#[tokio::test]
async fn a_returning_replica_resyncs_only_the_changed_blocks() {
    let reps = replicas(3);
    let vol = attach(config(3, None), &reps).await;
    for i in 0..64 {
        vol.write(i * BS, block(1, i), false).await.unwrap();
    }
    vol.flush().await.unwrap();
    let last = vol.replicas()[0].acked_seq;
    wait_for(&vol, "replica 2 durable", |r| r[2].durable_seq >= last).await;
    reps[2].set_down(true);
    // Five distinct blocks change while it is down (one of them twice), plus a trim.
    for (n, i) in [3u64, 10, 10, 40, 41, 63].into_iter().enumerate() {
        vol.write(i * BS, block(2 + n as u8, i), false).await.unwrap();
    }
    vol.trim(20 * BS, BS).await.unwrap();
    wait_for(&vol, "replica 2 failed", |r| r[2].status == ReplicaStatus::Failed).await;
    let before = reps[2].stats();
    let chunks_before = vol.replicas()[2].resync_chunks;
    reps[2].set_down(false);
    wait_for(&vol, "replica 2 healthy", |r| r[2].status == ReplicaStatus::Healthy).await;
    // 5 blocks + 1 trim copied; nothing else.
    assert_eq!(vol.replicas()[2].resync_chunks - chunks_before, 6);
    assert_eq!(reps[2].stats().resync_writes - before.resync_writes, 6);
    assert_same(&reps[2].contents(), &reps[0].contents(), "replica contents");
    assert_same(&reps[1].contents(), &reps[0].contents(), "replica contents");
    vol.close().await;
}

#[tokio::test]
async fn an_interrupted_resync_resumes_from_its_checkpoint() {
    let reps = replicas(3);
    let mut c = config(3, None);
    c.resync_checkpoint_blocks = 16;
    c.resync_rate = 64 * BS; // 64 blocks a second: the copy takes 4 s
    let vol = attach(c, &reps).await;
    for i in 0..256 {
        vol.write(i * BS, block(1, i), false).await.unwrap();
    }
    vol.flush().await.unwrap();
    let last = vol.replicas()[0].acked_seq;
    wait_for(&vol, "replica 2 durable", |r| r[2].durable_seq >= last).await;
    reps[2].set_down(true);
    for i in 0..256 {
        vol.write(i * BS, block(2, i), false).await.unwrap();
    }
    wait_for(&vol, "replica 2 failed", |r| r[2].status == ReplicaStatus::Failed).await;
    let start = vol.replicas()[2].resync_chunks;
    reps[2].set_down(false);
    wait_for(&vol, "half of the resync", |r| r[2].resync_chunks >= start + 128).await;
    // Power loss on the target mid-resync: unflushed copies are gone, checkpoints stay.
    reps[2].crash();
    reps[2].set_down(true);
    wait_for(&vol, "replica 2 failed again", |r| r[2].status == ReplicaStatus::Failed).await;
    assert!(reps[2].stats().checkpoints >= 4, "checkpoints taken: {:?}", reps[2].stats());
    let first = vol.replicas()[2].resync_chunks - start;
    reps[2].set_down(false);
    wait_for(&vol, "replica 2 healthy", |r| r[2].status == ReplicaStatus::Healthy).await;
    let h = &vol.replicas()[2];
    let resumed = h.resync_resumed_from / BS;
    assert!(resumed >= 64, "resumed from block {resumed} after {first} copied blocks");
    // The second pass copies exactly the blocks past the checkpoint (nothing was written).
    assert_eq!(h.resync_chunks - start - first, 256 - resumed);
    assert_same(&reps[2].contents(), &reps[0].contents(), "replica contents");
    vol.close().await;
}

fn snap(name: &str) -> hlstore_store::SnapshotInfo {
    hlstore_store::SnapshotInfo {
        name: name.into(),
        seq: 0,
        size: 0,
        created: 0,
        labels: Default::default(),
        partial: false,
    }
}

#[tokio::test]
async fn snapshots_missed_while_down_are_carried_by_resync() {
    use hlstore_replication::ReplicaTransport;
    let reps = replicas(3);
    let vol = attach(config(3, None), &reps).await;
    for i in 0..32 {
        vol.write(i * BS, block(1, i), false).await.unwrap();
    }
    let old = vol.snapshot(snap("old")).await.unwrap();
    assert!(old.seq > 0);
    vol.flush().await.unwrap();
    let last = vol.replicas()[0].acked_seq;
    wait_for(&vol, "replica 2 durable", |r| r[2].durable_seq >= last).await;
    reps[2].set_down(true);
    for i in 0..8 {
        vol.write(i * BS, block(2, i), false).await.unwrap();
    }
    wait_for(&vol, "replica 2 failed", |r| r[2].status == ReplicaStatus::Failed).await;
    // Taken and deleted while replica 2 is away: it must end up with "new" and without "old".
    let new = vol.snapshot(snap("new")).await.unwrap();
    assert!(vol.delete_snapshot("old").await.unwrap());
    for i in 4..12 {
        vol.write(i * BS, block(3, i), false).await.unwrap();
    }
    vol.trim(0, BS).await.unwrap();
    reps[2].set_down(false);
    wait_for(&vol, "replica 2 healthy", |r| r[2].status == ReplicaStatus::Healthy).await;
    let names = |r: &MemReplica| {
        let r = r.clone();
        async move { r.list_snapshots().await.unwrap().into_iter().map(|s| (s.name, s.seq, s.partial)).collect::<Vec<_>>() }
    };
    assert_eq!(names(&reps[2]).await, [("new".to_string(), new.seq, false)]);
    assert_eq!(names(&reps[0]).await, names(&reps[2]).await);
    let want = reps[0].read_snapshot("new", Offset(0), SIZE).await.unwrap();
    assert_same(
        &reps[2].read_snapshot("new", Offset(0), SIZE).await.unwrap(),
        &want,
        "snapshot on the resynced replica",
    );
    assert_eq!(&want[..8], &block(2, 0)[..8], "the snapshot saw the second write, not the trim");
    assert_same(&reps[2].contents(), &reps[0].contents(), "replica contents");
    vol.close().await;
}

/// Three replicas; replica 2 misses snapshot `name` and is brought back slowly (every call
/// it answers waits 40 ms), so its resync is still installing `name` when this returns
/// (32 separate copies: every other block changed after the snapshot).
async fn resync_installing(name: &str) -> (Vec<MemReplica>, ReplicatedVolume) {
    use hlstore_replication::ReplicaTransport;
    let reps = replicas(3);
    let vol = attach(config(3, None), &reps).await;
    for i in 0..64 {
        vol.write(i * BS, block(1, i), false).await.unwrap();
    }
    vol.flush().await.unwrap();
    let last = vol.replicas()[0].acked_seq;
    wait_for(&vol, "replica 2 durable", |r| r[2].durable_seq >= last).await;
    reps[2].set_down(true);
    vol.write(0, block(2, 0), false).await.unwrap();
    wait_for(&vol, "replica 2 failed", |r| r[2].status == ReplicaStatus::Failed).await;
    vol.snapshot(snap(name)).await.unwrap();
    // Every other block changes after the snapshot: installing it takes 32 separate copies.
    for i in (0..64).step_by(2) {
        vol.write(i * BS, block(3, i), false).await.unwrap();
    }
    // The returning replica answers slowly, so the install is still running when this returns.
    reps[2].set_delay(Duration::from_millis(40));
    reps[2].set_down(false);
    let start = Instant::now();
    loop {
        let l = reps[2].list_snapshots().await.unwrap_or_default();
        if l.iter().any(|s| s.name == name && s.partial) {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "the install never began: {l:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    (reps, vol)
}

/// A snapshot deleted while a resync is carrying it to a returning replica: the copy finds
/// it gone on the source. That is the delete's doing, not a fault of the source: no
/// replica may be failed for it, the delete succeeds, and the returning replica ends
/// without the snapshot (not even a partial copy holding blocks).
#[tokio::test]
async fn a_snapshot_deleted_while_a_resync_carries_it_fails_no_replica() {
    use hlstore_replication::ReplicaTransport;
    let (reps, vol) = resync_installing("doomed").await;
    assert!(vol.delete_snapshot("doomed").await.expect("delete during the install"));
    let start = Instant::now();
    loop {
        let r = vol.replicas();
        for h in &r[..2] {
            assert_eq!(h.status, ReplicaStatus::Healthy, "an in-sync replica was failed: {r:?}");
        }
        if r[2].status == ReplicaStatus::Healthy {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "replica 2 never caught up: {r:?}");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    reps[2].set_delay(Duration::ZERO);
    for r in &reps {
        let names: Vec<_> = r.list_snapshots().await.unwrap().into_iter().map(|s| s.name).collect();
        assert!(names.is_empty(), "{}: {names:?}", r.name());
    }
    assert_same(&reps[2].contents(), &reps[0].contents(), "replica contents");
    vol.close().await;
}

/// A snapshot taken while a resync is carrying the snapshots to a returning replica (after
/// the resync listed them) must reach that replica too: it is on every replica once the
/// volume is healthy again (so it is "ready", and keeps three copies).
#[tokio::test]
async fn a_snapshot_taken_while_a_resync_carries_snapshots_reaches_the_returning_replica() {
    use hlstore_replication::ReplicaTransport;
    let (reps, vol) = resync_installing("early").await;
    let late = vol.snapshot(snap("late")).await.expect("snapshot during the install");
    wait_for(&vol, "replica 2 healthy", |r| r[2].status == ReplicaStatus::Healthy).await;
    reps[2].set_delay(Duration::ZERO);
    let names = |r: &MemReplica| {
        let r = r.clone();
        async move { r.list_snapshots().await.unwrap().into_iter().map(|s| (s.name, s.seq, s.partial)).collect::<Vec<_>>() }
    };
    assert_eq!(names(&reps[2]).await, names(&reps[0]).await);
    assert!(names(&reps[2]).await.contains(&("late".to_string(), late.seq, false)));
    assert_same(
        &reps[2].read_snapshot("late", Offset(0), SIZE).await.unwrap(),
        &reps[0].read_snapshot("late", Offset(0), SIZE).await.unwrap(),
        "the late snapshot on the returning replica",
    );
    vol.close().await;
}

#[tokio::test]
async fn a_snapshot_needs_a_write_quorum() {
    let reps = replicas(3);
    let vol = attach(config(3, None), &reps).await;
    vol.write(0, block(1, 0), false).await.unwrap();
    reps[1].set_down(true);
    reps[2].set_down(true);
    let err = vol.snapshot(snap("lonely")).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unavailable, "{err}");
    vol.close().await;
}

#[tokio::test]
async fn a_crashed_replica_converges_after_losing_unflushed_writes() {
    let reps = replicas(3);
    let vol = attach(config(3, None), &reps).await;
    for i in 0..16 {
        vol.write(i * BS, block(1, i), false).await.unwrap();
    }
    vol.flush().await.unwrap();
    for i in 8..24 {
        vol.write(i * BS, block(2, i), false).await.unwrap();
    }
    wait_for(&vol, "replica 1 caught up", |r| r[1].acked_seq == r[0].acked_seq).await;
    reps[1].crash();
    assert!(reps[1].contents() != reps[0].contents(), "the crash lost the unflushed writes");
    vol.write(30 * BS, block(3, 30), false).await.unwrap();
    wait_for(&vol, "replica 1 failed", |r| r[1].status == ReplicaStatus::Failed).await;
    reps[1].set_down(false);
    wait_for(&vol, "replica 1 healthy", |r| r[1].status == ReplicaStatus::Healthy).await;
    assert_same(&reps[1].contents(), &reps[0].contents(), "replica contents");
    vol.close().await;
}

#[tokio::test]
async fn a_newer_engine_fences_the_old_one() {
    let reps = replicas(3);
    let old = attach(config(3, None), &reps).await;
    old.write(0, block(1, 0), false).await.unwrap();
    let new = attach(config(3, None), &reps).await;
    assert_eq!((old.epoch(), new.epoch()), (1, 2));
    let err = old.write(BS, block(9, 1), false).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::StaleEpoch, "{err}");
    let err = old.write(BS, block(9, 1), false).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::StaleEpoch, "{err}");
    let err = old.flush().await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::StaleEpoch, "{err}");
    new.write(BS, block(2, 1), false).await.unwrap();
    assert_eq!(new.read(0, 2 * BS).await.unwrap(), [block(1, 0), block(2, 1)].concat());
    for r in &reps {
        assert_eq!(
            &r.contents()[BS as usize..2 * BS as usize],
            &block(2, 1)[..],
            "no write of the fenced engine landed"
        );
    }
    new.close().await;
    old.close().await;
}

#[tokio::test]
async fn failover_picks_the_most_advanced_replica_and_resyncs_the_others() {
    let reps = replicas(3);
    let first = attach(config(3, None), &reps).await;
    for i in 0..8 {
        first.write(i * BS, block(1, i), false).await.unwrap();
    }
    reps[2].set_down(true);
    for i in 4..12 {
        first.write(i * BS, block(2, i), false).await.unwrap();
    }
    first.flush().await.unwrap();
    let expect = first.read(0, 16 * BS).await.unwrap();
    first.close().await;
    reps[2].set_down(false);
    let second = attach(config(3, None), &reps).await;
    assert_eq!(second.epoch(), 2);
    wait_for(&second, "all healthy", |r| r.iter().all(|i| i.status == ReplicaStatus::Healthy)).await;
    assert_same(&second.read(0, 16 * BS).await.unwrap(), &expect, "read after failover");
    assert_same(&reps[2].contents(), &reps[0].contents(), "replica contents");
    second.close().await;
}

/// A write that failed for lack of quorum still landed on one replica. A later engine
/// attaches without that replica; when it returns, its stray block must be replaced by the
/// volume's content (two-sided resync), not kept.
#[tokio::test]
async fn a_stray_unacknowledged_write_is_undone_when_its_replica_returns() {
    let reps = replicas(3);
    let first = attach(config(3, None), &reps).await;
    first.write(0, block(1, 0), false).await.unwrap();
    reps[0].set_down(true);
    reps[1].set_down(true);
    let err = first.write(5 * BS, block(66, 5), false).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unavailable);
    assert_eq!(&reps[2].contents()[5 * BS as usize..6 * BS as usize], &block(66, 5)[..], "the stray write landed");
    first.close().await;

    reps[0].set_down(false);
    reps[1].set_down(false);
    reps[2].set_down(true);
    let second = attach(config(3, None), &reps).await;
    second.write(7 * BS, block(2, 7), false).await.unwrap();
    reps[2].set_down(false);
    wait_for(&second, "replica 2 healthy", |r| r[2].status == ReplicaStatus::Healthy).await;
    assert_same(&reps[2].contents(), &reps[0].contents(), "replica 2 after resync");
    assert_eq!(second.read(5 * BS, BS).await.unwrap(), vec![0; BS as usize]);
    second.close().await;
}

#[tokio::test]
async fn a_resync_whose_source_breaks_restarts_from_another_replica() {
    let reps = replicas(3);
    let vol = attach(config(3, None), &reps).await;
    for i in 0..16 {
        vol.write(i * BS, block(1, i), false).await.unwrap();
    }
    reps[2].set_down(true);
    for i in 0..8 {
        vol.write(i * BS, block(2, i), false).await.unwrap();
    }
    wait_for(&vol, "replica 2 failed", |r| r[2].status == ReplicaStatus::Failed).await;
    // Replica 0 (the preferred source) cannot serve a resync.
    reps[0].set_fail_resync_source(true);
    reps[2].set_down(false);
    wait_for(&vol, "replica 2 healthy", |r| r[2].status == ReplicaStatus::Healthy).await;
    assert_same(&reps[2].contents(), &reps[1].contents(), "replica 2 resynced from replica 1");
    reps[0].set_fail_resync_source(false);
    wait_for(&vol, "all healthy", |r| r.iter().all(|i| i.status == ReplicaStatus::Healthy)).await;
    vol.write(20 * BS, block(3, 20), false).await.unwrap();
    vol.close().await;
}

/// Every replica drops out at once. Nothing is acknowledged meanwhile; when a majority is
/// back the volume attaches again from the most advanced one and every write acknowledged
/// before the outage is still there.
#[tokio::test]
async fn after_losing_every_replica_the_volume_recovers_when_a_majority_returns() {
    let reps = replicas(3);
    let vol = attach(config(3, None), &reps).await;
    for i in 0..8 {
        vol.write(i * BS, block(1, i), false).await.unwrap();
    }
    for r in &reps {
        r.set_down(true);
    }
    let err = vol.write(8 * BS, block(2, 8), false).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unavailable);
    wait_for(&vol, "all down", |r| r.iter().all(|i| !i.status.in_sync())).await;
    reps[0].set_down(false);
    reps[2].set_down(false);
    wait_for(&vol, "a majority back", |r| r.iter().filter(|i| i.status == ReplicaStatus::Healthy).count() >= 2).await;
    for i in 0..8 {
        assert!(vol.read(i * BS, BS).await.unwrap() == block(1, i), "block {i}");
    }
    vol.write(9 * BS, block(3, 9), false).await.unwrap();
    reps[1].set_down(false);
    wait_for(&vol, "all healthy", |r| r.iter().all(|i| i.status == ReplicaStatus::Healthy)).await;
    assert_same(&reps[1].contents(), &reps[0].contents(), "replica 1");
    assert_same(&reps[2].contents(), &reps[0].contents(), "replica 2");
    vol.close().await;
}

/// Power loss on every node: everything acknowledged by a FLUSH (and every FUA write)
/// survives; a new engine finds it and all replicas converge.
#[tokio::test]
async fn flushed_and_fua_writes_survive_losing_power_everywhere() {
    let reps = replicas(3);
    let first = attach(config(3, None), &reps).await;
    first.write(0, block(2, 0), true).await.unwrap();
    for i in 1..8 {
        first.write(i * BS, block(1, i), false).await.unwrap();
    }
    first.flush().await.unwrap();
    for i in 9..16 {
        first.write(i * BS, block(3, i), false).await.unwrap();
    }
    for r in &reps {
        r.crash();
    }
    first.close().await;
    for r in &reps {
        r.set_down(false);
    }
    let second = attach(config(3, None), &reps).await;
    wait_for(&second, "all healthy", |r| r.iter().all(|i| i.status == ReplicaStatus::Healthy)).await;
    assert!(second.read(0, BS).await.unwrap() == block(2, 0), "FUA block");
    for i in 1..8 {
        assert!(second.read(i * BS, BS).await.unwrap() == block(1, i), "flushed block {i}");
    }
    assert_same(&reps[1].contents(), &reps[0].contents(), "replica 1");
    assert_same(&reps[2].contents(), &reps[0].contents(), "replica 2");
    second.close().await;
}

#[tokio::test]
async fn a_slow_replica_lags_without_slowing_writes() {
    let reps = replicas(3);
    let vol = attach(config(3, None), &reps).await;
    // 250 ms per request: older than the ack timeout (150 ms), younger than the failure
    // timeout (600 ms) for both writes queued behind each other.
    reps[2].set_delay(Duration::from_millis(250));
    let start = Instant::now();
    for i in 0..2 {
        vol.write(i * BS, block(1, i), false).await.unwrap();
    }
    // Waiting for the slow replica would take at least 500 ms.
    assert!(start.elapsed() < Duration::from_millis(400), "writes waited for the slow replica");
    wait_for(&vol, "replica 2 lagging", |r| r[2].status == ReplicaStatus::Lagging).await;
    reps[2].set_delay(Duration::ZERO);
    wait_for(&vol, "replica 2 caught up", |r| {
        r[2].status == ReplicaStatus::Healthy && r[2].acked_seq == r[0].acked_seq
    })
    .await;
    assert_same(&reps[2].contents(), &reps[0].contents(), "replica contents");
    vol.close().await;
}

/// Writes keep landing on a replica while it resyncs, and the replica applies resync
/// writes without a seq guard: only the runtime's ordering guard keeps old copied blocks
/// from overwriting them. The target is slow and the resync window small, so most copied
/// blocks are queued after newer direct writes to the same blocks were.
#[tokio::test]
async fn writes_during_resync_are_never_overwritten_by_older_copies() {
    let reps = replicas(3);
    reps[2].set_naive_resync(true);
    let mut c = config(3, None);
    c.resync_window = 4;
    let vol = attach(c, &reps).await;
    for i in 0..128 {
        vol.write(i * BS, block(1, i), false).await.unwrap();
    }
    vol.flush().await.unwrap();
    reps[2].set_down(true);
    for i in 0..128 {
        vol.write(i * BS, block(2, i), false).await.unwrap();
    }
    wait_for(&vol, "replica 2 failed", |r| r[2].status == ReplicaStatus::Failed).await;
    reps[2].set_delay(Duration::from_millis(1));
    reps[2].set_down(false);
    let mut round = 0u64;
    while vol.replicas()[2].status != ReplicaStatus::Healthy {
        for i in [(round * 37) % 128, (round * 53 + 11) % 128] {
            vol.write(i * BS, block(3 + (round % 200) as u8, i), false).await.unwrap();
        }
        round += 1;
        assert!(round < 2_000, "resync did not finish: {:?}", vol.replicas());
        tokio::time::sleep(Duration::from_millis(4)).await;
    }
    assert!(round > 10, "the resync overlapped only {round} rounds of writes");
    reps[2].set_delay(Duration::ZERO);
    wait_for(&vol, "replica 2 caught up", |r| r[2].acked_seq == r[0].acked_seq).await;
    assert_same(&reps[2].contents(), &reps[0].contents(), "replica contents");
    vol.close().await;
}

#[tokio::test]
async fn bad_requests_get_clear_errors() {
    let reps = replicas(1);
    let vol = attach(config(1, None), &reps).await;
    assert_eq!(vol.write(1, vec![0; BS as usize], false).await.unwrap_err().kind(), ErrorKind::InvalidArgument);
    assert_eq!(vol.read(SIZE, BS).await.unwrap_err().kind(), ErrorKind::OutOfRange);
    assert_eq!(vol.trim(SIZE - BS, 2 * BS).await.unwrap_err().kind(), ErrorKind::OutOfRange);
    vol.write_zeroes(0, 2 * BS, false).await.unwrap();
    assert_eq!(vol.read(0, 2 * BS).await.unwrap(), vec![0; 2 * BS as usize]);
    vol.close().await;
}

#[tokio::test]
async fn attach_without_a_majority_fails() {
    let reps = replicas(3);
    reps[0].set_down(true);
    reps[1].set_down(true);
    let mut c = config(3, None);
    c.machine.attach_timeout_ms = 500;
    let err = ReplicatedVolume::attach(c, reps.clone()).await.err().expect("attach must fail");
    assert_eq!(err.kind(), ErrorKind::Unavailable, "{err}");
}

/// A replica that stops answering while writes keep coming is left behind once its queue
/// holds `MAX_QUEUED_BYTES` (64 MiB) of unacked writes, long before its failure timeout:
/// the queue is bounded in bytes, the quorum keeps acking, and the replica catches up by
/// resync once it answers again. Every write goes to its own place, so a write lost on the
/// way (the write whose send trips the bound must still reach the other replicas) shows
/// as a hole on every replica.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_replica_is_left_behind_when_its_queue_is_full_of_bytes() {
    const BIG: u64 = 128 << 20;
    let mut c = config(3, None);
    c.size = BIG;
    c.machine.failure_timeout_ms = 120_000;
    let reps: Vec<MemReplica> = (0..3).map(|i| MemReplica::new(format!("node-{i}"), BIG)).collect();
    let vol = attach(c, &reps).await;
    // The first replica stalls: the write whose send to it trips the bound is then
    // still to be sent to the two others in the same step.
    reps[0].set_delay(Duration::from_secs(2));
    let piece = 64 * BS;
    let mut expect = vec![0u8; BIG as usize];
    for i in 0..(BIG / piece) {
        let data: Vec<u8> = (0..piece).map(|j| (i as u8).wrapping_add((j / BS) as u8) | 1).collect();
        let at = i * piece;
        vol.write(at, data.clone(), false).await.expect("the quorum acks without the stalled replica");
        expect[at as usize..(at + piece) as usize].copy_from_slice(&data);
    }
    wait_for(&vol, "the stalled replica to be left behind", |r| {
        !matches!(r[0].status, ReplicaStatus::Healthy | ReplicaStatus::Lagging)
    })
    .await;
    vol.flush().await.unwrap();
    assert_same(&reps[1].contents(), &expect, "replica 1: every acknowledged write");
    assert_same(&reps[2].contents(), &expect, "replica 2: every acknowledged write");
    reps[0].set_delay(Duration::ZERO);
    wait_for(&vol, "every replica healthy again", |r| r.iter().all(|h| h.status == ReplicaStatus::Healthy)).await;
    vol.flush().await.unwrap();
    assert_same(&reps[0].contents(), &expect, "the left-behind replica after its resync");
    vol.close().await;
}

/// A replica slower than the others under a sustained stream of large writes is followed,
/// not dropped: while its link holds more than half the byte bound, the engine takes no
/// new client requests, so the writers slow to its pace. Without that, the quorum acked
/// at the fast replicas' pace, the slow one's queue reached the bound within a second, and
/// it was left behind and resynced again and again (seen under 1 MiB sequential writes on
/// a 3-node cluster): two copies most of the time, and the resyncs slowed everyone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_replica_slows_the_writers_instead_of_being_left_behind() {
    const BIG: u64 = 64 << 20;
    const MIB: u64 = 1 << 20;
    let mut c = config(3, None);
    c.size = BIG;
    c.machine.ack_timeout_ms = 1_000;
    c.machine.failure_timeout_ms = 5_000;
    c.machine.io_timeout_ms = 10_000;
    let reps: Vec<MemReplica> = (0..3).map(|i| MemReplica::new(format!("node-{i}"), BIG)).collect();
    let vol = attach(c, &reps).await;
    // At most ~125 writes of 1 MiB a second on replica 0; the others take them as they come.
    reps[0].set_write_delay(Duration::from_millis(8));
    let worst = std::sync::Mutex::new(Vec::new());
    let done = std::sync::atomic::AtomicBool::new(false);
    let watch = async {
        while !done.load(std::sync::atomic::Ordering::Relaxed) {
            let s = vol.replicas()[0].status;
            if !matches!(s, ReplicaStatus::Healthy | ReplicaStatus::Lagging) {
                worst.lock().unwrap().push(s);
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    let mut expect = vec![0u8; BIG as usize];
    let writes: Vec<(u64, Vec<u8>)> = (0..256u64)
        .map(|i| {
            let at = (i * MIB) % BIG;
            let data: Vec<u8> = (0..MIB).map(|j| (i as u8).wrapping_mul(7).wrapping_add((j / BS) as u8) | 1).collect();
            (at, data)
        })
        .collect();
    for (at, data) in &writes {
        expect[*at as usize..(*at + MIB) as usize].copy_from_slice(data);
    }
    // Eight writers, each writing its share in order (a later pass rewrites a place only
    // after the earlier write there was acked, so `expect` is what the volume must hold).
    let writers = (0..8usize).map(|w| {
        let vol = &vol;
        let mine: Vec<&(u64, Vec<u8>)> = writes.iter().skip(w).step_by(8).collect();
        async move {
            for (at, data) in mine {
                vol.write(*at, data.clone(), false).await.expect("write");
            }
        }
    });
    let run = async {
        futures::future::join_all(writers).await;
        done.store(true, std::sync::atomic::Ordering::Relaxed);
    };
    tokio::join!(run, watch);
    let seen = worst.into_inner().unwrap();
    assert!(seen.is_empty(), "the slow replica was dropped during the writes: {:?}", &seen[..seen.len().min(5)]);
    assert_eq!(reps[0].stats().resync_writes, 0, "the slow replica was resynced");
    vol.flush().await.unwrap();
    wait_for(&vol, "the slow replica caught up", |r| r[0].acked_seq == r[1].acked_seq).await;
    for (i, r) in reps.iter().enumerate() {
        assert_same(&r.contents(), &expect, &format!("replica {i}"));
    }
    vol.close().await;
}

/// A returning replica is marked as resyncing on its ordered link before any new write
/// reaches it. Here the mark is slow and the replica loses power before it is recorded:
/// had a new write (FUA, so durable) overtaken the mark, the replica would report a high
/// last seq and no mark, and a later engine could take it for complete (it prefers it as
/// the local replica) although it misses the blocks written while it was down.
#[tokio::test]
async fn a_write_never_reaches_a_resyncing_replica_before_its_mark() {
    let reps = replicas(3);
    let first = attach(config(3, None), &reps).await;
    for i in 0..16 {
        first.write(i * BS, block(1, i), false).await.unwrap();
    }
    first.flush().await.unwrap();
    reps[2].set_down(true);
    for i in 0..8 {
        first.write(i * BS, block(2, i), false).await.unwrap();
    }
    wait_for(&first, "replica 2 failed", |r| r[2].status == ReplicaStatus::Failed).await;
    reps[2].set_mark_delay(Duration::from_millis(500));
    reps[2].set_down(false);
    wait_for(&first, "replica 2 resyncing", |r| r[2].status == ReplicaStatus::Resyncing).await;
    first.write(20 * BS, block(3, 20), true).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    // Power loss on replica 2 while its mark is still being recorded.
    reps[2].crash();
    wait_for(&first, "replica 2 failed again", |r| r[2].status == ReplicaStatus::Failed).await;
    first.close().await;

    reps[2].set_mark_delay(Duration::ZERO);
    reps[2].set_down(false);
    // The next engine runs on replica 2's node: it prefers replica 2 as source and for reads.
    let mut c = config(3, None);
    c.machine.replicas[0].local = false;
    c.machine.replicas[2].local = true;
    let second = attach(c, &reps).await;
    wait_for(&second, "all healthy", |r| r.iter().all(|i| i.status == ReplicaStatus::Healthy)).await;
    for i in 0..8 {
        assert!(second.read(i * BS, BS).await.unwrap() == block(2, i), "acknowledged block {i} lost");
    }
    assert!(second.read(20 * BS, BS).await.unwrap() == block(3, 20), "acknowledged FUA block lost");
    assert_same(&reps[2].contents(), &reps[0].contents(), "replica 2");
    assert_same(&reps[1].contents(), &reps[0].contents(), "replica 1");
    second.close().await;
}

/// A replica that missed three attach cycles (an engine wrote in each) resyncs
/// incrementally: the volume's epoch history, recorded on the replicas, tells where its
/// history and the volume's forked, so only the blocks changed since are copied.
#[tokio::test]
async fn a_replica_that_missed_three_attaches_resyncs_only_what_changed() {
    let reps = replicas(3);
    let first = attach(config(3, None), &reps).await;
    for i in 0..64 {
        first.write(i * BS, block(1, i), false).await.unwrap();
    }
    first.flush().await.unwrap();
    let last = first.replicas()[0].acked_seq;
    wait_for(&first, "replica 2 durable", |r| r[2].durable_seq >= last).await;
    first.close().await;
    reps[2].set_down(true);
    let mut changed = std::collections::BTreeSet::new();
    for cycle in 0..3u64 {
        let vol = attach(config(3, None), &reps).await;
        assert_eq!(vol.epoch(), 2 + cycle);
        // Three blocks per cycle, one of them written again in the next cycle.
        for i in [cycle * 5 + 1, cycle * 5 + 2, cycle * 5 + 6] {
            vol.write(i * BS, block(10 + cycle as u8, i), false).await.unwrap();
            changed.insert(i);
        }
        vol.flush().await.unwrap();
        vol.close().await;
    }
    assert_eq!(changed.len(), 7);
    let before = reps[2].stats();
    reps[2].set_down(false);
    let vol = attach(config(3, None), &reps).await;
    wait_for(&vol, "all healthy", |r| r.iter().all(|i| i.status == ReplicaStatus::Healthy)).await;
    // Only the changed blocks were copied, not the 64 written before it left.
    assert_eq!(vol.replicas()[2].resync_chunks, changed.len() as u64);
    assert_eq!(reps[2].stats().resync_writes - before.resync_writes, changed.len() as u64);
    assert_same(&reps[2].contents(), &reps[0].contents(), "replica 2");
    assert_same(&reps[1].contents(), &reps[0].contents(), "replica 1");
    vol.close().await;
}

/// Reads go straight to the local replica only while it holds every acknowledged write.
/// Here the local replica is slow to apply (but answers reads at once and stays healthy):
/// a write acknowledged by the two others must be visible to the next read, which must
/// then not be served from the local replica's older copy.
#[tokio::test]
async fn a_read_after_an_ack_the_local_replica_has_not_applied_sees_the_write() {
    let mut c = config(3, None);
    c.machine.ack_timeout_ms = 5_000;
    c.machine.failure_timeout_ms = 10_000;
    let reps = replicas(3);
    let vol = attach(c, &reps).await;
    wait_for(&vol, "all healthy", |r| r.iter().all(|i| i.status == ReplicaStatus::Healthy)).await;
    for round in 0..20u8 {
        vol.write(0, block(round * 2 + 1, 0), false).await.unwrap();
        wait_for(&vol, "every replica applied it", |r| r.iter().all(|i| i.acked_seq == r[1].acked_seq)).await;
        assert!(vol.read(0, BS).await.unwrap() == block(round * 2 + 1, 0), "round {round}: read from the local copy");
        reps[0].set_write_delay(Duration::from_millis(400));
        vol.write(0, block(round * 2 + 2, 0), false).await.unwrap();
        assert_eq!(vol.replicas()[0].status, ReplicaStatus::Healthy, "the slow local replica is still healthy");
        let got = vol.read(0, BS).await.unwrap();
        assert!(got == block(round * 2 + 2, 0), "round {round}: a read after the ack returned older data");
        reps[0].set_write_delay(Duration::ZERO);
    }
    vol.close().await;
}

/// Reads straight from the local replica stop with the read lease: cut off from the
/// others, the engine may be fenced by a newer one at any time, so a read must fail (after
/// its deadline) instead of returning what the local replica holds.
#[tokio::test]
async fn without_the_read_lease_no_read_is_served_from_the_local_replica() {
    let mut c = config(3, None);
    c.machine.lease_ms = 300;
    c.machine.io_timeout_ms = 1_000;
    let reps = replicas(3);
    let vol = attach(c, &reps).await;
    wait_for(&vol, "all healthy", |r| r.iter().all(|i| i.status == ReplicaStatus::Healthy)).await;
    vol.write(0, block(1, 0), false).await.unwrap();
    assert!(vol.read(0, BS).await.unwrap() == block(1, 0));
    reps[1].set_down(true);
    reps[2].set_down(true);
    tokio::time::sleep(Duration::from_millis(700)).await;
    let err = vol.read(0, BS).await.expect_err("a read without the lease");
    assert_eq!(err.kind(), ErrorKind::Unavailable, "{err}");
    reps[1].set_down(false);
    reps[2].set_down(false);
    vol.close().await;
}

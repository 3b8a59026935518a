//! Self-healing over in-memory replicas: read repair, the scrub, and resyncs whose source
//! holds a corrupt block (see `replication/heal.rs`).

use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::stream::BoxStream;
use hlstore_core::{BlockDevice, ErrorKind, Result};
use hlstore_core::{Epoch, Offset};
use hlstore_replication::transport::{Claim, SnapshotInfo};
use hlstore_replication::{
    ChunkData, HealStats, History, MachineConfig, MemReplica, ReplicaSeqs, ReplicaStatus, ReplicaTransport,
    ReplicatedVolume, ResyncChunk, Seq, VolumeConfig, WriteReq, WriteStream,
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

/// A [`MemReplica`] whose plain reads (the scrub's) take `read_delay` and whose stream
/// writes are applied `write_delay` after they were sent (pipelined: the delay adds to
/// each write's latency, not to the stream's throughput); everything else is the
/// replica's own.
#[derive(Clone)]
struct Slow {
    inner: MemReplica,
    read_delay: Duration,
    write_delay: Duration,
}

impl Slow {
    fn new(inner: &MemReplica, read_delay: Duration, write_delay: Duration) -> Self {
        Self { inner: inner.clone(), read_delay, write_delay }
    }
}

impl ReplicaTransport for Slow {
    fn name(&self) -> &str {
        self.inner.name()
    }
    async fn state(&self) -> Result<ReplicaSeqs> {
        self.inner.state().await
    }
    async fn open(&self, claim: Claim) -> Result<ReplicaSeqs> {
        self.inner.open(claim).await
    }
    async fn ping(&self, epoch: Epoch) -> Result<ReplicaSeqs> {
        self.inner.ping(epoch).await
    }
    async fn write_stream(&self, epoch: Epoch) -> Result<WriteStream> {
        let WriteStream { requests: inner, acks } = self.inner.write_stream(epoch).await?;
        let delay = self.write_delay;
        let (requests, mut sent) = tokio::sync::mpsc::channel::<WriteReq>(1024);
        let (stamped, mut due) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Some(req) = sent.recv().await {
                if stamped.send((tokio::time::Instant::now() + delay, req)).is_err() {
                    break;
                }
            }
        });
        tokio::spawn(async move {
            while let Some((at, req)) = due.recv().await {
                tokio::time::sleep_until(at).await;
                if inner.send(req).await.is_err() {
                    break;
                }
            }
        });
        Ok(WriteStream { requests, acks })
    }
    async fn read(&self, epoch: Epoch, offset: Offset, len: u64) -> Result<Vec<u8>> {
        tokio::time::sleep(self.read_delay).await;
        self.inner.read(epoch, offset, len).await
    }
    async fn flush(&self, epoch: Epoch) -> Result<Seq> {
        self.inner.flush(epoch).await
    }
    async fn trim(&self, epoch: Epoch, seq: Seq, offset: Offset, len: u64) -> Result<()> {
        self.inner.trim(epoch, seq, offset, len).await
    }
    async fn resync_stream(
        &self,
        epoch: Epoch,
        since: Seq,
        resume: Option<(u64, Seq)>,
    ) -> Result<BoxStream<'static, Result<ResyncChunk>>> {
        self.inner.resync_stream(epoch, since, resume).await
    }
    async fn begin_resync(
        &self,
        epoch: Epoch,
        from_seq: Seq,
        resume: bool,
        history: History,
    ) -> Result<Option<(u64, Seq)>> {
        self.inner.begin_resync(epoch, from_seq, resume, history).await
    }
    async fn set_history(&self, epoch: Epoch, history: History) -> Result<()> {
        self.inner.set_history(epoch, history).await
    }
    async fn checkpoint_resync(&self, epoch: Epoch, offset: Offset) -> Result<()> {
        self.inner.checkpoint_resync(epoch, offset).await
    }
    async fn create_snapshot(&self, epoch: Epoch, snap: SnapshotInfo) -> Result<SnapshotInfo> {
        self.inner.create_snapshot(epoch, snap).await
    }
    async fn delete_snapshot(&self, epoch: Epoch, name: &str) -> Result<bool> {
        self.inner.delete_snapshot(epoch, name).await
    }
    async fn list_snapshots(&self) -> Result<Vec<SnapshotInfo>> {
        self.inner.list_snapshots().await
    }
    async fn install_snapshot(
        &self,
        epoch: Epoch,
        snap: SnapshotInfo,
        blocks: Vec<(u64, Option<Vec<u8>>)>,
        last: bool,
    ) -> Result<()> {
        self.inner.install_snapshot(epoch, snap, blocks, last).await
    }
    async fn expand(&self, epoch: Epoch, new_size: u64) -> Result<()> {
        self.inner.expand(epoch, new_size).await
    }
    async fn read_snapshot(&self, name: &str, offset: Offset, len: u64) -> Result<Vec<u8>> {
        self.inner.read_snapshot(name, offset, len).await
    }
    async fn changed_blocks(&self, from: Option<&str>, to: Option<&str>) -> Result<Vec<(u64, u64)>> {
        self.inner.changed_blocks(from, to).await
    }
    async fn apply_resync(&self, epoch: Epoch, chunks: Vec<ResyncChunk>) -> Result<u64> {
        self.inner.apply_resync(epoch, chunks).await
    }
    async fn end_resync(&self, epoch: Epoch) -> Result<Seq> {
        self.inner.end_resync(epoch).await
    }
}

/// The scrub never stalls foreground writes: its checks read beside the write pipelines.
/// Here every scrub read takes 800 ms on every replica and the scrub checks the whole
/// volume back to back, so a check that waited for (or held back) the writes in flight
/// would hold some write for most of those 800 ms. Writes must keep their own latency.
#[tokio::test]
async fn the_scrub_never_stalls_writes_in_flight() {
    let reps = replicas();
    let slow: Vec<Slow> = reps.iter().map(|r| Slow::new(r, Duration::from_millis(800), Duration::ZERO)).collect();
    let mut cfg = config(1 << 30);
    // Reads answered within the deadline.
    cfg.machine.failure_timeout_ms = 3_000;
    let vol = ReplicatedVolume::attach(cfg, slow).await.expect("attach");
    let h = vol.heal_stats();
    let started = Instant::now();
    let (mut worst, mut n) = (Duration::ZERO, 0u64);
    while started.elapsed() < Duration::from_millis(2_500) {
        let t = Instant::now();
        vol.write((n % 64) * BS, block(4, n), false).await.unwrap();
        worst = worst.max(t.elapsed());
        n += 1;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // The scrub did run meanwhile (its checks were in flight during the writes).
    assert!(get(&h.scrub_blocks) >= 256, "the scrub compared {} blocks", get(&h.scrub_blocks));
    assert!(worst < Duration::from_millis(300), "a write took {worst:?} while the scrub ran ({n} writes)");
    vol.close().await;
}

/// Scrub reads are ordered against the writes to their own range: under writes that one
/// replica acks late (so they are in flight there while others applied them), the scrub
/// sees the same content everywhere (no false divergence), repairs nothing it should not,
/// and still repairs a corrupt block.
#[tokio::test]
async fn the_scrub_under_concurrent_writes_sees_each_range_at_one_point() {
    let reps = replicas();
    let slow: Vec<Slow> = reps
        .iter()
        .enumerate()
        .map(|(i, r)| Slow::new(r, Duration::ZERO, Duration::from_millis(if i == 2 { 3 } else { 0 })))
        .collect();
    // Checks of the whole 1 MiB volume back to back.
    let vol = Arc::new(ReplicatedVolume::attach(config(1 << 30), slow).await.expect("attach"));
    let h = vol.heal_stats();
    let writers: Vec<_> = (0..4u64)
        .map(|w| {
            let vol = vol.clone();
            tokio::spawn(async move {
                let started = Instant::now();
                let mut n = 0u64;
                while started.elapsed() < Duration::from_millis(2_000) {
                    let b = (n * 7 + w * 13) % (SIZE / BS);
                    vol.write(b * BS, block(w as u8 + 1, n), false).await.unwrap();
                    n += 1;
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    reps[1].corrupt_block(200);
    for w in writers {
        w.await.unwrap();
    }
    until("the corrupt block rewritten (or overwritten)", 10, || !reps[1].is_corrupt(200)).await;
    vol.flush().await.unwrap();
    let last = vol.replicas()[0].acked_seq;
    until("every replica applied every write", 10, || vol.replicas().iter().all(|r| r.acked_seq >= last)).await;
    assert!(get(&h.scrub_blocks) >= 512, "the scrub compared {} blocks", get(&h.scrub_blocks));
    assert_eq!(get(&h.divergent_blocks), 0, "false divergence: a scrub read did not wait for a write to its range");
    assert_eq!(get(&h.unrecoverable_blocks), 0);
    assert_same(&reps[1].contents(), &reps[0].contents(), "replica 1");
    assert_same(&reps[2].contents(), &reps[0].contents(), "replica 2");
    assert!(all_healthy(&vol), "{:?}", vol.replicas());
    Arc::try_unwrap(vol).ok().expect("writers done").close().await;
}

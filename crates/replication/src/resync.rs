//! The resync copy task: streams the blocks changed since `since` from the source and hands
//! them to the actor, which queues them on the target's ordered link (dropping blocks that
//! a newer direct write already covers — see [`crate`], "Resync ordering").
//!
//! Two-sided resyncs also list the blocks the target itself changed since `since` and copy
//! those from the source (read), because the target may hold writes the source never had.
//! Every chunk of a two-sided resync carries `lift_seq`, a seq the machine reserved for it:
//! above every seq assigned or seen, below every later write, so the replica's "never
//! replace a newer block" guard lets them replace the target's stray blocks but never a
//! newer write.
//!
//! Backpressure: at most `window` chunks are between this task and the target's ack;
//! with a rate limit, the task also paces itself to `rate` bytes per second.
//!
//! Resumable: blocks come in ascending offset order, so every `checkpoint_every` blocks the
//! task asks the target (in order on its link, after the chunks before) to flush and
//! record "every block below `offset` is complete up to my durable seq". A later resync
//! of the same engine from the same point (the target restarted, or its link failed)
//! gets that checkpoint from `BeginResync` and streams blocks below it only if they
//! changed after its seq. Trims are always resent (they carry no data). The target's own
//! blocks of a two-sided resync are copied in the same offset order, merged with the
//! source's, so a checkpoint covers them too (strays below it were already replaced); a
//! resumed two-sided resync lists the target's own changes with the same split. Only the
//! engine that took a checkpoint resumes from it (the store keys it by epoch): under one
//! engine the history is linear, so "complete up to seq" means the same thing to both.
//!
//! Bad blocks on the source: its stream ends with `Corruption` at the bad block (every
//! block before it was sent). The task asks the actor for the block ([`ResyncMsg::Fetch`]:
//! a check across the in-sync replicas, which also rewrites the source's copy, see
//! `heal.rs`), hands the good copy to the target, and reopens the stream past the bad
//! block. With no good copy anywhere the block is skipped (the target keeps what it had,
//! the actor counts the block as unrecoverable and logs it) and the copy goes on: a bad
//! block never fails the source or makes the resync loop.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::{mpsc, Semaphore};

use super::link::{with_timeout, Permit};
use super::transport::{ChunkData, ReplicaTransport, ResyncChunk, SnapshotInfo};
use super::types::{History, ReplicaId, Seq};
use hlstore_core::error::{Error, ErrorKind, Result};
use hlstore_core::{Epoch, Offset};

/// Chunks handed to the actor in one message, at most (those the source stream has ready).
const HAND_OVER_BATCH: usize = 256;
/// Snapshot blocks sent in one install call, at most.
const INSTALL_BATCH: usize = 256;
/// Rounds of carrying snapshots at the end of a resync, at most (a round after one that
/// installed something picks up snapshots taken or deleted meanwhile).
const CARRY_ROUNDS: usize = 8;

/// What the resync task sends to the actor.
pub(super) enum ResyncMsg {
    /// Chunks in offset order, holding one window permit each.
    Chunks(Vec<ResyncChunk>, Permit),
    /// Every chunk below `offset` was sent: checkpoint the target (in link order).
    Checkpoint(u64),
    /// The target had a checkpoint: the resync resumes from `offset`.
    Resumed(u64),
    /// The source's block at `offset` failed its checksum: check the in-sync replicas and
    /// answer the good copy with the seq to apply it at (None: no good copy).
    Fetch { offset: u64, reply: tokio::sync::oneshot::Sender<super::heal::Fetched> },
    /// Everything was queued; the actor ends the resync on the target's link.
    Copied,
    /// The resync failed; `source_failed` tells whether the source (not the target) erred.
    Failed { error: Error, source_failed: bool },
}

pub(super) type ResyncReports = mpsc::UnboundedSender<(ReplicaId, u64, ResyncMsg)>;

/// One resync job.
pub(super) struct ResyncJob<T> {
    pub source: Arc<T>,
    pub target: Arc<T>,
    pub epoch: u64,
    pub since: Seq,
    /// Recorded on the target: it holds the history up to here until the resync ends.
    /// (The actor already queued the mark on the target's link ahead of every write; the
    /// task asks again, with the same values, for the checkpoint to resume from.)
    pub consistent: Seq,
    /// The volume's epoch history, recorded with the mark.
    pub history: History,
    /// Seq for chunks of a two-sided resync (see the module docs); `None` keeps each
    /// chunk's own seq.
    pub lift_seq: Option<Seq>,
    pub two_sided: bool,
    pub block_size: u64,
    pub window: usize,
    /// Blocks copied between checkpoints (0: never checkpoint).
    pub checkpoint_every: u64,
    /// Bytes per second, at most (0: unlimited).
    pub rate: u64,
    pub timeout: Duration,
    pub replica: ReplicaId,
    pub gen: u64,
    pub reports: ResyncReports,
}

impl<T: ReplicaTransport> ResyncJob<T> {
    pub async fn run(self) {
        let res = self.copy().await;
        let msg = match res {
            Ok(()) => ResyncMsg::Copied,
            Err((error, source_failed)) => ResyncMsg::Failed { error, source_failed },
        };
        let _ = self.reports.send((self.replica, self.gen, msg));
    }

    /// Copies everything; errors say whether the source failed (`true`) or the target.
    async fn copy(&self) -> std::result::Result<(), (Error, bool)> {
        let (on_source, on_target) = (|e| (e, true), |e| (e, false));
        let window = Arc::new(Semaphore::new(self.window.max(1)));
        let resume = with_timeout(
            self.timeout,
            "begin resync",
            self.target.begin_resync(Epoch(self.epoch), self.consistent, true, self.history),
        )
        .await
        .map_err(on_target)?
        .filter(|&(offset, _)| offset > 0);
        if let Some((offset, _)) = resume {
            self.report(ResyncMsg::Resumed(offset)).map_err(on_target)?;
        }
        let mut target_only = BTreeSet::new();
        if self.two_sided {
            let mut own = with_timeout(
                self.timeout,
                "resync list",
                self.target.resync_stream(Epoch(self.epoch), self.since, resume),
            )
            .await
            .map_err(on_target)?;
            while let Some(c) = own.next().await {
                let c = c.map_err(on_target)?;
                let len = match c.data {
                    ChunkData::Trim(len) => len,
                    _ => self.block_size,
                };
                let first = c.offset / self.block_size;
                target_only.extend(first..first + len.div_ceil(self.block_size));
            }
        }
        let pace = Pace::new(self.rate);
        let mut checkpointed = resume.map_or(0, |(offset, _)| offset);
        let mut since_checkpoint = 0;
        let mut from = resume;
        let mut last_bad = None;
        // Chunks ready together go to the actor as one message (in offset order); anything
        // else reported (a checkpoint, a copied or healed block) sends them first.
        let mut pending: Vec<ResyncChunk> = Vec::new();
        let batch = HAND_OVER_BATCH.min(self.window.max(1));
        'stream: loop {
            let mut chunks =
                with_timeout(self.timeout, "resync", self.source.resync_stream(Epoch(self.epoch), self.since, from))
                    .await
                    .map_err(on_source)?
                    .ready_chunks(batch);
            while let Some(ready) = chunks.next().await {
                for c in ready {
                    let mut c = match c {
                        Ok(c) => c,
                        Err(Error::Corruption { offset, .. }) if last_bad.is_none_or(|b| offset > b) => {
                            // Blocks come in offset order: everything below `offset` was sent.
                            self.hand_over_all(std::mem::take(&mut pending), &window).await.map_err(on_target)?;
                            let bad = offset / self.block_size;
                            while let Some(b) = target_only.first().copied().filter(|&b| b < bad) {
                                target_only.remove(&b);
                                self.copy_block(b, &window, &pace).await?;
                            }
                            target_only.remove(&bad);
                            self.heal_block(bad, &window).await?;
                            last_bad = Some(offset);
                            // Past the bad block: nothing below it again (trims are resent,
                            // which is harmless).
                            from = Some((offset + self.block_size, Seq::MAX));
                            continue 'stream;
                        }
                        Err(e) => return Err(on_source(e)),
                    };
                    let len = match c.data {
                        ChunkData::Trim(len) => len,
                        ChunkData::Data(ref d) => d.len() as u64,
                        ChunkData::Zero => self.block_size,
                    };
                    let block = !matches!(c.data, ChunkData::Trim(_));
                    let first = c.offset / self.block_size;
                    if block && target_only.first().is_some_and(|&b| b < first) {
                        // The target's own blocks before this one go first: offset order holds.
                        self.hand_over_all(std::mem::take(&mut pending), &window).await.map_err(on_target)?;
                        while let Some(b) = target_only.first().copied().filter(|&b| b < first) {
                            target_only.remove(&b);
                            self.copy_block(b, &window, &pace).await?;
                        }
                    }
                    if block
                        && self.checkpoint_every > 0
                        && since_checkpoint >= self.checkpoint_every
                        && c.offset > checkpointed
                    {
                        self.hand_over_all(std::mem::take(&mut pending), &window).await.map_err(on_target)?;
                        self.report(ResyncMsg::Checkpoint(c.offset)).map_err(on_target)?;
                        (checkpointed, since_checkpoint) = (c.offset, 0);
                    }
                    since_checkpoint += u64::from(block);
                    for b in first..first + len.div_ceil(self.block_size) {
                        target_only.remove(&b);
                    }
                    if let Some(seq) = self.lift_seq {
                        c.seq = seq;
                    }
                    pending.push(c);
                    if block && self.rate > 0 {
                        self.hand_over_all(std::mem::take(&mut pending), &window).await.map_err(on_target)?;
                        pace.wait(self.block_size).await;
                    }
                }
                self.hand_over_all(std::mem::take(&mut pending), &window).await.map_err(on_target)?;
            }
            break;
        }
        for b in target_only {
            self.copy_block(b, &window, &pace).await?;
        }
        // The chunks must be applied before the snapshots' views are computed against them.
        self.drained(&window).await?;
        self.carry_snapshots().await
    }

    /// Waits until every chunk handed over was applied (all window permits are back).
    async fn drained(&self, window: &Arc<Semaphore>) -> std::result::Result<(), (Error, bool)> {
        let all = self.window_permits();
        let permits =
            window.acquire_many(all).await.map_err(|_| (Error::Internal("resync window closed".into()), false))?;
        drop(permits);
        Ok(())
    }

    /// Makes the target's snapshots the source's: deletes those the source no longer has,
    /// installs those it lacks or holds partially. An install first records the snapshot
    /// on the target (partial), so from then on the target's own writes keep what it sees;
    /// then it copies the snapshot's content of every block the source changed since it
    /// (the target's live data equals the source's now, so the rest it already shows). A
    /// two-sided resync gave copied blocks a new seq, so there the whole view is copied.
    async fn carry_snapshots(&self) -> std::result::Result<(), (Error, bool)> {
        let t = self.timeout;
        let list_source = || async {
            match with_timeout(t, "list snapshots", self.source.list_snapshots()).await {
                Ok(l) => Ok(Some(l)),
                Err(e) if e.kind() == ErrorKind::Unsupported => Ok(None),
                Err(e) => Err((e, true)),
            }
        };
        let Some(mut src) = list_source().await? else { return Ok(()) };
        // Snapshots taken or deleted while the installs run are carried by another round
        // (each round lists the source again), until a round has nothing to install.
        for _ in 0..CARRY_ROUNDS {
            let tgt = match with_timeout(t, "list snapshots", self.target.list_snapshots()).await {
                Ok(l) => l,
                Err(e) if e.kind() == ErrorKind::Unsupported => return Ok(()),
                Err(e) => return Err((e, false)),
            };
            for s in tgt.iter().filter(|s| !src.iter().any(|x| x.name == s.name)) {
                self.drop_target_snapshot(&s.name).await?;
            }
            let mut installed = false;
            for s in src.iter().filter(|s| !s.partial) {
                if tgt.iter().any(|x| x.name == s.name && !x.partial) {
                    continue;
                }
                self.install(s).await?;
                installed = true;
            }
            if !installed {
                return Ok(());
            }
            let Some(now) = list_source().await? else { return Ok(()) };
            src = now;
        }
        Ok(())
    }

    async fn drop_target_snapshot(&self, name: &str) -> std::result::Result<(), (Error, bool)> {
        with_timeout(self.timeout, "delete snapshot", self.target.delete_snapshot(Epoch(self.epoch), name))
            .await
            .map(drop)
            .map_err(|e| (e, false))
    }

    /// Installs `s` on the target. A snapshot deleted meanwhile (the engine's delete raced
    /// the copy: the source answers NotFound) is not a fault of either side: its partial
    /// copy is removed from the target and the resync goes on.
    async fn install(&self, s: &SnapshotInfo) -> std::result::Result<(), (Error, bool)> {
        match self.install_once(s).await {
            Err((e, blame_source)) if e.kind() == ErrorKind::NotFound => {
                let still = with_timeout(self.timeout, "list snapshots", self.source.list_snapshots())
                    .await
                    .map_err(|e| (e, true))?
                    .iter()
                    .any(|x| x.name == s.name);
                if still {
                    return Err((e, blame_source));
                }
                tracing::info!(snapshot = %s.name, "snapshot deleted while a resync carried it; not installed");
                self.drop_target_snapshot(&s.name).await
            }
            r => r,
        }
    }

    async fn install_once(&self, s: &SnapshotInfo) -> std::result::Result<(), (Error, bool)> {
        let (t, bs) = (self.timeout, self.block_size);
        let install = |blocks, last| self.target.install_snapshot(Epoch(self.epoch), s.clone(), blocks, last);
        with_timeout(t, "install snapshot", install(Vec::new(), false)).await.map_err(|e| (e, false))?;
        let mut runs = with_timeout(t, "changed blocks", self.source.changed_blocks(Some(&s.name), None))
            .await
            .map_err(|e| (e, true))?;
        if self.two_sided {
            let all = with_timeout(t, "changed blocks", self.source.changed_blocks(None, Some(&s.name)))
                .await
                .map_err(|e| (e, true))?;
            runs.extend(all);
        }
        let mut blocks: Vec<u64> = runs.into_iter().flat_map(|(b, n)| b..b + n).filter(|b| b * bs < s.size).collect();
        blocks.sort_unstable();
        blocks.dedup();
        let mut copied = 0u64;
        for piece in blocks.chunk_by(|a, b| b == &(a + 1)).flat_map(|run| run.chunks(INSTALL_BATCH)) {
            let (first, n) = (piece[0], piece.len() as u64);
            let data = with_timeout(t, "read snapshot", self.source.read_snapshot(&s.name, Offset(first * bs), n * bs))
                .await
                .map_err(|e| (e, true))?;
            let batch: Vec<(u64, Option<Vec<u8>>)> = data
                .chunks(bs as usize)
                .zip(first..)
                .map(|(d, b)| (b, d.iter().any(|&x| x != 0).then(|| d.to_vec())))
                .collect();
            with_timeout(t, "install snapshot", install(batch, false)).await.map_err(|e| (e, false))?;
            copied += n;
        }
        with_timeout(t, "install snapshot", install(Vec::new(), true)).await.map_err(|e| (e, false))?;
        tracing::info!(snapshot = %s.name, blocks = copied, "snapshot carried to a resynced replica");
        Ok(())
    }

    /// Block `b` of the source failed its checksum: hands the target the good copy from
    /// another in-sync replica, if there is one (the actor also repairs the source).
    async fn heal_block(&self, b: u64, window: &Arc<Semaphore>) -> std::result::Result<(), (Error, bool)> {
        let offset = b * self.block_size;
        let (reply, rx) = tokio::sync::oneshot::channel();
        self.report(ResyncMsg::Fetch { offset, reply }).map_err(|e| (e, false))?;
        match rx.await {
            Ok(Some((data, seq))) => {
                let data = if data.iter().all(|&x| x == 0) { ChunkData::Zero } else { ChunkData::Data(data) };
                self.hand_over(ResyncChunk { offset, seq, data }, window).await.map_err(|e| (e, false))
            }
            _ => {
                tracing::error!(replica.id = %self.target.name(), offset, "resync skips a block that is corrupt on every in-sync replica; the target keeps its own copy");
                Ok(())
            }
        }
    }

    /// Copies block `b` (one the target changed on its own) from the source.
    async fn copy_block(&self, b: u64, window: &Arc<Semaphore>, pace: &Pace) -> std::result::Result<(), (Error, bool)> {
        let offset = b * self.block_size;
        let read = with_timeout(
            self.timeout,
            "resync read",
            self.source.read(Epoch(self.epoch), Offset(offset), self.block_size),
        )
        .await;
        let data = match read {
            Err(e) if e.kind() == ErrorKind::Corruption => return self.heal_block(b, window).await,
            other => other.map_err(|e| (e, true))?,
        };
        let data = if data.iter().all(|&x| x == 0) { ChunkData::Zero } else { ChunkData::Data(data.into()) };
        let seq = self.lift_seq.unwrap_or(self.since);
        self.hand_over(ResyncChunk { offset, seq, data }, window).await.map_err(|e| (e, false))?;
        pace.wait(self.block_size).await;
        Ok(())
    }

    fn report(&self, msg: ResyncMsg) -> Result<()> {
        self.reports
            .send((self.replica, self.gen, msg))
            .map_err(|_| Error::Unavailable("volume closed during resync".into()))
    }

    async fn hand_over(&self, chunk: ResyncChunk, window: &Arc<Semaphore>) -> Result<()> {
        self.hand_over_all(vec![chunk], window).await
    }

    /// Hands `chunks` to the actor as one message (one window permit per chunk).
    async fn hand_over_all(&self, chunks: Vec<ResyncChunk>, window: &Arc<Semaphore>) -> Result<()> {
        if chunks.is_empty() {
            return Ok(());
        }
        let n = u32::try_from(chunks.len()).unwrap_or(u32::MAX).min(self.window_permits());
        let permit =
            window.clone().acquire_many_owned(n).await.map_err(|_| Error::Internal("resync window closed".into()))?;
        self.report(ResyncMsg::Chunks(chunks, Arc::new(permit)))
    }

    /// The window in permits.
    fn window_permits(&self) -> u32 {
        u32::try_from(self.window.max(1)).unwrap_or(u32::MAX)
    }
}

/// Paces a copy to a byte rate: waits until `bytes` so far fit in the elapsed time.
struct Pace {
    rate: u64,
    start: tokio::time::Instant,
    bytes: std::sync::atomic::AtomicU64,
}

impl Pace {
    fn new(rate: u64) -> Self {
        Self { rate, start: tokio::time::Instant::now(), bytes: 0.into() }
    }

    async fn wait(&self, n: u64) {
        if self.rate == 0 {
            return;
        }
        let total = self.bytes.fetch_add(n, std::sync::atomic::Ordering::Relaxed) + n;
        let due = self.start + Duration::from_secs_f64(total as f64 / self.rate as f64);
        tokio::time::sleep_until(due).await;
    }
}

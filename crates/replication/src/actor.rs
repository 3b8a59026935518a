//! The actor of a [`super::ReplicatedVolume`]: the only place that touches the machine.
//!
//! It owns the machine, one link per connected replica (`link.rs`), the resync tasks
//! (`resync.rs`) and one-shot RPC tasks, all in one `JoinSet` aborted when it ends. Replies
//! come back on unbounded channels from tasks it owns; replies from connections or resyncs
//! the machine already dropped are filtered out by generation numbers before they reach
//! it, so every decision is made in one order.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use std::sync::atomic::{AtomicU64, Ordering as AtomicOrdering};
use tokio::sync::{mpsc, oneshot};
use tokio::task::{AbortHandle, JoinSet};
use tokio::time::Instant;

use super::event::{Command, Event};
use super::heal::{self, Answer, Cause, Check, Checks, Fetched, HealStats, Scrub, ScrubNow, ScrubReport};
use super::link::{self, LinkEvent, LinkOp, Permit};
use super::machine::{Machine, Phase};
use super::resync::{ResyncJob, ResyncMsg, ResyncReports};
use super::transport::{ChunkData, Claim, ClaimMode, ReplicaTransport, ResyncChunk, SnapshotInfo};
use super::types::{
    FailReason, OpId, ReplicaError, ReplicaHealth, ReplicaId, ReplicaSeqs, ReplicaStatus, Seq, VolumeConfig,
};
use hlstore_core::error::{Error, ErrorKind, Result};
use hlstore_core::{Epoch, Offset};

/// Unacked write bytes on one replica's link above which the engine holds client requests
/// back (`Actor::hold_requests`): half the bound at which it leaves the replica behind.
const HOLD_QUEUED_BYTES: u64 = link::MAX_QUEUED_BYTES / 2;

#[derive(Debug, Default)]
pub(super) struct Shared {
    pub epoch: u64,
    pub replicas: Vec<ReplicaHealth>,
    pub heal: Arc<HealStats>,
}

pub(super) enum Request {
    Change { payload: Payload, fua: bool, reply: oneshot::Sender<Result<()>> },
    Flush { reply: oneshot::Sender<Result<()>> },
    Read { offset: u64, len: u64, reply: oneshot::Sender<Result<Vec<u8>>> },
    Snapshot { snap: SnapshotInfo, reply: oneshot::Sender<Result<SnapshotInfo>> },
    DeleteSnapshot { name: String, reply: oneshot::Sender<Result<bool>> },
    Expand { size: u64, reply: oneshot::Sender<Result<()>> },
    ScrubNow { reply: oneshot::Sender<Result<ScrubReport>> },
}

#[derive(Debug, Clone)]
pub(super) enum Payload {
    Data { offset: u64, data: Bytes },
    Trim { offset: u64, len: u64 },
}

impl Payload {
    fn range(&self) -> (u64, u64) {
        match self {
            Payload::Data { offset, data } => (*offset, data.len() as u64),
            Payload::Trim { offset, len } => (*offset, *len),
        }
    }
}

enum Reply {
    Done(oneshot::Sender<Result<()>>),
    Read { offset: u64, len: u64, reply: oneshot::Sender<Result<Vec<u8>>> },
}

enum Internal {
    State(ReplicaId, Result<ReplicaSeqs>),
    Open(ReplicaId, Result<ReplicaSeqs>),
    Ping(ReplicaId, Result<ReplicaSeqs>),
    Read {
        op: OpId,
        replica: ReplicaId,
        res: Result<Vec<u8>>,
    },
    /// The answers to a check of replicas against each other (`heal.rs`).
    Checked {
        id: u64,
        answers: Vec<(ReplicaId, Answer)>,
    },
    Repaired {
        cause: Cause,
        replica: ReplicaId,
        blocks: Vec<u64>,
        res: Result<u64>,
    },
}

/// A client read that failed its checksum on some replicas: those replicas, and the
/// first mismatch (offset, stored crc, data crc).
struct CorruptRead {
    replicas: Vec<ReplicaId>,
    first: (u64, u32, u32),
}

struct LinkHandle {
    gen: u64,
    ops: mpsc::UnboundedSender<LinkOp>,
    abort: AbortHandle,
    /// Write bytes queued on the link and not yet acked (bounded by `MAX_QUEUED_BYTES`).
    queued: link::QueuedBytes,
}

/// Lets client reads go straight to the local replica between actor steps (see
/// `Machine::local_read_until`): the actor publishes after every step, before that step's
/// commands run (so before any client sees an ack of it), until when such reads are
/// allowed; a reader checks the clock against it.
#[derive(Debug)]
pub(super) struct ReadGate {
    start: Instant,
    /// Runtime milliseconds (since `start`) before which reads may bypass the actor; 0:
    /// closed.
    until: AtomicU64,
    epoch: AtomicU64,
}

impl ReadGate {
    pub(super) fn new() -> Self {
        Self { start: Instant::now(), until: AtomicU64::new(0), epoch: AtomicU64::new(0) }
    }

    /// The epoch to read under, if a read may go straight to the local replica now.
    pub(super) fn open(&self) -> Option<u64> {
        let until = self.until.load(AtomicOrdering::SeqCst);
        let now = self.start.elapsed().as_millis() as u64;
        (until != 0 && now < until).then(|| self.epoch.load(AtomicOrdering::SeqCst))
    }
}

pub(super) struct Actor<T> {
    cfg: VolumeConfig,
    machine: Machine,
    replicas: Vec<Arc<T>>,
    shared: Arc<Mutex<Shared>>,
    attached: Option<oneshot::Sender<Result<u64>>>,
    start: Instant,
    gate: Arc<ReadGate>,
    timeout: Duration,
    next_op: OpId,
    ops: HashMap<OpId, Reply>,
    /// The payload of the client write being stepped, and payloads sequenced in this step.
    current: Option<Payload>,
    payloads: HashMap<Seq, Payload>,
    /// Links found over their byte bound while a step's commands were applied: failed
    /// once the step is done (failing one steps the machine, which must not happen in the
    /// middle of another step: the commands left of it would lose their payloads).
    left_behind: Vec<(ReplicaId, u64, Error)>,
    /// Per replica whose link holds more than `HOLD_QUEUED_BYTES`: since when (runtime
    /// ms), and whether the engine stopped holding client requests back for it.
    backlog: Vec<Option<(u64, bool)>>,
    /// Since when client requests are held back (runtime ms), if they are.
    holding_since: Option<u64>,
    statuses: Vec<ReplicaStatus>,
    links: Vec<Option<LinkHandle>>,
    /// Running resync per target: (generation, task, source).
    resyncs: Vec<Option<(u64, AbortHandle, ReplicaId)>>,
    gens: u64,
    /// Blocks written directly to a resyncing replica since its resync began.
    overwritten: Vec<HashSet<u64>>,
    resync_chunks: Vec<u64>,
    /// Offset the last resync into each replica resumed from (0: none resumed).
    resumed: Vec<u64>,
    tasks: JoinSet<()>,
    internal: (mpsc::UnboundedSender<Internal>, mpsc::UnboundedReceiver<Internal>),
    link_reports: (link::Reports, mpsc::UnboundedReceiver<(ReplicaId, u64, LinkEvent)>),
    resync_reports: (ResyncReports, mpsc::UnboundedReceiver<(ReplicaId, u64, ResyncMsg)>),
    heal: Arc<HealStats>,
    checks: Checks,
    scrub: Scrub,
    corrupt_reads: HashMap<OpId, CorruptRead>,
    scrub_now: Option<ScrubNow>,
}

impl<T: ReplicaTransport> Actor<T> {
    pub(super) fn new(
        cfg: VolumeConfig,
        machine: Machine,
        replicas: Vec<Arc<T>>,
        shared: Arc<Mutex<Shared>>,
        attached: oneshot::Sender<Result<u64>>,
        gate: Arc<ReadGate>,
    ) -> Self {
        let n = replicas.len();
        let timeout = Duration::from_millis(cfg.machine.failure_timeout_ms.max(1));
        let heal = shared.lock().unwrap_or_else(|e| e.into_inner()).heal.clone();
        let scrub = Scrub::new(cfg.scrub_rate);
        Self {
            cfg,
            machine,
            replicas,
            shared,
            attached: Some(attached),
            start: gate.start,
            gate,
            timeout,
            next_op: 1,
            ops: HashMap::new(),
            current: None,
            payloads: HashMap::new(),
            left_behind: Vec::new(),
            backlog: vec![None; n],
            holding_since: None,
            statuses: vec![ReplicaStatus::Unknown; n],
            links: (0..n).map(|_| None).collect(),
            resyncs: (0..n).map(|_| None).collect(),
            gens: 0,
            overwritten: vec![HashSet::new(); n],
            resync_chunks: vec![0; n],
            resumed: vec![0; n],
            tasks: JoinSet::new(),
            internal: mpsc::unbounded_channel(),
            link_reports: mpsc::unbounded_channel(),
            resync_reports: mpsc::unbounded_channel(),
            heal,
            checks: Checks::default(),
            scrub,
            corrupt_reads: HashMap::new(),
            scrub_now: None,
        }
    }

    fn now(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    pub(super) async fn run(mut self, mut requests: mpsc::Receiver<Request>) {
        let now = self.now();
        self.step(Event::Attach { now });
        let mut tick = tokio::time::interval(self.cfg.tick);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let take_requests = !self.hold_requests();
            tokio::select! {
                req = requests.recv(), if take_requests => match req {
                    Some(req) => self.on_request(req),
                    None => break,
                },
                Some(msg) = self.internal.1.recv() => self.on_internal(msg),
                Some((r, gen, ev)) = self.link_reports.1.recv() => self.on_link(r, gen, ev),
                Some((r, gen, msg)) = self.resync_reports.1.recv() => self.on_resync(r, gen, msg),
                Some(_) = self.tasks.join_next(), if !self.tasks.is_empty() => {}
                _ = tick.tick() => {
                    let now = self.now();
                    self.step(Event::Tick { now });
                    self.scrub_tick();
                }
            }
        }
        let closed = || Error::Unavailable(format!("volume {}: closed", self.cfg.name));
        for (_, reply) in self.ops.drain() {
            match reply {
                Reply::Done(tx) => {
                    let _ = tx.send(Err(closed()));
                }
                Reply::Read { reply, .. } => {
                    let _ = reply.send(Err(closed()));
                }
            }
        }
        self.tasks.shutdown().await;
        self.release().await;
    }

    /// The engine stopped serving: clear its claim on the replicas (best effort), so the
    /// next attach, here or elsewhere, neither needs a takeover nor waits out a lease.
    async fn release(&self) {
        let owner = self.cfg.machine.owner;
        if owner == 0 || !self.machine.was_active() || matches!(self.machine.phase(), Phase::Fenced { .. }) {
            return;
        }
        let epoch = self.machine.epoch();
        let calls = self.replicas.iter().map(|t| {
            let claim = Claim { epoch, owner, owner_node: String::new(), mode: ClaimMode::Release };
            link::with_timeout(Duration::from_secs(2), "release", t.open(claim))
        });
        for (t, res) in self.replicas.iter().zip(futures::future::join_all(calls).await) {
            if let Err(e) = res {
                tracing::debug!(volume.id = %self.cfg.name, replica.id = %t.name(), error = %e, "release failed");
            }
        }
    }

    /// Whether to leave client requests in their queue for now: while a replica's link
    /// holds more than `HOLD_QUEUED_BYTES` of unacked writes, the writers slow to that
    /// replica's pace instead of leaving it behind at `MAX_QUEUED_BYTES` (a replica that
    /// is only slower than the others was dropped and resynced again and again under a
    /// sustained load). For one replica, for at most `ack_timeout_ms` at a stretch: one
    /// that does not drain its queue in that time (stalled, or far slower) no longer holds
    /// anyone back, and the byte bound leaves it behind as before. Re-evaluated on every
    /// event the actor handles (acks included) and every tick.
    fn hold_requests(&mut self) -> bool {
        let now = self.now();
        let limit = self.cfg.machine.ack_timeout_ms;
        let mut hold = false;
        for r in 0..self.replicas.len() {
            let queued = self.links[r].as_ref().map_or(0, |l| l.queued.load(AtomicOrdering::Acquire));
            if queued <= HOLD_QUEUED_BYTES {
                self.backlog[r] = None;
                continue;
            }
            let (since, gave_up) = self.backlog[r].get_or_insert((now, false));
            if !*gave_up && now.saturating_sub(*since) >= limit {
                *gave_up = true;
                tracing::warn!(
                    volume.id = %self.cfg.name,
                    replica.id = %self.replicas[r].name(),
                    queued_mib = queued >> 20,
                    "replica keeps its write queue over the mark: writes no longer wait for it"
                );
            }
            hold |= !*gave_up;
        }
        match (hold, self.holding_since) {
            (true, None) => self.holding_since = Some(now),
            (false, Some(t)) => {
                self.heal.held_ms.fetch_add(now.saturating_sub(t), AtomicOrdering::Relaxed);
                self.holding_since = None;
            }
            _ => {}
        }
        hold
    }

    fn on_request(&mut self, req: Request) {
        let op = self.next_op;
        self.next_op += 1;
        let now = self.now();
        match req {
            Request::Change { payload, fua, reply } => {
                self.ops.insert(op, Reply::Done(reply));
                self.current = Some(payload);
                self.step(Event::ClientWrite { op, fua, now });
                self.current = None;
            }
            Request::Flush { reply } => {
                self.ops.insert(op, Reply::Done(reply));
                self.step(Event::ClientFlush { op, now });
            }
            Request::Read { offset, len, reply } => {
                self.ops.insert(op, Reply::Read { offset, len, reply });
                self.step(Event::ClientRead { op, now });
            }
            Request::Snapshot { snap, reply } => self.snapshot(snap, reply),
            Request::DeleteSnapshot { name, reply } => self.delete_snapshot(name, reply),
            Request::ScrubNow { reply } => self.start_scrub_now(reply),
            Request::Expand { size, reply } => {
                // The scrub covers the new blocks from its next pass (a failed expand
                // only makes its reads beyond the old end fail, which it ignores).
                self.cfg.size = self.cfg.size.max(size);
                self.expand(size, reply)
            }
        }
    }

    /// In-sync replicas (their links carry every write in seq order), or an error when
    /// fewer than the write quorum are.
    fn in_sync_replicas(&self, what: &str) -> Result<Vec<ReplicaId>> {
        let ids: Vec<ReplicaId> = (0..self.replicas.len()).filter(|&r| self.machine.status(r).in_sync()).collect();
        let need = self.machine.write_quorum();
        if self.machine.phase() != Phase::Active || ids.len() < need {
            return Err(Error::Unavailable(format!(
                "volume {}: {what} needs {need} in-sync replicas, {} are",
                self.cfg.name,
                ids.len()
            )));
        }
        Ok(ids)
    }

    /// A crash-consistent snapshot: the same point of the write stream (every write
    /// assigned so far) on every in-sync replica, queued on each link after those writes;
    /// done once a write quorum recorded it. Replicas that miss it get it by resync.
    fn snapshot(&mut self, snap: SnapshotInfo, reply: oneshot::Sender<Result<SnapshotInfo>>) {
        let ids = match self.in_sync_replicas("a snapshot") {
            Ok(ids) => ids,
            Err(e) => {
                let _ = reply.send(Err(e));
                return;
            }
        };
        let snap = SnapshotInfo { seq: self.machine.last_seq(), ..snap };
        let need = self.machine.write_quorum();
        let op = |reply| LinkOp::Snapshot { snap: snap.clone(), reply };
        self.fan_out(ids, need, "snapshot", op, |mut got| got.swap_remove(0), reply);
    }

    /// Queues `op` on the links of `ids` (in order after what they already carry) and
    /// answers `reply` once every link answered: `done(successes)` if at least `need`
    /// succeeded, else the first error.
    fn fan_out<A: Send + 'static, R: Send + 'static>(
        &mut self,
        ids: Vec<ReplicaId>,
        need: usize,
        what: &'static str,
        op: impl Fn(oneshot::Sender<Result<A>>) -> LinkOp,
        done: impl FnOnce(Vec<A>) -> R + Send + 'static,
        reply: oneshot::Sender<Result<R>>,
    ) {
        let mut waits = Vec::new();
        for r in ids {
            let (tx, rx) = oneshot::channel();
            let _ = self.link(r).ops.send(op(tx));
            waits.push(rx);
        }
        let vol = self.cfg.name.clone();
        self.tasks.spawn(async move {
            let res = quorum(waits, need).await.map(done);
            let _ = reply.send(res.map_err(|e| Error::Unavailable(format!("volume {vol}: {what}: {e}"))));
        });
    }

    /// Grows every replica; all of them must be in sync (a replica left at the old size
    /// could not take writes beyond it).
    fn expand(&mut self, size: u64, reply: oneshot::Sender<Result<()>>) {
        let ids = match self.in_sync_replicas("expanding") {
            Ok(ids) if ids.len() == self.replicas.len() => ids,
            Ok(ids) => {
                let _ = reply.send(Err(Error::Unavailable(format!(
                    "volume {}: expanding needs every replica in sync ({} of {} are); retry when they are healthy",
                    self.cfg.name,
                    ids.len(),
                    self.replicas.len()
                ))));
                return;
            }
            Err(e) => {
                let _ = reply.send(Err(e));
                return;
            }
        };
        let need = self.replicas.len();
        self.fan_out(ids, need, "expand", |reply| LinkOp::Expand { size, reply }, |_| (), reply);
    }

    /// Deletes a snapshot on every in-sync replica (others are reconciled by resync).
    fn delete_snapshot(&mut self, name: String, reply: oneshot::Sender<Result<bool>>) {
        let ids = match self.in_sync_replicas("deleting a snapshot") {
            Ok(ids) => ids,
            Err(e) => {
                let _ = reply.send(Err(e));
                return;
            }
        };
        let need = self.machine.write_quorum();
        // A resyncing replica gets the delete too, in order on its link, without counting
        // towards the quorum: its resync may have installed the snapshot already, and
        // nothing else would remove it there once it is in sync.
        for r in (0..self.replicas.len()).filter(|&r| self.machine.status(r) == ReplicaStatus::Resyncing) {
            if let Some(l) = &self.links[r] {
                let (tx, _) = oneshot::channel();
                let _ = l.ops.send(LinkOp::DeleteSnapshot { name: name.clone(), reply: tx });
            }
        }
        let op = |reply| LinkOp::DeleteSnapshot { name: name.clone(), reply };
        self.fan_out(ids, need, "delete snapshot", op, |got| got.into_iter().any(|e| e), reply);
    }

    fn on_internal(&mut self, msg: Internal) {
        let now = self.now();
        match msg {
            Internal::State(replica, Ok(state)) => self.step(Event::StateReplied { replica, state, now }),
            Internal::Open(replica, Ok(state)) => self.step(Event::OpenReplied { replica, state, now }),
            Internal::Ping(replica, Ok(state)) => self.step(Event::PingReplied { replica, state, now }),
            Internal::Ping(replica, Err(e)) => {
                tracing::debug!(volume.id = %self.cfg.name, replica.id = %self.replicas[replica].name(), error = %e, "ping failed");
                self.step(Event::PingFailed { replica, error: ReplicaError::from_error(&e), now })
            }
            Internal::State(replica, Err(e)) | Internal::Open(replica, Err(e)) => {
                tracing::warn!(volume.id = %self.cfg.name, replica.id = %self.replicas[replica].name(), error = %e, "replica open failed");
                self.step(Event::OpenFailed { replica, error: ReplicaError::from_error(&e), now })
            }
            Internal::Read { op, res: Ok(data), .. } => {
                if let Some(Reply::Read { reply, offset, len }) = self.ops.remove(&op) {
                    let _ = reply.send(Ok(data));
                    if self.corrupt_reads.remove(&op).is_some() {
                        self.read_repair(offset, len);
                    }
                }
            }
            Internal::Read { op, replica, res: Err(Error::Corruption { offset, expected, actual, .. }) } => {
                if self.ops.contains_key(&op) {
                    tracing::warn!(volume.id = %self.cfg.name, replica.id = %self.replicas[replica].name(), offset, "read failed its checksum; reading another replica");
                    let c = self
                        .corrupt_reads
                        .entry(op)
                        .or_insert_with(|| CorruptRead { replicas: Vec::new(), first: (offset, expected, actual) });
                    c.replicas.push(replica);
                    let exclude = c.replicas.clone();
                    self.step(Event::ReadCorrupt { op, exclude, now });
                }
            }
            Internal::Checked { id, answers } => self.on_checked(id, answers),
            Internal::Repaired { cause, replica, blocks, res } => {
                let name = self.replicas[replica].name().to_string();
                let offsets: Vec<u64> = blocks.iter().map(|b| b * u64::from(self.cfg.block_size)).collect();
                if cause == Cause::ScrubNow {
                    if let Some(s) = self.scrub_now.as_mut() {
                        s.outstanding = s.outstanding.saturating_sub(1);
                        s.report.repaired += *res.as_ref().unwrap_or(&0);
                    }
                    self.continue_scrub_now();
                }
                match res {
                    Ok(n) => {
                        heal::repaired(cause, n, &self.heal);
                        tracing::warn!(volume.id = %self.cfg.name, replica.id = %name, cause = cause.label(), ?offsets, applied = n, "corrupt blocks rewritten from a good copy");
                    }
                    Err(e) => {
                        tracing::warn!(volume.id = %self.cfg.name, replica.id = %name, cause = cause.label(), ?offsets, error = %e, "repair failed")
                    }
                }
            }
            Internal::Read { op, replica, res: Err(e) } => {
                if self.ops.contains_key(&op) {
                    tracing::warn!(volume.id = %self.cfg.name, replica.id = %self.replicas[replica].name(), error = %e, "read failed");
                    self.step(Event::ReadFailed { op, replica, error: ReplicaError::from_error(&e), now });
                }
            }
        }
    }

    fn on_link(&mut self, r: ReplicaId, gen: u64, ev: LinkEvent) {
        if self.links[r].as_ref().is_none_or(|l| l.gen != gen) {
            return;
        }
        let now = self.now();
        match ev {
            LinkEvent::Acked { seq, durable_seq } => self.step(Event::WriteAcked { replica: r, seq, durable_seq, now }),
            LinkEvent::Flushed { durable_seq } => self.step(Event::FlushDone { replica: r, durable_seq, now }),
            LinkEvent::ResyncEnded { durable_seq } => self.step(Event::ResyncDone { replica: r, durable_seq, now }),
            LinkEvent::Failed(e) => {
                tracing::warn!(volume.id = %self.cfg.name, replica.id = %self.replicas[r].name(), error = %e, "replica link failed");
                self.drop_link(r);
                self.step(Event::WriteFailed { replica: r, error: ReplicaError::from_error(&e), now });
            }
        }
    }

    fn on_resync(&mut self, r: ReplicaId, gen: u64, msg: ResyncMsg) {
        if self.resyncs[r].as_ref().is_none_or(|&(g, ..)| g != gen) {
            return;
        }
        match msg {
            ResyncMsg::Chunks(chunks, permit) => self.queue_chunks(r, chunks, permit),
            ResyncMsg::Checkpoint(offset) => {
                if let Some(l) = &self.links[r] {
                    let _ = l.ops.send(LinkOp::CheckpointResync { offset });
                }
            }
            ResyncMsg::Fetch { offset, reply } => {
                let bs = u64::from(self.cfg.block_size);
                tracing::warn!(volume.id = %self.cfg.name, replica.id = %self.replicas[r].name(), offset, "resync source has a corrupt block; checking the other replicas");
                self.start_check(offset, bs, Cause::Resync, Some(reply));
            }
            ResyncMsg::Resumed(offset) => {
                tracing::info!(volume.id = %self.cfg.name, replica.id = %self.replicas[r].name(), offset, "resync resumes from a checkpoint");
                self.resumed[r] = offset;
            }
            ResyncMsg::Copied => {
                self.resyncs[r] = None;
                if let Some(l) = &self.links[r] {
                    let _ = l.ops.send(LinkOp::EndResync);
                }
            }
            ResyncMsg::Failed { error, source_failed } => {
                let source = self.resyncs[r].take().map_or(r, |(_, _, source)| source);
                let culprit = if source_failed { source } else { r };
                let name = self.replicas[culprit].name();
                tracing::warn!(volume.id = %self.cfg.name, replica.id = %name, %error, "resync failed");
                let now = self.now();
                let error = ReplicaError::from_error(&error);
                if source_failed {
                    // The source is dropped and the resync restarts from another one.
                    self.drop_link(source);
                    self.step(Event::WriteFailed { replica: source, error, now });
                } else {
                    self.step(Event::ResyncFailed { replica: r, error, now });
                }
            }
        }
    }

    /// Queues copied chunks on the target's link (one operation), minus the blocks a direct
    /// write already replaced since the resync began (those writes are newer and already
    /// queued).
    fn queue_chunks(&mut self, r: ReplicaId, chunks: Vec<ResyncChunk>, permit: Permit) {
        let Some(link) = &self.links[r] else { return };
        let mut pieces = Vec::with_capacity(chunks.len());
        for chunk in chunks {
            self.pieces(r, chunk, &mut pieces);
        }
        self.resync_chunks[r] += pieces.len() as u64;
        if !pieces.is_empty() {
            let _ = link.ops.send(LinkOp::Resync { chunks: pieces, permit });
        }
    }

    /// The pieces of `chunk` that no direct write replaced since the resync began.
    fn pieces(&self, r: ReplicaId, chunk: ResyncChunk, out: &mut Vec<ResyncChunk>) {
        let bs = u64::from(self.cfg.block_size);
        let (len, data) = match &chunk.data {
            ChunkData::Data(d) => (d.len() as u64, Some(d)),
            ChunkData::Zero => (bs, None),
            ChunkData::Trim(len) => (*len, None),
        };
        let first = chunk.offset / bs;
        let blocks = len.div_ceil(bs);
        let skip = &self.overwritten[r];
        let mut b = first;
        while b < first + blocks {
            if skip.contains(&b) {
                b += 1;
                continue;
            }
            let start = b;
            while b < first + blocks && !skip.contains(&b) {
                b += 1;
            }
            let (offset, run) = (start * bs, (b - start) * bs);
            let piece = match data {
                Some(d) => {
                    let at = ((start - first) * bs) as usize;
                    let end = (at + run as usize).min(d.len());
                    ChunkData::Data(d.slice(at..end))
                }
                None if matches!(chunk.data, ChunkData::Zero) => ChunkData::Zero,
                None => ChunkData::Trim(run),
            };
            out.push(ResyncChunk { offset, seq: chunk.seq, data: piece });
        }
    }

    fn step(&mut self, ev: Event) {
        let cmds = self.machine.step(ev);
        self.publish_read_gate();
        for cmd in cmds {
            self.apply(cmd);
        }
        self.payloads.clear();
        for (r, gen, e) in std::mem::take(&mut self.left_behind) {
            self.on_link(r, gen, LinkEvent::Failed(e));
        }
        let mut shared = self.shared.lock().unwrap_or_else(|e| e.into_inner());
        for (r, info) in shared.replicas.iter_mut().enumerate() {
            let v = self.machine.view(r);
            info.status = v.status;
            info.acked_seq = v.acked_seq;
            info.durable_seq = v.durable_seq;
            info.resync_chunks = self.resync_chunks[r];
            info.resync_resumed_from = self.resumed[r];
        }
    }

    /// Publishes `Machine::local_read_until` (before the step's commands run).
    fn publish_read_gate(&self) {
        let until = self.machine.local_read_until().map_or(0, |(_, until)| until);
        self.gate.epoch.store(self.machine.epoch(), AtomicOrdering::SeqCst);
        self.gate.until.store(until, AtomicOrdering::SeqCst);
    }

    fn epoch_error(&self, reason: FailReason) -> Error {
        reason.to_error(&self.cfg.name, self.machine.epoch())
    }

    fn apply(&mut self, cmd: Command) {
        match cmd {
            Command::SendState { replica } => {
                let (t, tx, timeout) = (self.replicas[replica].clone(), self.internal.0.clone(), self.timeout);
                self.tasks.spawn(async move {
                    let res = link::with_timeout(timeout, "state", t.state()).await;
                    let _ = tx.send(Internal::State(replica, res));
                });
            }
            Command::SendOpen { replica, epoch, mode } => {
                let (t, tx, timeout) = (self.replicas[replica].clone(), self.internal.0.clone(), self.timeout);
                let claim =
                    Claim { epoch, owner: self.cfg.machine.owner, owner_node: self.cfg.owner_node.clone(), mode };
                self.tasks.spawn(async move {
                    let res = link::with_timeout(timeout, "open", t.open(claim)).await;
                    let _ = tx.send(Internal::Open(replica, res));
                });
            }
            Command::SendPing { replica } => {
                let (t, tx, timeout) = (self.replicas[replica].clone(), self.internal.0.clone(), self.timeout);
                let epoch = self.machine.epoch();
                self.tasks.spawn(async move {
                    let res = link::with_timeout(timeout, "ping", t.ping(Epoch(epoch))).await;
                    let _ = tx.send(Internal::Ping(replica, res));
                });
            }
            Command::Attached { epoch, source, wait_ms } => {
                tracing::info!(volume.id = %self.cfg.name, epoch, source = %self.replicas[source].name(), "attached");
                self.shared.lock().unwrap_or_else(|e| e.into_inner()).epoch = epoch;
                if let Some(tx) = self.attached.take() {
                    if wait_ms == 0 {
                        let _ = tx.send(Ok(epoch));
                    } else {
                        // The volume was held by another engine: serve nothing until its
                        // read lease has run out (the handle reaches no client before).
                        tracing::info!(volume.id = %self.cfg.name, wait_ms, "taking over: waiting out the previous engine's read lease");
                        self.tasks.spawn(async move {
                            tokio::time::sleep(Duration::from_millis(wait_ms)).await;
                            let _ = tx.send(Ok(epoch));
                        });
                    }
                }
            }
            Command::AttachFailed { reason } => {
                let err = self.epoch_error(reason);
                if let Some(tx) = self.attached.take() {
                    let _ = tx.send(Err(err));
                }
            }
            Command::Fenced { current } => {
                tracing::error!(volume.id = %self.cfg.name, epoch = self.machine.epoch(), current, "fenced by a newer engine");
                if let Some(tx) = self.attached.take() {
                    let _ = tx.send(Err(Error::StaleEpoch {
                        volume: self.cfg.name.clone(),
                        got: self.machine.epoch(),
                        current,
                    }));
                }
            }
            Command::Sequenced { seq, .. } => {
                if let Some(p) = self.current.take() {
                    let (offset, len) = p.range();
                    self.checks.touch(offset, len, u64::from(self.cfg.block_size));
                    self.payloads.insert(seq, p);
                }
            }
            Command::SendWrite { replica, seq, fua } => self.send_write(replica, seq, fua),
            Command::SendFlush { replica } => {
                let _ = self.link(replica).ops.send(LinkOp::Flush);
            }
            Command::SendRead { op, replica } => {
                let Some(Reply::Read { offset, len, .. }) = self.ops.get(&op) else { return };
                let (offset, len) = (*offset, *len);
                let (t, tx, timeout, epoch) =
                    (self.replicas[replica].clone(), self.internal.0.clone(), self.timeout, self.machine.epoch());
                self.tasks.spawn(async move {
                    let res = link::with_timeout(timeout, "read", t.read(Epoch(epoch), Offset(offset), len)).await;
                    let _ = tx.send(Internal::Read { op, replica, res });
                });
            }
            Command::AckClient { op } => match self.ops.remove(&op) {
                Some(Reply::Done(tx)) => {
                    let _ = tx.send(Ok(()));
                }
                Some(Reply::Read { reply, .. }) => {
                    let _ = reply.send(Err(Error::Internal("read acknowledged without data".into())));
                }
                None => {}
            },
            Command::FailClient { op, reason } => {
                let err = self.epoch_error(reason);
                match self.ops.remove(&op) {
                    Some(Reply::Done(tx)) => {
                        let _ = tx.send(Err(err));
                    }
                    Some(Reply::Read { reply, offset, len }) => match self.corrupt_reads.remove(&op) {
                        Some(CorruptRead { first: (at, expected, actual), .. }) if reason == FailReason::Corrupt => {
                            // Never bad data: the read fails (EIO) with the checksum error;
                            // the check counts the blocks as unrecoverable.
                            let volume = self.cfg.name.clone();
                            let _ = reply.send(Err(Error::Corruption { volume, offset: at, expected, actual }));
                            self.read_repair(offset, len);
                        }
                        _ => {
                            let _ = reply.send(Err(err));
                        }
                    },
                    None => {}
                }
            }
            Command::SetStatus { replica, status } => {
                tracing::info!(volume.id = %self.cfg.name, replica.id = %self.replicas[replica].name(), %status, "replica status");
                if status != ReplicaStatus::Resyncing {
                    self.overwritten[replica].clear();
                    self.abort_resync(replica);
                }
                self.statuses[replica] = status;
            }
            Command::Disconnect { replica } => {
                self.drop_link(replica);
                self.abort_resync(replica);
                self.overwritten[replica].clear();
            }
            Command::StartResync { replica, source, since, upto, two_sided, consistent } => {
                self.start_resync(replica, source, (since, upto, consistent), two_sided)
            }
            Command::AbortResync { replica } => self.abort_resync(replica),
            Command::Record { replica, resync_from } => {
                let history = Box::new(self.machine.history());
                let _ = self.link(replica).ops.send(LinkOp::Record { history, resync_from });
            }
        }
    }

    /// A client read met corrupt blocks in `[offset, offset + len)`: check and repair the
    /// range (once at a time per range).
    fn read_repair(&mut self, offset: u64, len: u64) {
        if !self.checks.checking(offset, len) {
            self.start_check(offset, len, Cause::Read, None);
        }
    }

    /// Checks the next range of the volume when the scrub is due.
    fn scrub_tick(&mut self) {
        if self.machine.phase() != Phase::Active || self.checks.scrubbing() {
            return;
        }
        if let Some((offset, len, pass_done)) = self.scrub.next(Instant::now(), self.cfg.size) {
            self.start_check(offset, len, Cause::Scrub, None);
            if pass_done {
                let h = &self.heal;
                h.scrub_passes.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tracing::info!(
                    volume.id = %self.cfg.name,
                    blocks = HealStats::get(&h.scrub_blocks),
                    repaired = HealStats::get(&h.scrub_repairs),
                    divergent = HealStats::get(&h.divergent_blocks),
                    unrecoverable = HealStats::get(&h.unrecoverable_blocks),
                    "scrub pass queued to the end of the volume (totals since attach)"
                );
            }
        }
    }

    /// Starts an operator's scrub pass (one at a time per volume).
    fn start_scrub_now(&mut self, reply: oneshot::Sender<Result<ScrubReport>>) {
        let ids = match self.in_sync_replicas("a scrub") {
            Ok(ids) => ids,
            Err(e) => {
                let _ = reply.send(Err(e));
                return;
            }
        };
        if self.scrub_now.is_some() {
            let _ =
                reply.send(Err(Error::Conflict(format!("volume {}: a scrub pass is already running", self.cfg.name))));
            return;
        }
        let report = ScrubReport { replicas: ids.len() as u32, ..ScrubReport::default() };
        tracing::info!(volume.id = %self.cfg.name, "scrub pass requested");
        self.scrub_now = Some(ScrubNow { cursor: 0, size: self.cfg.size, report, outstanding: 0, reply });
        self.continue_scrub_now();
    }

    /// Checks the next range of an operator's scrub pass, or answers when it is done.
    fn continue_scrub_now(&mut self) {
        let Some(s) = self.scrub_now.as_mut() else { return };
        if self.checks.running(Cause::ScrubNow) {
            return;
        }
        if s.cursor < s.size {
            let (offset, len) = (s.cursor, heal::SCRUB_CHUNK.min(s.size - s.cursor));
            s.cursor += len;
            if self.machine.phase() != Phase::Active {
                let s = self.scrub_now.take().expect("scrub pass");
                let _ = s
                    .reply
                    .send(Err(Error::Unavailable(format!("volume {}: detached during the scrub", self.cfg.name))));
                return;
            }
            self.start_check(offset, len, Cause::ScrubNow, None);
            return;
        }
        if s.outstanding == 0 {
            let s = self.scrub_now.take().expect("scrub pass");
            let r = s.report;
            tracing::info!(volume.id = %self.cfg.name, blocks = r.blocks, corrupt = r.corrupt, repaired = r.repaired, divergent = r.divergent, unrecoverable = r.unrecoverable, "scrub pass done");
            let _ = s.reply.send(Ok(r));
        }
    }

    /// Starts a check of `[offset, offset + len)` across the in-sync replicas (see
    /// `heal.rs`): reads queued on their links now, the verdict in `on_checked`.
    fn start_check(&mut self, offset: u64, len: u64, cause: Cause, fetch: Option<oneshot::Sender<Fetched>>) {
        let ids: Vec<ReplicaId> = match self.machine.phase() {
            Phase::Active => (0..self.replicas.len()).filter(|&r| self.machine.status(r).in_sync()).collect(),
            _ => Vec::new(),
        };
        if ids.is_empty() {
            if let Some(f) = fetch {
                let _ = f.send(None);
            }
            return;
        }
        let mut waits = Vec::new();
        let mut gens = Vec::new();
        for r in ids {
            let (tx, rx) = oneshot::channel();
            let l = self.link(r);
            // The scrub reads beside the write pipeline (ordered only against writes to
            // its range); the checks of a corrupt read or resync source are rare and read
            // at one point of the stream (the resync needs that point's content).
            let op = match cause {
                Cause::Scrub | Cause::ScrubNow => LinkOp::RangeRead { offset, len, reply: tx },
                Cause::Read | Cause::Resync => LinkOp::Read { offset, len, reply: tx },
            };
            let _ = l.ops.send(op);
            gens.push((r, l.gen));
            waits.push((r, self.replicas[r].clone(), rx));
        }
        let id = self.checks.start(Check { offset, len, cause, dirty: HashSet::new(), gens, fetch });
        let (tx, epoch, timeout) = (self.internal.0.clone(), self.machine.epoch(), self.timeout);
        let bs = u64::from(self.cfg.block_size);
        self.tasks.spawn(async move {
            let mut answers = Vec::new();
            for (r, t, rx) in waits {
                let a = match rx.await {
                    Ok(Ok(d)) => Answer::Data(d),
                    Ok(Err(e)) if e.kind() == ErrorKind::Corruption && len <= bs => Answer::Corrupt(vec![offset / bs]),
                    Ok(Err(e)) if e.kind() == ErrorKind::Corruption => {
                        // Which blocks: read them one by one.
                        let mut bad = Vec::new();
                        for b in offset / bs..(offset + len) / bs {
                            let res =
                                link::with_timeout(timeout, "probe", t.read(Epoch(epoch), Offset(b * bs), bs)).await;
                            if res.is_err_and(|e| e.kind() == ErrorKind::Corruption) {
                                bad.push(b);
                            }
                        }
                        Answer::Corrupt(bad)
                    }
                    Ok(Err(e)) => Answer::Failed(e),
                    Err(_) => Answer::Failed(Error::Unavailable("replica link closed".into())),
                };
                answers.push((r, a));
            }
            let _ = tx.send(Internal::Checked { id, answers });
        });
    }

    /// Judges a check and rewrites the bad blocks through their replicas' links.
    fn on_checked(&mut self, id: u64, answers: Vec<(ReplicaId, Answer)>) {
        let Some(check) = self.checks.take(id) else { return };
        let bs = u64::from(self.cfg.block_size);
        for (r, a) in &answers {
            if let Answer::Failed(e) = a {
                tracing::debug!(volume.id = %self.cfg.name, replica.id = %self.replicas[*r].name(), error = %e, "check read failed; the replica is left out of this check");
            }
        }
        let mut verdict = heal::judge(check.offset, check.len, bs, &answers, &check.dirty);
        heal::report(&self.cfg.name, check.cause, &verdict, &self.heal);
        let repairs = std::mem::take(&mut verdict.repairs);
        if check.cause == Cause::ScrubNow {
            if let Some(s) = self.scrub_now.as_mut() {
                let corrupt: usize = answers
                    .iter()
                    .map(|(_, a)| match a {
                        Answer::Corrupt(blocks) => blocks.len(),
                        _ => 0,
                    })
                    .sum();
                s.report.blocks += verdict.blocks;
                s.report.corrupt += corrupt as u64;
                s.report.divergent += verdict.divergent.len() as u64;
                s.report.unrecoverable += verdict.unrecoverable.len() as u64;
            }
        }
        if repairs.is_empty() && check.fetch.is_none() {
            self.continue_scrub_now();
            return;
        }
        let seq = self.machine.reserve_seq();
        if let Some(f) = check.fetch {
            let _ = f.send(verdict.first.take().map(|d| (d, seq)));
        }
        for (r, blocks) in repairs {
            let gen = check.gens.iter().find(|(x, _)| *x == r).map(|&(_, g)| g);
            let link = match &self.links[r] {
                Some(l) if Some(l.gen) == gen && self.machine.status(r).in_sync() => l,
                _ => continue,
            };
            let ids: Vec<u64> = blocks.iter().map(|(b, _)| *b).collect();
            let chunks = blocks
                .into_iter()
                .map(|(b, d)| ResyncChunk { offset: b * bs, seq, data: ChunkData::Data(d) })
                .collect();
            let (reply, rx) = oneshot::channel();
            let _ = link.ops.send(LinkOp::Repair { chunks, reply });
            let (tx, cause) = (self.internal.0.clone(), check.cause);
            if let Some(s) = self.scrub_now.as_mut().filter(|_| cause == Cause::ScrubNow) {
                s.outstanding += 1;
            }
            self.tasks.spawn(async move {
                let res = rx.await.unwrap_or_else(|_| Err(Error::Unavailable("replica link closed".into())));
                let _ = tx.send(Internal::Repaired { cause, replica: r, blocks: ids, res });
            });
        }
        self.continue_scrub_now();
    }

    fn send_write(&mut self, replica: ReplicaId, seq: Seq, fua: bool) {
        if self.left_behind.iter().any(|(r, ..)| *r == replica) {
            // Its link fails at the end of this step: nothing more goes on it (a later
            // write must not reach the replica past the one it skipped).
            return;
        }
        let Some(p) = self.payloads.get(&seq).cloned() else {
            // Never leave a gap in a replica's ordered stream: acks are cumulative, so a
            // later write's ack would cover the one never sent. Fail the link instead.
            tracing::error!(volume.id = %self.cfg.name, seq, "write without a payload");
            let gen = self.link(replica).gen;
            let e = Error::Internal(format!("write {seq} lost its payload before reaching its replica"));
            self.left_behind.push((replica, gen, e));
            return;
        };
        if self.statuses[replica] == ReplicaStatus::Resyncing {
            let bs = u64::from(self.cfg.block_size);
            let (offset, len) = p.range();
            self.overwritten[replica].extend(offset / bs..(offset + len).div_ceil(bs));
        }
        let op = match p {
            Payload::Data { offset, data } => LinkOp::Write { seq, offset, data, fua },
            Payload::Trim { offset, len } => LinkOp::Trim { seq, offset, len },
        };
        // Bounded in bytes: a replica this far behind is left behind (failed, resynced
        // later) rather than queueing without limit; the others go on acking.
        let bytes = match &op {
            LinkOp::Write { data, .. } => data.len() as u64,
            _ => 0,
        };
        let l = self.link(replica);
        let (gen, queued) = (l.gen, l.queued.clone());
        let before = queued.fetch_add(bytes, std::sync::atomic::Ordering::AcqRel);
        if bytes > 0 && before > 0 && before + bytes > link::MAX_QUEUED_BYTES {
            let e = Error::Unavailable(format!(
                "replica {}: more than {} MiB of writes queued and not acked; left behind",
                self.replicas[replica].name(),
                link::MAX_QUEUED_BYTES >> 20
            ));
            queued.fetch_sub(bytes, std::sync::atomic::Ordering::AcqRel);
            self.left_behind.push((replica, gen, e));
            return;
        }
        let _ = self.link(replica).ops.send(op);
    }

    /// The replica's link, started on first use.
    fn link(&mut self, r: ReplicaId) -> &LinkHandle {
        if self.links[r].is_none() {
            self.gens += 1;
            let gen = self.gens;
            let (tx, rx) = mpsc::unbounded_channel();
            let queued = link::QueuedBytes::default();
            let fut = link::run(
                self.replicas[r].clone(),
                self.machine.epoch(),
                r,
                gen,
                rx,
                self.link_reports.0.clone(),
                self.timeout,
                queued.clone(),
            );
            let abort = self.tasks.spawn(fut);
            self.links[r] = Some(LinkHandle { gen, ops: tx, abort, queued });
        }
        self.links[r].as_ref().expect("link was just created")
    }

    fn drop_link(&mut self, r: ReplicaId) {
        if let Some(l) = self.links[r].take() {
            l.abort.abort();
        }
    }

    fn abort_resync(&mut self, r: ReplicaId) {
        if let Some((_, abort, _)) = self.resyncs[r].take() {
            abort.abort();
        }
    }

    /// `range` is (since, upto, consistent) of the plan.
    fn start_resync(&mut self, r: ReplicaId, source: ReplicaId, range: (Seq, Seq, Seq), lift_seq: Option<Seq>) {
        let (since, upto, consistent) = range;
        self.abort_resync(r);
        self.link(r);
        self.gens += 1;
        let epoch = self.machine.epoch();
        tracing::info!(volume.id = %self.cfg.name, replica.id = %self.replicas[r].name(), source = %self.replicas[source].name(), since, upto, two_sided = lift_seq.is_some(), "resync started");
        let job = ResyncJob {
            source: self.replicas[source].clone(),
            target: self.replicas[r].clone(),
            epoch,
            since,
            consistent,
            history: self.machine.history(),
            lift_seq,
            two_sided: lift_seq.is_some(),
            block_size: u64::from(self.cfg.block_size),
            window: self.cfg.resync_window,
            checkpoint_every: self.cfg.resync_checkpoint_blocks,
            rate: self.cfg.resync_rate,
            timeout: self.timeout,
            replica: r,
            gen: self.gens,
            reports: self.resync_reports.0.clone(),
        };
        let abort = self.tasks.spawn(job.run());
        self.resyncs[r] = Some((self.gens, abort, source));
    }
}

/// Waits for every answer; `Ok` with the successes if at least `need` succeeded, else the
/// first error.
async fn quorum<T>(waits: Vec<oneshot::Receiver<Result<T>>>, need: usize) -> Result<Vec<T>> {
    let mut ok = Vec::new();
    let mut first_err = None;
    for rx in waits {
        match rx.await {
            Ok(Ok(v)) => ok.push(v),
            Ok(Err(e)) => {
                first_err.get_or_insert(e);
            }
            Err(_) => {
                first_err.get_or_insert(Error::Unavailable("replica link closed".into()));
            }
        }
    }
    if ok.len() >= need.max(1) {
        Ok(ok)
    } else {
        Err(first_err.unwrap_or_else(|| Error::Unavailable("no replica answered".into())))
    }
}

//! [`Machine`]: the quorum replicator of one volume as a pure state machine.
//!
//! No I/O, no clocks, no tasks: [`Machine::step`] takes an [`Event`] (with the time in it)
//! and returns the [`Command`]s to carry out, in order. The contract it enforces is stated
//! in the module docs of [`crate`]; this file keeps the write/flush/read
//! paths and deadlines, `attach.rs` the attach and resync planning.

use std::collections::{BTreeMap, VecDeque};

use super::event::{Command, Event};
use super::types::{
    FailReason, History, MachineConfig, Millis, OpId, ReplicaError, ReplicaId, ReplicaSeqs, ReplicaStatus, Seq,
    MAX_REPLICAS, SEQ_EPOCH_SHIFT,
};
use hlstore_core::error::Result;

/// Where the machine is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Detached,
    /// `State` sent to every replica; waiting for a majority of replies.
    Probing,
    /// `Open(epoch)` sent; waiting for a majority to accept it.
    Opening,
    Active,
    AttachFailed,
    /// A replica reported a newer epoch. Terminal: every request fails.
    Fenced {
        current: u64,
    },
}

/// A resync planned or running into a replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct ResyncPlan {
    pub since: Seq,
    pub upto: Seq,
    /// `Some(lift)` for a two-sided resync (see [`Command::StartResync`]).
    pub two_sided: Option<Seq>,
    /// Until the resync is done the target holds the history only up to here.
    pub consistent: Seq,
    /// The replica copied from, once started.
    pub source: Option<ReplicaId>,
}

/// What the machine tracks per replica.
#[derive(Debug, Clone)]
pub(super) struct Rep {
    pub status: ReplicaStatus,
    /// The last `State`/`Open` reply.
    pub reported: Option<ReplicaSeqs>,
    /// Highest seq this replica acknowledged on its current connection (acks are in order).
    pub acked_seq: Seq,
    pub durable_seq: Seq,
    /// Writes sent and not acked: (seq, sent at).
    pub inflight: VecDeque<(Seq, Millis)>,
    /// Flushes sent and not answered: (last seq sent before it, sent at).
    pub flushes: VecDeque<(Seq, Millis)>,
    /// Highest seq sent on the current connection.
    pub last_sent: Seq,
    pub open_pending: bool,
    pub retry_at: Millis,
    pub resync: Option<ResyncPlan>,
    /// How far this replica holds the volume's history as a prefix, as this engine last
    /// established it (`None`: never established). For a replica that was in sync: the
    /// last seq sent to it (it applied a prefix of that; its own report caps it).
    pub known_cp: Option<Seq>,
    /// The epoch this engine read from the replica when probing: the compare-and-set
    /// value of its attach claim.
    pub expect: u64,
    /// The replica refused the attach claim: another engine claimed it first.
    pub conflict: bool,
    /// When the last `Open` was sent.
    pub open_sent: Millis,
    /// When the outstanding ping was sent.
    pub ping_sent: Option<Millis>,
    /// The replica's vote for this engine's read lease: it accepted this engine's epoch
    /// when answering a request sent at `t`; the vote holds until `t + lease_ms`.
    pub lease_until: Millis,
}

impl Rep {
    fn new() -> Self {
        Self {
            status: ReplicaStatus::Unknown,
            reported: None,
            acked_seq: 0,
            durable_seq: 0,
            inflight: VecDeque::new(),
            flushes: VecDeque::new(),
            last_sent: 0,
            open_pending: false,
            retry_at: 0,
            resync: None,
            known_cp: None,
            expect: 0,
            conflict: false,
            open_sent: 0,
            ping_sent: None,
            lease_until: 0,
        }
    }

    /// When the oldest unanswered request was sent.
    fn oldest_request(&self) -> Option<Millis> {
        let w = self.inflight.front().map(|&(_, t)| t);
        let f = self.flushes.front().map(|&(_, t)| t);
        match (w, f) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    pub fn oldest_request_age(&self, now: Millis) -> Option<Millis> {
        self.oldest_request().map(|t| now.saturating_sub(t))
    }

    fn connected(&self) -> bool {
        matches!(self.status, ReplicaStatus::Healthy | ReplicaStatus::Lagging | ReplicaStatus::Resyncing)
    }
}

#[derive(Debug, Clone, Copy)]
struct PendingWrite {
    op: OpId,
    fua: bool,
    deadline: Millis,
}

#[derive(Debug, Clone, Copy)]
struct PendingFlush {
    op: OpId,
    barrier: Seq,
    deadline: Millis,
}

/// A read-only view of one replica, for operators and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplicaView {
    pub status: ReplicaStatus,
    pub acked_seq: Seq,
    pub durable_seq: Seq,
}

/// The quorum replicator of one volume. See [`crate`] for the contract.
#[derive(Debug, Clone)]
pub struct Machine {
    pub(super) cfg: MachineConfig,
    pub(super) w: usize,
    pub(super) phase: Phase,
    pub(super) epoch: u64,
    pub(super) reps: Vec<Rep>,
    /// The end of the volume's history: the highest seq assigned, or the attach base.
    pub(super) last_seq: Seq,
    /// Highest seq ever assigned or reported by a replica: new seqs go above it (a
    /// re-attach may cut the history back, seqs are never reused).
    pub(super) max_seq: Seq,
    /// The source's `last_seq` when attach completed.
    pub(super) attach_base: Seq,
    /// Highest seq acknowledged to a client: reads must see it.
    acked_client_seq: Seq,
    writes: BTreeMap<Seq, PendingWrite>,
    flushes: Vec<PendingFlush>,
    pub(super) attach_deadline: Millis,
    /// Set once the first attach completed: a later `Opening` is a re-attach after the
    /// in-sync set emptied, and requests then fail with `NoQuorum`, not `NotAttached`.
    pub(super) was_active: bool,
    /// The attach source holds data beyond the adopted history (`attach_base`): no other
    /// replica is taken as healthy on equal seqs alone.
    pub(super) dirty_source: bool,
    /// The probe found the volume held by another engine (a takeover): the first
    /// activation waits out that engine's read lease.
    pub(super) lease_wait: bool,
    /// Reads waiting for the read lease: (op, deadline).
    parked_reads: Vec<(OpId, Millis)>,
    /// The activations the volume's history descends from, this one last (see
    /// `attach.rs`); recorded on every replica admitted.
    pub(super) history: History,
}

impl Machine {
    /// A detached machine. Fails on an invalid configuration (see [`MachineConfig::quorum`]).
    pub fn new(cfg: MachineConfig) -> Result<Self> {
        let w = cfg.quorum()?;
        let n = cfg.replicas.len();
        Ok(Self {
            cfg,
            w,
            phase: Phase::Detached,
            epoch: 0,
            reps: (0..n).map(|_| Rep::new()).collect(),
            last_seq: 0,
            max_seq: 0,
            attach_base: 0,
            acked_client_seq: 0,
            writes: BTreeMap::new(),
            flushes: Vec::new(),
            attach_deadline: 0,
            was_active: false,
            dirty_source: false,
            lease_wait: false,
            parked_reads: Vec::new(),
            history: History::default(),
        })
    }

    pub fn phase(&self) -> Phase {
        self.phase
    }
    /// Whether the volume was active at some point (attach completed once).
    pub fn was_active(&self) -> bool {
        self.was_active
    }
    pub fn epoch(&self) -> u64 {
        self.epoch
    }
    pub fn write_quorum(&self) -> usize {
        self.w
    }
    pub fn replica_count(&self) -> usize {
        self.reps.len()
    }
    /// Highest sequence number assigned so far.
    pub fn last_seq(&self) -> Seq {
        self.last_seq
    }
    /// The volume's epoch history: the activations it descends from, the current one
    /// last (empty before the first attach).
    pub fn history(&self) -> History {
        self.history
    }
    pub fn status(&self, replica: ReplicaId) -> ReplicaStatus {
        self.reps[replica].status
    }
    pub fn view(&self, replica: ReplicaId) -> ReplicaView {
        let r = &self.reps[replica];
        ReplicaView { status: r.status, acked_seq: r.acked_seq, durable_seq: r.durable_seq }
    }
    /// Client writes and flushes not answered yet.
    pub fn pending_ops(&self) -> usize {
        self.writes.len() + self.flushes.len()
    }

    /// Feeds one event; returns the commands to carry out, in order.
    pub fn step(&mut self, event: Event) -> Vec<Command> {
        let mut out = Vec::new();
        if let Phase::Fenced { current } = self.phase {
            match event {
                Event::ClientWrite { op, .. } | Event::ClientFlush { op, .. } | Event::ClientRead { op, .. } => {
                    out.push(Command::FailClient { op, reason: FailReason::Fenced { current } })
                }
                Event::ReadFailed { op, .. } | Event::ReadCorrupt { op, .. } => {
                    out.push(Command::FailClient { op, reason: FailReason::Fenced { current } })
                }
                Event::PingReplied { replica, .. } | Event::PingFailed { replica, .. } => {
                    self.reps[replica].ping_sent = None;
                }
                _ => {}
            }
            return out;
        }
        match event {
            Event::Attach { now } => self.on_attach(now, &mut out),
            Event::StateReplied { replica, state, now } => self.on_state(replica, state, now, &mut out),
            Event::OpenReplied { replica, state, now } => self.on_opened(replica, state, now, &mut out),
            Event::OpenFailed { replica, error, now } => self.on_open_failed(replica, error, now, &mut out),
            Event::ClientWrite { op, fua, now } => self.on_write(op, fua, now, &mut out),
            Event::ClientFlush { op, now } => self.on_flush(op, now, &mut out),
            Event::ClientRead { op, now } => self.route_read(op, now, &[], &mut out),
            Event::ReadCorrupt { op, exclude, now } => self.route_read(op, now, &exclude, &mut out),
            Event::WriteAcked { replica, seq, durable_seq, now } => {
                self.on_acked(replica, seq, durable_seq, now, &mut out)
            }
            Event::FlushDone { replica, durable_seq, now } => self.on_flushed(replica, durable_seq, now, &mut out),
            Event::WriteFailed { replica, error, now } => self.on_replica_error(replica, error, now, &mut out),
            Event::ReadFailed { op, replica, error, now } => {
                self.on_replica_error(replica, error, now, &mut out);
                if let Phase::Fenced { current } = self.phase {
                    out.push(Command::FailClient { op, reason: FailReason::Fenced { current } });
                } else {
                    self.route_read(op, now, &[], &mut out);
                }
            }
            Event::PingReplied { replica, state, now } => self.on_ping(replica, Ok(state), now, &mut out),
            Event::PingFailed { replica, error, now } => self.on_ping(replica, Err(error), now, &mut out),
            Event::ResyncDone { replica, durable_seq, now } => self.on_resync_done(replica, durable_seq, now, &mut out),
            Event::ResyncFailed { replica, error, now } => self.on_replica_error(replica, error, now, &mut out),
            Event::Tick { now } => self.on_tick(now, &mut out),
        }
        out
    }

    /// Client reads waiting for the read lease.
    pub fn parked_reads(&self) -> usize {
        self.parked_reads.len()
    }

    /// The next sequence number: above everything seen, and in this epoch's range.
    fn assign_seq(&mut self) -> Seq {
        let seq = self.reserve_seq();
        self.last_seq = seq;
        seq
    }

    /// The first seq this engine may issue next (not a write of the history by itself).
    pub(super) fn next_seq(&self) -> Seq {
        self.max_seq.saturating_add(1).max(self.epoch.saturating_mul(1 << SEQ_EPOCH_SHIFT))
    }

    /// Takes [`Machine::next_seq`]: every seq an activation issues (writes, the lift seq
    /// of two-sided resyncs, repaired blocks) is at least its history entry's `start`. A
    /// repair (see `heal.rs`) carries such a seq so that the replica's "never replace a
    /// newer block" guard lets it replace the damaged version but no later write.
    pub fn reserve_seq(&mut self) -> Seq {
        let seq = self.next_seq();
        self.max_seq = seq;
        seq
    }

    /// Why a request fails while the volume is not active.
    fn inactive_reason(&self) -> FailReason {
        if self.was_active {
            FailReason::NoQuorum
        } else {
            FailReason::NotAttached
        }
    }

    fn in_sync_count(&self) -> usize {
        self.reps.iter().filter(|r| r.status.in_sync()).count()
    }

    /// In-sync replicas that applied `seq`.
    fn votes(&self, seq: Seq) -> usize {
        self.reps.iter().filter(|r| r.status.in_sync() && r.acked_seq >= seq).count()
    }

    /// In-sync replicas on which everything up to `seq` is durable.
    fn durable_votes(&self, seq: Seq) -> usize {
        self.reps.iter().filter(|r| r.status.in_sync() && r.durable_seq >= seq).count()
    }

    fn on_write(&mut self, op: OpId, fua: bool, now: Millis, out: &mut Vec<Command>) {
        if self.phase != Phase::Active {
            out.push(Command::FailClient { op, reason: self.inactive_reason() });
            return;
        }
        let seq = self.assign_seq();
        out.push(Command::Sequenced { op, seq });
        for (id, r) in self.reps.iter_mut().enumerate() {
            if r.connected() {
                out.push(Command::SendWrite { replica: id, seq, fua });
                r.inflight.push_back((seq, now));
                r.last_sent = seq;
            }
        }
        self.writes.insert(seq, PendingWrite { op, fua, deadline: now + self.cfg.io_timeout_ms });
    }

    fn on_flush(&mut self, op: OpId, now: Millis, out: &mut Vec<Command>) {
        if self.phase != Phase::Active {
            out.push(Command::FailClient { op, reason: self.inactive_reason() });
            return;
        }
        let barrier = self.last_seq;
        if self.durable_votes(barrier) >= self.w {
            out.push(Command::AckClient { op });
            return;
        }
        for (id, r) in self.reps.iter_mut().enumerate() {
            let covered = r.flushes.back().is_some_and(|&(covers, _)| covers >= barrier);
            if r.status.in_sync() && r.durable_seq < barrier && !covered {
                out.push(Command::SendFlush { replica: id });
                r.flushes.push_back((r.last_sent, now));
            }
        }
        self.flushes.push(PendingFlush { op, barrier, deadline: now + self.cfg.io_timeout_ms });
    }

    /// Whether this engine holds the read lease at `now`: a write quorum of replicas
    /// answered a request under its epoch sent less than `lease_ms` ago. A newer engine
    /// claims a majority, which shares a replica with every write quorum, and waits
    /// `lease_wait_ms` before serving; so while this holds, no newer engine acknowledged
    /// anything and a read of this engine's replicas is not stale.
    pub fn lease_valid(&self, now: Millis) -> bool {
        self.reps.iter().filter(|r| r.lease_until > now).count() >= self.w
    }

    /// The local replica and until when (exclusive, runtime milliseconds) a client read
    /// may go straight to it without a step: the engine is active, the local replica is
    /// healthy and acknowledged every write acknowledged to a client, and the read lease
    /// holds (until the lease's end). The same replica `dispatch_read` would pick first,
    /// under the same lease. The runtime recomputes it after every step, before that step's
    /// commands run, so a client never sees an ack the gate does not account for.
    pub fn local_read_until(&self) -> Option<(ReplicaId, Millis)> {
        if self.phase != Phase::Active {
            return None;
        }
        let (id, r) = self.reps.iter().enumerate().find(|&(id, _)| self.cfg.replicas[id].local)?;
        if r.status != ReplicaStatus::Healthy || r.acked_seq < self.acked_client_seq {
            return None;
        }
        // lease_valid(now) <=> now < the W-th latest lease end. Runs after every step:
        // no allocation (at most MAX_REPLICAS replicas).
        let mut ends = [0 as Millis; MAX_REPLICAS];
        let n = self.reps.len().min(MAX_REPLICAS);
        for (end, r) in ends.iter_mut().zip(&self.reps) {
            *end = r.lease_until;
        }
        ends[..n].sort_unstable_by(|a, b| b.cmp(a));
        let until = *ends[..n].get(self.w.checked_sub(1)?)?;
        (until > 0).then_some((id, until))
    }

    /// Reads are served only under the read lease; without it they wait (the lease is
    /// renewed by pings) until their deadline. `exclude`: replicas that failed this
    /// read's checksum (a parked read forgets them; they answer `Corrupt` again).
    fn route_read(&mut self, op: OpId, now: Millis, exclude: &[ReplicaId], out: &mut Vec<Command>) {
        if self.phase != Phase::Active {
            out.push(Command::FailClient { op, reason: self.inactive_reason() });
            return;
        }
        if !self.lease_valid(now) {
            self.parked_reads.push((op, now + self.cfg.io_timeout_ms));
            self.renew_lease(now, out);
            return;
        }
        self.dispatch_read(op, exclude, out);
    }

    /// Pings every connected replica that has no ping outstanding.
    fn renew_lease(&mut self, now: Millis, out: &mut Vec<Command>) {
        for (id, r) in self.reps.iter_mut().enumerate() {
            if r.connected() && r.ping_sent.is_none() {
                r.ping_sent = Some(now);
                out.push(Command::SendPing { replica: id });
            }
        }
    }

    /// Serves the parked reads once the lease holds again.
    fn release_reads(&mut self, now: Millis, out: &mut Vec<Command>) {
        if self.parked_reads.is_empty() || self.phase != Phase::Active || !self.lease_valid(now) {
            return;
        }
        for (op, _) in std::mem::take(&mut self.parked_reads) {
            self.dispatch_read(op, &[], out);
        }
    }

    fn on_ping(&mut self, id: ReplicaId, res: Result<ReplicaSeqs, ReplicaError>, now: Millis, out: &mut Vec<Command>) {
        let Some(sent) = self.reps[id].ping_sent.take() else { return };
        match res {
            Ok(state) if state.epoch > self.epoch => self.fence(state.epoch, out),
            Ok(_) => {
                let r = &mut self.reps[id];
                r.lease_until = r.lease_until.max(sent.saturating_add(self.cfg.lease_ms));
                self.release_reads(now, out);
            }
            Err(ReplicaError::StaleEpoch { current }) => self.fence(current, out),
            // An unreachable replica just gives no vote; its link's deadlines fail it.
            Err(_) => {}
        }
    }

    /// A replica answered a request sent at `sent` under this engine's epoch.
    pub(super) fn vote(&mut self, id: ReplicaId, sent: Millis) {
        let r = &mut self.reps[id];
        r.lease_until = r.lease_until.max(sent.saturating_add(self.cfg.lease_ms));
    }

    /// Picks a replica holding every acknowledged write: in sync, caught up to the highest
    /// acknowledged seq; the local one first, healthy before lagging; none in `exclude`.
    fn dispatch_read(&mut self, op: OpId, exclude: &[ReplicaId], out: &mut Vec<Command>) {
        let best = self
            .reps
            .iter()
            .enumerate()
            .filter(|(id, r)| r.status.in_sync() && r.acked_seq >= self.acked_client_seq && !exclude.contains(id))
            .min_by_key(|&(id, r)| (r.status != ReplicaStatus::Healthy, !self.cfg.replicas[id].local, id));
        match best {
            Some((replica, _)) => out.push(Command::SendRead { op, replica }),
            None if !exclude.is_empty() => out.push(Command::FailClient { op, reason: FailReason::Corrupt }),
            None => out.push(Command::FailClient { op, reason: FailReason::NoReplica }),
        }
    }

    fn on_acked(&mut self, id: ReplicaId, seq: Seq, durable: Seq, now: Millis, out: &mut Vec<Command>) {
        let r = &mut self.reps[id];
        if !r.connected() {
            return;
        }
        let mut sent = None;
        while r.inflight.front().is_some_and(|&(s, _)| s <= seq) {
            sent = r.inflight.pop_front().map(|(_, t)| t);
        }
        r.acked_seq = r.acked_seq.max(seq);
        r.durable_seq = r.durable_seq.max(durable);
        if let Some(t) = sent {
            self.vote(id, t);
        }
        self.maybe_recovered(id, now, out);
        self.settle(out);
        self.release_reads(now, out);
    }

    fn on_flushed(&mut self, id: ReplicaId, durable: Seq, now: Millis, out: &mut Vec<Command>) {
        let r = &mut self.reps[id];
        if !r.connected() {
            return;
        }
        let sent = r.flushes.pop_front().map(|(_, t)| t);
        r.durable_seq = r.durable_seq.max(durable);
        if let Some(t) = sent {
            self.vote(id, t);
        }
        self.maybe_recovered(id, now, out);
        self.settle(out);
        self.release_reads(now, out);
    }

    /// A lagging replica whose oldest request is young again is healthy.
    fn maybe_recovered(&mut self, id: ReplicaId, now: Millis, out: &mut Vec<Command>) {
        let r = &mut self.reps[id];
        let young = r.oldest_request().is_none_or(|t| now.saturating_sub(t) < self.cfg.ack_timeout_ms);
        if r.status == ReplicaStatus::Lagging && young {
            r.status = ReplicaStatus::Healthy;
            out.push(Command::SetStatus { replica: id, status: ReplicaStatus::Healthy });
        }
    }

    fn on_replica_error(&mut self, id: ReplicaId, error: ReplicaError, now: Millis, out: &mut Vec<Command>) {
        match error {
            ReplicaError::StaleEpoch { current } => self.fence(current, out),
            ReplicaError::Failed(_) | ReplicaError::Conflict => {
                self.fail_replica(id, now, out);
                self.settle(out);
            }
        }
    }

    /// Stops using a replica: in-flight requests are forgotten (it will be resynced from
    /// its durable seq when it comes back), resyncs it was the source of are restarted.
    pub(super) fn fail_replica(&mut self, id: ReplicaId, now: Millis, out: &mut Vec<Command>) {
        let retry_at = now + self.cfg.retry_interval_ms;
        let r = &mut self.reps[id];
        if r.status == ReplicaStatus::Failed {
            return;
        }
        r.resync = None;
        let was_connected = r.connected();
        if r.status.in_sync() {
            // It applied a prefix of what was sent to it; its report will cap this.
            r.known_cp = Some(r.last_sent.max(r.acked_seq));
        }
        r.status = ReplicaStatus::Failed;
        r.inflight.clear();
        r.flushes.clear();
        r.retry_at = retry_at;
        if was_connected {
            out.push(Command::Disconnect { replica: id });
        }
        out.push(Command::SetStatus { replica: id, status: ReplicaStatus::Failed });
        if self.phase == Phase::Active && self.in_sync_count() == 0 {
            self.reattach(now, out);
            return;
        }
        for (t, r) in self.reps.iter_mut().enumerate() {
            if let Some(plan) = r.resync.as_mut() {
                if plan.source == Some(id) {
                    plan.source = None;
                    out.push(Command::AbortResync { replica: t });
                }
            }
        }
        self.start_resyncs(out);
    }

    pub(super) fn fence(&mut self, current: u64, out: &mut Vec<Command>) {
        let current = current.max(self.epoch.saturating_add(1));
        self.phase = Phase::Fenced { current };
        out.push(Command::Fenced { current });
        let reason = FailReason::Fenced { current };
        for (id, r) in self.reps.iter().enumerate() {
            if r.connected() {
                out.push(Command::Disconnect { replica: id });
            }
        }
        for (_, w) in std::mem::take(&mut self.writes) {
            out.push(Command::FailClient { op: w.op, reason });
        }
        for f in std::mem::take(&mut self.flushes) {
            out.push(Command::FailClient { op: f.op, reason });
        }
        for (op, _) in std::mem::take(&mut self.parked_reads) {
            out.push(Command::FailClient { op, reason });
        }
    }

    /// Fails the pending writes sequenced after `seq` (a re-attach adopted a history that
    /// ends at `seq`: they are on no replica the volume trusts).
    pub(super) fn fail_writes_after(&mut self, seq: Seq, reason: FailReason, out: &mut Vec<Command>) {
        for (_, w) in self.writes.split_off(&seq.saturating_add(1)) {
            out.push(Command::FailClient { op: w.op, reason });
        }
    }

    /// Acknowledges every client write and flush that reached its quorum, in seq order,
    /// then starts resyncs whose source became ready.
    pub(super) fn settle(&mut self, out: &mut Vec<Command>) {
        let ready: Vec<Seq> = self
            .writes
            .iter()
            .filter(|(&seq, w)| {
                let votes = if w.fua { self.durable_votes(seq) } else { self.votes(seq) };
                votes >= self.w
            })
            .map(|(&seq, _)| seq)
            .collect();
        for seq in ready {
            if let Some(w) = self.writes.remove(&seq) {
                self.acked_client_seq = self.acked_client_seq.max(seq);
                out.push(Command::AckClient { op: w.op });
            }
        }
        let mut i = 0;
        while i < self.flushes.len() {
            if self.durable_votes(self.flushes[i].barrier) >= self.w {
                let f = self.flushes.remove(i);
                out.push(Command::AckClient { op: f.op });
            } else {
                i += 1;
            }
        }
        self.start_resyncs(out);
    }

    fn on_tick(&mut self, now: Millis, out: &mut Vec<Command>) {
        match self.phase {
            Phase::Probing | Phase::Opening if now >= self.attach_deadline => {
                self.phase = Phase::AttachFailed;
                out.push(Command::AttachFailed { reason: FailReason::NoQuorum });
                return;
            }
            Phase::Opening | Phase::Active => {}
            _ => return,
        }
        for id in 0..self.reps.len() {
            let r = &self.reps[id];
            let age = r.oldest_request().map(|t| now.saturating_sub(t));
            if r.connected() && age.is_some_and(|a| a >= self.cfg.failure_timeout_ms) {
                self.fail_replica(id, now, out);
            } else if r.status == ReplicaStatus::Healthy && age.is_some_and(|a| a >= self.cfg.ack_timeout_ms) {
                self.reps[id].status = ReplicaStatus::Lagging;
                out.push(Command::SetStatus { replica: id, status: ReplicaStatus::Lagging });
            } else if r.status == ReplicaStatus::Failed && !r.open_pending && now >= r.retry_at {
                let (epoch, mode) = (self.epoch, self.open_mode(id));
                let r = &mut self.reps[id];
                r.open_pending = true;
                r.open_sent = now;
                r.retry_at = now + self.cfg.retry_interval_ms;
                out.push(Command::SendOpen { replica: id, epoch, mode });
            }
        }
        if self.phase == Phase::Active {
            // Keep the read lease: ping replicas whose vote is half spent (acks of writes
            // renew it too, so a busy volume sends no pings).
            let half = self.cfg.lease_ms / 2;
            for (id, r) in self.reps.iter_mut().enumerate() {
                if r.connected() && r.ping_sent.is_none() && r.lease_until <= now.saturating_add(half) {
                    r.ping_sent = Some(now);
                    out.push(Command::SendPing { replica: id });
                }
            }
        }
        let mut i = 0;
        while i < self.parked_reads.len() {
            if self.parked_reads[i].1 <= now {
                let (op, _) = self.parked_reads.remove(i);
                out.push(Command::FailClient { op, reason: FailReason::NoLease });
            } else {
                i += 1;
            }
        }
        match self.phase {
            Phase::Active => self.settle(out),
            Phase::Opening if self.was_active => {}
            _ => return,
        }
        let reason = if self.in_sync_count() < self.w { FailReason::NoQuorum } else { FailReason::Timeout };
        let expired: Vec<Seq> = self.writes.iter().filter(|(_, w)| w.deadline <= now).map(|(&s, _)| s).collect();
        for seq in expired {
            if let Some(w) = self.writes.remove(&seq) {
                out.push(Command::FailClient { op: w.op, reason });
            }
        }
        let mut i = 0;
        while i < self.flushes.len() {
            if self.flushes[i].deadline <= now {
                let f = self.flushes.remove(i);
                out.push(Command::FailClient { op: f.op, reason });
            } else {
                i += 1;
            }
        }
    }
}

//! Attach (epoch bump, choice of the source of truth), re-attach and resync planning for
//! [`Machine`].
//!
//! **Consistent point.** For each opened replica the machine works out `cp`, how far the
//! replica holds the volume's history as a prefix: its `last_seq`, lowered to its
//! `resync_from` mark (an unfinished resync), to what this engine remembers about it (the
//! last seq it sent it while in sync, or the point a resync into it started from), and to
//! the attach base if the history was cut back since. A replica this engine never had in
//! sync is related through the epoch history it recorded ([`History`]): its report
//! stands up to the fork point of its history and the volume's (see the module docs of
//! [`crate`], "Epoch history"), however many attaches it missed. Without a
//! usable history (a record written before histories were kept, or sharing no activation
//! with the volume's) it is related through the epochs in its seqs (`e` our epoch, `h`
//! the attach base; see [`SEQ_EPOCH_SHIFT`](super::types::SEQ_EPOCH_SHIFT)): last
//! written in `e`, or in `h`'s epoch up to `h`: its report stands; in `h`'s epoch beyond
//! `h`: `h`; older or unrelated: 0 (where its history forked is unknown).
//!
//! **Attach.** `State` to every replica; once a majority answered, `Open(max epoch + 1)` to
//! every replica; once a majority accepted, the volume is active. The source of truth is
//! the opened replica with the highest `cp`: every acknowledged write `s` was applied by W
//! in-sync replicas, whose `cp` stays `>= s`, and W intersects the majority. The history
//! is adopted up to the source's `cp` (the attach base); pending writes beyond it fail.
//! The activation appends `(epoch, start, base)` to the history it adopted (the source's
//! at the first attach, its own at a re-attach), `start` being the first seq it may issue.
//!
//! **Admission.** Every replica admitted (healthy or resyncing) gets [`Command::Record`]
//! first: the history, and for a resyncing one its mark, durable on it before any write.
//!
//! **Resync plan.** A replica at exactly the end of the history, with `cp == last_seq`, is
//! healthy. Any other one resyncs from `since = min(durable_seq, cp)` (a crash may have
//! lost what was not durable), two-sided if `last_seq > cp` (what it holds beyond `cp` may
//! be writes the history does not contain, which must be overwritten from the source).
//!
//! **Re-attach.** When the last in-sync replica fails, the same procedure runs again under
//! the same epoch, with the engine's memory of each replica's `cp`.

use std::cmp::Reverse;

use super::event::Command;
use super::machine::{Machine, Phase, ResyncPlan};
use super::transport::ClaimMode;
use super::types::{
    epoch_of_seq, FailReason, History, Millis, ReplicaError, ReplicaId, ReplicaSeqs, ReplicaStatus, Seq,
    SEQ_EPOCH_SHIFT,
};
use hlstore_store::HistoryEntry;

impl Machine {
    fn majority(&self) -> usize {
        self.reps.len() / 2 + 1
    }

    pub(super) fn on_attach(&mut self, now: Millis, out: &mut Vec<Command>) {
        if !matches!(self.phase, Phase::Detached | Phase::AttachFailed) {
            return;
        }
        self.phase = Phase::Probing;
        self.attach_deadline = now + self.cfg.attach_timeout_ms;
        for (id, r) in self.reps.iter_mut().enumerate() {
            r.status = ReplicaStatus::Unknown;
            r.reported = None;
            r.open_pending = true;
            r.conflict = false;
            out.push(Command::SendState { replica: id });
        }
    }

    /// How this engine claims a replica: by compare-and-set on the epoch it probed until
    /// it first held a majority, then by joining (it owns the epoch).
    pub(super) fn open_mode(&self, id: ReplicaId) -> ClaimMode {
        if self.was_active {
            ClaimMode::Join
        } else {
            ClaimMode::Cas { expect: self.reps[id].expect }
        }
    }

    /// Once a majority answered the probe: refuse if the replicas name another engine as
    /// the holder (unless this is a takeover, which then waits out that engine's read
    /// lease), and claim every replica at `max epoch + 1` by compare-and-set on the epoch
    /// each one reported (unanswered ones: the highest epoch seen). Of two engines racing
    /// for the volume, each replica takes the first claim it gets and refuses the other, so
    /// at most one reaches a majority.
    pub(super) fn on_state(&mut self, id: ReplicaId, state: ReplicaSeqs, now: Millis, out: &mut Vec<Command>) {
        if self.phase != Phase::Probing {
            return;
        }
        self.reps[id].reported = Some(state);
        self.reps[id].open_pending = false;
        let answered = self.reps.iter().filter(|r| r.reported.is_some()).count();
        if answered < self.majority() {
            return;
        }
        // Any holder counts, whatever its epoch: a holder at an older epoch than another
        // replica reports may still hold a write quorum (the newer claim may have lost).
        let me = self.cfg.owner;
        let holders: Vec<u64> =
            self.reps.iter().filter_map(|r| r.reported.map(|s| s.owner)).filter(|&o| o != 0 && o != me).collect();
        let cfg = &self.cfg;
        let refused = holders.iter().find(|o| !cfg.takeover_owners.contains(o) && !cfg.dead_owners.contains(o));
        if let (Some(&owner), false) = (refused, cfg.takeover) {
            self.phase = Phase::AttachFailed;
            out.push(Command::AttachFailed { reason: FailReason::Owned { owner } });
            return;
        }
        self.lease_wait = holders.iter().any(|o| !cfg.dead_owners.contains(o));
        let max_epoch = self.reps.iter().filter_map(|r| r.reported.map(|s| s.epoch)).max().unwrap_or(0);
        // Seqs carry the epoch in their high bits: an epoch that does not fit is refused.
        let Some(epoch) = max_epoch
            .checked_add(1)
            .filter(|&e| e.checked_shl(SEQ_EPOCH_SHIFT).is_some_and(|s| s >> SEQ_EPOCH_SHIFT == e))
        else {
            self.phase = Phase::AttachFailed;
            out.push(Command::AttachFailed { reason: FailReason::NoQuorum });
            return;
        };
        self.epoch = epoch;
        self.phase = Phase::Opening;
        for (id, r) in self.reps.iter_mut().enumerate() {
            r.expect = r.reported.map_or(max_epoch, |s| s.epoch);
            r.reported = None;
            r.open_pending = true;
            r.open_sent = now;
            out.push(Command::SendOpen { replica: id, epoch, mode: ClaimMode::Cas { expect: r.expect } });
        }
    }

    pub(super) fn on_opened(&mut self, id: ReplicaId, state: ReplicaSeqs, now: Millis, out: &mut Vec<Command>) {
        if state.epoch > self.epoch {
            self.fence(state.epoch, out);
            return;
        }
        if state.epoch < self.epoch {
            // The answer to an open under the epoch before a re-attach: a newer one is out.
            return;
        }
        self.reps[id].open_pending = false;
        let sent = self.reps[id].open_sent;
        self.vote(id, sent);
        match self.phase {
            Phase::Opening => {
                self.reps[id].reported = Some(state);
                self.maybe_activate(now, out);
            }
            Phase::Active if matches!(self.reps[id].status, ReplicaStatus::Failed | ReplicaStatus::Unknown) => {
                self.admit(id, state, false, out);
                self.start_resyncs(out);
                self.settle(out);
            }
            _ => {}
        }
        let _ = now;
    }

    pub(super) fn on_open_failed(&mut self, id: ReplicaId, error: ReplicaError, now: Millis, out: &mut Vec<Command>) {
        if let ReplicaError::StaleEpoch { current } = error {
            if matches!(self.phase, Phase::Opening | Phase::Active) {
                self.fence(current, out);
                return;
            }
        }
        let r = &mut self.reps[id];
        r.open_pending = false;
        r.retry_at = now + self.cfg.retry_interval_ms;
        r.conflict |= error == ReplicaError::Conflict;
        if r.status != ReplicaStatus::Failed && matches!(self.phase, Phase::Opening | Phase::Active) {
            r.status = ReplicaStatus::Failed;
            out.push(Command::SetStatus { replica: id, status: ReplicaStatus::Failed });
        }
        if self.phase == Phase::Opening {
            // Another engine's claim won on so many replicas that this one cannot reach a
            // majority: give up now rather than at the attach deadline.
            let conflicts = self.reps.iter().filter(|r| r.conflict).count();
            if !self.was_active && conflicts > self.reps.len() - self.majority() {
                self.phase = Phase::AttachFailed;
                out.push(Command::AttachFailed { reason: FailReason::Conflict });
                return;
            }
            self.maybe_activate(now, out);
        }
    }

    /// How far an opened replica holds the volume's history as a prefix: its `last_seq`,
    /// lowered to where an unfinished resync left it complete (`resync_from`) and to what
    /// this engine established about it. A replica this engine never established is
    /// related to the history through its recorded epoch history, or failing that the
    /// epochs in its seqs (see the module docs); before the first attach completes, its
    /// own report is all there is.
    pub(super) fn consistent_point(&self, id: ReplicaId) -> Seq {
        let Some(s) = self.reps[id].reported else { return 0 };
        let raw = s.resync_from.map_or(s.last_seq, |f| f.min(s.last_seq));
        match self.reps[id].known_cp {
            Some(k) => raw.min(k),
            None if !self.was_active => raw,
            None => {
                if let Some(fork) = trusted(&s).and_then(|h| self.history.fork_point(&h)) {
                    return raw.min(fork);
                }
                let et = epoch_of_seq(s.last_seq);
                if s.last_seq == 0 || et == self.epoch {
                    raw
                } else if et == epoch_of_seq(self.attach_base) {
                    raw.min(self.attach_base)
                } else {
                    0
                }
            }
        }
    }

    /// Activates once a majority accepted the epoch.
    fn maybe_activate(&mut self, now: Millis, out: &mut Vec<Command>) {
        let opened = self.reps.iter().filter(|r| r.reported.is_some()).count();
        if opened >= self.majority() {
            self.activate(now, out);
        }
    }

    /// A majority accepted the epoch: choose the source, classify the opened replicas.
    ///
    /// The source is the replica with the highest consistent point: every acknowledged
    /// write `s` was applied by W in-sync replicas, which then held the history up to `s`
    /// (their consistent point stays >= `s` until they lose data), and W intersects the
    /// majority. If the source holds data beyond its consistent point (an unfinished
    /// resync), the history is adopted only up to that point and every other replica
    /// resyncs from it.
    fn activate(&mut self, now: Millis, out: &mut Vec<Command>) {
        let _ = now;
        let source = self
            .reps
            .iter()
            .enumerate()
            .filter_map(|(id, r)| r.reported.map(|s| (id, s)))
            .max_by_key(|&(id, s)| {
                let cp = self.consistent_point(id);
                (cp, cp == s.last_seq, s.durable_seq, self.cfg.replicas[id].local, Reverse(id))
            })
            .map(|(id, _)| id)
            .unwrap_or(0);
        let base = self.consistent_point(source);
        self.attach_base = base;
        self.dirty_source = self.reps[source].reported.is_some_and(|s| s.last_seq != base);
        // Any opened replica reporting more than `base` holds writes that were never
        // adopted; new seqs go above all of them.
        self.last_seq = base;
        let reported = self.reps.iter().filter_map(|r| r.reported.map(|s| s.last_seq)).max().unwrap_or(0);
        self.max_seq = self.max_seq.max(reported);
        // The adopted history: the source's at the first attach (its data is that history
        // up to `base`), this engine's own at a re-attach (`base` was computed against it).
        let mut history = if self.was_active {
            self.history
        } else {
            self.reps[source].reported.and_then(|s| trusted(&s)).unwrap_or_default()
        };
        history.push(HistoryEntry { epoch: self.epoch, start: self.next_seq(), base });
        self.history = history;
        // The history now ends at `base`: whatever replicas hold beyond it is not in it.
        for r in &mut self.reps {
            r.known_cp = r.known_cp.map(|k| k.min(base));
        }
        self.phase = Phase::Active;
        self.was_active = true;
        let wait_ms = if std::mem::take(&mut self.lease_wait) { self.cfg.lease_wait_ms() } else { 0 };
        out.push(Command::Attached { epoch: self.epoch, source, wait_ms });
        // After a re-attach: writes sequenced beyond the adopted history never reached a
        // quorum and are not in it.
        self.fail_writes_after(base, FailReason::NoQuorum, out);
        for id in 0..self.reps.len() {
            match self.reps[id].reported {
                Some(state) => self.admit(id, state, id == source, out),
                None if !self.reps[id].open_pending && self.reps[id].status != ReplicaStatus::Failed => {
                    self.reps[id].status = ReplicaStatus::Failed;
                    out.push(Command::SetStatus { replica: id, status: ReplicaStatus::Failed });
                }
                None => {}
            }
        }
        self.start_resyncs(out);
    }

    /// Brings an opened replica into the active volume: healthy if it holds exactly the
    /// history up to `last_seq` (or is the attach source), resyncing otherwise.
    fn admit(&mut self, id: ReplicaId, state: ReplicaSeqs, is_source: bool, out: &mut Vec<Command>) {
        self.reps[id].reported = Some(state);
        let last = self.last_seq;
        let cp = if is_source { self.attach_base } else { self.consistent_point(id) };
        let since = state.durable_seq.min(cp);
        // Equal seqs mean equal content only if the replica is a clean prefix and the
        // history did not just restart from a source holding more than it adopted.
        let same = cp == state.last_seq && state.last_seq == last && (last > self.attach_base || !self.dirty_source);
        let healthy = is_source || same;
        out.push(Command::Record { replica: id, resync_from: (!healthy).then_some(cp) });
        let r = &mut self.reps[id];
        r.inflight.clear();
        r.flushes.clear();
        r.last_sent = cp;
        if healthy {
            r.status = ReplicaStatus::Healthy;
            r.acked_seq = cp;
            r.durable_seq = state.durable_seq.min(cp);
            r.known_cp = Some(cp);
            r.resync = None;
        } else {
            r.status = ReplicaStatus::Resyncing;
            r.acked_seq = 0;
            r.durable_seq = 0;
            r.known_cp = Some(cp);
            // Data beyond `cp` may be writes the history does not contain: copy the
            // target's own changed blocks from the source too.
            // A seq of its own for the copied chunks: above every seq assigned or seen,
            // below every later write.
            let two_sided = (state.last_seq > cp).then(|| self.reserve_seq());
            let r = &mut self.reps[id];
            r.resync = Some(ResyncPlan { since, upto: last, two_sided, consistent: cp, source: None });
        }
        out.push(Command::SetStatus { replica: id, status: self.reps[id].status });
    }

    /// Starts every planned resync that has no source yet, from an in-sync replica that
    /// applied everything up to the plan's `upto` (healthy first, then the most advanced).
    pub(super) fn start_resyncs(&mut self, out: &mut Vec<Command>) {
        for t in 0..self.reps.len() {
            let Some(plan) = self.reps[t].resync else { continue };
            if plan.source.is_some() || self.reps[t].status != ReplicaStatus::Resyncing {
                continue;
            }
            let source = self
                .reps
                .iter()
                .enumerate()
                .filter(|(_, r)| r.status.in_sync() && r.acked_seq >= plan.upto)
                .min_by_key(|&(id, r)| (r.status != ReplicaStatus::Healthy, Reverse(r.acked_seq), id))
                .map(|(id, _)| id);
            if let Some(source) = source {
                if let Some(p) = self.reps[t].resync.as_mut() {
                    p.source = Some(source);
                }
                out.push(Command::StartResync {
                    replica: t,
                    source,
                    since: plan.since,
                    upto: plan.upto,
                    two_sided: plan.two_sided,
                    consistent: plan.consistent,
                });
            }
        }
    }

    /// The resync copied everything up to `upto` and the target flushed it: from now on
    /// it holds a prefix of the history and its acks count.
    pub(super) fn on_resync_done(&mut self, id: ReplicaId, durable: Seq, now: Millis, out: &mut Vec<Command>) {
        let r = &mut self.reps[id];
        let Some(plan) = r.resync else { return };
        if r.status != ReplicaStatus::Resyncing || plan.source.is_none() {
            return;
        }
        r.resync = None;
        r.acked_seq = r.acked_seq.max(plan.upto);
        r.known_cp = Some(r.acked_seq);
        r.last_sent = r.last_sent.max(r.acked_seq);
        r.durable_seq = r.durable_seq.max(durable);
        let lagging = r.oldest_request_age(now).is_some_and(|a| a >= self.cfg.ack_timeout_ms);
        r.status = if lagging { ReplicaStatus::Lagging } else { ReplicaStatus::Healthy };
        out.push(Command::SetStatus { replica: id, status: r.status });
        self.settle(out);
        self.start_resyncs(out);
    }

    /// The last in-sync replica failed: no connected replica is known to hold every
    /// acknowledged write. Attach again (same epoch: this engine still owns the volume):
    /// once a majority answers, the replica with the highest consistent point holds every
    /// acknowledged write (each was applied by W in-sync replicas, whose consistent points
    /// this engine remembers). Requests meanwhile fail with `NoQuorum`; a re-attach never
    /// gives up.
    pub(super) fn reattach(&mut self, now: Millis, out: &mut Vec<Command>) {
        self.phase = Phase::Opening;
        self.attach_deadline = Millis::MAX;
        let epoch = self.epoch;
        for (id, r) in self.reps.iter_mut().enumerate() {
            if matches!(r.status, ReplicaStatus::Healthy | ReplicaStatus::Lagging | ReplicaStatus::Resyncing) {
                out.push(Command::Disconnect { replica: id });
            }
            r.resync = None;
            if r.status.in_sync() {
                r.known_cp = Some(r.last_sent.max(r.acked_seq));
            }
            if r.status != ReplicaStatus::Unknown {
                r.status = ReplicaStatus::Unknown;
                out.push(Command::SetStatus { replica: id, status: ReplicaStatus::Unknown });
            }
            r.reported = None;
            r.inflight.clear();
            r.flushes.clear();
            r.open_pending = true;
            r.open_sent = now;
            r.retry_at = now + self.cfg.retry_interval_ms;
            out.push(Command::SendOpen { replica: id, epoch, mode: ClaimMode::Join });
        }
    }
}

/// The history a replica reported, if it can be used: it holds only writes of the
/// activations listed (every engine records its history before its writes). A replica
/// holding a write of a later epoch than its history's last (written by an engine that
/// keeps no history) is related by epochs instead.
fn trusted(s: &ReplicaSeqs) -> Option<History> {
    s.history.last().filter(|e| epoch_of_seq(s.last_seq) <= e.epoch).map(|_| s.history)
}

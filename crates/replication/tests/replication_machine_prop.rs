//! Property test of the replication machine against a model of the replicas.
//!
//! Random interleavings of client writes/flushes, replica acks (delivered in order per
//! replica, like the real ordered stream), replica failures, reconnects, resync
//! completions and time. Each model replica records which seqs it truly holds and which
//! it holds durably; the machine's answers are checked against that, never against its
//! own bookkeeping:
//! - a write is acked only if at least W replicas hold it;
//! - a FUA write only if at least W replicas hold it durably;
//! - a flush only if at least W replicas durably hold every write acked before it.

use std::collections::{BTreeSet, HashMap, VecDeque};

use hlstore_replication::{Command as C, Event as E, Machine, MachineConfig, ReplicaError, ReplicaSeqs};
use proptest::prelude::*;

#[derive(Debug, Clone, Copy)]
enum Op {
    Write(u64, bool),
    Flush,
}

#[derive(Debug, Default, Clone)]
struct ModelReplica {
    queue: VecDeque<Op>,
    has: BTreeSet<u64>,
    durable: BTreeSet<u64>,
    durable_seq: u64,
    connected: bool,
    open_pending: bool,
    /// Epoch of the last open sent to it.
    open_epoch: u64,
    /// (source, upto) of the running resync.
    resync: Option<(usize, u64)>,
}

impl ModelReplica {
    fn sync(&mut self) {
        self.durable = self.has.clone();
        self.durable_seq = self.has.iter().next_back().copied().unwrap_or(0);
    }
}

enum Pending {
    Write(u64, bool),
    /// Writes acked to the client before the flush was issued.
    Flush(BTreeSet<u64>),
}

struct Harness {
    m: Machine,
    w: usize,
    reps: Vec<ModelReplica>,
    pending: HashMap<u64, Pending>,
    acked: BTreeSet<u64>,
    next_op: u64,
    now: u64,
}

impl Harness {
    fn new(n: usize, w: usize) -> Self {
        let mut cfg = MachineConfig::new(n);
        cfg.write_quorum = Some(w);
        cfg.ack_timeout_ms = 100;
        cfg.failure_timeout_ms = 400;
        cfg.io_timeout_ms = 1_000;
        cfg.retry_interval_ms = 200;
        cfg.lease_ms = u64::MAX / 4;
        let m = Machine::new(cfg).unwrap();
        let mut h = Harness {
            m,
            w,
            reps: vec![ModelReplica::default(); n],
            pending: HashMap::new(),
            acked: BTreeSet::new(),
            next_op: 1,
            now: 0,
        };
        h.step(E::Attach { now: 0 });
        for r in 0..n {
            h.step(E::StateReplied { replica: r, state: ReplicaSeqs::default(), now: 0 });
        }
        for r in 0..n {
            let state = ReplicaSeqs { epoch: 1, ..Default::default() };
            h.step(E::OpenReplied { replica: r, state, now: 0 });
        }
        h
    }

    fn step(&mut self, ev: E) {
        let mut sequenced: Option<(u64, u64)> = None;
        for cmd in self.m.step(ev) {
            match cmd {
                C::Sequenced { op, seq } => sequenced = Some((op, seq)),
                C::SendWrite { replica, seq, fua } => {
                    assert_eq!(sequenced.map(|s| s.1), Some(seq));
                    self.reps[replica].queue.push_back(Op::Write(seq, fua));
                }
                C::SendFlush { replica } => self.reps[replica].queue.push_back(Op::Flush),
                C::SendOpen { replica, epoch, .. } => {
                    self.reps[replica].open_pending = true;
                    self.reps[replica].open_epoch = epoch;
                }
                C::SetStatus { replica, status } => {
                    self.reps[replica].connected =
                        status.in_sync() || status == hlstore_replication::ReplicaStatus::Resyncing;
                }
                C::Disconnect { replica } => {
                    let r = &mut self.reps[replica];
                    r.queue.clear();
                    r.connected = false;
                    r.resync = None;
                }
                C::StartResync { replica, source, upto, .. } => self.reps[replica].resync = Some((source, upto)),
                C::AbortResync { replica } => self.reps[replica].resync = None,
                C::AckClient { op } => self.check_ack(op),
                C::FailClient { op, .. } => {
                    self.pending.remove(&op);
                }
                _ => {}
            }
        }
        if let Some((op, seq)) = sequenced {
            if let Some(Pending::Write(s, _)) = self.pending.get_mut(&op) {
                *s = seq;
            }
        }
    }

    fn check_ack(&mut self, op: u64) {
        let w = self.w;
        match self.pending.remove(&op).expect("ack for an unknown op") {
            Pending::Write(seq, fua) => {
                let holders = self.reps.iter().filter(|r| r.has.contains(&seq)).count();
                assert!(holders >= w, "write {seq} acked with {holders} holders < W={w}");
                if fua {
                    let durable = self.reps.iter().filter(|r| r.durable.contains(&seq)).count();
                    assert!(durable >= w, "FUA write {seq} acked with {durable} durable copies < W={w}");
                }
                self.acked.insert(seq);
            }
            Pending::Flush(before) => {
                let durable = self.reps.iter().filter(|r| before.is_subset(&r.durable)).count();
                assert!(durable >= w, "flush acked with {durable} replicas durably holding the acked writes < W={w}");
            }
        }
    }

    fn act(&mut self, kind: u8, r: usize, param: u8) {
        let r = r % self.reps.len();
        let now = self.now;
        match kind {
            0 => {
                let op = self.next_op;
                self.next_op += 1;
                let fua = param.is_multiple_of(4);
                self.pending.insert(op, Pending::Write(0, fua));
                self.step(E::ClientWrite { op, fua, now });
            }
            1 => {
                let op = self.next_op;
                self.next_op += 1;
                self.pending.insert(op, Pending::Flush(self.acked.clone()));
                self.step(E::ClientFlush { op, now });
            }
            2 => {
                let rep = &mut self.reps[r];
                let Some(op) = rep.queue.pop_front() else { return };
                let ev = match op {
                    Op::Write(seq, fua) => {
                        rep.has.insert(seq);
                        if fua {
                            rep.sync();
                        }
                        E::WriteAcked { replica: r, seq, durable_seq: rep.durable_seq, now }
                    }
                    Op::Flush => {
                        rep.sync();
                        E::FlushDone { replica: r, durable_seq: rep.durable_seq, now }
                    }
                };
                self.step(ev);
            }
            3 if self.reps[r].connected => {
                self.step(E::WriteFailed { replica: r, error: ReplicaError::Failed("injected".into()), now });
            }
            4 => {
                self.now += u64::from(param) * 4;
                let now = self.now;
                self.step(E::Tick { now });
            }
            5 if self.reps[r].open_pending => {
                let rep = &mut self.reps[r];
                rep.open_pending = false;
                let last_seq = rep.has.iter().next_back().copied().unwrap_or(0);
                let state = ReplicaSeqs {
                    epoch: rep.open_epoch,
                    owner: 0,
                    last_seq,
                    durable_seq: rep.durable_seq,
                    resync_from: None,
                    history: Default::default(),
                };
                self.step(E::OpenReplied { replica: r, state, now });
            }
            6 => {
                let Some((source, upto)) = self.reps[r].resync else { return };
                let copied: Vec<u64> = self.reps[source].has.range(..=upto).copied().collect();
                let rep = &mut self.reps[r];
                rep.resync = None;
                rep.has.extend(copied);
                rep.sync();
                let durable_seq = rep.durable_seq;
                self.step(E::ResyncDone { replica: r, durable_seq, now });
            }
            _ => {}
        }
    }
}

fn quorum_config() -> impl Strategy<Value = (usize, usize)> {
    (1usize..=5).prop_flat_map(|n| (Just(n), (n / 2 + 1)..=n))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2048, ..ProptestConfig::default() })]

    #[test]
    fn acks_never_precede_the_quorum(
        (n, w) in quorum_config(),
        actions in prop::collection::vec((0u8..7, 0usize..5, any::<u8>()), 1..300),
    ) {
        let mut h = Harness::new(n, w);
        for (kind, r, param) in actions {
            h.act(kind, r, param);
        }
    }
}

/// Writes keep being acked while the machine is driven fairly (every replica answers):
/// the property above is not satisfied vacuously.
#[test]
fn a_fair_schedule_acks_everything() {
    let mut h = Harness::new(3, 2);
    for i in 0..50u8 {
        h.act(0, 0, i);
        h.act(1, 0, 1);
        for r in 0..3 {
            while !h.reps[r].queue.is_empty() {
                h.act(2, r, 0);
            }
        }
    }
    assert!(h.pending.is_empty(), "{} ops left", h.pending.len());
    assert_eq!(h.acked.len(), 50);
}

//! The replication state machine: exact commands for each event sequence.

use hlstore_replication::{
    Command as C, Event as E, FailReason, History, Machine, MachineConfig, Phase, ReplicaError, ReplicaSeqs,
    ReplicaStatus as St,
};
use hlstore_store::{ClaimMode, HistoryEntry};

/// The first seq of epoch 1.
const S: u64 = 1 << 40;

fn cfg(n: usize, w: Option<usize>) -> MachineConfig {
    let mut c = MachineConfig::new(n);
    c.write_quorum = w;
    c.ack_timeout_ms = 100;
    c.failure_timeout_ms = 1_000;
    c.io_timeout_ms = 5_000;
    c.attach_timeout_ms = 2_000;
    c.retry_interval_ms = 500;
    // Long enough that no lease ping shows up in the exact command lists below; the lease
    // has its own tests.
    c.lease_ms = 1_000_000;
    c
}

fn seqs(epoch: u64, last: u64, durable: u64) -> ReplicaSeqs {
    ReplicaSeqs {
        epoch,
        owner: 0,
        last_seq: last,
        durable_seq: durable,
        resync_from: None,
        history: History::default(),
    }
}

/// A machine with every replica opened at seq 0 under epoch 1.
fn active(n: usize, w: Option<usize>) -> Machine {
    let mut m = Machine::new(cfg(n, w)).unwrap();
    m.step(E::Attach { now: 0 });
    for r in 0..n {
        m.step(E::StateReplied { replica: r, state: seqs(0, 0, 0), now: 0 });
    }
    for r in 0..n {
        m.step(E::OpenReplied { replica: r, state: seqs(1, 0, 0), now: 0 });
    }
    assert_eq!(m.phase(), Phase::Active);
    assert!((0..n).all(|r| m.status(r) == St::Healthy));
    m
}

fn sends(seq: u64, replicas: &[usize], fua: bool) -> Vec<C> {
    replicas.iter().map(|&replica| C::SendWrite { replica, seq, fua }).collect()
}

fn write(m: &mut Machine, op: u64, seq: u64, replicas: &[usize], now: u64) {
    let mut want = vec![C::Sequenced { op, seq }];
    want.extend(sends(seq, replicas, false));
    assert_eq!(m.step(E::ClientWrite { op, fua: false, now }), want);
}

fn ack(m: &mut Machine, replica: usize, seq: u64, durable: u64, now: u64) -> Vec<C> {
    m.step(E::WriteAcked { replica, seq, durable_seq: durable, now })
}

#[test]
fn config_rejects_non_majority_quorums() {
    assert!(Machine::new(cfg(0, None)).is_err());
    assert!(Machine::new(cfg(6, None)).is_err());
    assert!(Machine::new(cfg(3, Some(1))).is_err());
    assert!(Machine::new(cfg(2, Some(1))).is_err());
    assert!(Machine::new(cfg(4, Some(2))).is_err());
    assert!(Machine::new(cfg(3, Some(4))).is_err());
    assert_eq!(Machine::new(cfg(1, None)).unwrap().write_quorum(), 1);
    assert_eq!(Machine::new(cfg(2, None)).unwrap().write_quorum(), 2);
    assert_eq!(Machine::new(cfg(3, None)).unwrap().write_quorum(), 2);
    assert_eq!(Machine::new(cfg(4, None)).unwrap().write_quorum(), 3);
    assert_eq!(Machine::new(cfg(5, Some(5))).unwrap().write_quorum(), 5);
}

#[test]
fn attach_bumps_the_epoch_and_picks_the_most_advanced_replica() {
    let mut m = Machine::new(cfg(3, None)).unwrap();
    assert_eq!(
        m.step(E::Attach { now: 0 }),
        vec![C::SendState { replica: 0 }, C::SendState { replica: 1 }, C::SendState { replica: 2 }]
    );
    assert_eq!(m.step(E::StateReplied { replica: 1, state: seqs(4, 10, 10), now: 1 }), vec![]);
    assert_eq!(
        m.step(E::StateReplied { replica: 2, state: seqs(2, 7, 5), now: 1 }),
        vec![
            C::SendOpen { replica: 0, epoch: 5, mode: ClaimMode::Cas { expect: 4 } },
            C::SendOpen { replica: 1, epoch: 5, mode: ClaimMode::Cas { expect: 4 } },
            C::SendOpen { replica: 2, epoch: 5, mode: ClaimMode::Cas { expect: 2 } },
        ]
    );
    assert_eq!(m.step(E::OpenReplied { replica: 2, state: seqs(5, 7, 5), now: 2 }), vec![]);
    // Majority accepted: replica 1 (last_seq 10) is the source, replica 2 resyncs from its
    // durable seq 5 (one-sided: it is a clean prefix of the same history).
    assert_eq!(
        m.step(E::OpenReplied { replica: 1, state: seqs(5, 10, 10), now: 2 }),
        vec![
            C::Attached { epoch: 5, source: 1, wait_ms: 0 },
            C::Record { replica: 1, resync_from: None },
            C::SetStatus { replica: 1, status: St::Healthy },
            C::Record { replica: 2, resync_from: Some(7) },
            C::SetStatus { replica: 2, status: St::Resyncing },
            C::StartResync { replica: 2, source: 1, since: 5, upto: 10, two_sided: None, consistent: 7 },
        ]
    );
    assert_eq!(m.epoch(), 5);
    // The straggler answers later with the source's seq: healthy without resync.
    assert_eq!(
        m.step(E::OpenReplied { replica: 0, state: seqs(5, 10, 8), now: 3 }),
        vec![C::Record { replica: 0, resync_from: None }, C::SetStatus { replica: 0, status: St::Healthy }]
    );
    // Reads never go to the resyncing replica.
    assert_eq!(m.step(E::ClientRead { op: 9, now: 3 }), vec![C::SendRead { op: 9, replica: 0 }]);
    // New writes are in epoch 5's seq range and also go to the resyncing replica.
    write(&mut m, 1, 5 << 40, &[0, 1, 2], 4);
    // The resyncing replica's ack does not count.
    assert_eq!(ack(&mut m, 2, 5 << 40, 0, 5), vec![]);
    assert_eq!(ack(&mut m, 0, 5 << 40, 0, 5), vec![]);
    assert_eq!(ack(&mut m, 1, 5 << 40, 0, 5), vec![C::AckClient { op: 1 }]);
    assert_eq!(
        m.step(E::ResyncDone { replica: 2, durable_seq: 5 << 40, now: 6 }),
        vec![C::SetStatus { replica: 2, status: St::Healthy }]
    );
    assert_eq!(m.view(2).acked_seq, 5 << 40);
}

#[test]
fn an_incomplete_replica_is_never_the_source() {
    // (Its copied chunks carry the first seq of epoch 2: above every seq any replica
    // reported, in the range of the activation that issues them.)
    let mut m = Machine::new(cfg(3, None)).unwrap();
    m.step(E::Attach { now: 0 });
    m.step(E::StateReplied { replica: 0, state: seqs(1, 0, 0), now: 0 });
    m.step(E::StateReplied { replica: 1, state: seqs(1, 0, 0), now: 0 });
    let incomplete = ReplicaSeqs { resync_from: Some(S + 3), ..seqs(2, S + 50, S + 50) };
    m.step(E::OpenReplied { replica: 0, state: incomplete, now: 0 });
    assert_eq!(
        m.step(E::OpenReplied { replica: 1, state: seqs(2, S + 40, S + 40), now: 0 }),
        vec![
            C::Attached { epoch: 2, source: 1, wait_ms: 0 },
            C::Record { replica: 0, resync_from: Some(S + 3) },
            C::SetStatus { replica: 0, status: St::Resyncing },
            C::Record { replica: 1, resync_from: None },
            C::SetStatus { replica: 1, status: St::Healthy },
            C::StartResync {
                replica: 0,
                source: 1,
                since: S + 3,
                upto: S + 40,
                two_sided: Some(2 << 40),
                consistent: S + 3
            },
        ]
    );
}

#[test]
fn attach_fails_without_a_majority_before_the_deadline() {
    let mut m = Machine::new(cfg(3, None)).unwrap();
    m.step(E::Attach { now: 0 });
    m.step(E::StateReplied { replica: 0, state: seqs(0, 0, 0), now: 0 });
    assert_eq!(m.step(E::Tick { now: 1_999 }), vec![]);
    assert_eq!(m.step(E::Tick { now: 2_000 }), vec![C::AttachFailed { reason: FailReason::NoQuorum }]);
    assert_eq!(
        m.step(E::ClientWrite { op: 1, fua: false, now: 2_001 }),
        vec![C::FailClient { op: 1, reason: FailReason::NotAttached }]
    );
}

#[test]
fn a_newer_epoch_at_open_fences_the_attach() {
    let mut m = Machine::new(cfg(3, None)).unwrap();
    m.step(E::Attach { now: 0 });
    m.step(E::StateReplied { replica: 0, state: seqs(3, 0, 0), now: 0 });
    m.step(E::StateReplied { replica: 1, state: seqs(3, 0, 0), now: 0 });
    let err = ReplicaError::StaleEpoch { current: 7 };
    assert_eq!(m.step(E::OpenFailed { replica: 2, error: err, now: 1 }), vec![C::Fenced { current: 7 }]);
    assert_eq!(m.phase(), Phase::Fenced { current: 7 });
}

#[test]
fn writes_are_acked_on_the_quorum_and_in_order() {
    let mut m = active(3, None);
    write(&mut m, 1, S, &[0, 1, 2], 10);
    write(&mut m, 2, S + 1, &[0, 1, 2], 11);
    assert_eq!(ack(&mut m, 1, S, 0, 12), vec![]);
    assert_eq!(ack(&mut m, 1, S + 1, 0, 12), vec![]);
    // Replica 2 acks both at once: both writes reach W = 2, acked in seq order.
    assert_eq!(ack(&mut m, 2, S + 1, 0, 13), vec![C::AckClient { op: 1 }, C::AckClient { op: 2 }]);
    assert_eq!(ack(&mut m, 0, S + 1, 0, 14), vec![]);
}

#[test]
fn a_slow_replica_lags_and_recovers_without_blocking_the_quorum() {
    let mut m = active(3, None);
    write(&mut m, 1, S, &[0, 1, 2], 0);
    ack(&mut m, 0, S, 0, 10);
    assert_eq!(ack(&mut m, 1, S, 0, 10), vec![C::AckClient { op: 1 }]);
    assert_eq!(m.step(E::Tick { now: 99 }), vec![]);
    assert_eq!(m.step(E::Tick { now: 100 }), vec![C::SetStatus { replica: 2, status: St::Lagging }]);
    // Lagging still receives writes and still counts for quorum.
    write(&mut m, 2, S + 1, &[0, 1, 2], 101);
    assert_eq!(ack(&mut m, 0, S + 1, 0, 102), vec![]);
    // Its oldest request is now S+1 (sent at 101), which is young: healthy again.
    assert_eq!(ack(&mut m, 2, S, 0, 150), vec![C::SetStatus { replica: 2, status: St::Healthy }]);
    assert_eq!(ack(&mut m, 2, S + 1, 0, 151), vec![C::AckClient { op: 2 }]);
}

#[test]
fn a_dead_replica_fails_comes_back_and_resyncs_from_its_durable_seq() {
    let mut m = active(3, None);
    write(&mut m, 1, S, &[0, 1, 2], 0);
    ack(&mut m, 0, S, S, 5);
    assert_eq!(ack(&mut m, 1, S, S, 5), vec![C::AckClient { op: 1 }]);
    assert_eq!(m.step(E::Tick { now: 100 }), vec![C::SetStatus { replica: 2, status: St::Lagging }]);
    assert_eq!(
        m.step(E::Tick { now: 1_000 }),
        vec![C::Disconnect { replica: 2 }, C::SetStatus { replica: 2, status: St::Failed }]
    );
    // A failed replica is not sent writes.
    write(&mut m, 2, S + 1, &[0, 1], 1_001);
    ack(&mut m, 0, S + 1, S, 1_002);
    assert_eq!(ack(&mut m, 1, S + 1, S, 1_002), vec![C::AckClient { op: 2 }]);
    // Reconnect attempts every retry interval.
    assert_eq!(m.step(E::Tick { now: 1_499 }), vec![]);
    assert_eq!(m.step(E::Tick { now: 1_500 }), vec![C::SendOpen { replica: 2, epoch: 1, mode: ClaimMode::Join }]);
    assert_eq!(m.step(E::Tick { now: 1_600 }), vec![], "one open at a time");
    assert_eq!(
        m.step(E::OpenReplied { replica: 2, state: seqs(1, S, S - 1), now: 1_700 }),
        vec![
            C::Record { replica: 2, resync_from: Some(S) },
            C::SetStatus { replica: 2, status: St::Resyncing },
            C::StartResync { replica: 2, source: 0, since: S - 1, upto: S + 1, two_sided: None, consistent: S },
        ]
    );
    // New writes reach the resyncing replica; its acks do not count.
    write(&mut m, 3, S + 2, &[0, 1, 2], 1_800);
    ack(&mut m, 2, S + 2, S + 2, 1_801);
    assert_eq!(ack(&mut m, 0, S + 2, S, 1_802), vec![]);
    assert_eq!(
        m.step(E::ResyncDone { replica: 2, durable_seq: S + 2, now: 1_900 }),
        vec![C::SetStatus { replica: 2, status: St::Healthy }, C::AckClient { op: 3 },]
    );
}

#[test]
fn an_erroring_replica_fails_at_once_and_a_resync_source_loss_restarts_it() {
    let mut m = active(3, None);
    write(&mut m, 1, S, &[0, 1, 2], 0);
    ack(&mut m, 0, S, 0, 1);
    ack(&mut m, 1, S, 0, 1);
    let err = ReplicaError::Failed("connection reset".into());
    assert_eq!(
        m.step(E::WriteFailed { replica: 2, error: err.clone(), now: 2 }),
        vec![C::Disconnect { replica: 2 }, C::SetStatus { replica: 2, status: St::Failed },]
    );
    m.step(E::Tick { now: 502 });
    assert_eq!(
        m.step(E::OpenReplied { replica: 2, state: seqs(1, 0, 0), now: 503 }),
        vec![
            C::Record { replica: 2, resync_from: Some(0) },
            C::SetStatus { replica: 2, status: St::Resyncing },
            C::StartResync { replica: 2, source: 0, since: 0, upto: S, two_sided: None, consistent: 0 },
        ]
    );
    // The source dies: the resync restarts from the other in-sync replica.
    assert_eq!(
        m.step(E::WriteFailed { replica: 0, error: err.clone(), now: 504 }),
        vec![
            C::Disconnect { replica: 0 },
            C::SetStatus { replica: 0, status: St::Failed },
            C::AbortResync { replica: 2 },
            C::StartResync { replica: 2, source: 1, since: 0, upto: S, two_sided: None, consistent: 0 },
        ]
    );
    // The target dies mid-resync: when it returns it is resynced from the interrupted
    // point even though its last_seq looks current, and two-sided (what it holds beyond
    // that point is not known to be a prefix of the history).
    m.step(E::WriteFailed { replica: 2, error: err, now: 505 });
    m.step(E::Tick { now: 1_005 });
    let cmds = m.step(E::OpenReplied { replica: 2, state: seqs(1, S, S), now: 1_006 });
    assert_eq!(
        cmds,
        vec![
            C::Record { replica: 2, resync_from: Some(0) },
            C::SetStatus { replica: 2, status: St::Resyncing },
            C::StartResync { replica: 2, source: 1, since: 0, upto: S, two_sided: Some(S + 1), consistent: 0 },
        ]
    );
}

#[test]
fn without_quorum_writes_wait_then_fail_and_are_never_acked_by_a_minority() {
    let mut m = active(3, None);
    let err = ReplicaError::Failed("down".into());
    m.step(E::WriteFailed { replica: 1, error: err.clone(), now: 0 });
    m.step(E::WriteFailed { replica: 2, error: err, now: 0 });
    write(&mut m, 1, S, &[0], 10);
    assert_eq!(ack(&mut m, 0, S, S, 11), vec![]);
    assert_eq!(
        m.step(E::Tick { now: 5_009 }),
        vec![
            C::SendOpen { replica: 1, epoch: 1, mode: ClaimMode::Join },
            C::SendOpen { replica: 2, epoch: 1, mode: ClaimMode::Join }
        ]
    );
    assert_eq!(m.step(E::Tick { now: 5_010 }), vec![C::FailClient { op: 1, reason: FailReason::NoQuorum }]);
    assert_eq!(m.step(E::ClientFlush { op: 2, now: 5_011 }), vec![]);
    assert_eq!(m.step(E::Tick { now: 10_011 }), vec![C::FailClient { op: 2, reason: FailReason::NoQuorum }]);
}

#[test]
fn a_write_waiting_for_quorum_is_acked_when_a_replica_catches_up_in_time() {
    let mut m = active(3, None);
    let err = ReplicaError::Failed("down".into());
    m.step(E::WriteFailed { replica: 1, error: err.clone(), now: 0 });
    m.step(E::WriteFailed { replica: 2, error: err, now: 0 });
    write(&mut m, 1, S, &[0], 10);
    ack(&mut m, 0, S, S, 11);
    m.step(E::Tick { now: 500 });
    m.step(E::OpenReplied { replica: 1, state: seqs(1, 0, 0), now: 600 });
    assert_eq!(
        m.step(E::ResyncDone { replica: 1, durable_seq: S, now: 700 }),
        vec![C::SetStatus { replica: 1, status: St::Healthy }, C::AckClient { op: 1 }]
    );
}

#[test]
fn flush_waits_for_durable_on_the_quorum() {
    let mut m = active(3, None);
    write(&mut m, 1, S, &[0, 1, 2], 0);
    ack(&mut m, 0, S, 0, 1);
    ack(&mut m, 1, S, 0, 1);
    assert_eq!(
        m.step(E::ClientFlush { op: 2, now: 2 }),
        vec![C::SendFlush { replica: 0 }, C::SendFlush { replica: 1 }, C::SendFlush { replica: 2 },]
    );
    // A second flush with the same barrier sends nothing new.
    assert_eq!(m.step(E::ClientFlush { op: 3, now: 2 }), vec![]);
    // A write after the flush: its seq is beyond the barrier, a third flush needs new ones.
    write(&mut m, 4, S + 1, &[0, 1, 2], 3);
    assert_eq!(m.step(E::FlushDone { replica: 0, durable_seq: S, now: 4 }), vec![]);
    assert_eq!(
        m.step(E::FlushDone { replica: 2, durable_seq: S, now: 4 }),
        vec![C::AckClient { op: 2 }, C::AckClient { op: 3 }]
    );
    assert_eq!(
        m.step(E::ClientFlush { op: 5, now: 5 }),
        vec![C::SendFlush { replica: 0 }, C::SendFlush { replica: 1 }, C::SendFlush { replica: 2 },]
    );
    // Durable on one replica only: not enough.
    assert_eq!(ack(&mut m, 0, S + 1, S, 6), vec![]);
    assert_eq!(m.step(E::FlushDone { replica: 0, durable_seq: S + 1, now: 6 }), vec![]);
    assert_eq!(ack(&mut m, 1, S + 1, S + 1, 7), vec![C::AckClient { op: 4 }, C::AckClient { op: 5 }]);
    assert_eq!(m.step(E::FlushDone { replica: 1, durable_seq: S + 1, now: 8 }), vec![]);
    // Everything durable on a quorum: a new flush is acked at once.
    assert_eq!(m.step(E::ClientFlush { op: 6, now: 9 }), vec![C::AckClient { op: 6 }]);
}

#[test]
fn fua_write_is_acked_once_durable_on_the_quorum() {
    let mut m = active(3, None);
    assert_eq!(m.step(E::ClientWrite { op: 1, fua: true, now: 0 }), {
        let mut v = vec![C::Sequenced { op: 1, seq: S }];
        v.extend(sends(S, &[0, 1, 2], true));
        v
    });
    assert_eq!(ack(&mut m, 0, S, S, 1), vec![]);
    assert_eq!(ack(&mut m, 1, S, 0, 1), vec![], "applied but not durable");
    assert_eq!(ack(&mut m, 2, S, S, 1), vec![C::AckClient { op: 1 }]);
}

#[test]
fn a_newer_epoch_fences_everything() {
    let mut m = active(3, None);
    write(&mut m, 1, S, &[0, 1, 2], 0);
    assert_eq!(
        m.step(E::ClientFlush { op: 2, now: 0 }),
        vec![C::SendFlush { replica: 0 }, C::SendFlush { replica: 1 }, C::SendFlush { replica: 2 },]
    );
    let fenced = FailReason::Fenced { current: 2 };
    assert_eq!(
        m.step(E::WriteFailed { replica: 1, error: ReplicaError::StaleEpoch { current: 2 }, now: 1 }),
        vec![
            C::Fenced { current: 2 },
            C::Disconnect { replica: 0 },
            C::Disconnect { replica: 1 },
            C::Disconnect { replica: 2 },
            C::FailClient { op: 1, reason: fenced },
            C::FailClient { op: 2, reason: fenced },
        ]
    );
    assert_eq!(ack(&mut m, 0, S, S, 2), vec![]);
    assert_eq!(m.step(E::ClientWrite { op: 3, fua: false, now: 3 }), vec![C::FailClient { op: 3, reason: fenced }]);
    assert_eq!(m.step(E::ClientRead { op: 4, now: 3 }), vec![C::FailClient { op: 4, reason: fenced }]);
}

#[test]
fn reads_prefer_the_local_replica_that_has_every_acked_write() {
    let mut m = active(3, None);
    assert_eq!(m.step(E::ClientRead { op: 1, now: 0 }), vec![C::SendRead { op: 1, replica: 0 }]);
    write(&mut m, 2, S, &[0, 1, 2], 0);
    ack(&mut m, 1, S, 0, 1);
    ack(&mut m, 2, S, 0, 1);
    // The local replica has not applied the acked write yet: read elsewhere.
    assert_eq!(m.step(E::ClientRead { op: 3, now: 2 }), vec![C::SendRead { op: 3, replica: 1 }]);
    ack(&mut m, 0, S, 0, 3);
    assert_eq!(m.step(E::ClientRead { op: 4, now: 3 }), vec![C::SendRead { op: 4, replica: 0 }]);
    // A failed read marks the replica failed and retries on another.
    let err = ReplicaError::Failed("io".into());
    assert_eq!(
        m.step(E::ReadFailed { op: 4, replica: 0, error: err, now: 4 }),
        vec![
            C::Disconnect { replica: 0 },
            C::SetStatus { replica: 0, status: St::Failed },
            C::SendRead { op: 4, replica: 1 },
        ]
    );
}

#[test]
fn a_corrupt_read_keeps_the_replica_and_reads_elsewhere_until_none_is_left() {
    let mut m = active(3, None);
    assert_eq!(m.step(E::ClientRead { op: 1, now: 0 }), vec![C::SendRead { op: 1, replica: 0 }]);
    // No Disconnect, no SetStatus: the replica stays healthy; the read goes elsewhere.
    assert_eq!(m.step(E::ReadCorrupt { op: 1, exclude: vec![0], now: 1 }), vec![C::SendRead { op: 1, replica: 1 }]);
    assert_eq!(m.step(E::ReadCorrupt { op: 1, exclude: vec![0, 1], now: 2 }), vec![C::SendRead { op: 1, replica: 2 }]);
    assert_eq!(
        m.step(E::ReadCorrupt { op: 1, exclude: vec![0, 1, 2], now: 3 }),
        vec![C::FailClient { op: 1, reason: FailReason::Corrupt }]
    );
    assert!((0..3).all(|r| m.status(r) == St::Healthy));
    // Writes still go to every replica; a reserved seq is skipped by the next write.
    let reserved = m.reserve_seq();
    assert_eq!(reserved, S);
    write(&mut m, 2, S + 1, &[0, 1, 2], 4);
}

#[test]
fn single_replica_volume() {
    let mut m = active(1, None);
    write(&mut m, 1, S, &[0], 0);
    assert_eq!(ack(&mut m, 0, S, 0, 1), vec![C::AckClient { op: 1 }]);
    assert_eq!(m.step(E::ClientFlush { op: 2, now: 2 }), vec![C::SendFlush { replica: 0 }]);
    assert_eq!(m.step(E::FlushDone { replica: 0, durable_seq: S, now: 3 }), vec![C::AckClient { op: 2 }]);
    // Losing the only replica loses the in-sync set: attach again.
    assert_eq!(
        m.step(E::WriteFailed { replica: 0, error: ReplicaError::Failed("gone".into()), now: 4 }),
        vec![
            C::Disconnect { replica: 0 },
            C::SetStatus { replica: 0, status: St::Failed },
            C::SetStatus { replica: 0, status: St::Unknown },
            C::SendOpen { replica: 0, epoch: 1, mode: ClaimMode::Join },
        ]
    );
    assert_eq!(
        m.step(E::ClientWrite { op: 3, fua: false, now: 5 }),
        vec![C::FailClient { op: 3, reason: FailReason::NoQuorum }]
    );
    assert_eq!(
        m.step(E::OpenReplied { replica: 0, state: seqs(1, S, S), now: 6 }),
        vec![
            C::Attached { epoch: 1, source: 0, wait_ms: 0 },
            C::Record { replica: 0, resync_from: None },
            C::SetStatus { replica: 0, status: St::Healthy },
        ]
    );
    write(&mut m, 4, S + 1, &[0], 7);
    assert_eq!(ack(&mut m, 0, S + 1, 0, 8), vec![C::AckClient { op: 4 }]);
}

#[test]
fn five_replicas_with_quorum_three() {
    let mut m = active(5, Some(3));
    write(&mut m, 1, S, &[0, 1, 2, 3, 4], 0);
    assert_eq!(ack(&mut m, 4, S, 0, 1), vec![]);
    assert_eq!(ack(&mut m, 3, S, 0, 1), vec![]);
    assert_eq!(ack(&mut m, 0, S, 0, 1), vec![C::AckClient { op: 1 }]);
    let err = ReplicaError::Failed("down".into());
    m.step(E::WriteFailed { replica: 0, error: err.clone(), now: 2 });
    m.step(E::WriteFailed { replica: 1, error: err.clone(), now: 2 });
    write(&mut m, 2, S + 1, &[2, 3, 4], 3);
    ack(&mut m, 2, S + 1, 0, 4);
    ack(&mut m, 3, S + 1, 0, 4);
    assert_eq!(ack(&mut m, 4, S + 1, 0, 4), vec![C::AckClient { op: 2 }]);
    m.step(E::WriteFailed { replica: 2, error: err, now: 5 });
    write(&mut m, 3, S + 2, &[3, 4], 6);
    ack(&mut m, 3, S + 2, 0, 7);
    assert_eq!(ack(&mut m, 4, S + 2, 0, 7), vec![], "two of five is a minority");
}

#[test]
fn a_replica_holding_unadopted_writes_of_an_older_epoch_resyncs_two_sided() {
    // Replicas 0 and 1 attach at seq S+10 of epoch 1; replica 2 was ahead (S+20, never
    // adopted) and was down during the attach.
    let mut m = Machine::new(cfg(3, None)).unwrap();
    m.step(E::Attach { now: 0 });
    m.step(E::StateReplied { replica: 0, state: seqs(1, S + 10, S + 10), now: 0 });
    m.step(E::StateReplied { replica: 1, state: seqs(1, S + 10, S + 10), now: 0 });
    m.step(E::OpenReplied { replica: 0, state: seqs(2, S + 10, S + 10), now: 0 });
    m.step(E::OpenReplied { replica: 1, state: seqs(2, S + 10, S + 10), now: 0 });
    m.step(E::OpenFailed { replica: 2, error: ReplicaError::Failed("down".into()), now: 0 });
    let s2 = 2 << 40;
    write(&mut m, 1, s2, &[0, 1], 1);
    ack(&mut m, 0, s2, 0, 2);
    assert_eq!(ack(&mut m, 1, s2, 0, 2), vec![C::AckClient { op: 1 }]);
    m.step(E::Tick { now: 600 });
    assert_eq!(
        m.step(E::OpenReplied { replica: 2, state: seqs(2, S + 20, S + 20), now: 601 }),
        vec![
            C::Record { replica: 2, resync_from: Some(S + 10) },
            C::SetStatus { replica: 2, status: St::Resyncing },
            C::StartResync {
                replica: 2,
                source: 0,
                since: S + 10,
                upto: s2,
                two_sided: Some(s2 + 1),
                consistent: S + 10
            },
        ]
    );
    // Copied chunks carry s2 + 1 (reserved): above its stray S + 20, below the next write.
    write(&mut m, 2, s2 + 2, &[0, 1, 2], 602);
}

#[test]
fn a_resync_starts_once_its_source_applied_everything_before_it() {
    let mut m = active(3, None);
    let err = ReplicaError::Failed("down".into());
    m.step(E::WriteFailed { replica: 2, error: err, now: 0 });
    write(&mut m, 1, S, &[0, 1], 1);
    assert_eq!(
        m.step(E::Tick { now: 500 }),
        vec![
            C::SetStatus { replica: 0, status: St::Lagging },
            C::SetStatus { replica: 1, status: St::Lagging },
            C::SendOpen { replica: 2, epoch: 1, mode: ClaimMode::Join },
        ]
    );
    // Nobody applied S yet: no source can provide it.
    assert_eq!(
        m.step(E::OpenReplied { replica: 2, state: seqs(1, 0, 0), now: 501 }),
        vec![C::Record { replica: 2, resync_from: Some(0) }, C::SetStatus { replica: 2, status: St::Resyncing }]
    );
    // (Both in-sync replicas became lagging at the tick; an answer makes them healthy.)
    assert_eq!(
        ack(&mut m, 1, S, 0, 502),
        vec![
            C::SetStatus { replica: 1, status: St::Healthy },
            C::StartResync { replica: 2, source: 1, since: 0, upto: S, two_sided: None, consistent: 0 },
        ]
    );
    assert_eq!(
        ack(&mut m, 0, S, 0, 503),
        vec![C::SetStatus { replica: 0, status: St::Healthy }, C::AckClient { op: 1 }]
    );
}

#[test]
fn losing_every_in_sync_replica_attaches_again_from_the_most_advanced() {
    let mut m = active(3, None);
    write(&mut m, 1, S, &[0, 1, 2], 0);
    ack(&mut m, 0, S, 0, 1);
    assert_eq!(ack(&mut m, 1, S, 0, 1), vec![C::AckClient { op: 1 }]);
    let err = ReplicaError::Failed("down".into());
    m.step(E::WriteFailed { replica: 2, error: err.clone(), now: 2 });
    m.step(E::WriteFailed { replica: 0, error: err.clone(), now: 2 });
    assert_eq!(
        m.step(E::WriteFailed { replica: 1, error: err, now: 3 }),
        vec![
            C::Disconnect { replica: 1 },
            C::SetStatus { replica: 1, status: St::Failed },
            C::SetStatus { replica: 0, status: St::Unknown },
            C::SendOpen { replica: 0, epoch: 1, mode: ClaimMode::Join },
            C::SetStatus { replica: 1, status: St::Unknown },
            C::SendOpen { replica: 1, epoch: 1, mode: ClaimMode::Join },
            C::SetStatus { replica: 2, status: St::Unknown },
            C::SendOpen { replica: 2, epoch: 1, mode: ClaimMode::Join },
        ]
    );
    // Meanwhile requests fail with NoQuorum, and the re-attach never gives up.
    assert_eq!(
        m.step(E::ClientWrite { op: 2, fua: false, now: 4 }),
        vec![C::FailClient { op: 2, reason: FailReason::NoQuorum }]
    );
    assert_eq!(m.step(E::Tick { now: 100_000 }), vec![]);
    assert_eq!(m.step(E::OpenReplied { replica: 2, state: seqs(1, 0, 0), now: 100_001 }), vec![]);
    // Replica 1 acked everything that was acknowledged: it becomes the source.
    assert_eq!(
        m.step(E::OpenReplied { replica: 1, state: seqs(1, S, 0), now: 100_002 }),
        vec![
            C::Attached { epoch: 1, source: 1, wait_ms: 0 },
            C::Record { replica: 1, resync_from: None },
            C::SetStatus { replica: 1, status: St::Healthy },
            C::Record { replica: 2, resync_from: Some(0) },
            C::SetStatus { replica: 2, status: St::Resyncing },
            C::StartResync { replica: 2, source: 1, since: 0, upto: S, two_sided: None, consistent: 0 },
        ]
    );
    // Seqs continue above everything assigned before.
    write(&mut m, 3, S + 1, &[1, 2], 100_003);
}

// ----- single writer: compare-and-set attach, holders, read lease -----

fn owned(epoch: u64, owner: u64) -> ReplicaSeqs {
    ReplicaSeqs { owner, ..seqs(epoch, 0, 0) }
}

fn owner_cfg(owner: u64) -> MachineConfig {
    let mut c = cfg(3, None);
    c.owner = owner;
    c.lease_ms = 1_000;
    c
}

#[test]
fn attach_claims_each_replica_by_compare_and_set_on_the_epoch_it_read() {
    let mut m = Machine::new(owner_cfg(7)).unwrap();
    m.step(E::Attach { now: 0 });
    m.step(E::StateReplied { replica: 0, state: seqs(3, 0, 0), now: 1 });
    assert_eq!(
        m.step(E::StateReplied { replica: 1, state: seqs(2, 0, 0), now: 1 }),
        vec![
            C::SendOpen { replica: 0, epoch: 4, mode: ClaimMode::Cas { expect: 3 } },
            C::SendOpen { replica: 1, epoch: 4, mode: ClaimMode::Cas { expect: 2 } },
            // Not heard from: expected at the highest epoch seen.
            C::SendOpen { replica: 2, epoch: 4, mode: ClaimMode::Cas { expect: 3 } },
        ]
    );
}

#[test]
fn two_engines_racing_for_a_volume_cannot_both_attach() {
    // Each replica takes the first claim and refuses the other (Conflict): the engine that
    // lost on a majority fails at once instead of attaching.
    let mut a = Machine::new(owner_cfg(0xa)).unwrap();
    let mut b = Machine::new(owner_cfg(0xb)).unwrap();
    for m in [&mut a, &mut b] {
        m.step(E::Attach { now: 0 });
        for r in 0..3 {
            m.step(E::StateReplied { replica: r, state: seqs(1, 0, 0), now: 1 });
        }
        assert_eq!(m.phase(), Phase::Opening);
    }
    // Replica 0 took A's claim; replicas 1 and 2 took B's.
    a.step(E::OpenReplied { replica: 0, state: owned(2, 0xa), now: 2 });
    b.step(E::OpenFailed { replica: 0, error: ReplicaError::Conflict, now: 2 });
    assert_eq!(
        a.step(E::OpenFailed { replica: 1, error: ReplicaError::Conflict, now: 3 }),
        vec![C::SetStatus { replica: 1, status: St::Failed }]
    );
    assert_eq!(
        a.step(E::OpenFailed { replica: 2, error: ReplicaError::Conflict, now: 3 }),
        vec![C::SetStatus { replica: 2, status: St::Failed }, C::AttachFailed { reason: FailReason::Conflict }]
    );
    b.step(E::OpenReplied { replica: 1, state: owned(2, 0xb), now: 3 });
    let out = b.step(E::OpenReplied { replica: 2, state: owned(2, 0xb), now: 3 });
    assert!(out.contains(&C::Attached { epoch: 2, source: 1, wait_ms: 0 }), "{out:?}");
    assert_eq!(a.phase(), Phase::AttachFailed);
    assert_eq!(b.phase(), Phase::Active);
    // The winner brings the replica the loser took in by joining (it holds the majority).
    let out = b.step(E::Tick { now: 600 });
    assert_eq!(out[0], C::SendOpen { replica: 0, epoch: 2, mode: ClaimMode::Join });
}

#[test]
fn a_volume_held_by_another_engine_is_refused_unless_taken_over() {
    let mut m = Machine::new(owner_cfg(7)).unwrap();
    m.step(E::Attach { now: 0 });
    m.step(E::StateReplied { replica: 0, state: seqs(2, 0, 0), now: 1 });
    assert_eq!(
        m.step(E::StateReplied { replica: 1, state: owned(1, 9), now: 1 }),
        vec![C::AttachFailed { reason: FailReason::Owned { owner: 9 } }]
    );
    assert_eq!(m.phase(), Phase::AttachFailed);
    // A holder known to have stopped may be taken over; the attach then waits out its lease.
    let mut c = owner_cfg(7);
    c.takeover_owners = vec![9];
    let mut m = Machine::new(c).unwrap();
    m.step(E::Attach { now: 0 });
    m.step(E::StateReplied { replica: 0, state: seqs(2, 0, 0), now: 1 });
    m.step(E::StateReplied { replica: 1, state: owned(1, 9), now: 1 });
    m.step(E::OpenReplied { replica: 0, state: owned(3, 7), now: 2 });
    let out = m.step(E::OpenReplied { replica: 1, state: owned(3, 7), now: 2 });
    assert_eq!(out[0], C::Attached { epoch: 3, source: 0, wait_ms: 1_250 });
    // Its own earlier claim (same owner) is no holder: no wait.
    let mut m = Machine::new(owner_cfg(7)).unwrap();
    m.step(E::Attach { now: 0 });
    m.step(E::StateReplied { replica: 0, state: owned(2, 7), now: 1 });
    m.step(E::StateReplied { replica: 1, state: owned(2, 7), now: 1 });
    m.step(E::OpenReplied { replica: 0, state: owned(3, 7), now: 2 });
    let out = m.step(E::OpenReplied { replica: 1, state: owned(3, 7), now: 2 });
    assert_eq!(out[0], C::Attached { epoch: 3, source: 0, wait_ms: 0 });
}

#[test]
fn forced_takeover_of_an_unreachable_holder_waits_out_its_lease() {
    let mut c = owner_cfg(7);
    c.takeover = true;
    let mut m = Machine::new(c).unwrap();
    m.step(E::Attach { now: 0 });
    m.step(E::StateReplied { replica: 1, state: owned(4, 5), now: 1 });
    m.step(E::StateReplied { replica: 2, state: owned(4, 5), now: 1 });
    m.step(E::OpenReplied { replica: 1, state: owned(5, 7), now: 2 });
    let out = m.step(E::OpenReplied { replica: 2, state: owned(5, 7), now: 2 });
    assert_eq!(out[0], C::Attached { epoch: 5, source: 1, wait_ms: 1_250 });
}

/// An active machine (owner 7, lease 1 s) whose opens were all sent at 0.
fn leased() -> Machine {
    let mut m = Machine::new(owner_cfg(7)).unwrap();
    m.step(E::Attach { now: 0 });
    for r in 0..3 {
        m.step(E::StateReplied { replica: r, state: seqs(0, 0, 0), now: 0 });
    }
    for r in 0..3 {
        m.step(E::OpenReplied { replica: r, state: owned(1, 7), now: 0 });
    }
    assert_eq!(m.phase(), Phase::Active);
    m
}

#[test]
fn reads_need_a_lease_renewed_by_a_write_quorum() {
    let mut m = leased();
    // The opens (sent at 0) vote until 1000.
    assert!(m.lease_valid(999));
    assert_eq!(m.step(E::ClientRead { op: 1, now: 10 }), vec![C::SendRead { op: 1, replica: 0 }]);
    // Idle: pings go out once half the lease is spent, and their answers renew it.
    assert_eq!(
        m.step(E::Tick { now: 500 }),
        vec![C::SendPing { replica: 0 }, C::SendPing { replica: 1 }, C::SendPing { replica: 2 }]
    );
    assert_eq!(m.step(E::Tick { now: 600 }), vec![], "one ping at a time");
    m.step(E::PingReplied { replica: 0, state: owned(1, 7), now: 520 });
    m.step(E::PingReplied { replica: 1, state: owned(1, 7), now: 520 });
    assert!(m.lease_valid(1_499));
    assert!(!m.lease_valid(1_500));
    // Replica 2 never answers (a partition): one vote is not a quorum once the others expire.
    m.step(E::PingFailed { replica: 0, error: ReplicaError::Failed("timeout".into()), now: 1_100 });
    m.step(E::PingFailed { replica: 1, error: ReplicaError::Failed("timeout".into()), now: 1_100 });
    // At 1500 the lease is gone: a read waits (and asks for pings), never served stale.
    let out = m.step(E::ClientRead { op: 2, now: 1_500 });
    assert_eq!(out, vec![C::SendPing { replica: 0 }, C::SendPing { replica: 1 }]);
    assert_eq!(m.parked_reads(), 1);
    // One answer is not enough (W = 2), two are: the read goes out.
    assert_eq!(m.step(E::PingReplied { replica: 0, state: owned(1, 7), now: 1_510 }), vec![]);
    assert_eq!(
        m.step(E::PingReplied { replica: 1, state: owned(1, 7), now: 1_510 }),
        vec![C::SendRead { op: 2, replica: 0 }]
    );
    // Without answers a parked read fails at its deadline with NoLease.
    m.step(E::PingFailed { replica: 0, error: ReplicaError::Failed("timeout".into()), now: 2_600 });
    m.step(E::PingFailed { replica: 1, error: ReplicaError::Failed("timeout".into()), now: 2_600 });
    let out = m.step(E::ClientRead { op: 3, now: 2_600 });
    assert_eq!(out.len(), 2, "pings: {out:?}");
    let out = m.step(E::Tick { now: 2_600 + 5_000 });
    assert!(out.contains(&C::FailClient { op: 3, reason: FailReason::NoLease }), "{out:?}");
}

#[test]
fn write_acks_renew_the_lease_from_the_time_the_write_was_sent() {
    let mut m = leased();
    write(&mut m, 1, S, &[0, 1, 2], 900);
    ack(&mut m, 0, S, 0, 1_200);
    ack(&mut m, 1, S, 0, 1_300);
    // Sent at 900: the votes hold until 1900, however late the acks came.
    assert!(m.lease_valid(1_899));
    assert!(!m.lease_valid(1_900));
}

#[test]
fn a_ping_answered_under_a_newer_epoch_fences_the_engine() {
    let mut m = leased();
    m.step(E::Tick { now: 500 });
    let out = m.step(E::PingFailed { replica: 1, error: ReplicaError::StaleEpoch { current: 2 }, now: 510 });
    assert!(out.contains(&C::Fenced { current: 2 }), "{out:?}");
    assert_eq!(
        m.step(E::ClientRead { op: 1, now: 520 }),
        vec![C::FailClient { op: 1, reason: FailReason::Fenced { current: 2 } }]
    );
}

#[test]
fn an_epoch_that_does_not_fit_in_a_seq_is_refused() {
    let mut m = Machine::new(owner_cfg(7)).unwrap();
    m.step(E::Attach { now: 0 });
    m.step(E::StateReplied { replica: 0, state: seqs(u64::MAX, 0, 0), now: 1 });
    assert_eq!(
        m.step(E::StateReplied { replica: 1, state: seqs(1, 0, 0), now: 1 }),
        vec![C::AttachFailed { reason: FailReason::NoQuorum }]
    );
}

/// Replicas reporting the largest seqs (a hostile or corrupt peer) must not make the
/// machine overflow when it sequences the next write.
#[test]
fn hostile_seqs_do_not_overflow() {
    let mut m = Machine::new(cfg(3, None)).unwrap();
    m.step(E::Attach { now: 0 });
    m.step(E::StateReplied { replica: 0, state: seqs(1, u64::MAX, u64::MAX), now: 0 });
    let out = m.step(E::StateReplied { replica: 1, state: seqs(0, 0, 0), now: 0 });
    assert!(out.iter().any(|c| matches!(c, C::SendOpen { replica: 0, epoch: 2, .. })), "{out:?}");
    for r in 0..3 {
        m.step(E::OpenReplied { replica: r, state: seqs(2, if r == 0 { u64::MAX } else { 0 }, 0), now: 0 });
    }
    let out = m.step(E::ClientWrite { op: 1, fua: false, now: 1 });
    assert!(
        out.iter().any(|c| matches!(c, C::Sequenced { op: 1, .. }) || matches!(c, C::FailClient { op: 1, .. })),
        "{out:?}"
    );
}

// ----- epoch history: incremental resync across missed attaches -----

fn entry(epoch: u64, start: u64, base: u64) -> HistoryEntry {
    HistoryEntry { epoch, start, base }
}

fn hist(entries: &[HistoryEntry]) -> History {
    History::from_entries(entries).unwrap()
}

fn with_history(s: ReplicaSeqs, entries: &[HistoryEntry]) -> ReplicaSeqs {
    ReplicaSeqs { history: hist(entries), ..s }
}

/// Attaches a fresh machine (epoch 5) from replicas 0 and 1 reporting `source`; replica 2
/// answers after activation with `late`. Returns the commands of replica 2's admission.
fn attach_then_admit(source: ReplicaSeqs, late: ReplicaSeqs) -> (Machine, Vec<C>) {
    let mut m = Machine::new(cfg(3, None)).unwrap();
    m.step(E::Attach { now: 0 });
    m.step(E::StateReplied { replica: 0, state: source, now: 0 });
    m.step(E::StateReplied { replica: 1, state: source, now: 0 });
    m.step(E::OpenReplied { replica: 0, state: ReplicaSeqs { epoch: 5, ..source }, now: 1 });
    m.step(E::OpenReplied { replica: 1, state: ReplicaSeqs { epoch: 5, ..source }, now: 1 });
    assert_eq!(m.phase(), Phase::Active);
    let cmds = m.step(E::OpenReplied { replica: 2, state: ReplicaSeqs { epoch: 5, ..late }, now: 2 });
    (m, cmds)
}

/// Epochs 1..=4, each adopting everything before it: a1 wrote up to S+64, a2 up to
/// 2<<40 + 3, a3 up to 3<<40 + 3, a4 up to 4<<40 + 3.
fn four_epochs() -> Vec<HistoryEntry> {
    vec![entry(1, S, 0), entry(2, 2 << 40, S + 64), entry(3, 3 << 40, (2 << 40) + 3), entry(4, 4 << 40, (3 << 40) + 3)]
}

#[test]
fn activation_appends_itself_to_the_source_history_and_records_it_first() {
    let h = four_epochs();
    let src = with_history(seqs(4, (4 << 40) + 3, (4 << 40) + 3), &h);
    let (m, cmds) = attach_then_admit(src, src);
    let mut want = h.clone();
    want.push(entry(5, 5 << 40, (4 << 40) + 3));
    assert_eq!(m.history(), hist(&want));
    // Every admission records the history before anything else reaches the replica.
    assert_eq!(
        cmds,
        vec![C::Record { replica: 2, resync_from: None }, C::SetStatus { replica: 2, status: St::Healthy }]
    );
}

#[test]
fn a_replica_that_missed_three_attaches_resyncs_from_its_own_durable_point() {
    let h = four_epochs();
    let src = with_history(seqs(4, (4 << 40) + 3, (4 << 40) + 3), &h);
    // Replica 2 was last written (and synced) in epoch 1 at S + 64: a clean prefix.
    let late = with_history(seqs(1, S + 64, S + 64), &h[..1]);
    let (_, cmds) = attach_then_admit(src, late);
    assert_eq!(
        cmds,
        vec![
            C::Record { replica: 2, resync_from: Some(S + 64) },
            C::SetStatus { replica: 2, status: St::Resyncing },
            C::StartResync {
                replica: 2,
                source: 0,
                since: S + 64,
                upto: (4 << 40) + 3,
                two_sided: None,
                consistent: S + 64
            },
        ]
    );
    // Without a history (a record from before histories were kept) the same replica is
    // rebuilt from scratch, two-sided: where it forked is unknown.
    let (_, cmds) = attach_then_admit(src, seqs(1, S + 64, S + 64));
    assert_eq!(
        cmds[2],
        C::StartResync {
            replica: 2,
            source: 0,
            since: 0,
            upto: (4 << 40) + 3,
            two_sided: Some(5 << 40),
            consistent: 0
        }
    );
}

#[test]
fn a_replica_of_an_abandoned_branch_resyncs_two_sided_from_the_fork() {
    let h = four_epochs();
    let src = with_history(seqs(4, (4 << 40) + 3, (4 << 40) + 3), &h);
    // Replica 2 holds writes of an epoch-2 engine (x2) that adopted epoch 1 only up to
    // S + 40 and whose writes the volume's epoch 2 (which adopted S + 64) never saw: it
    // agrees with the volume up to S + 40 only, however high its seqs are.
    let x2 = entry(2, 2 << 40, S + 40);
    let late = with_history(seqs(2, (2 << 40) + 9, (2 << 40) + 9), &[h[0], x2]);
    let (_, cmds) = attach_then_admit(src, late);
    assert_eq!(
        cmds,
        vec![
            C::Record { replica: 2, resync_from: Some(S + 40) },
            C::SetStatus { replica: 2, status: St::Resyncing },
            C::StartResync {
                replica: 2,
                source: 0,
                since: S + 40,
                upto: (4 << 40) + 3,
                two_sided: Some(5 << 40),
                consistent: S + 40
            },
        ]
    );
    // A replica whose last write is newer than its history's last epoch was written by an
    // engine that kept no history: its history is not trusted (epochs only: full rebuild).
    let stale = with_history(seqs(3, (3 << 40) + 1, (3 << 40) + 1), &h[..1]);
    let (_, cmds) = attach_then_admit(src, stale);
    assert_eq!(cmds[0], C::Record { replica: 2, resync_from: Some(0) });
}

#[test]
fn a_re_attach_starts_a_new_activation_above_every_seq_it_issued() {
    let mut m = active(3, None);
    write(&mut m, 1, S, &[0, 1, 2], 0);
    write(&mut m, 2, S + 1, &[0, 1, 2], 0);
    ack(&mut m, 0, S, 0, 1);
    ack(&mut m, 1, S, 0, 1);
    let err = ReplicaError::Failed("down".into());
    for r in 0..3 {
        m.step(E::WriteFailed { replica: r, error: err.clone(), now: 2 });
    }
    // Re-attach from replicas 0 and 1 (both at S): S + 1 is cut off the history.
    m.step(E::OpenReplied { replica: 0, state: seqs(1, S, S), now: 3 });
    m.step(E::OpenReplied { replica: 1, state: seqs(1, S, S), now: 3 });
    assert_eq!(m.history(), hist(&[entry(1, S, 0), entry(1, S + 2, S)]));
    // Replica 2 holds the cut write S + 1 and recorded only the first activation: it
    // agrees with the volume up to S (by the history, and by this engine's memory).
    let late = with_history(seqs(1, S + 1, S + 1), &[entry(1, S, 0)]);
    let cmds = m.step(E::OpenReplied { replica: 2, state: late, now: 4 });
    assert_eq!(cmds[0], C::Record { replica: 2, resync_from: Some(S) });
}

#[test]
fn a_dead_holder_is_taken_over_without_a_lease_wait() {
    // The engine of this node's previous agent process: nobody can hold its lease.
    let mut c = owner_cfg(7);
    c.dead_owners = vec![9];
    let mut m = Machine::new(c).unwrap();
    m.step(E::Attach { now: 0 });
    m.step(E::StateReplied { replica: 0, state: owned(2, 9), now: 1 });
    m.step(E::StateReplied { replica: 1, state: owned(2, 9), now: 1 });
    m.step(E::OpenReplied { replica: 0, state: owned(3, 7), now: 2 });
    let out = m.step(E::OpenReplied { replica: 1, state: owned(3, 7), now: 2 });
    assert!(out.iter().any(|c| matches!(c, C::Attached { wait_ms: 0, .. })), "{out:?}");
}

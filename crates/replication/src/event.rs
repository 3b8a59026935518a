//! What goes into the replication machine ([`Event`]) and what comes out ([`Command`]).

use super::transport::ClaimMode;
use super::types::{FailReason, Millis, OpId, ReplicaError, ReplicaId, ReplicaSeqs, ReplicaStatus, Seq};

/// An input to [`super::Machine::step`]. Replies name the replica they came from; the
/// runtime drops replies from connections the machine already gave up on (see
/// [`Command::Disconnect`]), so a reply here is always from the current connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Start attaching: query every replica's state.
    Attach {
        now: Millis,
    },
    StateReplied {
        replica: ReplicaId,
        state: ReplicaSeqs,
        now: Millis,
    },
    OpenReplied {
        replica: ReplicaId,
        state: ReplicaSeqs,
        now: Millis,
    },
    /// A `State` or `Open` request failed.
    OpenFailed {
        replica: ReplicaId,
        error: ReplicaError,
        now: Millis,
    },
    /// A client write (or trim / write-zeroes: anything that changes data). The machine
    /// answers with [`Command::Sequenced`] (or `FailClient`).
    ClientWrite {
        op: OpId,
        fua: bool,
        now: Millis,
    },
    ClientFlush {
        op: OpId,
        now: Millis,
    },
    ClientRead {
        op: OpId,
        now: Millis,
    },
    /// The replica applied every write up to `seq` (acks arrive in seq order per replica)
    /// and reports `durable_seq`.
    WriteAcked {
        replica: ReplicaId,
        seq: Seq,
        durable_seq: Seq,
        now: Millis,
    },
    /// A write, trim or flush on this replica failed.
    WriteFailed {
        replica: ReplicaId,
        error: ReplicaError,
        now: Millis,
    },
    /// A flush on the replica completed.
    FlushDone {
        replica: ReplicaId,
        durable_seq: Seq,
        now: Millis,
    },
    /// A read failed; the machine picks another replica or fails the read.
    ReadFailed {
        op: OpId,
        replica: ReplicaId,
        error: ReplicaError,
        now: Millis,
    },
    /// A read failed its checksum on the replicas in `exclude` (every replica that did so
    /// for this read so far). They stay in service (the runtime repairs the block); the
    /// read goes to another replica holding every acknowledged write, or fails with
    /// [`FailReason::Corrupt`] when none is left.
    ReadCorrupt {
        op: OpId,
        exclude: Vec<ReplicaId>,
        now: Millis,
    },
    /// The resync into `replica` copied everything and the replica flushed it.
    ResyncDone {
        replica: ReplicaId,
        durable_seq: Seq,
        now: Millis,
    },
    ResyncFailed {
        replica: ReplicaId,
        error: ReplicaError,
        now: Millis,
    },
    /// The replica answered a ping (sent when the machine asked for it).
    PingReplied {
        replica: ReplicaId,
        state: ReplicaSeqs,
        now: Millis,
    },
    PingFailed {
        replica: ReplicaId,
        error: ReplicaError,
        now: Millis,
    },
    /// Time passed: deadlines are checked.
    Tick {
        now: Millis,
    },
}

/// An output of the machine: I/O for the runtime to do, or a client answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    SendState {
        replica: ReplicaId,
    },
    /// Claim `replica` at `epoch` for this engine (`MachineConfig::owner`) with `mode`.
    SendOpen {
        replica: ReplicaId,
        epoch: u64,
        mode: ClaimMode,
    },
    /// Attach completed under `epoch`; `source` was the most advanced replica. The volume
    /// was held by another engine: serve nothing for `wait_ms` (its read lease).
    Attached {
        epoch: u64,
        source: ReplicaId,
        wait_ms: Millis,
    },
    /// Check that `replica` still accepts this engine's epoch (renews the read lease).
    SendPing {
        replica: ReplicaId,
    },
    AttachFailed {
        reason: FailReason,
    },
    /// The client write `op` got sequence number `seq`; the runtime keeps its payload for
    /// the `SendWrite` commands that follow in the same step.
    Sequenced {
        op: OpId,
        seq: Seq,
    },
    /// Send write `seq` to `replica` on its ordered write stream.
    SendWrite {
        replica: ReplicaId,
        seq: Seq,
        fua: bool,
    },
    /// Ask `replica` to make everything it applied durable (after the writes already sent
    /// to it, in order).
    SendFlush {
        replica: ReplicaId,
    },
    /// Read for `op` from `replica`.
    SendRead {
        op: OpId,
        replica: ReplicaId,
    },
    AckClient {
        op: OpId,
    },
    FailClient {
        op: OpId,
        reason: FailReason,
    },
    /// The replica was admitted into the active volume: durably record on it the volume's
    /// epoch history ([`super::Machine::history`]) and, with `resync_from`, the resync
    /// mark (it holds the history only up to there until the resync ends). Queued on the
    /// replica's ordered link ahead of every write sent to it after this command: no
    /// write of this activation reaches a replica before both are durable there.
    Record {
        replica: ReplicaId,
        resync_from: Option<Seq>,
    },
    /// A status change (for operators, metrics and the runtime's bookkeeping).
    SetStatus {
        replica: ReplicaId,
        status: ReplicaStatus,
    },
    /// Drop the connection and every in-flight request to `replica`; later replies from it
    /// must not reach the machine.
    Disconnect {
        replica: ReplicaId,
    },
    /// Copy into `replica` every block written after `since` from `source`. Writes after
    /// `upto` are already being sent to `replica` directly. With `two_sided = Some(lift)`,
    /// the blocks the target itself changed after `since` are copied from the source too
    /// (the target may hold writes the history does not contain), and every copied chunk
    /// carries seq `lift`: above anything the target may hold, below every later write.
    /// `consistent` is how far the target holds the history meanwhile (already recorded
    /// on it by [`Command::Record`], so that a later engine does not take it for complete).
    StartResync {
        replica: ReplicaId,
        source: ReplicaId,
        since: Seq,
        upto: Seq,
        two_sided: Option<Seq>,
        consistent: Seq,
    },
    /// Stop the resync into `replica` (its source went away; a new one will be started).
    AbortResync {
        replica: ReplicaId,
    },
    /// A replica reported a newer epoch: this engine is fenced and fails everything.
    Fenced {
        current: u64,
    },
}

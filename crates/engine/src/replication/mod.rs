//! Quorum replication: a pure state machine and the runtime that drives it.
//!
//! Layout: [`types`] (ids, statuses, config), [`event`] (events in, commands out),
//! [`Machine`] (`machine.rs` write/flush/read paths and deadlines, `attach.rs` attach and
//! resync planning; no I/O, no clock), [`transport`] (`ReplicaTransport`; `grpc_replica.rs`
//! over tonic, `mem_replica.rs` in memory for tests), [`ReplicatedVolume`] (`runtime.rs`
//! the handle and `BlockDevice`; `actor.rs` the one task per volume that drives the
//! machine; `link.rs` the ordered per-replica pipeline; `resync.rs` the copy task;
//! `heal.rs` read repair and the scrub).
//!
//! # Contract (enforced by [`Machine`])
//!
//! A volume has N replicas (1..=5) and a write quorum W with `N/2 < W <= N` (default the
//! majority). Anything else is rejected: with `W <= N/2` two disjoint quorums could ack, and
//! an attach majority could miss an acknowledged write.
//!
//! - **Sequence numbers.** Every data-changing request (write, trim, write-zeroes) gets a
//!   strictly increasing seq, in this epoch's range (`seq >> 40 == epoch` for the first
//!   2^40 writes), and is sent, in seq order, on one ordered stream per replica to every
//!   replica that is healthy, lagging or resyncing.
//! - **When a write is acked.** Once W *in-sync* replicas (healthy or lagging) applied it.
//!   Acks are in seq order per replica, so a replica that acked seq S holds every write up
//!   to S; acks from resyncing replicas do not count (they hold new writes but miss old
//!   blocks, and counting them could leave an acked write only on replicas whose union,
//!   not any single one, holds the volume). A FUA write is acked once W in-sync replicas
//!   report `durable_seq >= seq`.
//! - **What a FLUSH waits for.** Its barrier is the highest seq assigned when it arrives;
//!   it is acked once W in-sync replicas report `durable_seq >= barrier`, i.e. every write
//!   sequenced before the flush (acknowledged or still pending) is on stable storage on a
//!   write quorum. A flush is sent to a replica only after the writes before it on the
//!   same stream.
//! - **No minority ack.** With fewer than W in-sync replicas nothing is acked; writes and
//!   flushes wait until their deadline (`io_timeout_ms`) and then fail with `NoQuorum`
//!   (`Unavailable`). A failed write may still have been applied on some replicas (like a
//!   failed disk write, its blocks are undefined until rewritten); replicas converge on
//!   the source's content by resync.
//! - **Stragglers.** A replica with a request older than `ack_timeout_ms` is `Lagging`: it
//!   keeps receiving writes, the quorum acks without it, and it is healthy again once it
//!   answers in time. One older than `failure_timeout_ms`, or one that errors, is
//!   `Failed`: its connection and in-flight requests are dropped, and every
//!   `retry_interval_ms` it is re-opened. A replica that comes back is resynced from its
//!   durable seq (incremental) while it receives new writes, and becomes healthy when the
//!   copy is done and flushed.
//! - **What an epoch bump fences.** Attach asks a majority for its state and opens every
//!   replica under `max(epoch) + 1`; a replica refuses every request with an older epoch.
//!   Once a majority accepted, an older engine can no longer reach a write quorum (its
//!   writes fail) and a new engine always finds the acked writes: it takes as source the
//!   replica holding the longest clean prefix of the history (see `attach.rs`). Any
//!   replica reporting a newer epoch fences this engine: every pending and later request
//!   fails with `StaleEpoch`.
//! - **Losing every in-sync replica.** The volume attaches again (same epoch) once a
//!   majority answers; requests meanwhile fail with `NoQuorum`.
//! - **Reads** go to an in-sync replica that applied every write acknowledged so far: the
//!   local one first, healthy before lagging. Resyncing and failed replicas serve none.
//!   A replica whose read fails its checksum stays in service: the read goes to another
//!   such replica (or fails with `Corruption`, EIO, if none is left) and the bad blocks
//!   are rewritten from a good copy (`heal.rs`, which also holds the scrub).
//!
//! # Resync ordering
//!
//! A resync copies blocks from an in-sync source into the target while new writes are
//! also sent to the target. An old copied block must never overwrite a newer write. Two
//! guards, either sufficient on its own: (1) the runtime remembers every block a direct
//! write touched since the resync began and drops copied chunks for those blocks; copied
//! chunks and direct writes go through the same ordered per-replica link, so a chunk is
//! either dropped or applied before the newer write; (2) chunks carry their seq and the
//! replica's `ApplyResync` never replaces a block written at a newer seq. A replica under
//! resync is marked (`BeginResync`, reported as `resync_from` until `EndResync`), so an
//! engine attaching after a crash never takes a half-resynced replica for complete.
//!
//! Completeness: direct writes to the target start at `upto + 1` (the last seq assigned
//! when it was admitted); the copy starts only once its source applied everything up to
//! `upto`, so copy plus direct writes cover the whole history. Where the target may hold
//! writes the source never had (written under an older engine and never adopted), the
//! resync is two-sided: the target's own changed blocks are re-copied from the source
//! (see `attach.rs` for how the start point is chosen).
//!
//! Resumable: blocks are copied in offset order and the target checkpoints (flush, then
//! record "below offset O, complete up to durable seq D") every few thousand blocks. A
//! later resync by the same engine from the same start point (the target restarted or its
//! link broke) copies blocks below O only if they changed after D. Checkpoints are keyed
//! by epoch: a new engine may adopt a different history, so it starts over. Copies can be
//! rate limited (`resync_rate`) so a rebuild leaves bandwidth to client I/O.
//!
//! # Snapshots
//!
//! A snapshot is a point of the write stream: the engine takes the last seq it assigned
//! and queues "snapshot at seq" on the ordered link of every in-sync replica, after every
//! write up to it and before any later one; each replica flushes and records it. It is
//! taken once a write quorum recorded it. Replicas that missed it (down, resyncing) get
//! it at the end of their next resync, which also deletes snapshots the source no longer
//! has (`resync.rs`, `carry_snapshots`): the same snapshots everywhere, eventually.
//!
//! Known limit: a write still buffered on the replica side of a connection the engine
//! already dropped could land after the replica was re-admitted. The retry interval keeps
//! that window far longer than any in-flight request; closing it fully needs the replica to
//! refuse plain writes older than a block's current seq.

pub mod event;
pub mod machine;
pub mod runtime;
pub mod transport;
pub mod types;

mod actor;
mod attach;
mod grpc_replica;
mod heal;
mod link;
mod mem_replica;
mod resync;

pub use event::{Command, Event};
pub use heal::{HealStats, ScrubReport};
pub use machine::{Machine, Phase, ReplicaView};
pub use runtime::{ReplicaHealth, ReplicatedVolume, VolumeConfig};
pub use transport::{
    ChunkData, GrpcReplica, MemReplica, MemStats, ReplicaTransport, ResyncChunk, WriteAck, WriteReq, WriteStream,
};
pub use types::{FailReason, MachineConfig, ReplicaError, ReplicaId, ReplicaSeqs, ReplicaSpec, ReplicaStatus, Seq};

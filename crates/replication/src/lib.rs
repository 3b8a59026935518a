//! Quorum replication: a pure state machine and the runtime that drives it.
//!
//! Layout: [`types`] (ids, statuses, config), [`event`] (events in, commands out),
//! [`Machine`] (`machine.rs` write/flush/read paths and deadlines, `attach.rs` attach and
//! resync planning; no I/O, no clock), [`transport`] (`ReplicaTransport`; `grpc_replica.rs`
//! over tonic, `mem_replica.rs` in memory for tests), [`ReplicatedVolume`] (`runtime.rs`
//! the handle and `BlockDevice`; `actor.rs` the one task per volume that drives the
//! machine; `link.rs` the ordered per-replica pipeline; `resync.rs` the copy task;
//! `heal.rs` read repair and the scrub), [`rpc`] (the `hlstore.replica.v1` server over a
//! store, its conversions and the one `Status` ↔ error mapping; `grpc_replica.rs` is the
//! client).
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
//!   `retry_interval_ms` it is re-opened. A replica whose link holds more than
//!   `MAX_QUEUED_BYTES` of unacked writes is failed the same way (queues are bounded in
//!   bytes, not only by their deadlines), after the step that found it: a write stream
//!   never skips a write, since acks are cumulative. Before that: while a link holds more
//!   than half the bound, the engine takes no new client requests (for at most
//!   `ack_timeout_ms` at a stretch per replica), so a replica that is only slower than the
//!   others sets the writers' pace instead of being dropped and resynced over and over. A replica that comes back is resynced from its
//!   durable seq (incremental) while it receives new writes, and becomes healthy when the
//!   copy is done and flushed.
//! - **One writer: attach is a compare-and-set.** Replicas record, with their epoch, the
//!   engine instance holding them (`owner`, 0 = none). Attach asks a majority for its state;
//!   if any names another holder the attach is refused, unless the caller knows that holder
//!   stopped (`takeover_owners`) or forces a takeover (`takeover`: its node is gone). It
//!   then claims every replica at `max(epoch) + 1` by compare-and-set on the epoch it read
//!   from that replica (`ClaimMode::Cas`): of two engines racing, each replica takes the
//!   first claim and refuses the other (`Conflict`), so at most one reaches a majority, and
//!   the loser fails at once. Once active, stragglers are brought in with `Join` (only an
//!   engine holding a majority at the epoch sends it); a detaching engine `Release`s.
//! - **What an epoch bump fences.** A replica refuses every request with an older epoch.
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
//! - **Scrub.** At `scrub_rate` bytes per second the runtime compares the volume, range
//!   after range, across the in-sync replicas: a block failing its checksum on some of
//!   them is rewritten from the copy the others agree on (never over a newer write),
//!   copies that read fine but differ are reported as divergent, a block bad everywhere
//!   as unrecoverable. Each pass compares every block not written during its own check
//!   (a written block was replaced on every replica; the next pass compares it). **It
//!   never stalls foreground writes:** a scrub read waits only for the in-flight writes
//!   to its own range and runs beside the replica's write pipeline, never draining it
//!   nor holding back a write queued after it (`link.rs`, `LinkOp::RangeRead`).
//! - **Read lease (no stale reads).** A replica's answer to any request under this engine's
//!   epoch (write ack, flush, open, `Ping`) sent at time `t` is a vote until `t + lease_ms`;
//!   reads are served only while W replicas' votes hold, else they wait (pings renew the
//!   lease; an idle engine pings when half of it is spent) and fail with `NoLease` at the
//!   I/O deadline. A newer engine claims a majority, which shares a replica with every
//!   write quorum; that replica answered the old engine's last vote before it took the new
//!   claim, so the old lease ends at most `lease_ms` after the new engine's claim reached a
//!   majority. An engine that found another holder therefore serves nothing for
//!   `lease_wait_ms` (1.25 × `lease_ms`, margin for clock rates) after activating: from then
//!   on the old engine can neither write (fenced) nor read (no lease). Holders that
//!   released their claim cost no wait.
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
//! The mark is ordered with the writes: the machine emits [`Command::Record`] when it
//! admits a replica, before any write is sent to it, and the runtime queues it as the
//! first op of the replica's ordered link; the link sends nothing after it until the
//! replica answered, i.e. made the mark durable. So a replica never holds a write of this
//! engine without its mark: losing power in between leaves it with its old data and old
//! `last_seq` (never a high `last_seq` without the mark, which a later engine could take
//! for complete, even as its attach source, while it misses older blocks).
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
//! # Epoch history
//!
//! Every activation of an engine (an attach, or a re-attach after it lost every in-sync
//! replica) adopts a history up to its attach base and appends writes of its own. The
//! machine names it `(epoch, start, base)`: `start = max(max_seq + 1, epoch << 40)`, the
//! first seq it may issue (every write seq and the lift seq of two-sided resyncs it issues
//! is `>= start > base`). The volume's history `C` is the list of these activations: the
//! attach source's recorded list plus the new entry at the first attach, the engine's own
//! list plus the new entry at a re-attach ([`hlstore_store::History`], at most
//! `HISTORY_LEN` entries, oldest dropped).
//!
//! Invariant R: *a replica holds only writes of activations in its recorded history `R`,
//! and holds `H(R)` (the writes of `R`'s history, applied in seq order) up to its raw
//! point `p` (`last_seq`, lowered to `resync_from`).* It holds because `Record` makes `C`
//! (and for a resyncing replica the mark, in the same durable update) durable before any
//! write of the activation reaches the replica: an in-sync admission holds `H(C)` up to
//! its `last_seq` (it was found a clean prefix); a resyncing one holds `H(C)` up to its
//! mark `cp` (computed against `C` below); `EndResync` clears the mark only once the copy
//! completed the prefix.
//!
//! Fork point. `H(a_1..a_n)` is `H(a_1..a_{n-1})` cut at `a_n.base`, plus writes at seqs
//! `>= a_n.start > a_n.base`. By induction, for `x <= min(a_j.base, j > k)`, `H(a_1..a_n)`
//! and `H(a_1..a_k)` agree on every seq `<= x`. An activation adopts exactly one history,
//! so two lists holding the same entry agree on everything before it; with `a_k` the last
//! entry `C` and `R` share, `H(C)` and `H(R)` agree up to `f =` the lowest base either
//! list recorded after `a_k` (`History::fork_point`). So a replica holds `H(C)` up to
//! `cp = min(p, f)`, however many activations it missed, and the attach plan is the usual
//! one: resync from `min(durable_seq, cp)`, two-sided if `last_seq > cp` (its writes beyond
//! `cp` may be outside `H(C)`).
//!
//! The invariants of the contract are kept: every acknowledged write is in the history
//! (the source is still the replica with the highest `cp`; `cp` is computed from the
//! history only for replicas the engine never had in sync, after the first activation); a
//! replica's `cp` never exceeds the clean prefix it holds (above). Without a shared entry
//! (a record from before histories were kept, or more than `HISTORY_LEN` activations
//! missed) the old rule applies: related through the epochs in its seqs, else 0 (full
//! two-sided rebuild). A replica whose `last_seq` is from a newer epoch than its history's
//! last entry was written by an engine that keeps no history; its history is not used.
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
mod local_replica;
#[cfg(any(test, feature = "testing"))]
mod mem_replica;
mod resync;
pub mod rpc;
mod serve;

pub use event::{Command, Event};
pub use heal::{HealStats, ScrubReport};
pub use machine::{Machine, Phase, ReplicaView};
pub use runtime::{ReplicaHealth, ReplicatedVolume, VolumeConfig};
pub use transport::{
    AnyReplica, ChunkData, GrpcReplica, LocalReplica, ReplicaTransport, ResyncChunk, WriteAck, WriteReq, WriteStream,
};
#[cfg(any(test, feature = "testing"))]
pub use transport::{MemReplica, MemStats};
pub use types::{
    FailReason, History, MachineConfig, ReplicaError, ReplicaId, ReplicaSeqs, ReplicaSpec, ReplicaStatus, Seq,
};

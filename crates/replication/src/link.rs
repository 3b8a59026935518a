//! The ordered pipeline to one replica: one task per connection that owns the replica's
//! write stream and serialises everything that changes the replica's data.
//!
//! Invariant: operations are applied on the replica in the order the actor queued them.
//! Foreground writes are pipelined on the ordered write stream; unary calls (trim, flush,
//! history and resync mark, resync chunks, end of resync) wait until every earlier stream
//! request was acked, and later ones are sent only once they returned, so they can neither
//! overtake nor be overtaken by a write. Consecutive resync chunks go out as
//! one `apply_resync` batch, and up to [`RESYNC_PIPELINE`] batches are in flight at once
//! (a rebuild is not one round trip per batch): batches carry distinct blocks (the store
//! never lets an older chunk replace a newer block, so their order among themselves does
//! not matter), and every other operation, a write included, waits until the batches in
//! flight were applied. A request unanswered for `timeout` fails the link; the actor
//! then reports the replica as failed.
//!
//! One exception, for the scrub: a [`LinkOp::RangeRead`] is ordered only against the
//! writes to its own range. It waits for the acks of the in-flight writes that overlap it
//! (never for the others), then runs beside the pipeline: the link keeps sending and
//! acking writes while it is answered. So a scrub check never stalls foreground writes;
//! writes queued after it may or may not be seen by it (the actor knows which blocks they
//! touched and leaves those out of the verdict, see `heal.rs`).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit};
use tokio::time::Instant;

use super::transport::{ReplicaTransport, ResyncChunk, SnapshotInfo, WriteAck, WriteReq, WriteStream};
use super::types::{History, ReplicaId, Seq};
use hlstore_core::error::{Error, ErrorKind, Result};
use hlstore_core::{Epoch, Offset};

/// A resync permit, shared by the pieces of one chunk: the resync task may have a bounded
/// number of chunks in flight.
pub(super) type Permit = Arc<OwnedSemaphorePermit>;

/// What the actor asks a link to do.
pub(super) enum LinkOp {
    Write {
        seq: Seq,
        offset: u64,
        data: Bytes,
        fua: bool,
    },
    Trim {
        seq: Seq,
        offset: u64,
        len: u64,
    },
    Resync {
        chunks: Vec<ResyncChunk>,
        permit: Permit,
    },
    Flush,
    /// Record the volume's history and, with `resync_from`, the resync mark (durably,
    /// before anything queued after it).
    Record {
        history: Box<History>,
        resync_from: Option<Seq>,
    },
    EndResync,
    /// Flush the target and record resync progress below `offset`.
    CheckpointResync {
        offset: u64,
    },
    /// Record a snapshot after every write queued before it.
    Snapshot {
        snap: SnapshotInfo,
        reply: oneshot::Sender<Result<SnapshotInfo>>,
    },
    DeleteSnapshot {
        name: String,
        reply: oneshot::Sender<Result<bool>>,
    },
    Expand {
        size: u64,
        reply: oneshot::Sender<Result<()>>,
    },
    /// Read after every write queued before it (a check of replicas against each other,
    /// see `heal.rs`). Its error goes to the caller; it does not fail the link.
    Read {
        offset: u64,
        len: u64,
        reply: oneshot::Sender<Result<Vec<u8>>>,
    },
    /// Read after every write queued before it *to an overlapping range*, without holding
    /// back anything else: it waits for the acks of the overlapping writes in flight, then
    /// runs beside the pipeline (module docs). Its error goes to the caller.
    RangeRead {
        offset: u64,
        len: u64,
        reply: oneshot::Sender<Result<Vec<u8>>>,
    },
    /// Rewrite blocks that failed their checksum with the good content, after every write
    /// queued before it (`apply_resync`; see `heal.rs` for the seq they carry). Answers
    /// how many blocks were applied; its error does not fail the link.
    Repair {
        chunks: Vec<ResyncChunk>,
        reply: oneshot::Sender<Result<u64>>,
    },
}

/// What a link reports to the actor.
#[derive(Debug)]
pub(super) enum LinkEvent {
    Acked { seq: Seq, durable_seq: Seq },
    Flushed { durable_seq: Seq },
    ResyncEnded { durable_seq: Seq },
    Failed(Error),
}

/// Reports go to the actor tagged with the replica and the link generation.
pub(super) type Reports = mpsc::UnboundedSender<(ReplicaId, u64, LinkEvent)>;

/// Stream requests awaiting their ack, at most. Kept below the transports' stream queue
/// depth so that sending never blocks while acks wait to be read.
pub(super) const MAX_IN_FLIGHT: usize = 128;

/// Bytes of writes queued on one link and not yet acked, at most. A replica that falls
/// this far behind is left behind: its link fails (the machine marks it failed and
/// resyncs it when it is back) instead of the queue growing without bound.
pub(super) const MAX_QUEUED_BYTES: u64 = 64 << 20;

/// Bytes of writes queued on a link and not yet acked (shared by the actor, which adds,
/// and the link, which subtracts on ack).
pub(super) type QueuedBytes = Arc<std::sync::atomic::AtomicU64>;

/// Resync chunks sent in one `apply_resync` call, at most.
const RESYNC_BATCH: usize = 256;

/// `apply_resync` calls in flight on one link, at most.
pub(super) const RESYNC_PIPELINE: usize = 4;

/// An `apply_resync` call in flight, holding its chunks' window permits until it returns.
type Apply = futures::future::BoxFuture<'static, Result<()>>;

struct InFlight {
    seq: Seq,
    sent: Instant,
    /// Write payload bytes (counted in `queued` until acked).
    bytes: u64,
    /// The volume byte range it writes.
    offset: u64,
}

impl InFlight {
    fn overlaps(&self, offset: u64, len: u64) -> bool {
        self.offset < offset + len && offset < self.offset + self.bytes
    }
}

/// A range read waiting for the ack of the last overlapping write queued before it.
struct Parked {
    until: Seq,
    offset: u64,
    len: u64,
    reply: oneshot::Sender<Result<Vec<u8>>>,
}

struct Link<T> {
    replica: Arc<T>,
    epoch: u64,
    id: ReplicaId,
    gen: u64,
    reports: Reports,
    timeout: Duration,
    inflight: VecDeque<InFlight>,
    /// An op taken from the queue while batching, to run next.
    next: Option<LinkOp>,
    queued: QueuedBytes,
    /// Range reads waiting for overlapping writes to be acked.
    parked: Vec<Parked>,
    /// Range reads running beside the pipeline (aborted with the link).
    reads: tokio::task::JoinSet<()>,
    /// Resync batches in flight, in the order sent.
    applies: futures::stream::FuturesOrdered<Apply>,
}

/// Runs a link until the actor drops its queue or the replica fails.
#[allow(clippy::too_many_arguments)]
pub(super) async fn run<T: ReplicaTransport>(
    replica: Arc<T>,
    epoch: u64,
    id: ReplicaId,
    gen: u64,
    ops: mpsc::UnboundedReceiver<LinkOp>,
    reports: Reports,
    timeout: Duration,
    queued: QueuedBytes,
) {
    let mut link = Link {
        replica,
        epoch,
        id,
        gen,
        reports,
        timeout,
        inflight: VecDeque::new(),
        next: None,
        queued,
        parked: Vec::new(),
        reads: tokio::task::JoinSet::new(),
        applies: futures::stream::FuturesOrdered::new(),
    };
    if let Err(e) = link.serve(ops).await {
        link.report(LinkEvent::Failed(e));
    }
}

impl<T: ReplicaTransport> Link<T> {
    fn report(&self, ev: LinkEvent) {
        // The actor is gone when this fails: nothing left to tell.
        let _ = self.reports.send((self.id, self.gen, ev));
    }

    async fn serve(&mut self, mut ops: mpsc::UnboundedReceiver<LinkOp>) -> Result<()> {
        let WriteStream { requests, mut acks } =
            with_timeout(self.timeout, "open write stream", self.replica.write_stream(Epoch(self.epoch))).await?;
        loop {
            if let Some(op) = self.next.take() {
                self.execute(op, &mut ops, &requests, &mut acks).await?;
                continue;
            }
            let deadline = self.inflight.front().map(|f| f.sent + self.timeout);
            tokio::select! {
                ack = acks.next(), if !self.inflight.is_empty() => self.on_ack(ack)?,
                Some(_) = self.reads.join_next(), if !self.reads.is_empty() => {}
                Some(applied) = self.applies.next(), if !self.applies.is_empty() => applied?,
                _ = tokio::time::sleep_until(deadline.unwrap_or_else(Instant::now)), if deadline.is_some() => {
                    return Err(Error::Unavailable(format!("replica {}: write not acked within {:?}", self.replica.name(), self.timeout)));
                }
                op = ops.recv(), if self.inflight.len() < MAX_IN_FLIGHT => {
                    let Some(op) = op else { return Ok(()) };
                    self.execute(op, &mut ops, &requests, &mut acks).await?;
                }
            }
        }
    }

    fn on_ack(&mut self, ack: Option<Result<WriteAck>>) -> Result<()> {
        let ack =
            ack.ok_or_else(|| Error::Unavailable(format!("replica {}: write stream closed", self.replica.name())))??;
        match self.inflight.pop_front() {
            Some(InFlight { seq, bytes, .. }) => {
                self.queued.fetch_sub(bytes, std::sync::atomic::Ordering::AcqRel);
                self.report(LinkEvent::Acked { seq, durable_seq: ack.durable_seq });
                self.unpark();
                Ok(())
            }
            None => Err(Error::Internal(format!("replica {}: ack without a request", self.replica.name()))),
        }
    }

    /// Waits until every resync batch in flight was applied.
    async fn drain_applies(&mut self) -> Result<()> {
        while let Some(applied) = self.applies.next().await {
            applied?;
        }
        Ok(())
    }

    /// Waits until every stream request was acked and every resync batch applied (before
    /// a unary call).
    async fn drain(&mut self, acks: &mut futures::stream::BoxStream<'static, Result<WriteAck>>) -> Result<()> {
        self.drain_applies().await?;
        self.drain_acks(acks).await
    }

    /// Waits until every stream request was acked.
    async fn drain_acks(&mut self, acks: &mut futures::stream::BoxStream<'static, Result<WriteAck>>) -> Result<()> {
        while let Some(first) = self.inflight.front() {
            let left = (first.sent + self.timeout).saturating_duration_since(Instant::now());
            let ack = tokio::time::timeout(left, acks.next()).await.map_err(|_| {
                Error::Unavailable(format!(
                    "replica {}: write not acked within {:?}",
                    self.replica.name(),
                    self.timeout
                ))
            })?;
            self.on_ack(ack)?;
        }
        Ok(())
    }

    /// Starts the parked range reads whose overlapping writes are all acked.
    fn unpark(&mut self) {
        if self.parked.is_empty() {
            return;
        }
        let oldest = self.inflight.front().map(|f| f.seq);
        let (ready, wait): (Vec<_>, Vec<_>) =
            std::mem::take(&mut self.parked).into_iter().partition(|p| oldest.is_none_or(|s| s > p.until));
        self.parked = wait;
        for p in ready {
            self.start_read(p.offset, p.len, p.reply);
        }
    }

    /// Runs a range read beside the pipeline.
    fn start_read(&mut self, offset: u64, len: u64, reply: oneshot::Sender<Result<Vec<u8>>>) {
        let (r, epoch, t) = (self.replica.clone(), self.epoch, self.timeout);
        self.reads.spawn(async move {
            let _ = reply.send(with_timeout(t, "range read", r.read(Epoch(epoch), Offset(offset), len)).await);
        });
    }

    async fn send(&mut self, requests: &mpsc::Sender<WriteReq>, req: WriteReq, entry: InFlight) -> Result<()> {
        self.drain_applies().await?;
        requests
            .send(req)
            .await
            .map_err(|_| Error::Unavailable(format!("replica {}: write stream closed", self.replica.name())))?;
        self.inflight.push_back(entry);
        Ok(())
    }

    async fn execute(
        &mut self,
        op: LinkOp,
        ops: &mut mpsc::UnboundedReceiver<LinkOp>,
        requests: &mpsc::Sender<WriteReq>,
        acks: &mut futures::stream::BoxStream<'static, Result<WriteAck>>,
    ) -> Result<()> {
        let now = Instant::now();
        let (r, epoch, t) = (self.replica.clone(), self.epoch, self.timeout);
        match op {
            LinkOp::Write { seq, offset, data, fua } => {
                let bytes = data.len() as u64;
                let req = WriteReq { seq, offset, data, fua };
                self.send(requests, req, InFlight { seq, sent: now, bytes, offset }).await
            }
            LinkOp::Trim { seq, offset, len } => {
                self.drain(acks).await?;
                with_timeout(t, "trim", r.trim(Epoch(epoch), seq, Offset(offset), len)).await?;
                self.report(LinkEvent::Acked { seq, durable_seq: 0 });
                Ok(())
            }
            LinkOp::Resync { mut chunks, permit } => {
                let mut permits = vec![permit];
                while chunks.len() < RESYNC_BATCH {
                    match ops.try_recv() {
                        Ok(LinkOp::Resync { chunks: more, permit }) if chunks.len() + more.len() <= RESYNC_BATCH => {
                            chunks.extend(more);
                            permits.push(permit);
                        }
                        Ok(other) => {
                            self.next = Some(other);
                            break;
                        }
                        Err(_) => break,
                    }
                }
                // Stream writes before the batch must be acked; batches before it may still
                // be in flight (distinct blocks, see the module docs).
                self.drain_acks(acks).await?;
                while self.applies.len() >= RESYNC_PIPELINE {
                    if let Some(applied) = self.applies.next().await {
                        applied?;
                    }
                }
                self.applies.push_back(Box::pin(async move {
                    with_timeout(t, "apply resync", r.apply_resync(Epoch(epoch), chunks)).await?;
                    drop(permits);
                    Ok(())
                }));
                Ok(())
            }
            LinkOp::Flush => {
                self.drain(acks).await?;
                let durable_seq = with_timeout(t, "flush", r.flush(Epoch(epoch))).await?;
                self.report(LinkEvent::Flushed { durable_seq });
                Ok(())
            }
            LinkOp::Snapshot { snap, reply } => {
                // Its answer goes to the caller; it does not fail the link (a replica
                // that cannot take it is reconciled by resync).
                self.drain(acks).await?;
                let _ = reply.send(with_timeout(t, "create snapshot", r.create_snapshot(Epoch(epoch), snap)).await);
                Ok(())
            }
            LinkOp::Expand { size, reply } => {
                self.drain(acks).await?;
                let _ = reply.send(with_timeout(t, "expand", r.expand(Epoch(epoch), size)).await);
                Ok(())
            }
            LinkOp::DeleteSnapshot { name, reply } => {
                self.drain(acks).await?;
                let _ = reply.send(with_timeout(t, "delete snapshot", r.delete_snapshot(Epoch(epoch), &name)).await);
                Ok(())
            }
            LinkOp::Read { offset, len, reply } => {
                self.drain(acks).await?;
                let _ = reply.send(with_timeout(t, "read", r.read(Epoch(epoch), Offset(offset), len)).await);
                Ok(())
            }
            LinkOp::RangeRead { offset, len, reply } => {
                // Writes are in flight in seq order: the last overlapping one is the one
                // to wait for. Nothing else is drained but resync batches (rarely any).
                self.drain_applies().await?;
                match self.inflight.iter().rev().find(|f| f.overlaps(offset, len)) {
                    Some(f) => self.parked.push(Parked { until: f.seq, offset, len, reply }),
                    None => self.start_read(offset, len, reply),
                }
                Ok(())
            }
            LinkOp::Repair { chunks, reply } => {
                self.drain(acks).await?;
                let _ = reply.send(with_timeout(t, "repair", r.apply_resync(Epoch(epoch), chunks)).await);
                Ok(())
            }
            LinkOp::CheckpointResync { offset } => {
                self.drain(acks).await?;
                with_timeout(t, "checkpoint resync", r.checkpoint_resync(Epoch(epoch), Offset(offset))).await?;
                Ok(())
            }
            LinkOp::Record { history, resync_from: Some(from) } => {
                self.drain(acks).await?;
                with_timeout(t, "begin resync", r.begin_resync(Epoch(epoch), from, true, *history)).await?;
                Ok(())
            }
            LinkOp::Record { history, resync_from: None } => {
                self.drain(acks).await?;
                match with_timeout(t, "record history", r.set_history(Epoch(epoch), *history)).await {
                    // A replica that keeps no history is related to others by epochs.
                    Err(e) if e.kind() == ErrorKind::Unsupported => Ok(()),
                    res => res,
                }
            }
            LinkOp::EndResync => {
                self.drain(acks).await?;
                let durable_seq = with_timeout(t, "end resync", r.end_resync(Epoch(epoch))).await?;
                self.report(LinkEvent::ResyncEnded { durable_seq });
                Ok(())
            }
        }
    }
}

/// Runs `fut`, failing with `Unavailable` after `timeout`.
pub(super) async fn with_timeout<R>(
    timeout: Duration,
    what: &str,
    fut: impl std::future::Future<Output = Result<R>>,
) -> Result<R> {
    tokio::time::timeout(timeout, fut)
        .await
        .map_err(|_| Error::Unavailable(format!("{what}: no answer within {timeout:?}")))?
}

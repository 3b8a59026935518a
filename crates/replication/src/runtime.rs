//! [`ReplicatedVolume`]: a replicated volume served by one actor task (`actor.rs`) that
//! drives the [`super::Machine`] and does its I/O through a [`ReplicaTransport`] per
//! replica.
//!
//! Boundary: frontends see only [`BlockDevice`]. Requests reach the actor through a bounded
//! channel (backpressure) and are validated (alignment, range) before they are queued.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};

use super::actor::{Actor, Payload, ReadGate, Request, Shared};
use super::heal::{HealStats, ScrubReport};
use super::machine::Machine;
use super::transport::{ReplicaTransport, SnapshotInfo};
use super::types::ReplicaStatus;
pub use super::types::{ReplicaHealth, VolumeConfig};
use futures::future::BoxFuture;
use hlstore_core::device::BlockDevice;
use hlstore_core::error::{Error, Result};
use hlstore_core::{Epoch, Offset};

/// A replicated volume. Dropping it (or [`ReplicatedVolume::close`]) stops its actor;
/// pending requests then fail with `Unavailable`.
pub struct ReplicatedVolume {
    name: String,
    /// Grows online (`expand`).
    size: AtomicU64,
    block_size: u32,
    tx: mpsc::Sender<Request>,
    shared: Arc<Mutex<Shared>>,
    task: tokio::task::JoinHandle<()>,
    /// Reads straight from the local replica while the actor's gate allows them.
    local_read: Option<LocalRead>,
}

type ReadFn = dyn Fn(u64, u64, u64) -> BoxFuture<'static, Result<Vec<u8>>> + Send + Sync;

/// The read path that bypasses the actor: the gate it publishes and the local replica.
struct LocalRead {
    gate: Arc<ReadGate>,
    read: Arc<ReadFn>,
}

impl ReplicatedVolume {
    /// Attaches the volume: bumps the epoch on a majority of `replicas` (in replica-set
    /// order, matching `cfg.machine.replicas`) and starts serving. Fails with `StaleEpoch`
    /// if another engine owns it, `Unavailable` if no majority answered in time.
    pub async fn attach<T: ReplicaTransport>(cfg: VolumeConfig, replicas: Vec<T>) -> Result<Self> {
        if replicas.len() != cfg.machine.replicas.len() {
            return Err(Error::InvalidArgument(format!(
                "volume {}: {} transports for {} replicas",
                cfg.name,
                replicas.len(),
                cfg.machine.replicas.len()
            )));
        }
        if cfg.block_size == 0 || !cfg.size.is_multiple_of(u64::from(cfg.block_size)) {
            return Err(Error::InvalidArgument(format!(
                "volume {}: size {} is not a multiple of the block size",
                cfg.name, cfg.size
            )));
        }
        let machine = Machine::new(cfg.machine.clone())?;
        let shared = Arc::new(Mutex::new(Shared {
            epoch: 0,
            replicas: cfg
                .machine
                .replicas
                .iter()
                .map(|s| ReplicaHealth {
                    name: s.name.clone(),
                    status: ReplicaStatus::Unknown,
                    acked_seq: 0,
                    durable_seq: 0,
                    resync_chunks: 0,
                    resync_resumed_from: 0,
                })
                .collect(),
            heal: Arc::default(),
        }));
        let (tx, rx) = mpsc::channel(cfg.queue_depth.max(1));
        let (attached_tx, attached_rx) = oneshot::channel();
        let replicas: Vec<Arc<T>> = replicas.into_iter().map(Arc::new).collect();
        let gate = Arc::new(ReadGate::new());
        let local_read = cfg.machine.replicas.iter().position(|r| r.local).map(|i| {
            let t = replicas[i].clone();
            let read: Arc<ReadFn> = Arc::new(move |epoch, offset, len| {
                let t = t.clone();
                Box::pin(async move { t.read(Epoch(epoch), Offset(offset), len).await })
            });
            LocalRead { gate: gate.clone(), read }
        });
        let actor = Actor::new(cfg.clone(), machine, replicas, shared.clone(), attached_tx, gate);
        let task = tokio::spawn(actor.run(rx));
        let res = attached_rx
            .await
            .unwrap_or_else(|_| Err(Error::Internal(format!("volume {}: actor ended during attach", cfg.name))));
        let vol =
            Self { name: cfg.name, size: cfg.size.into(), block_size: cfg.block_size, tx, shared, task, local_read };
        res.map(|_| vol)
    }

    /// The epoch this engine attached under.
    pub fn epoch(&self) -> u64 {
        self.lock().epoch
    }

    /// Runs one scrub pass now, unthrottled (see `heal.rs`), and reports what it found
    /// once every repair it queued was applied.
    pub async fn scrub_now(&self) -> Result<ScrubReport> {
        self.call(|reply| Request::ScrubNow { reply }).await
    }

    /// Read repair and scrub counters (for metrics).
    pub fn heal_stats(&self) -> Arc<HealStats> {
        self.lock().heal.clone()
    }

    /// Replica states (for the CLI and metrics).
    pub fn replicas(&self) -> Vec<ReplicaHealth> {
        self.lock().replicas.clone()
    }

    /// Takes a crash-consistent snapshot (see `replication` module docs, "Snapshots"): its
    /// seq is the last write assigned before it. Idempotent by name on each replica.
    pub async fn snapshot(&self, snap: SnapshotInfo) -> Result<SnapshotInfo> {
        self.call(|reply| Request::Snapshot { snap, reply }).await
    }

    /// Deletes a snapshot on the in-sync replicas; `true` if any had it.
    pub async fn delete_snapshot(&self, name: &str) -> Result<bool> {
        let name = name.to_string();
        self.call(|reply| Request::DeleteSnapshot { name, reply }).await
    }

    /// Grows the volume online: every replica first, then the engine's size (new NBD
    /// connections see it). The same size is OK; shrinking is refused.
    pub async fn expand(&self, new_size: u64) -> Result<()> {
        let size = self.size.load(Ordering::Acquire);
        let bs = u64::from(self.block_size);
        if new_size < size || !new_size.is_multiple_of(bs) {
            return Err(Error::InvalidArgument(format!(
                "volume {}: new size {new_size} must be a multiple of {bs} and at least the current size {size}",
                self.name
            )));
        }
        if new_size == size {
            return Ok(());
        }
        self.call(|reply| Request::Expand { size: new_size, reply }).await?;
        self.size.fetch_max(new_size, Ordering::AcqRel);
        Ok(())
    }

    /// Stops the actor and waits for it.
    pub async fn close(self) {
        let Self { tx, task, .. } = self;
        drop(tx);
        let _ = task.await;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn check(&self, offset: u64, len: u64) -> Result<()> {
        let bs = u64::from(self.block_size);
        if !offset.is_multiple_of(bs) || !len.is_multiple_of(bs) {
            return Err(Error::InvalidArgument(format!(
                "volume {}: unaligned request offset={offset} length={len}",
                self.name
            )));
        }
        let size = self.size.load(Ordering::Acquire);
        if offset.checked_add(len).is_none_or(|end| end > size) {
            return Err(Error::OutOfRange { volume: self.name.clone(), offset, length: len, size });
        }
        Ok(())
    }

    async fn call<R>(&self, make: impl FnOnce(oneshot::Sender<Result<R>>) -> Request) -> Result<R> {
        let (reply, rx) = oneshot::channel();
        let closed = || Error::Unavailable(format!("volume {}: closed", self.name));
        self.tx.send(make(reply)).await.map_err(|_| closed())?;
        rx.await.map_err(|_| closed())?
    }
}

/// Zeroes written by one request of a WRITE_ZEROES that keeps its range allocated.
static ZERO_PIECE: [u8; 1 << 20] = [0; 1 << 20];

impl BlockDevice for ReplicatedVolume {
    fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }
    fn block_size(&self) -> u32 {
        self.block_size
    }
    fn name(&self) -> &str {
        &self.name
    }

    async fn read(&self, offset: u64, len: u64) -> Result<Vec<u8>> {
        self.check(offset, len)?;
        if len == 0 {
            return Ok(Vec::new());
        }
        if let Some(lr) = &self.local_read {
            if let Some(epoch) = lr.gate.open() {
                // Any failure (a checksum, a newer epoch, an I/O error) takes the actor's
                // path, which repairs, fences or fails over.
                if let Ok(data) = (lr.read)(epoch, offset, len).await {
                    if data.len() as u64 == len {
                        return Ok(data);
                    }
                }
            }
        }
        self.call(|reply| Request::Read { offset, len, reply }).await
    }

    async fn write(&self, offset: u64, data: Vec<u8>, fua: bool) -> Result<()> {
        self.check(offset, data.len() as u64)?;
        if data.is_empty() {
            return Ok(());
        }
        let payload = Payload::Data { offset, data: data.into() };
        self.call(|reply| Request::Change { payload, fua, reply }).await
    }

    async fn flush(&self) -> Result<()> {
        self.call(|reply| Request::Flush { reply }).await
    }

    async fn trim(&self, offset: u64, len: u64) -> Result<()> {
        self.check(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        self.call(|reply| Request::Change { payload: Payload::Trim { offset, len }, fua: false, reply }).await
    }

    async fn write_zeroes(&self, offset: u64, len: u64, may_trim: bool) -> Result<()> {
        if may_trim {
            return self.trim(offset, len).await;
        }
        self.check(offset, len)?;
        // Kept allocated (NO_HOLE): written as zero blocks, one bounded piece at a time, all
        // pieces sharing one static buffer, so memory does not grow with the length.
        let mut at = offset;
        let end = offset + len;
        while at < end {
            let n = (end - at).min(ZERO_PIECE.len() as u64);
            let data = Bytes::from_static(&ZERO_PIECE[..n as usize]);
            let payload = Payload::Data { offset: at, data };
            self.call(|reply| Request::Change { payload, fua: false, reply }).await?;
            at += n;
        }
        Ok(())
    }
}

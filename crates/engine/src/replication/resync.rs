//! The resync copy task: streams the blocks changed since `since` from the source and hands
//! them to the actor, which queues them on the target's ordered link (dropping blocks that
//! a newer direct write already covers — see [`crate::replication`], "Resync ordering").
//!
//! Two-sided resyncs also list the blocks the target itself changed since `since` and copy
//! those from the source (read), because the target may hold writes the source never had.
//! Every chunk of a two-sided resync carries `lift_seq`, a seq the machine reserved for it:
//! above every seq assigned or seen, below every later write, so the replica's "never
//! replace a newer block" guard lets them replace the target's stray blocks but never a
//! newer write.
//!
//! Backpressure: at most `window` chunks are between this task and the target's ack.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::{mpsc, Semaphore};

use super::link::{with_timeout, Permit};
use super::transport::{ChunkData, ReplicaTransport, ResyncChunk};
use super::types::{ReplicaId, Seq};
use crate::error::{Error, Result};

/// What the resync task sends to the actor.
pub(super) enum ResyncMsg {
    Chunk(ResyncChunk, Permit),
    /// Everything was queued; the actor ends the resync on the target's link.
    Copied,
    /// The resync failed; `source_failed` tells whether the source (not the target) erred.
    Failed {
        error: Error,
        source_failed: bool,
    },
}

pub(super) type ResyncReports = mpsc::UnboundedSender<(ReplicaId, u64, ResyncMsg)>;

/// One resync job.
pub(super) struct ResyncJob<T> {
    pub source: Arc<T>,
    pub target: Arc<T>,
    pub epoch: u64,
    pub since: Seq,
    /// Recorded on the target: it holds the history up to here until the resync ends.
    pub consistent: Seq,
    /// Seq for chunks of a two-sided resync (see the module docs); `None` keeps each
    /// chunk's own seq.
    pub lift_seq: Option<Seq>,
    pub two_sided: bool,
    pub block_size: u64,
    pub window: usize,
    pub timeout: Duration,
    pub replica: ReplicaId,
    pub gen: u64,
    pub reports: ResyncReports,
}

impl<T: ReplicaTransport> ResyncJob<T> {
    pub async fn run(self) {
        let res = self.copy().await;
        let msg = match res {
            Ok(()) => ResyncMsg::Copied,
            Err((error, source_failed)) => ResyncMsg::Failed { error, source_failed },
        };
        let _ = self.reports.send((self.replica, self.gen, msg));
    }

    /// Copies everything; errors say whether the source failed (`true`) or the target.
    async fn copy(&self) -> std::result::Result<(), (Error, bool)> {
        let (on_source, on_target) = (|e| (e, true), |e| (e, false));
        let window = Arc::new(Semaphore::new(self.window.max(1)));
        with_timeout(self.timeout, "begin resync", self.target.begin_resync(self.epoch, self.consistent))
            .await
            .map_err(on_target)?;
        let mut target_only = BTreeSet::new();
        if self.two_sided {
            let mut own = with_timeout(self.timeout, "resync list", self.target.resync_stream(self.epoch, self.since))
                .await
                .map_err(on_target)?;
            while let Some(c) = own.next().await {
                let c = c.map_err(on_target)?;
                let len = match c.data {
                    ChunkData::Trim(len) => len,
                    _ => self.block_size,
                };
                let first = c.offset / self.block_size;
                target_only.extend(first..first + len.div_ceil(self.block_size));
            }
        }
        let mut chunks = with_timeout(self.timeout, "resync", self.source.resync_stream(self.epoch, self.since))
            .await
            .map_err(on_source)?;
        while let Some(c) = chunks.next().await {
            let mut c = c.map_err(on_source)?;
            let len = match c.data {
                ChunkData::Trim(len) => len,
                ChunkData::Data(ref d) => d.len() as u64,
                ChunkData::Zero => self.block_size,
            };
            let first = c.offset / self.block_size;
            for b in first..first + len.div_ceil(self.block_size) {
                target_only.remove(&b);
            }
            if let Some(seq) = self.lift_seq {
                c.seq = seq;
            }
            self.hand_over(c, &window).await.map_err(on_target)?;
        }
        let seq = self.lift_seq.unwrap_or(self.since);
        for b in target_only {
            let offset = b * self.block_size;
            let data = with_timeout(self.timeout, "resync read", self.source.read(self.epoch, offset, self.block_size))
                .await
                .map_err(on_source)?;
            let data = if data.iter().all(|&x| x == 0) { ChunkData::Zero } else { ChunkData::Data(data.into()) };
            self.hand_over(ResyncChunk { offset, seq, data }, &window).await.map_err(on_target)?;
        }
        Ok(())
    }

    async fn hand_over(&self, chunk: ResyncChunk, window: &Arc<Semaphore>) -> Result<()> {
        let permit =
            window.clone().acquire_owned().await.map_err(|_| Error::Internal("resync window closed".into()))?;
        self.reports
            .send((self.replica, self.gen, ResyncMsg::Chunk(chunk, Arc::new(permit))))
            .map_err(|_| Error::Unavailable("volume closed during resync".into()))
    }
}

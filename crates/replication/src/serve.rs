//! Serving a store: what the replica service (`rpc/service.rs`, over gRPC) and the
//! in-process replica (`local_replica.rs`, the engine's own node) share, so both apply a
//! write stream and produce a resync stream the same way.
//!
//! - **Group commit** ([`apply_write_stream`]): every write already received joins the
//!   group being applied (same volume and epoch; at most [`MAX_GROUP_WRITES`] writes and
//!   about [`MAX_GROUP_BYTES`]), and the group is one store call (`write_many`): one
//!   blocking-pool hop (none for a small group without FUA, [`INLINE_GROUP_BYTES`]: a
//!   page-cache write and an unsynced metadata batch run on the stream's task), one
//!   metadata batch, at most one flush (if any write in it is FUA).
//!   Acks stay one per write, in order. After a failed group the stream ends: later writes
//!   must not be applied past a gap.
//! - **Resync source** ([`resync_source`]): trims first, then blocks in offset order, read
//!   as runs of consecutive blocks (one store read per run); a run that fails is re-read
//!   block by block so the stream ends exactly at the first block that fails its checksum.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use futures::{FutureExt, Stream, StreamExt};
use tokio::sync::mpsc;

use crate::rpc::ServiceStats;
use hlstore_core::error::{Error, Result};
use hlstore_core::{Epoch, Offset, Seq};
use hlstore_store::{BlockWrite, Change, ChunkData, ReplicaStore, ResyncChunk, BLOCK_SIZE};

/// Most writes one group commit applies.
pub const MAX_GROUP_WRITES: usize = 64;
/// A group stops growing once it holds this many payload bytes.
pub const MAX_GROUP_BYTES: usize = 8 << 20;
/// A group of at most this many payload bytes and no FUA write is applied on the stream's
/// own task instead of the blocking pool.
pub const INLINE_GROUP_BYTES: usize = 64 << 10;
/// Most blocks one blocking call of a resync source reads.
pub const RESYNC_RUN_BLOCKS: u64 = 256;

/// One write received on a write stream.
#[derive(Debug)]
pub struct StreamWrite {
    pub volume: String,
    pub epoch: u64,
    pub seq: u64,
    pub offset: u64,
    pub data: Bytes,
    pub fua: bool,
}

/// Runs a blocking store call on the blocking pool.
pub async fn blocking<S: ReplicaStore, T: Send + 'static>(
    store: &Arc<S>,
    f: impl FnOnce(&S) -> Result<T> + Send + 'static,
) -> Result<T> {
    let store = store.clone();
    tokio::task::spawn_blocking(move || f(&store))
        .await
        .map_err(|e| Error::Internal(format!("store task failed: {e}")))?
}

/// Applies the writes of one stream in order with group commit (see the module docs),
/// sending `(seq, durable_seq)` per write, or one error after which the stream ends.
/// `incoming` yields `None` for a broken stream.
pub async fn apply_write_stream<S: ReplicaStore>(
    store: Arc<S>,
    mut incoming: impl Stream<Item = Option<StreamWrite>> + Unpin + Send,
    acks: mpsc::Sender<Result<(u64, u64)>>,
    stats: Arc<ServiceStats>,
) {
    let mut next: Option<StreamWrite> = None;
    loop {
        let first = match next.take() {
            Some(w) => w,
            None => match incoming.next().await {
                Some(Some(w)) => w,
                _ => return,
            },
        };
        let mut bytes = first.data.len();
        let mut group = vec![first];
        let mut ended = false;
        while group.len() < MAX_GROUP_WRITES && bytes < MAX_GROUP_BYTES {
            match incoming.next().now_or_never() {
                Some(Some(Some(w))) if w.volume == group[0].volume && w.epoch == group[0].epoch => {
                    bytes += w.data.len();
                    group.push(w);
                }
                Some(Some(Some(w))) => {
                    next = Some(w);
                    break;
                }
                Some(_) => {
                    ended = true;
                    break;
                }
                None => break,
            }
        }
        let seqs: Vec<u64> = group.iter().map(|w| w.seq).collect();
        // A small group without FUA is a page-cache write and a RocksDB batch without sync
        // (tens of µs): applied on this task, without the two thread hand-offs of the
        // blocking pool (on small VMs each costs as much as the write itself).
        let inline = bytes <= INLINE_GROUP_BYTES && !group.iter().any(|w| w.fua);
        let applied = if inline {
            apply_group(store.as_ref(), &group)
        } else {
            blocking(&store, move |s| apply_group(s, &group)).await
        };
        match applied {
            Ok(durable) => {
                stats.writes.fetch_add(seqs.len() as u64, Ordering::Relaxed);
                stats.write_bytes.fetch_add(bytes as u64, Ordering::Relaxed);
                for seq in seqs {
                    if acks.send(Ok((seq, durable.get()))).await.is_err() {
                        return;
                    }
                }
            }
            Err(e) => {
                count_error(&stats, &e);
                let _ = acks.send(Err(e)).await;
                return;
            }
        }
        if ended {
            return;
        }
    }
}

/// Applies one group (same volume and epoch) with one store call.
fn apply_group<S: ReplicaStore>(store: &S, group: &[StreamWrite]) -> Result<Seq> {
    let first = &group[0];
    let writes: Vec<BlockWrite<'_>> =
        group.iter().map(|w| BlockWrite { seq: Seq(w.seq), offset: Offset(w.offset), data: &w.data }).collect();
    let fua = group.iter().any(|w| w.fua);
    store.write_many(&first.volume, Epoch(first.epoch), &writes, fua)
}

/// Counts the errors the service reports as metrics.
pub fn count_error(stats: &ServiceStats, e: &Error) {
    match e.kind() {
        hlstore_core::ErrorKind::StaleEpoch => stats.stale_epoch_rejections.fetch_add(1, Ordering::Relaxed),
        hlstore_core::ErrorKind::Corruption => stats.corruptions.fetch_add(1, Ordering::Relaxed),
        _ => 0,
    };
}

/// The changes a resync stream sends (see `ReplicaTransport::resync_stream`).
pub async fn resync_changes<S: ReplicaStore>(
    store: &Arc<S>,
    volume: &str,
    epoch: u64,
    since: u64,
    resume: Option<(u64, u64)>,
) -> Result<Vec<Change>> {
    let v = volume.to_string();
    blocking(store, move |s| match resume {
        None => s.changes_since(&v, Epoch(epoch), Seq(since)),
        Some(split) => s.changes_since_split(&v, Epoch(epoch), Seq(since), split),
    })
    .await
}

/// Streams `changes` as resync chunks (see the module docs); the channel ends after the
/// last chunk or after the first error.
pub fn resync_source<S: ReplicaStore>(
    store: Arc<S>,
    volume: String,
    epoch: u64,
    changes: Vec<Change>,
    stats: Arc<ServiceStats>,
) -> mpsc::Receiver<Result<ResyncChunk>> {
    let (tx, rx) = mpsc::channel(2 * RESYNC_RUN_BLOCKS as usize);
    tokio::spawn(async move {
        let mut blocks = Vec::new();
        for c in changes {
            match c {
                Change::Trim { offset, len, seq } => {
                    let chunk = ResyncChunk { offset, seq, data: ChunkData::Trim(len) };
                    if tx.send(Ok(chunk)).await.is_err() {
                        return;
                    }
                }
                Change::Block { offset, seq } => blocks.push((offset, seq)),
            }
        }
        // One blocking call per RESYNC_RUN_BLOCKS blocks, each run of consecutive blocks
        // in it read with one store read.
        for batch in blocks.chunks(RESYNC_RUN_BLOCKS as usize) {
            let batch = batch.to_vec();
            let v = volume.clone();
            let (chunks, failed) = blocking(&store, move |s| Ok(read_runs(s, &v, epoch, &batch)))
                .await
                .unwrap_or_else(|e| (Vec::new(), Some(e)));
            stats.resync_blocks_sent.fetch_add(chunks.len() as u64, Ordering::Relaxed);
            for c in chunks {
                if tx.send(Ok(c)).await.is_err() {
                    return;
                }
            }
            if let Some(e) = failed {
                count_error(&stats, &e);
                let _ = tx.send(Err(e)).await;
                return;
            }
        }
    });
    rx
}

/// Reads `blocks` (ascending) run by run; stops at the first block that fails, returning
/// the chunks before it with its error.
fn read_runs<S: ReplicaStore>(
    s: &S,
    volume: &str,
    epoch: u64,
    blocks: &[(u64, u64)],
) -> (Vec<ResyncChunk>, Option<Error>) {
    let mut out = Vec::with_capacity(blocks.len());
    let mut rest = blocks;
    while !rest.is_empty() {
        let mut n = 1;
        while n < rest.len() && rest[n].0 == rest[0].0 + n as u64 * BLOCK_SIZE {
            n += 1;
        }
        let (chunks, failed) = read_run(s, volume, epoch, &rest[..n]);
        out.extend(chunks);
        if failed.is_some() {
            return (out, failed);
        }
        rest = &rest[n..];
    }
    (out, None)
}

/// Reads a run of consecutive blocks with one read; if that fails, block by block, so the
/// chunks before the first failing block are returned with its error.
fn read_run<S: ReplicaStore>(s: &S, volume: &str, epoch: u64, run: &[(u64, u64)]) -> (Vec<ResyncChunk>, Option<Error>) {
    let bs = BLOCK_SIZE as usize;
    if let Ok(data) = s.read(volume, Epoch(epoch), Offset(run[0].0), run.len() as u64 * BLOCK_SIZE) {
        let data = bytes::Bytes::from(data);
        let chunks = run
            .iter()
            .enumerate()
            .map(|(i, &(offset, seq))| ResyncChunk {
                offset,
                seq,
                data: ChunkData::Data(data.slice(i * bs..(i + 1) * bs)),
            })
            .collect();
        return (chunks, None);
    }
    let mut chunks = Vec::with_capacity(run.len());
    for &(offset, seq) in run {
        match s.read(volume, Epoch(epoch), Offset(offset), BLOCK_SIZE) {
            Ok(data) => chunks.push(ResyncChunk { offset, seq, data: ChunkData::Data(data.into()) }),
            Err(e) => return (chunks, Some(e)),
        }
    }
    (chunks, None)
}

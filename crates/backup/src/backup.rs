//! The backup pipeline: read → chunk → hash → compress → encrypt → pack → upload.
//!
//! Threads: one reader, N workers (zero check, keyed hash, dedup, zstd, seal), the calling
//! thread as packer, M uploaders. Every hand-off is a bounded channel, so memory stays
//! near `(2N + 2) × batch + (M + 2) × pack size` whatever the source size (a content-defined
//! batch keeps its whole read of [`CDC_READ_BYTES`] alive).
//! Order of writes: pack, then index (every [`INDEX_BATCH`] packs), then the snapshot. A
//! run killed at any point leaves packs the next run finds (their trailers) and reuses.

use std::collections::{BTreeMap, HashSet};
use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Mutex};

use crate::chunk::{cdc, is_zero, ChunkId, ChunkerConfig};
use crate::error::{Error, Result};
use crate::index::{IndexedPack, MasterIndex};
use crate::pack::{encode_blob_with, pack_key, FinishedPack, PackWriter};
use crate::progress::Progress;
use crate::repo::{Lease, Repository};
use crate::snapshot::{hostname, now_precise, BackupStats, ChunkRef, Snapshot, SnapshotMeta};
use crate::source::Source;

/// Bytes the reader hands to a worker at a time.
pub const BATCH_BYTES: usize = 4 * 1024 * 1024;
/// Bytes a content-defined reader reads at once (cut into batches sharing the buffer).
pub const CDC_READ_BYTES: usize = 16 * 1024 * 1024;
/// Packs per index file written during a backup.
pub const INDEX_BATCH: usize = 16;
/// Most reader threads a source may ask for ([`Source::parallel_reads`]).
pub const MAX_READERS: usize = 16;
/// Granularity of incremental reads (the block size of volumes).
pub const CHANGE_ALIGN: u64 = 4096;

/// Options of one backup run.
#[derive(Clone)]
pub struct BackupOptions {
    pub labels: BTreeMap<String, String>,
    /// Parent snapshot; by default the newest snapshot of the same source.
    pub parent: Option<String>,
    pub progress: Progress,
    /// Hash/compress/encrypt threads (0: one per CPU).
    pub workers: usize,
    /// Parallel pack uploads.
    pub uploaders: usize,
}

impl Default for BackupOptions {
    fn default() -> Self {
        BackupOptions { labels: BTreeMap::new(), parent: None, progress: Progress::hidden(), workers: 0, uploaders: 3 }
    }
}

struct Batch {
    base: u64,
    /// Shared with the other batches cut from the same read (no copy per batch).
    data: bytes::Bytes,
    /// End offsets (in `data`) of each chunk.
    ends: Vec<usize>,
}

struct NewBlob {
    id: ChunkId,
    blob: Vec<u8>,
    raw_len: u32,
    flags: u8,
}

#[derive(Default)]
struct Processed {
    refs: Vec<ChunkRef>,
    zeros: u64,
    read: u64,
    new: Vec<NewBlob>,
}

/// Shared state of one run.
struct Run<'a> {
    repo: &'a Repository,
    index: MasterIndex,
    inflight: Mutex<HashSet<ChunkId>>,
    abort: AtomicBool,
    pending_index: Mutex<Vec<IndexedPack>>,
    progress: Progress,
}

/// Backs up `source`; returns the stored snapshot.
pub fn backup(repo: &Repository, source: &dyn Source, opts: BackupOptions) -> Result<Snapshot> {
    // The lease goes first: prune must see it before we look at what exists.
    let started = std::time::Instant::now();
    let lease = Lease::acquire(repo.backend().clone(), "backup")?;
    let load = repo.load_index()?;
    if !load.unindexed.is_empty() {
        // Packs from an interrupted run: index them so later runs need not read trailers.
        repo.write_index(&load.unindexed)?;
    }
    let condemned = repo.condemned_packs()?;
    let index = if condemned.is_empty() { load.index } else { load.index.without_packs(&condemned) };
    let chunker = repo.config().chunker_for(source.changed_block_tracking());
    let size = source.size();
    let name = source.name();
    let parent = match &opts.parent {
        Some(p) => Some(repo.load_snapshot(&repo.resolve_snapshot(p)?)?),
        None => match repo.list_snapshots()?.into_iter().rev().find(|m| m.source == name) {
            Some(m) => Some(repo.load_snapshot(&m.id)?),
            None => None,
        },
    };
    // With a changed-range hint and a compatible parent, read only what changed: whole
    // chunks in version 1 repositories, 4 KiB blocks otherwise (the unchanged rest of a
    // chunk is kept as a partial reference to the parent's chunk).
    let (read_ranges, incremental): (Vec<Range<u64>>, bool) = match (&parent, source.changed_ranges(), chunker) {
        (Some(p), Some(changed), ChunkerConfig::Fixed { size: cs })
            if p.meta.chunker == chunker && p.meta.size == size =>
        {
            let align = if repo.partial_refs() { CHANGE_ALIGN.min(cs as u64) } else { cs as u64 };
            (align_ranges(&changed, align, size), true)
        }
        // A full read skips the source's holes (they are zeros: no chunk refers to them).
        _ => match source.data_ranges() {
            Some(data) => match chunker {
                ChunkerConfig::Fixed { size: cs } => (align_ranges(&data, cs as u64, size), false),
                ChunkerConfig::Cdc { .. } => (align_ranges(&data, 1, size), false),
            },
            None => (std::iter::once(0..size).collect(), false),
        },
    };
    if !incremental {
        // Holes count as done from the start (progress is in bytes of the source).
        opts.progress.inc(size - read_ranges.iter().map(|r| r.end - r.start).sum::<u64>());
    }

    tracing::debug!(elapsed = ?started.elapsed(), chunks = index.len(), "index loaded");
    let workers =
        if opts.workers == 0 { std::thread::available_parallelism().map_or(2, |n| n.get()) } else { opts.workers };
    let run = Run {
        repo,
        index,
        inflight: Mutex::new(HashSet::new()),
        abort: AtomicBool::new(false),
        pending_index: Mutex::new(Vec::new()),
        progress: opts.progress.clone(),
    };
    let mut stats = BackupStats::default();
    let mut refs: Vec<ChunkRef> = Vec::new();

    std::thread::scope(|s| -> Result<()> {
        let (batch_tx, batch_rx) = sync_channel::<Batch>(workers * 2);
        let (proc_tx, proc_rx) = sync_channel::<Processed>(workers * 2);
        let (pack_tx, pack_rx) = sync_channel::<FinishedPack>(1);
        let batch_rx = Arc::new(Mutex::new(batch_rx));
        let pack_rx = Arc::new(Mutex::new(pack_rx));
        let run = &run;
        let ranges = &read_ranges;

        let reader = s.spawn(move || read_source(run, source, chunker, ranges, batch_tx));
        let mut hs = Vec::new();
        for _ in 0..workers {
            let rx = batch_rx.clone();
            let tx = proc_tx.clone();
            hs.push(s.spawn(move || work(run, rx, tx)));
        }
        drop(proc_tx);
        // Only the threads hold the receivers: when they all stop, senders see it.
        drop(batch_rx);
        let mut ups = Vec::new();
        for _ in 0..opts.uploaders.max(1) {
            let rx = pack_rx.clone();
            ups.push(s.spawn(move || upload(run, rx)));
        }
        drop(pack_rx);
        let packed = pack_loop(run, proc_rx, pack_tx, &mut refs, &mut stats);
        if packed.is_err() {
            run.abort.store(true, Ordering::Relaxed);
        }
        let mut first: Option<Error> = packed.err();
        let mut note = |r: std::thread::Result<Result<()>>| {
            let r = r.unwrap_or_else(|_| Err(Error::Invalid("backup thread panicked".into())));
            if let Err(e) = r {
                run.abort.store(true, Ordering::Relaxed);
                if first.is_none() {
                    first = Some(e);
                }
            }
        };
        note(reader.join());
        for h in hs {
            note(h.join());
        }
        for h in ups {
            note(h.join());
        }
        match first {
            Some(e) => Err(e),
            None => Ok(()),
        }
    })?;

    tracing::debug!(elapsed = ?started.elapsed(), "source read and packed");
    let rest = std::mem::take(&mut *run.pending_index.lock().unwrap_or_else(|p| p.into_inner()));
    if !rest.is_empty() {
        repo.write_index(&rest)?;
    }
    stats.bytes_read = read_ranges.iter().map(|r| r.end - r.start).sum();
    if let Some(p) = &parent {
        if incremental {
            // Take what was not read (unchanged since the parent) over from the parent.
            for c in unread_parts(&p.chunks, &read_ranges) {
                stats.bytes_skipped += c.len as u64;
                refs.push(c);
            }
        }
    }
    refs.sort_by_key(|c| c.offset);
    stats.chunks = refs.len() as u64;
    let (time, nanos) = now_precise();
    let meta = SnapshotMeta {
        id: Snapshot::new_id(),
        time,
        nanos,
        source: name,
        size,
        host: hostname(),
        labels: opts.labels,
        parent: parent.map(|p| p.meta.id),
        chunker,
        stats,
    };
    let snap = Snapshot { meta, chunks: refs };
    // Only a backup whose lease stayed alive may claim the chunks it reused.
    lease.check()?;
    repo.save_snapshot(&snap)?;
    drop(lease);
    opts.progress.finish();
    Ok(snap)
}

/// Widens ranges to whole chunks, sorts and merges them, clips to `size`.
fn align_ranges(changed: &[Range<u64>], cs: u64, size: u64) -> Vec<Range<u64>> {
    let mut v: Vec<Range<u64>> = changed
        .iter()
        .filter(|r| r.start < r.end)
        .map(|r| (r.start / cs * cs)..(r.end.div_ceil(cs) * cs).min(size))
        .collect();
    v.sort_by_key(|r| r.start);
    let mut out: Vec<Range<u64>> = Vec::new();
    for r in v {
        match out.last_mut() {
            Some(l) if r.start <= l.end => l.end = l.end.max(r.end),
            _ => out.push(r),
        }
    }
    out
}

/// The parts of `chunks` (sorted by offset, not overlapping) outside `read` (sorted,
/// merged): whole chunks where nothing was read, trimmed references (`skip`, `len`)
/// where part of a chunk was.
fn unread_parts(chunks: &[ChunkRef], read: &[Range<u64>]) -> Vec<ChunkRef> {
    let mut out = Vec::new();
    let mut i = 0;
    for c in chunks {
        while i < read.len() && read[i].end <= c.offset {
            i += 1;
        }
        let mut pos = c.offset;
        let end = c.end();
        let mut j = i;
        while pos < end {
            match read.get(j) {
                Some(r) if r.start < end => {
                    if r.start > pos {
                        out.push(ChunkRef {
                            offset: pos,
                            len: (r.start - pos) as u32,
                            id: c.id,
                            skip: c.skip + (pos - c.offset) as u32,
                        });
                    }
                    pos = pos.max(r.end);
                    j += 1;
                }
                _ => {
                    out.push(ChunkRef {
                        offset: pos,
                        len: (end - pos) as u32,
                        id: c.id,
                        skip: c.skip + (pos - c.offset) as u32,
                    });
                    pos = end;
                }
            }
        }
    }
    out
}

fn read_source(
    run: &Run<'_>,
    source: &dyn Source,
    chunker: ChunkerConfig,
    ranges: &[Range<u64>],
    tx: SyncSender<Batch>,
) -> Result<()> {
    match chunker {
        ChunkerConfig::Fixed { size: cs } => {
            let cs = cs as usize;
            let step = (BATCH_BYTES / cs).max(1) * cs;
            // Batches are independent (chunk boundaries are fixed; refs are sorted at the
            // end), so sources that gain from it are read by several threads at once.
            // Batches end on the chunk grid; a range that starts or ends off the grid (an
            // incremental read of changed blocks) gives shorter chunks at its edges.
            let mut jobs: Vec<(u64, usize)> = Vec::new();
            for r in ranges {
                let mut off = r.start;
                while off < r.end {
                    let to_grid = step - (off % cs as u64) as usize;
                    let n = to_grid.min((r.end - off) as usize);
                    jobs.push((off, n));
                    off += n as u64;
                }
            }
            let next = std::sync::atomic::AtomicUsize::new(0);
            let read_jobs = |tx: SyncSender<Batch>| -> Result<()> {
                loop {
                    if run.abort.load(Ordering::Relaxed) {
                        return Ok(());
                    }
                    let Some(&(off, n)) = jobs.get(next.fetch_add(1, Ordering::Relaxed)) else {
                        return Ok(());
                    };
                    let mut data = vec![0u8; n];
                    source.read_at(off, &mut data)?;
                    // Chunk ends: the grid lines inside the batch, then its end.
                    let first = cs - (off % cs as u64) as usize;
                    let ends = (0..).map(|k| first + k * cs).take_while(|&e| e < n).chain(std::iter::once(n)).collect();
                    if tx.send(Batch { base: off, data: data.into(), ends }).is_err() {
                        return Ok(());
                    }
                }
            };
            let readers = source.parallel_reads().clamp(1, MAX_READERS).min(jobs.len().max(1));
            if readers == 1 {
                return read_jobs(tx);
            }
            std::thread::scope(|s| {
                let hs: Vec<_> = (0..readers)
                    .map(|_| {
                        let tx = tx.clone();
                        s.spawn(|| read_jobs(tx))
                    })
                    .collect();
                drop(tx);
                let mut first = Ok(());
                for h in hs {
                    let r = h.join().unwrap_or_else(|_| Err(Error::Invalid("backup reader panicked".into())));
                    if r.is_err() && first.is_ok() {
                        run.abort.store(true, Ordering::Relaxed);
                        first = r;
                    }
                }
                first
            })
        }
        ChunkerConfig::Cdc { min, avg, max } => {
            // Each range is cut on its own (a skipped hole ends a chunk).
            for r in ranges {
                if !read_cdc(run, source, (min as usize, avg as usize, max as usize), r.clone(), &tx)? {
                    return Ok(());
                }
            }
            Ok(())
        }
    }
}

/// Cuts `range` of `source` into content-defined chunks and sends them as batches; false
/// when the workers stopped listening. Sequential: each cut point depends on the previous
/// one. One large read is cut into batches that share its buffer; only the tail after the
/// last cut (less than `max`) is copied into the next read's buffer.
fn read_cdc(
    run: &Run<'_>,
    source: &dyn Source,
    (min, avg, max): (usize, usize, usize),
    range: Range<u64>,
    tx: &SyncSender<Batch>,
) -> Result<bool> {
    let size = range.end;
    let mut carry: Vec<u8> = Vec::new();
    let mut base = range.start; // source offset of carry[0]
    let mut read_to = range.start;
    loop {
        if run.abort.load(Ordering::Relaxed) {
            return Ok(false);
        }
        let n = (CDC_READ_BYTES as u64).min(size - read_to) as usize;
        let mut buf = Vec::with_capacity(carry.len() + n);
        buf.extend_from_slice(&carry);
        buf.resize(carry.len() + n, 0);
        source.read_at(read_to, &mut buf[carry.len()..])?;
        read_to += n as u64;
        let eof = read_to >= size;
        if buf.is_empty() {
            return Ok(true);
        }
        let buf = bytes::Bytes::from(buf);
        let mut pos = 0;
        let mut start = 0;
        let mut ends = Vec::new();
        while pos < buf.len() && (eof || buf.len() - pos >= max) {
            pos += cdc::cut(&buf[pos..], min, avg, max);
            ends.push(pos - start);
            if pos - start >= BATCH_BYTES {
                let data = buf.slice(start..pos);
                if tx.send(Batch { base: base + start as u64, data, ends: std::mem::take(&mut ends) }).is_err() {
                    return Ok(false);
                }
                start = pos;
            }
        }
        if !ends.is_empty() {
            let data = buf.slice(start..pos);
            if tx.send(Batch { base: base + start as u64, data, ends }).is_err() {
                return Ok(false);
            }
        }
        carry = buf[pos..].to_vec();
        base += pos as u64;
        if eof && carry.is_empty() {
            return Ok(true);
        }
    }
}

fn work(run: &Run<'_>, rx: Arc<Mutex<Receiver<Batch>>>, tx: SyncSender<Processed>) -> Result<()> {
    let key = run.repo.key();
    let level = run.repo.config().zstd_level;
    let mut compressor =
        zstd::bulk::Compressor::new(level).map_err(|e| Error::Invalid(format!("zstd level {level}: {e}")))?;
    loop {
        let batch = {
            let guard = rx.lock().unwrap_or_else(|p| p.into_inner());
            guard.recv()
        };
        let Ok(batch) = batch else { return Ok(()) };
        if run.abort.load(Ordering::Relaxed) {
            return Ok(());
        }
        let mut out = Processed { read: batch.data.len() as u64, ..Default::default() };
        let mut start = 0;
        for &end in &batch.ends {
            let data = &batch.data[start..end];
            let offset = batch.base + start as u64;
            start = end;
            if is_zero(data) {
                out.zeros += 1;
                continue;
            }
            let id = key.chunk_id(data);
            out.refs.push(ChunkRef::whole(offset, data.len() as u32, id));
            if run.index.contains(&id) {
                continue;
            }
            let fresh = run.inflight.lock().unwrap_or_else(|p| p.into_inner()).insert(id);
            if fresh {
                let (blob, flags) = encode_blob_with(&mut compressor, key, &id, data);
                out.new.push(NewBlob { id, blob, raw_len: data.len() as u32, flags });
            }
        }
        if tx.send(out).is_err() {
            return Ok(());
        }
    }
}

fn pack_loop(
    run: &Run<'_>,
    rx: Receiver<Processed>,
    tx: SyncSender<FinishedPack>,
    refs: &mut Vec<ChunkRef>,
    stats: &mut BackupStats,
) -> Result<()> {
    let pack_size = run.repo.config().pack_size as usize;
    let key = run.repo.key();
    let mut w = PackWriter::new();
    for p in rx {
        run.progress.inc(p.read);
        stats.zero_chunks += p.zeros;
        refs.extend_from_slice(&p.refs);
        for b in p.new {
            stats.new_chunks += 1;
            stats.new_bytes += b.raw_len as u64;
            stats.stored_bytes += b.blob.len() as u64;
            w.add(b.id, &b.blob, b.raw_len, b.flags);
            if w.len() >= pack_size {
                let full = std::mem::take(&mut w).finish(key);
                stats.packs += 1;
                if tx.send(full).is_err() {
                    return Err(Error::Invalid("pack upload stopped".into()));
                }
            }
        }
    }
    if !w.is_empty() {
        stats.packs += 1;
        if tx.send(w.finish(key)).is_err() {
            return Err(Error::Invalid("pack upload stopped".into()));
        }
    }
    Ok(())
}

fn upload(run: &Run<'_>, rx: Arc<Mutex<Receiver<FinishedPack>>>) -> Result<()> {
    loop {
        let p = {
            let guard = rx.lock().unwrap_or_else(|p| p.into_inner());
            guard.recv()
        };
        let Ok(p) = p else { return Ok(()) };
        if run.abort.load(Ordering::Relaxed) {
            return Ok(());
        }
        let started = std::time::Instant::now();
        run.repo.backend().put(&pack_key(&p.id), &p.bytes)?;
        tracing::debug!(pack = %p.id, bytes = p.bytes.len(), elapsed = ?started.elapsed(), "pack stored");
        let batch = {
            let mut pending = run.pending_index.lock().unwrap_or_else(|e| e.into_inner());
            pending.push(IndexedPack { id: p.id, len: p.bytes.len() as u64, entries: p.entries });
            if pending.len() >= INDEX_BATCH {
                std::mem::take(&mut *pending)
            } else {
                Vec::new()
            }
        };
        if !batch.is_empty() {
            run.repo.write_index(&batch)?;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unread_parts_trim_chunks_around_what_was_read() {
        let id = ChunkId([1; 32]);
        let c = |offset, len, skip| ChunkRef { offset, len, id, skip };
        let chunks = vec![c(0, 100, 0), c(100, 100, 0), c(200, 50, 30), c(300, 100, 0)];
        let parts = unread_parts(&chunks, &[10..20, 90..110, 300..400]);
        assert_eq!(parts, vec![c(0, 10, 0), c(20, 70, 20), c(110, 90, 10), c(200, 50, 30)]);
        assert_eq!(unread_parts(&chunks, &[]), chunks);
        let all: Vec<Range<u64>> = std::iter::once(0..1000).collect();
        assert!(unread_parts(&chunks, &all).is_empty());
    }

    #[test]
    fn ranges_align_and_merge() {
        let r = align_ranges(&[10..20, 5000..5001, 4096..4100, 9000..9000], 4096, 10000);
        assert_eq!(r, vec![0..8192]);
        let r = align_ranges(&[9000..9999, 9500..9600], 4096, 10000);
        assert_eq!(r, vec![8192..10000]);
    }
}

//! Restore: fetch packs in parallel, decrypt, write chunks out of order at their offsets.
//!
//! Files are written sparse (all-zero chunks stay holes); devices get explicit zeros.
//! Resumable: once a pack range's chunks are written and synced, its id is appended to a
//! state file (`<target>.hlstore-restore` for files, `--state-file` for devices; in groups
//! of [`STATE_SYNC_BYTES`], and everything written when a restore stops on an error); a
//! rerun for the same backup skips those ranges. The state file is removed on success.
//! [`restore_into`] writes to any [`RestoreSink`] (a fresh thin volume over NBD): only the
//! chunk records are written, holes are left to the target; it resumes the same way when
//! given a state file.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use crate::chunk::ChunkId;
use crate::error::{Error, Result};
use crate::index::Location;
use crate::pack::decode_blob_in_place;
use crate::progress::Progress;
use crate::repo::Repository;
use crate::snapshot::ChunkRef;

/// Parallel fetches by default.
pub const DEFAULT_WORKERS: usize = 4;

/// Where a restore goes.
#[derive(Debug, Clone)]
pub enum RestoreTarget {
    /// A regular file, created sparse.
    File(PathBuf),
    /// An existing block device (or file) at least as large as the backup.
    Device(PathBuf),
}

/// Options of one restore.
#[derive(Clone, Default)]
pub struct RestoreOptions {
    pub progress: Progress,
    /// Parallel pack fetches (0: default 4).
    pub workers: usize,
    /// Resume-state file; default `<file>.hlstore-restore` for files, none for devices.
    pub state_file: Option<PathBuf>,
}

/// What a restore did.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct RestoreStats {
    pub snapshot: String,
    pub size: u64,
    pub bytes_written: u64,
    pub packs_fetched: u64,
    /// Packs skipped because a previous interrupted run had written them.
    pub packs_resumed: u64,
}

/// Where a chunk's bytes go: (source offset, skip into the chunk, length).
type Piece = (u64, u32, u32);

/// Blob bytes fetched by one restore job at most: packs are split into ranges this size so
/// a handful of packs still keeps every worker busy.
pub const JOB_BYTES: u64 = 8 * 1024 * 1024;

struct Job {
    pack: String,
    /// Name in the resume state: `<pack>@<offset of the first blob>`.
    key: String,
    /// (blob location, chunk, every piece of it to write), sorted by blob offset.
    chunks: Vec<(Location, ChunkId, Vec<Piece>)>,
}

impl Job {
    /// Bytes of the image this job restores (progress counts these, not the bytes
    /// written, which skip zeros).
    fn image_bytes(&self) -> u64 {
        self.chunks.iter().flat_map(|c| c.2.iter()).map(|p| p.2 as u64).sum()
    }
}

/// Restores snapshot `id` (a unique prefix is enough) to `target`.
pub fn restore(repo: &Repository, id: &str, target: &RestoreTarget, opts: RestoreOptions) -> Result<RestoreStats> {
    let id = repo.resolve_snapshot(id)?;
    let snap = repo.load_snapshot(&id)?;
    let mut jobs = plan_jobs(repo, &id, &snap.chunks)?;

    let (path, is_device) = match target {
        RestoreTarget::File(p) => (p.clone(), false),
        RestoreTarget::Device(p) => (p.clone(), true),
    };
    let state_path = opts.state_file.clone().or_else(|| {
        (!is_device).then(|| {
            let mut s = path.clone().into_os_string();
            s.push(".hlstore-restore");
            PathBuf::from(s)
        })
    });
    let done = state_path.as_deref().map(|p| read_state(p, &id)).unwrap_or_default();
    // Resume only if the target still holds the earlier run's writes.
    let target_len = std::fs::metadata(&path).map(|m| m.len()).ok();
    let resuming = done.is_some() && (is_device || target_len == Some(snap.meta.size));
    let done = done.unwrap_or_default();
    let file = open_target(&path, is_device, resuming, snap.meta.size)?;
    let state = match &state_path {
        Some(p) => Some(StateLog::new(open_state(p, &id, resuming)?, snap.meta.size)),
        None => None,
    };
    let mut stats = RestoreStats { snapshot: id.clone(), size: snap.meta.size, ..Default::default() };
    let before = jobs.len();
    jobs.retain(|j| !done.contains(&j.key));
    stats.packs_resumed = (before - jobs.len()) as u64;
    if is_device && !resuming {
        stats.bytes_written += zero_gaps(&file, &snap.chunks, snap.meta.size, &path)?;
    }

    // A file is created empty (or holds the interrupted run's writes, which are the same
    // bytes), so it reads zeros wherever nothing was written; a device may hold anything.
    let sink = FileSink { file: &file, path: &path, zeroed: !is_device };
    let sync = || file.sync_data().map_err(|e| Error::io(format!("sync {}", path.display()), e));
    let after_pack = |job: &Job| -> Result<()> {
        match &state {
            Some(st) => st.done(job, sync),
            None => Ok(()),
        }
    };
    let written = run_jobs(repo, jobs, &sink, &opts, &after_pack, snap.meta.size).inspect_err(|_| {
        if let Some(st) = &state {
            let _ = st.flush(sync);
        }
    })?;
    file.sync_all().map_err(|e| Error::io(format!("sync {}", path.display()), e))?;
    if let Some(p) = &state_path {
        let _ = std::fs::remove_file(p);
    }
    stats.bytes_written += written;
    stats.packs_fetched = before as u64 - stats.packs_resumed;
    opts.progress.finish();
    Ok(stats)
}

/// Restores snapshot `id` into `sink`, which must read as zeros where the backup has holes
/// (a fresh thin volume): only chunk records are written. With `opts.state_file`, the run
/// is resumable: after each pack's chunks are written and `sink.sync()`ed, the pack is
/// recorded; a rerun for the same backup skips recorded packs; the file is removed on
/// success. Ends with `sink.sync()`.
pub fn restore_into(repo: &Repository, id: &str, sink: &dyn RestoreSink, opts: RestoreOptions) -> Result<RestoreStats> {
    let id = repo.resolve_snapshot(id)?;
    let snap = repo.load_snapshot(&id)?;
    let mut jobs = plan_jobs(repo, &id, &snap.chunks)?;
    let done = opts.state_file.as_deref().and_then(|p| read_state(p, &id));
    let resuming = done.is_some();
    let done = done.unwrap_or_default();
    let state = match &opts.state_file {
        Some(p) => Some(StateLog::new(open_state(p, &id, resuming)?, snap.meta.size)),
        None => None,
    };
    let before = jobs.len();
    jobs.retain(|j| !done.contains(&j.key));
    let resumed = (before - jobs.len()) as u64;
    let after_pack = |job: &Job| -> Result<()> {
        match &state {
            Some(st) => st.done(job, || sink.sync()),
            None => Ok(()),
        }
    };
    let written = run_jobs(repo, jobs, sink, &opts, &after_pack, snap.meta.size).inspect_err(|_| {
        if let Some(st) = &state {
            let _ = st.flush(|| sink.sync());
        }
    })?;
    sink.sync()?;
    if let Some(p) = &opts.state_file {
        let _ = std::fs::remove_file(p);
    }
    opts.progress.finish();
    Ok(RestoreStats {
        snapshot: id,
        size: snap.meta.size,
        bytes_written: written,
        packs_fetched: before as u64 - resumed,
        packs_resumed: resumed,
    })
}

/// True when `state_file` records an interrupted restore of backup `id`.
pub fn has_resume_state(state_file: &Path, id: &str) -> bool {
    read_state(state_file, id).is_some()
}

/// Groups the chunks by pack, in blob order. Done before touching the target, so a missing
/// chunk fails early.
fn plan_jobs(repo: &Repository, id: &str, chunks: &[ChunkRef]) -> Result<Vec<Job>> {
    let index = repo.load_index()?.index;
    // Prefer copies in packs no prune has condemned (a repack leaves two copies until the
    // old pack goes), so a restore does not race the deletion of the old pack.
    let condemned = repo.condemned_packs()?;
    let preferred = (!condemned.is_empty()).then(|| index.without_packs(&condemned));
    let mut by_chunk: HashMap<ChunkId, Vec<Piece>> = HashMap::new();
    for c in chunks {
        by_chunk.entry(c.id).or_default().push((c.offset, c.skip, c.len));
    }
    let mut by_pack: BTreeMap<String, Vec<(Location, ChunkId, Vec<Piece>)>> = BTreeMap::new();
    for (cid, offs) in by_chunk {
        let (ix, loc) = match preferred.as_ref().and_then(|p| p.get(&cid).map(|l| (p, l))) {
            Some(found) => found,
            None => (
                &index,
                index.get(&cid).ok_or_else(|| Error::MissingChunk { snapshot: id.to_string(), chunk: cid.to_hex() })?,
            ),
        };
        by_pack.entry(ix.pack_id(loc).to_string()).or_default().push((*loc, cid, offs));
    }
    let mut jobs = Vec::new();
    for (pack, mut chunks) in by_pack {
        chunks.sort_by_key(|c| c.0.offset);
        let mut cur: Vec<(Location, ChunkId, Vec<Piece>)> = Vec::new();
        let mut start = 0u64;
        for c in chunks {
            let end = c.0.offset as u64 + c.0.length as u64;
            if !cur.is_empty() && end - start > JOB_BYTES {
                jobs.push(Job { pack: pack.clone(), key: format!("{pack}@{start}"), chunks: std::mem::take(&mut cur) });
            }
            if cur.is_empty() {
                start = c.0.offset as u64;
            }
            cur.push(c);
        }
        if !cur.is_empty() {
            jobs.push(Job { pack: pack.clone(), key: format!("{pack}@{start}"), chunks: cur });
        }
    }
    // Workers pop from the end: start with the first ranges of each pack.
    jobs.reverse();
    Ok(jobs)
}

/// Fetches and writes the jobs' packs on `opts.workers` threads; `after_pack` runs after
/// each pack's chunks are written. Returns the bytes written; stops at the first error.
fn run_jobs(
    repo: &Repository,
    jobs: Vec<Job>,
    sink: &dyn RestoreSink,
    opts: &RestoreOptions,
    after_pack: &(dyn Fn(&Job) -> Result<()> + Sync),
    image_size: u64,
) -> Result<u64> {
    // Progress is in bytes of the image: holes and what an interrupted run restored
    // count as done from the start.
    let pending: u64 = jobs.iter().map(Job::image_bytes).sum();
    opts.progress.inc(image_size.saturating_sub(pending));
    let written = AtomicU64::new(0);
    let queue = Mutex::new(jobs);
    let workers = if opts.workers == 0 { DEFAULT_WORKERS } else { opts.workers };
    let first_err: Mutex<Option<Error>> = Mutex::new(None);
    let fail = |e: Error| {
        if let Ok(mut fe) = first_err.lock() {
            fe.get_or_insert(e);
        }
    };
    std::thread::scope(|s| {
        for _ in 0..workers {
            s.spawn(|| loop {
                if first_err.lock().map(|e| e.is_some()).unwrap_or(true) {
                    return;
                }
                let job = queue.lock().ok().and_then(|mut q| q.pop());
                let Some(job) = job else { return };
                match restore_pack(repo, &job, sink) {
                    Ok(n) => {
                        written.fetch_add(n, Ordering::Relaxed);
                        opts.progress.inc(job.image_bytes());
                        if let Err(e) = after_pack(&job) {
                            fail(e);
                        }
                    }
                    Err(e) => fail(e),
                }
            });
        }
    });
    if let Some(e) = first_err.into_inner().unwrap_or(None) {
        return Err(e);
    }
    Ok(written.into_inner())
}

/// Where restored chunks go: a file or device, or a volume over NBD.
pub trait RestoreSink: Sync {
    /// Writes `data` at `offset`.
    fn write_at(&self, offset: u64, data: &[u8]) -> Result<()>;
    /// True when the target reads zeros wherever nothing was written (a new sparse file,
    /// a fresh thin volume): all-zero blocks inside chunks are then skipped, so they stay
    /// unallocated.
    fn reads_zeros(&self) -> bool {
        true
    }
    /// Makes everything written so far durable.
    fn sync(&self) -> Result<()>;
}

struct FileSink<'a> {
    file: &'a File,
    path: &'a Path,
    zeroed: bool,
}

impl RestoreSink for FileSink<'_> {
    fn write_at(&self, offset: u64, data: &[u8]) -> Result<()> {
        self.file
            .write_all_at(data, offset)
            .map_err(|err| Error::io(format!("write {} at {offset}", self.path.display()), err))
    }

    fn sync(&self) -> Result<()> {
        self.file.sync_all().map_err(|e| Error::io(format!("sync {}", self.path.display()), e))
    }

    fn reads_zeros(&self) -> bool {
        self.zeroed
    }
}

/// Block size below which zeros inside a chunk are written rather than skipped.
pub const ZERO_SKIP_BLOCK: u64 = 4096;

/// Writes `data` at `offset`, skipping the all-zero 4 KiB blocks (aligned to the target)
/// when the sink reads zeros anyway. Returns the bytes written.
fn write_piece(sink: &dyn RestoreSink, offset: u64, data: &[u8]) -> Result<u64> {
    if !sink.reads_zeros() {
        sink.write_at(offset, data)?;
        return Ok(data.len() as u64);
    }
    let end = offset + data.len() as u64;
    let mut written = 0u64;
    let mut run: Option<u64> = None; // start of the pending non-zero run
    let mut pos = offset;
    while pos < end {
        let next = ((pos / ZERO_SKIP_BLOCK + 1) * ZERO_SKIP_BLOCK).min(end);
        let block = &data[(pos - offset) as usize..(next - offset) as usize];
        let zero = crate::chunk::is_zero(block);
        match (zero, run) {
            (false, None) => run = Some(pos),
            (true, Some(r)) => {
                sink.write_at(r, &data[(r - offset) as usize..(pos - offset) as usize])?;
                written += pos - r;
                run = None;
            }
            _ => {}
        }
        pos = next;
    }
    if let Some(r) = run {
        sink.write_at(r, &data[(r - offset) as usize..])?;
        written += end - r;
    }
    Ok(written)
}

fn restore_pack(repo: &Repository, job: &Job, sink: &dyn RestoreSink) -> Result<u64> {
    let Some(first) = job.chunks.first() else {
        return Ok(0);
    };
    let start = first.0.offset as u64;
    let end = job.chunks.iter().map(|c| c.0.entry(c.1).end()).max().unwrap_or(start);
    let key = crate::pack::pack_key(&job.pack);
    let mut bytes = repo.backend().get_range(&key, start, end - start)?;
    let mut n = 0u64;
    for (loc, cid, offs) in &job.chunks {
        let e = loc.entry(*cid);
        let a = (e.offset as u64 - start) as usize;
        // Each blob is decrypted where it lies (a damaged index placing two blobs over
        // each other makes the second fail authentication, not restore wrong bytes).
        let blob = bytes
            .get_mut(a..a + e.length as usize)
            .ok_or_else(|| Error::corrupt(format!("pack {}", job.pack), "shorter than its index says"))?;
        let plain = decode_blob_in_place(repo.key(), &e, blob, &job.pack)?;
        for &(o, skip, len) in offs {
            let piece = plain.get(skip as usize..skip as usize + len as usize).ok_or_else(|| {
                Error::corrupt(format!("pack {} chunk {cid}", job.pack), "backup references bytes past the chunk's end")
            })?;
            n += write_piece(sink, o, piece)?;
        }
    }
    Ok(n)
}

fn open_target(path: &Path, is_device: bool, resuming: bool, size: u64) -> Result<File> {
    let ctx = |op: &str| format!("{op} {}", path.display());
    if is_device {
        let f = OpenOptions::new().write(true).open(path).map_err(|e| Error::io(ctx("open device"), e))?;
        use std::io::{Seek, SeekFrom};
        let mut fr = &f;
        let dev_size = fr.seek(SeekFrom::End(0)).map_err(|e| Error::io(ctx("size of"), e))?;
        if dev_size < size {
            return Err(Error::Invalid(format!("{} holds {dev_size} bytes, the backup needs {size}", path.display())));
        }
        return Ok(f);
    }
    let f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(!resuming)
        .open(path)
        .map_err(|e| Error::io(ctx("create"), e))?;
    f.set_len(size).map_err(|e| Error::io(ctx("resize"), e))?;
    Ok(f)
}

/// Writes zeros wherever no chunk lands (devices only; files keep holes).
fn zero_gaps(file: &File, chunks: &[ChunkRef], size: u64, path: &Path) -> Result<u64> {
    let zeros = vec![0u8; 1 << 20];
    let mut n = 0;
    let mut pos = 0u64;
    let mut fill = |from: u64, to: u64| -> Result<()> {
        let mut o = from;
        while o < to {
            let k = ((to - o) as usize).min(zeros.len());
            file.write_all_at(&zeros[..k], o).map_err(|e| Error::io(format!("zero {} at {o}", path.display()), e))?;
            o += k as u64;
            n += k as u64;
        }
        Ok(())
    };
    for c in chunks {
        if c.offset > pos {
            fill(pos, c.offset)?;
        }
        pos = pos.max(c.offset + c.len as u64);
    }
    if pos < size {
        fill(pos, size)?;
    }
    Ok(n)
}

/// Bytes of the image restored between two syncs of the target (and so between two
/// appends to the resume state), at most: a crash redoes about this much. Smaller images
/// sync every sixteenth of their size.
pub const STATE_SYNC_BYTES: u64 = 64 * 1024 * 1024;

/// The resume state of a running restore: a job is recorded once a sync of the target
/// after its writes returned. Jobs are recorded in groups of [`STATE_SYNC_BYTES`], one
/// sync per group instead of one per job.
struct StateLog {
    file: Mutex<File>,
    /// Jobs written and not yet recorded, and their image bytes.
    pending: Mutex<(Vec<String>, u64)>,
    /// Image bytes per group.
    group: u64,
}

impl StateLog {
    fn new(file: File, image_size: u64) -> Self {
        let group = STATE_SYNC_BYTES.min(image_size / 16);
        StateLog { file: Mutex::new(file), pending: Mutex::new((Vec::new(), 0)), group }
    }

    /// `job` is written; `sync` makes the target durable.
    fn done(&self, job: &Job, sync: impl FnOnce() -> Result<()>) -> Result<()> {
        let keys = {
            let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
            p.0.push(job.key.clone());
            p.1 += job.image_bytes();
            if p.1 < self.group {
                return Ok(());
            }
            p.1 = 0;
            std::mem::take(&mut p.0)
        };
        self.record(keys, sync)
    }

    /// Records every job written so far (a restore stopping on an error keeps its progress).
    fn flush(&self, sync: impl FnOnce() -> Result<()>) -> Result<()> {
        let keys = std::mem::take(&mut self.pending.lock().unwrap_or_else(|e| e.into_inner()).0);
        if keys.is_empty() {
            return Ok(());
        }
        self.record(keys, sync)
    }

    fn record(&self, keys: Vec<String>, sync: impl FnOnce() -> Result<()>) -> Result<()> {
        // The sync starts after every job in `keys` was written, so it covers them.
        sync()?;
        let mut f = self.file.lock().unwrap_or_else(|e| e.into_inner());
        let mut text = String::new();
        for k in keys {
            text.push_str(&k);
            text.push('\n');
        }
        f.write_all(text.as_bytes()).map_err(|e| Error::io("write restore state", e))?;
        f.sync_data().map_err(|e| Error::io("sync restore state", e))
    }
}

fn read_state(p: &Path, id: &str) -> Option<HashSet<String>> {
    let f = File::open(p).ok()?;
    let mut lines = BufReader::new(f).lines();
    let head = lines.next()?.ok()?;
    if head.trim() != format!("hlstore-restore {id}") {
        return None;
    }
    Some(lines.map_while(|l| l.ok()).map(|l| l.trim().to_string()).collect())
}

fn open_state(p: &Path, id: &str, resuming: bool) -> Result<File> {
    if resuming {
        return OpenOptions::new().append(true).open(p).map_err(|e| Error::io(format!("open {}", p.display()), e));
    }
    let mut f = File::create(p).map_err(|e| Error::io(format!("create {}", p.display()), e))?;
    writeln!(f, "hlstore-restore {id}").map_err(|e| Error::io("write restore state", e))?;
    Ok(f)
}

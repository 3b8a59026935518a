//! Restore: fetch packs in parallel, decrypt, write chunks out of order at their offsets.
//!
//! Files are written sparse (all-zero chunks stay holes); devices get explicit zeros.
//! Resumable: after each pack's chunks are written and synced, its id is appended to a
//! state file (`<target>.hlstore-restore` for files, `--state-file` for devices); a rerun
//! for the same backup skips those packs. The state file is removed on success.

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
use crate::pack::decode_blob;
use crate::progress::Progress;
use crate::repo::Repository;

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

struct Job {
    pack: String,
    /// (blob location, chunk, every offset it goes to), sorted by blob offset.
    chunks: Vec<(Location, ChunkId, Vec<u64>)>,
}

/// Restores snapshot `id` (a unique prefix is enough) to `target`.
pub fn restore(repo: &Repository, id: &str, target: &RestoreTarget, opts: RestoreOptions) -> Result<RestoreStats> {
    let id = repo.resolve_snapshot(id)?;
    let snap = repo.load_snapshot(&id)?;
    let index = repo.load_index()?.index;
    // Plan everything before touching the target: a missing chunk fails early.
    let mut by_chunk: HashMap<ChunkId, Vec<u64>> = HashMap::new();
    for c in &snap.chunks {
        by_chunk.entry(c.id).or_default().push(c.offset);
    }
    let mut by_pack: BTreeMap<u32, Vec<(Location, ChunkId, Vec<u64>)>> = BTreeMap::new();
    for (cid, offs) in by_chunk {
        let loc = index.get(&cid).ok_or_else(|| Error::MissingChunk { snapshot: id.clone(), chunk: cid.to_hex() })?;
        by_pack.entry(loc.pack).or_default().push((*loc, cid, offs));
    }
    let mut jobs: Vec<Job> = by_pack
        .into_iter()
        .map(|(p, mut chunks)| {
            chunks.sort_by_key(|c| c.0.offset);
            Job { pack: index.packs[p as usize].0.clone(), chunks }
        })
        .collect();

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
        Some(p) => Some(Mutex::new(open_state(p, &id, resuming)?)),
        None => None,
    };
    let mut stats = RestoreStats { snapshot: id.clone(), size: snap.meta.size, ..Default::default() };
    let before = jobs.len();
    jobs.retain(|j| !done.contains(&j.pack));
    stats.packs_resumed = (before - jobs.len()) as u64;
    if is_device && !resuming {
        stats.bytes_written += zero_gaps(&file, &snap.chunks, snap.meta.size, &path)?;
    }

    let written = AtomicU64::new(0);
    let queue = Mutex::new(jobs);
    let workers = if opts.workers == 0 { 4 } else { opts.workers };
    let first_err: Mutex<Option<Error>> = Mutex::new(None);
    std::thread::scope(|s| {
        for _ in 0..workers {
            s.spawn(|| loop {
                if first_err.lock().map(|e| e.is_some()).unwrap_or(true) {
                    return;
                }
                let job = queue.lock().ok().and_then(|mut q| q.pop());
                let Some(job) = job else { return };
                match restore_pack(repo, &job, &file, &path) {
                    Ok(n) => {
                        written.fetch_add(n, Ordering::Relaxed);
                        opts.progress.inc(n);
                        let mark = match &state {
                            Some(st) => file
                                .sync_data()
                                .map_err(|e| Error::io(format!("sync {}", path.display()), e))
                                .and_then(|_| {
                                    let mut f = st.lock().unwrap_or_else(|p| p.into_inner());
                                    writeln!(f, "{}", job.pack).map_err(|e| Error::io("write restore state", e))
                                }),
                            None => Ok(()),
                        };
                        if let Err(e) = mark {
                            if let Ok(mut fe) = first_err.lock() {
                                fe.get_or_insert(e);
                            }
                        }
                    }
                    Err(e) => {
                        if let Ok(mut fe) = first_err.lock() {
                            fe.get_or_insert(e);
                        }
                    }
                }
            });
        }
    });
    if let Some(e) = first_err.into_inner().unwrap_or(None) {
        return Err(e);
    }
    file.sync_all().map_err(|e| Error::io(format!("sync {}", path.display()), e))?;
    if let Some(p) = &state_path {
        let _ = std::fs::remove_file(p);
    }
    stats.bytes_written += written.into_inner();
    stats.packs_fetched = before as u64 - stats.packs_resumed;
    opts.progress.finish();
    Ok(stats)
}

fn restore_pack(repo: &Repository, job: &Job, file: &File, path: &Path) -> Result<u64> {
    let Some(first) = job.chunks.first() else {
        return Ok(0);
    };
    let start = first.0.offset as u64;
    let end = job.chunks.iter().map(|c| c.0.entry(c.1).end()).max().unwrap_or(start);
    let key = crate::pack::pack_key(&job.pack);
    let bytes = repo.backend().get_range(&key, start, end - start)?;
    let mut n = 0u64;
    for (loc, cid, offs) in &job.chunks {
        let e = loc.entry(*cid);
        let a = (e.offset as u64 - start) as usize;
        let blob = bytes
            .get(a..a + e.length as usize)
            .ok_or_else(|| Error::corrupt(format!("pack {}", job.pack), "shorter than its index says"))?;
        let plain = decode_blob(repo.key(), &e, blob, &job.pack)?;
        for &o in offs {
            file.write_all_at(&plain, o).map_err(|err| Error::io(format!("write {} at {o}", path.display()), err))?;
            n += plain.len() as u64;
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
fn zero_gaps(file: &File, chunks: &[crate::snapshot::ChunkRef], size: u64, path: &Path) -> Result<u64> {
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

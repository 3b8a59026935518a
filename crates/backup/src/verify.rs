//! `verify`: checks the repository's structure (every index readable, every indexed pack
//! present with the indexed size, every snapshot's chunks indexed) and, with `read_data`,
//! every pack's bytes (name = BLAKE3 of content, every blob authenticates and hashes to its
//! chunk id). The report names each damaged object and each backup it affects; damage to
//! one pack never hides the state of the others.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Mutex;

use serde::Serialize;

use crate::chunk::ChunkId;
use crate::error::Result;
use crate::pack::{decode_blob, pack_key, parse_pack};
use crate::progress::Progress;
use crate::repo::Repository;

/// How serious a finding is.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// Data is lost or unreadable.
    Error,
    /// Recoverable (e.g. an index to rebuild); no data lost.
    Warning,
}

/// One finding.
#[derive(Debug, Clone, Serialize)]
pub struct Problem {
    pub severity: Severity,
    /// `missing_pack`, `truncated_pack`, `damaged_pack`, `unindexed_pack`, `bad_index`,
    /// `bad_snapshot`.
    pub kind: String,
    /// Object key.
    pub object: String,
    pub detail: String,
}

/// A backup that cannot be fully restored.
#[derive(Debug, Clone, Serialize)]
pub struct Affected {
    pub snapshot: String,
    pub source: String,
    /// Chunks that are missing or damaged.
    pub bad_chunks: u64,
    pub bad_bytes: u64,
    /// Objects responsible.
    pub objects: Vec<String>,
}

/// Result of a verify run.
#[derive(Debug, Clone, Serialize)]
pub struct VerifyReport {
    /// True when no finding is an error.
    pub ok: bool,
    pub snapshots: u64,
    pub packs: u64,
    pub packs_read: u64,
    pub problems: Vec<Problem>,
    pub affected: Vec<Affected>,
}

/// Verifies the repository.
pub fn verify(repo: &Repository, read_data: bool, progress: Progress) -> Result<VerifyReport> {
    let load = repo.load_index()?;
    let index = &load.index;
    let mut problems = Vec::new();
    let err = |kind: &str, object: String, detail: String| Problem {
        severity: Severity::Error,
        kind: kind.into(),
        object,
        detail,
    };
    for (f, why) in &load.bad_index_files {
        problems.push(err("bad_index", f.clone(), why.clone()));
    }
    for p in &load.unindexed {
        problems.push(Problem {
            severity: Severity::Warning,
            kind: "unindexed_pack".into(),
            object: pack_key(&p.id),
            detail: "not listed in any index file (index lost, or a backup was interrupted); \
                     its own trailer was read instead"
                .into(),
        });
    }
    // Chunks that cannot be read, with the object responsible.
    let mut bad_chunks: HashMap<ChunkId, String> = HashMap::new();
    let mut by_pack: HashMap<u32, Vec<ChunkId>> = HashMap::new();
    for (id, loc) in index.iter() {
        by_pack.entry(loc.pack).or_default().push(*id);
    }
    for (id, why) in &load.bad_packs {
        problems.push(err("damaged_pack", pack_key(id), why.clone()));
    }
    let mut readable: Vec<u32> = Vec::new();
    for (i, (pid, len)) in index.packs.iter().enumerate() {
        let key = pack_key(pid);
        let chunks = by_pack.get(&(i as u32)).cloned().unwrap_or_default();
        match load.pack_sizes.get(pid) {
            None => {
                problems.push(err(
                    "missing_pack",
                    key.clone(),
                    format!("listed in the index with {} chunks but not stored", chunks.len()),
                ));
                for c in chunks {
                    bad_chunks.insert(c, key.clone());
                }
            }
            Some(&size) if size != *len => {
                let mut lost = 0;
                for c in chunks {
                    if let Some(loc) = index.get(&c) {
                        if loc.entry(c).end() > size {
                            bad_chunks.insert(c, key.clone());
                            lost += 1;
                        }
                    }
                }
                problems.push(err(
                    "truncated_pack",
                    key.clone(),
                    format!("{size} bytes stored, {len} expected; {lost} chunks lost"),
                ));
                if read_data {
                    readable.push(i as u32);
                }
            }
            Some(_) => readable.push(i as u32),
        }
    }

    let mut packs_read = 0;
    if read_data {
        let queue = Mutex::new(readable);
        let found: Mutex<(Vec<Problem>, HashMap<ChunkId, String>, u64)> = Mutex::new((Vec::new(), HashMap::new(), 0));
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| loop {
                    let Some(i) = queue.lock().ok().and_then(|mut q| q.pop()) else {
                        return;
                    };
                    let (pid, _) = &index.packs[i as usize];
                    let chunks = by_pack.get(&i).cloned().unwrap_or_default();
                    let (probs, bad) = check_pack(repo, pid, &chunks, index);
                    if let Ok(mut f) = found.lock() {
                        f.0.extend(probs);
                        f.1.extend(bad);
                        f.2 += 1;
                    }
                    progress.inc(1);
                });
            }
        });
        let (probs, bad, n) = found.into_inner().unwrap_or_default();
        problems.extend(probs);
        for (c, k) in bad {
            bad_chunks.entry(c).or_insert(k);
        }
        packs_read = n;
    }

    let mut affected = Vec::new();
    let ids = repo.snapshot_ids()?;
    for id in &ids {
        let snap = match repo.load_snapshot(id) {
            Ok(s) => s,
            Err(e) => {
                problems.push(err("bad_snapshot", format!("snapshots/{id}"), e.to_string()));
                continue;
            }
        };
        let mut n = 0u64;
        let mut bytes = 0u64;
        let mut objects = BTreeSet::new();
        let mut seen = HashSet::new();
        for c in &snap.chunks {
            let culprit = match bad_chunks.get(&c.id) {
                Some(k) => Some(k.clone()),
                None => match index.get(&c.id) {
                    None => Some("(chunk in no pack or index)".into()),
                    Some(l) if c.skip as u64 + c.len as u64 > l.raw_len as u64 => {
                        Some(format!("snapshots/{id} (a piece past its chunk's end)"))
                    }
                    Some(_) => None,
                },
            };
            if let Some(k) = culprit {
                if seen.insert(c.id) {
                    n += 1;
                }
                bytes += c.len as u64;
                objects.insert(k);
            }
        }
        if n > 0 {
            affected.push(Affected {
                snapshot: id.clone(),
                source: snap.meta.source.clone(),
                bad_chunks: n,
                bad_bytes: bytes,
                objects: objects.into_iter().collect(),
            });
        }
    }
    affected.sort_by(|a, b| a.snapshot.cmp(&b.snapshot));
    problems.sort_by(|a, b| (&a.object, &a.kind).cmp(&(&b.object, &b.kind)));
    progress.finish();
    Ok(VerifyReport {
        ok: problems.iter().all(|p| p.severity != Severity::Error) && affected.is_empty(),
        snapshots: ids.len() as u64,
        packs: load.pack_sizes.len() as u64,
        packs_read,
        problems,
        affected,
    })
}

/// Reads one pack fully and checks it; returns findings and unreadable chunks.
fn check_pack(
    repo: &Repository,
    pid: &str,
    chunks: &[ChunkId],
    index: &crate::index::MasterIndex,
) -> (Vec<Problem>, HashMap<ChunkId, String>) {
    let key = pack_key(pid);
    let mut probs = Vec::new();
    let mut bad = HashMap::new();
    let bytes = match repo.backend().get(&key) {
        Ok(b) => b,
        Err(e) => {
            probs.push(Problem {
                severity: Severity::Error,
                kind: "missing_pack".into(),
                object: key.clone(),
                detail: e.to_string(),
            });
            for c in chunks {
                bad.insert(*c, key.clone());
            }
            return (probs, bad);
        }
    };
    let mut details: BTreeMap<&str, String> = BTreeMap::new();
    if blake3::hash(&bytes).to_hex().as_str() != pid {
        details.insert("hash", "content does not match the pack name".into());
    }
    if let Err(e) = parse_pack(repo.key(), &bytes, pid) {
        details.insert("trailer", e.to_string());
    }
    let mut damaged = 0;
    for c in chunks {
        let Some(loc) = index.get(c) else { continue };
        let e = loc.entry(*c);
        let blob = bytes.get(e.offset as usize..e.end() as usize);
        let okay = blob.is_some_and(|b| decode_blob(repo.key(), &e, b, pid).is_ok());
        if !okay {
            bad.insert(*c, key.clone());
            damaged += 1;
        }
    }
    if damaged > 0 {
        details.insert("chunks", format!("{damaged} of {} chunks unreadable", chunks.len()));
    }
    if !details.is_empty() {
        probs.push(Problem {
            severity: Severity::Error,
            kind: "damaged_pack".into(),
            object: key,
            detail: details.into_values().collect::<Vec<_>>().join("; "),
        });
    }
    (probs, bad)
}

//! `ImageReader`: random-access reads of a backup's image (what `restore` would write),
//! chunk by chunk, through a byte-bounded cache of decoded chunks. The FUSE view serves
//! its `image` files with it; it needs no FUSE itself.
//!
//! Invariant: every byte returned is either a hole of the backup (zeros) or comes from a
//! blob that opened under the repository key and hashed to its chunk id (`decode_blob`);
//! a damaged or missing blob is an error naming the object, never wrong data.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use crate::chunk::ChunkId;
use crate::error::{Error, Result};
use crate::index::{Location, MasterIndex};
use crate::pack::{decode_blob, pack_key};
use crate::repo::Repository;
use crate::snapshot::{ChunkRef, Snapshot};

/// Default budget of the decoded-chunk cache.
pub const DEFAULT_CACHE_BYTES: usize = 128 * 1024 * 1024;
/// A chunk not found where the index says reloads the index (a prune may have repacked
/// it), once per index generation and at most this often.
const INDEX_RELOAD_EVERY: Duration = Duration::from_secs(1);

/// Where chunks are: the repository's index, preferring copies in packs no prune has
/// condemned (a repack leaves two copies until the old pack goes).
struct Locator {
    index: MasterIndex,
    preferred: Option<MasterIndex>,
    generation: u64,
    loaded: Instant,
}

impl Locator {
    fn load(repo: &Repository, generation: u64) -> Result<Locator> {
        let index = repo.load_index()?.index;
        let condemned: HashSet<String> = repo.condemned_packs()?;
        let preferred = (!condemned.is_empty()).then(|| index.without_packs(&condemned));
        Ok(Locator { index, preferred, generation, loaded: Instant::now() })
    }

    /// (pack id, location) of a chunk.
    fn find(&self, id: &ChunkId) -> Option<(String, Location)> {
        if let Some(p) = &self.preferred {
            if let Some(l) = p.get(id) {
                return Some((p.pack_id(l).to_string(), *l));
            }
        }
        self.index.get(id).map(|l| (self.index.pack_id(l).to_string(), *l))
    }
}

/// Decoded chunks, least recently used evicted first, bounded in bytes.
struct ChunkCache {
    budget: usize,
    used: usize,
    tick: u64,
    chunks: HashMap<ChunkId, (Arc<Vec<u8>>, u64)>,
    by_age: BTreeMap<u64, ChunkId>,
}

impl ChunkCache {
    fn get(&mut self, id: &ChunkId) -> Option<Arc<Vec<u8>>> {
        self.tick += 1;
        let tick = self.tick;
        let (data, last) = self.chunks.get_mut(id)?;
        self.by_age.remove(last);
        *last = tick;
        self.by_age.insert(tick, *id);
        Some(data.clone())
    }

    fn put(&mut self, id: ChunkId, data: Arc<Vec<u8>>) {
        if data.len() > self.budget || self.chunks.contains_key(&id) {
            return;
        }
        self.tick += 1;
        self.used += data.len();
        self.chunks.insert(id, (data, self.tick));
        self.by_age.insert(self.tick, id);
        while self.used > self.budget {
            let Some((_, old)) = self.by_age.pop_first() else { break };
            if let Some((d, _)) = self.chunks.remove(&old) {
                self.used -= d.len();
            }
        }
    }
}

/// Reads chunks of one repository; shared by every image of a mount.
pub struct ChunkSource {
    repo: Arc<Repository>,
    locator: RwLock<Arc<Locator>>,
    cache: Mutex<ChunkCache>,
    /// One fetch per chunk at a time: the kernel's readahead asks for neighbouring
    /// ranges of one chunk on several threads at once; the others wait for the cache.
    fetching: Mutex<HashMap<ChunkId, Arc<Mutex<()>>>>,
}

impl ChunkSource {
    /// Loads the repository's index; `cache_bytes` bounds the decoded chunks kept.
    pub fn new(repo: Arc<Repository>, cache_bytes: usize) -> Result<ChunkSource> {
        let locator = Arc::new(Locator::load(&repo, 0)?);
        Ok(ChunkSource {
            repo,
            locator: RwLock::new(locator),
            cache: Mutex::new(ChunkCache {
                budget: cache_bytes,
                used: 0,
                tick: 0,
                chunks: HashMap::new(),
                by_age: BTreeMap::new(),
            }),
            fetching: Mutex::new(HashMap::new()),
        })
    }

    /// The repository.
    pub fn repo(&self) -> &Arc<Repository> {
        &self.repo
    }

    fn locator(&self) -> Arc<Locator> {
        match self.locator.read() {
            Ok(l) => l.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// The index after `stale` failed us: a newer one another reader loaded meanwhile,
    /// or a fresh load (unless `stale` is younger than [`INDEX_RELOAD_EVERY`], so a
    /// chunk that is really gone does not reload the index on every read).
    fn reload(&self, stale: &Locator) -> Result<Option<Arc<Locator>>> {
        let mut g = match self.locator.write() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        if g.generation != stale.generation {
            return Ok(Some(g.clone()));
        }
        if g.loaded.elapsed() < INDEX_RELOAD_EVERY {
            return Ok(None);
        }
        *g = Arc::new(Locator::load(&self.repo, stale.generation + 1)?);
        Ok(Some(g.clone()))
    }

    /// The plaintext of a chunk `snapshot` references (named in errors).
    pub fn chunk(&self, id: &ChunkId, snapshot: &str) -> Result<Arc<Vec<u8>>> {
        let cached = || self.cache.lock().ok().and_then(|mut c| c.get(id));
        if let Some(c) = cached() {
            return Ok(c);
        }
        let turn = match self.fetching.lock() {
            Ok(mut f) => f.entry(*id).or_default().clone(),
            Err(p) => p.into_inner().entry(*id).or_default().clone(),
        };
        let _turn = turn.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = cached() {
            return Ok(c);
        }
        let r = self.fetch_and_cache(id, snapshot);
        if let Ok(mut f) = self.fetching.lock() {
            f.remove(id);
        }
        r
    }

    fn fetch_and_cache(&self, id: &ChunkId, snapshot: &str) -> Result<Arc<Vec<u8>>> {
        let locator = self.locator();
        let data = Arc::new(match self.fetch(&locator, id, snapshot) {
            // The pack went away (a prune repacked it) or the chunk is not in our index:
            // look again in a current index.
            Err(e @ (Error::NotFound(_) | Error::MissingChunk { .. })) => match self.reload(&locator)? {
                Some(fresh) => self.fetch(&fresh, id, snapshot)?,
                None => return Err(e),
            },
            r => r?,
        });
        if let Ok(mut c) = self.cache.lock() {
            c.put(*id, data.clone());
        }
        Ok(data)
    }

    fn fetch(&self, locator: &Locator, id: &ChunkId, snapshot: &str) -> Result<Vec<u8>> {
        let (pack, loc) = locator
            .find(id)
            .ok_or_else(|| Error::MissingChunk { snapshot: snapshot.to_string(), chunk: id.to_string() })?;
        let blob = self.repo.backend().get_range(&pack_key(&pack), loc.offset as u64, loc.length as u64)?;
        if blob.len() != loc.length as usize {
            return Err(Error::corrupt(format!("pack {pack}"), "shorter than its index says"));
        }
        decode_blob(self.repo.key(), &loc.entry(*id), &blob, &pack)
    }
}

/// One backup's image, readable at any offset.
pub struct ImageReader {
    snapshot: Arc<Snapshot>,
    chunks: Arc<ChunkSource>,
}

impl ImageReader {
    pub fn new(snapshot: Arc<Snapshot>, chunks: Arc<ChunkSource>) -> ImageReader {
        ImageReader { snapshot, chunks }
    }

    /// Size of the image.
    pub fn size(&self) -> u64 {
        self.snapshot.meta.size
    }

    /// Reads up to `len` bytes at `offset` (fewer only at the end of the image).
    pub fn read(&self, offset: u64, len: usize) -> Result<Vec<u8>> {
        let size = self.size();
        if offset >= size {
            return Ok(Vec::new());
        }
        let end = offset.saturating_add(len as u64).min(size);
        let mut out = vec![0u8; (end - offset) as usize];
        let refs: &[ChunkRef] = &self.snapshot.chunks;
        // Records are sorted by offset and do not overlap; holes read as zeros.
        let first = refs.partition_point(|c| c.end() <= offset);
        for c in refs[first..].iter().take_while(|c| c.offset < end) {
            let data = self.chunks.chunk(&c.id, &self.snapshot.meta.id)?;
            let from = c.offset.max(offset);
            let to = c.end().min(end);
            let src = (c.skip as u64 + (from - c.offset)) as usize;
            let piece = data.get(src..src + (to - from) as usize).ok_or_else(|| {
                Error::corrupt(
                    format!("snapshots/{}", self.snapshot.meta.id),
                    format!("record at {} points past the end of chunk {}", c.offset, c.id),
                )
            })?;
            out[(from - offset) as usize..(to - offset) as usize].copy_from_slice(piece);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cache_evicts_the_least_recently_used_within_its_budget() {
        let mut c = ChunkCache { budget: 10, used: 0, tick: 0, chunks: HashMap::new(), by_age: BTreeMap::new() };
        let id = |b: u8| ChunkId([b; 32]);
        c.put(id(1), Arc::new(vec![0; 4]));
        c.put(id(2), Arc::new(vec![0; 4]));
        assert!(c.get(&id(1)).is_some()); // 2 is now the oldest
        c.put(id(3), Arc::new(vec![0; 4]));
        assert!(c.get(&id(2)).is_none());
        assert!(c.get(&id(1)).is_some() && c.get(&id(3)).is_some());
        assert_eq!(c.used, 8);
        c.put(id(4), Arc::new(vec![0; 11])); // larger than the budget: not kept
        assert!(c.get(&id(4)).is_none());
        assert_eq!(c.used, 8);
    }
}

//! `DiskStore`: replicas as sparse slot files plus RocksDB metadata.
//!
//! Layout under the data directory: `meta/` (RocksDB, see [`keys`]),
//! `volumes/<vid>.slots` (one sparse file of 4 KiB slots per replica) and `FORMAT` (the
//! store format version, [`FORMAT_VERSION`]; a directory without it is version 1, the
//! layout before the file existed).
//!
//! Format versions: an agent opens directories of its own version and older ones
//! (upgrading them in place when a later version needs it, after which an older agent
//! refuses them); a directory of a newer version is refused with an error naming both
//! versions, never read by guesswork. Rolling back an agent after such an upgrade means
//! restoring that node's replicas by resync (delete its data directory; the volumes'
//! other replicas fill a new one).
//!
//! Write path (copy-on-write): take free slots, write the data into them, then commit one
//! RocksDB batch that points the blocks at the new slots, records their crc and seq, and
//! marks the old slots free. The old slots are only *reused* (and hole-punched) after a
//! flush made that batch durable, so after any crash the recovered map points either at the
//! old content (batch lost) or at the new content (batch kept; data written before it).
//!
//! Flush: fdatasync the slot file, write the durable mark (`S.durable_seq`), fsync the
//! RocksDB WAL. RocksDB recovers a prefix of its WAL, so a recovered durable mark implies
//! every batch before it was recovered too, and the data sync came before it.
//!
//! Recovery on open (power loss before a flush): for every block written after the durable
//! mark (seq-index entries above it), verify the new slot; if it does not hold what its crc says,
//! roll the block back to the entry it replaced (kept in its seq-index value). Then flush.

mod batch;
mod file;
mod free;
mod keys;
mod pages;
mod recovery;
mod snap;
mod upgrade;
mod volume;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use rocksdb::{BlockBasedOptions, Direction, IteratorMode, Options, ReadOptions, WriteOptions, DB};

use hlstore_core::error::{Error, Result};

use super::check;
use super::history::History;
use super::record::{
    ApplyStats, Change, ChunkData, Claim, ReplicaInfo, ReplicaState, ResyncChunk, SnapshotInfo, VolumeRecord,
    BLOCK_SIZE,
};
use super::store::{BlockWrite, ReplicaStore};
use batch::Batch;
use file::SlotFile;
use hlstore_core::{Epoch, Offset, Seq};
use keys::{Entry, PersistState, StoredVolume};
use pages::{PageState, Pages};
use volume::{Alloc, VolInner, Volume};

/// Free slots kept allocated for reuse: at most 1/KEEP_FREE_FRACTION of the allocated
/// blocks...
const KEEP_FREE_FRACTION: u64 = 8;
/// ...and at most 64 MiB per volume.
const KEEP_FREE_MAX_SLOTS: u64 = (64 << 20) / BLOCK_SIZE;

/// A raw RocksDB key and value.
type KeyValue = (Box<[u8]>, Box<[u8]>);

/// The on-disk [`ReplicaStore`]. See the module docs for the write, flush and recovery
/// protocols.
pub struct DiskStore {
    root: PathBuf,
    db: DB,
    volumes: RwLock<HashMap<String, Arc<Volume>>>,
    /// Serialises create/delete (volume numbering and the volume map).
    admin: Mutex<()>,
    /// Power-loss simulation: slot files remember what no fdatasync covered yet.
    track_unsynced: bool,
}

fn meta_err(context: impl Into<String>) -> impl FnOnce(rocksdb::Error) -> Error {
    let context = context.into();
    move |e| Error::Meta { context, message: e.into_string() }
}

fn corrupt_meta(what: &str) -> Error {
    Error::Meta { context: "decoding".into(), message: format!("malformed {what} record in the metadata store") }
}

/// Blocks of a byte range.
fn blocks(offset: u64, len: u64) -> std::ops::Range<u64> {
    offset / BLOCK_SIZE..(offset + len) / BLOCK_SIZE
}

/// Resync data chunks staged for one metadata batch (`apply_resync`).
struct ResyncGroup {
    batch: Batch,
    /// Opened by the first chunk.
    pages: Option<Pages>,
    allocs: Vec<Alloc>,
    hwm_before: u64,
    /// Blocks staged (a block seen again commits the group first).
    blocks: std::collections::HashSet<u64>,
    /// (block, its entry before, seq) per staged chunk.
    accounts: Vec<(u64, Option<Entry>, u64)>,
}

impl ResyncGroup {
    fn new() -> Self {
        Self {
            batch: Batch::default(),
            pages: None,
            allocs: Vec::new(),
            hwm_before: 0,
            blocks: Default::default(),
            accounts: Vec::new(),
        }
    }
}

/// How many writes from the start of `writes` touch no block twice (at least one).
fn disjoint_prefix(writes: &[BlockWrite<'_>]) -> usize {
    if writes.len() < 2 {
        return writes.len().max(1);
    }
    let mut seen: Vec<std::ops::Range<u64>> = Vec::with_capacity(writes.len());
    for (i, w) in writes.iter().enumerate() {
        let r = blocks(w.offset.get(), w.data.len() as u64);
        if seen.iter().any(|s| s.start < r.end && r.start < s.end) {
            return i.max(1);
        }
        seen.push(r);
    }
    writes.len()
}

/// The store format this build writes and the newest it reads. 2: metadata in pages
/// (`keys`); 1: one record per block (rewritten into pages at open, `upgrade`).
pub const FORMAT_VERSION: u32 = 2;
const FORMAT_FILE: &str = "FORMAT";

/// The format version of the store under `root` (1 if unrecorded); a newer one than this
/// build reads is refused.
fn check_format(root: &Path) -> Result<u32> {
    let path = root.join(FORMAT_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let version =
                text.trim().strip_prefix("hlstore-store ").and_then(|v| v.parse::<u32>().ok()).ok_or_else(|| {
                    Error::InvalidArgument(format!("{}: not an hlstore store format file ({text:?})", path.display()))
                })?;
            if version > FORMAT_VERSION {
                return Err(Error::Unsupported(format!(
                    "{} was written by a newer hlstore (store format {version}; this agent reads formats up to \
                     {FORMAT_VERSION}): run the newer version, or empty the directory and let the volumes' other \
                     replicas resync this node",
                    root.display()
                )));
            }
            Ok(version)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(1),
        Err(e) => Err(Error::io(format!("reading {}", path.display()), e)),
    }
}

impl DiskStore {
    /// Opens (or creates) the store under `root`, recovering every volume.
    pub fn open(root: impl AsRef<Path>) -> Result<Self> {
        Self::open_with(root, false)
    }

    /// Opens the store for power-loss tests: every slot file remembers which slots were
    /// written since its last fdatasync, and [`power_cut`](Self::power_cut) drops them.
    /// Costs a set insert per written slot; not for production use.
    pub fn open_simulating_power_loss(root: impl AsRef<Path>) -> Result<Self> {
        Self::open_with(root, true)
    }

    /// Simulates a power cut (store opened with
    /// [`open_simulating_power_loss`](Self::open_simulating_power_loss)): every slot no
    /// fdatasync covered loses its data (reads as zeroes), then the store closes without a
    /// flush. Metadata already handed to RocksDB survives (the hardest case for recovery:
    /// the map points at data that never reached the disk). Returns the slots lost.
    pub fn power_cut(self) -> Result<u64> {
        let vols: Vec<Arc<Volume>> = self.volumes.read().unwrap_or_else(|p| p.into_inner()).values().cloned().collect();
        let mut lost = 0;
        for v in vols {
            lost += v.file.lose_unsynced().map_err(|e| Error::io("simulated power cut", e))?;
        }
        Ok(lost)
    }

    fn open_with(root: impl AsRef<Path>, track_unsynced: bool) -> Result<Self> {
        let root = root.as_ref().to_path_buf();
        hlstore_core::durable_file::create_dir_all(&root.join("volumes"))?;
        let version = check_format(&root)?;
        let mut opts = Options::default();
        opts.create_if_missing(true);
        // Metadata pages are read with point lookups, many of keys that do not exist yet.
        let mut table = BlockBasedOptions::default();
        table.set_bloom_filter(10.0, false);
        opts.set_block_based_table_factory(&table);
        // Point-in-time recovery: RocksDB recovers a consistent prefix of the WAL.
        opts.set_wal_recovery_mode(rocksdb::DBRecoveryMode::PointInTime);
        let db = DB::open(&opts, root.join("meta")).map_err(meta_err(format!("opening {}/meta", root.display())))?;
        // RocksDB syncs its own directory, not the entry of `meta` in ours.
        hlstore_core::durable_file::sync_dir(&root)?;
        let store = Self { root, db, volumes: RwLock::new(HashMap::new()), admin: Mutex::new(()), track_unsynced };
        if version < FORMAT_VERSION {
            // Before any record changes: an older agent must not read a half-upgraded store.
            let path = store.root.join(FORMAT_FILE);
            hlstore_core::durable_file::write_atomic(&path, format!("hlstore-store {FORMAT_VERSION}\n").as_bytes())?;
        }
        store.upgrade_v1_records()?;
        store.load_volumes()?;
        Ok(store)
    }

    /// A number that grows with every metadata change (every write, trim, resync chunk,
    /// flush, snapshot or record change commits a metadata batch): unchanged between two
    /// looks means the store was idle in between.
    pub fn activity(&self) -> u64 {
        self.db.latest_sequence_number()
    }

    /// Hands back memory an idle store holds: writes the metadata memtables out to a table
    /// file if they hold at least `min_bytes` (a memtable's arena is freed only once it is
    /// written out; under load it grows to RocksDB's write buffer, 64 MiB, and an idle agent
    /// would keep it until the next burst filled it). Returns the memtables' size before.
    /// Durability is unchanged: what the memtables hold is in the write-ahead log already,
    /// and the unsynced marks of blocks whose data is not synced are written out with the
    /// rest (recovery treats them the same either way).
    pub fn release_idle_memory(&self, min_bytes: u64) -> Result<u64> {
        let size = self
            .db
            .property_int_value("rocksdb.cur-size-all-mem-tables")
            .map_err(meta_err("reading the memtable size"))?
            .unwrap_or(0);
        if size >= min_bytes {
            self.db.flush().map_err(meta_err("writing out the memtables"))?;
        }
        Ok(size)
    }

    /// Flushes every volume with changes since its last flush (the flush protocol of
    /// `flush`, without an epoch check: it only makes durable what is already applied).
    /// Run periodically by the node agent, so freed slots become reusable (and seq-index
    /// rollback records stop growing) without waiting for a client FLUSH. Returns how many
    /// volumes it flushed; the first error ends the pass.
    pub fn flush_dirty(&self) -> Result<usize> {
        let vols: Vec<(String, Arc<Volume>)> = self
            .volumes
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let mut flushed = 0;
        for (name, v) in vols {
            let dirty = {
                let g = volume::read(&v);
                g.st.last_seq != g.st.durable_seq || !g.pending.is_empty() || g.changes != g.synced_changes
            };
            if dirty {
                self.flush_volume(&name, &v)?;
                flushed += 1;
            }
        }
        Ok(flushed)
    }

    /// Bytes the volume's slot file occupies on disk (for space-reclaim checks).
    pub fn disk_usage(&self, volume: &str) -> Result<u64> {
        let v = self.vol(volume)?;
        v.file.disk_usage().map_err(|e| Error::io(format!("volume {volume}: stat"), e))
    }

    /// Where the block at `offset` is stored: the slot file and the byte offset in it
    /// (None if the block is unallocated). For diagnostics and damage tests.
    pub fn block_location(&self, volume: &str, offset: u64) -> Result<Option<(PathBuf, u64)>> {
        let v = self.vol(volume)?;
        let b = offset / BLOCK_SIZE;
        let entry = self.map_range(v.vid, b..b + 1)?.first().map(|(_, e)| *e);
        Ok(entry.map(|e| (self.slot_path(v.vid), e.slot * BLOCK_SIZE)))
    }

    fn slot_path(&self, vid: u32) -> PathBuf {
        self.root.join("volumes").join(format!("{vid}.slots"))
    }

    fn load_volumes(&self) -> Result<()> {
        let prefix = [keys::VOLUME];
        let mut found = Vec::new();
        for item in self.db.iterator(IteratorMode::From(&prefix, Direction::Forward)) {
            let (k, v) = item.map_err(meta_err("listing volumes"))?;
            if k.first() != Some(&keys::VOLUME) {
                break;
            }
            let sv: StoredVolume = serde_json::from_slice(&v).map_err(|_| corrupt_meta("volume"))?;
            found.push(sv);
        }
        let mut map = HashMap::new();
        for sv in found {
            let name = sv.record.volume_id.clone();
            let vol = self.load_volume(sv)?;
            recovery::recover(self, &name, &vol)?;
            map.insert(name, Arc::new(vol));
        }
        *self.volumes.write().unwrap_or_else(|p| p.into_inner()) = map;
        Ok(())
    }

    fn load_volume(&self, sv: StoredVolume) -> Result<Volume> {
        let name = &sv.record.volume_id;
        let st = match self.db.get(keys::state(sv.vid)).map_err(meta_err(format!("volume {name}: state")))? {
            Some(b) => PersistState::decode(&b).ok_or_else(|| corrupt_meta("state"))?,
            None => PersistState::default(),
        };
        let free_pages = pages::load_free(&self.db, sv.vid)?;
        let free: free::FreeSlots = free_pages.iter().flat_map(|(&page, &bits)| pages::bits_of(page, bits)).collect();
        let snaps = self.load_snapshots(sv.vid)?;
        let file = SlotFile::open(&self.slot_path(sv.vid), self.track_unsynced)
            .map_err(|e| Error::io(format!("volume {name}: opening slot file"), e))?;
        Ok(Volume {
            vid: sv.vid,
            file,
            inner: RwLock::new(VolInner {
                pages: PageState::seeded(free_pages),
                ..VolInner::new(sv.record, st, free, snaps)
            }),
            flush_lock: Mutex::new(()),
        })
    }

    /// All keys in `[prefix + from, end of prefix)` (from defaults to the prefix itself).
    fn scan(&self, prefix: &[u8], from: Option<&[u8]>) -> Result<Vec<KeyValue>> {
        self.scan_between(from.unwrap_or(prefix), keys::prefix_end(prefix))
    }

    /// Every record with a key in `[from, to)`.
    fn scan_between(&self, from: &[u8], to: Vec<u8>) -> Result<Vec<KeyValue>> {
        let mut ro = ReadOptions::default();
        ro.set_iterate_upper_bound(to);
        let mut out = Vec::new();
        for item in self.db.iterator_opt(IteratorMode::From(from, Direction::Forward), ro) {
            out.push(item.map_err(meta_err("scanning"))?);
        }
        Ok(out)
    }

    /// Map entries of blocks in `range`, as (block, entry).
    fn map_range(&self, vid: u32, range: std::ops::Range<u64>) -> Result<Vec<(u64, Entry)>> {
        let mut out = Vec::new();
        if range.is_empty() {
            return Ok(out);
        }
        let (first, last) = (range.start / keys::PAGE, (range.end - 1) / keys::PAGE);
        let mut add = |page: u64, v: &[u8]| {
            pages::for_each_entry(v, |i, e| {
                let b = page * keys::PAGE + i as u64;
                if range.contains(&b) {
                    out.push((b, e));
                }
            })
            .ok_or_else(|| corrupt_meta("map page"))
        };
        if first == last {
            // One page: a point lookup, cheaper than an iterator.
            let v = self.db.get_pinned(keys::map(vid, first)).map_err(meta_err("reading the block map"))?;
            if let Some(v) = v {
                add(first, &v)?;
            }
            return Ok(out);
        }
        let mut ro = ReadOptions::default();
        ro.set_iterate_upper_bound(keys::map(vid, last + 1));
        let start = keys::map(vid, first);
        for item in self.db.iterator_opt(IteratorMode::From(&start, Direction::Forward), ro) {
            let (k, v) = item.map_err(meta_err("reading the block map"))?;
            let page = keys::u64_at(&k, keys::FIELD0).ok_or_else(|| corrupt_meta("map key"))?;
            add(page, &v)?;
        }
        Ok(out)
    }

    /// The read of `ReplicaStore::read`; with `cached_only`, None where the metadata or the
    /// data is not in memory (the caller then reads on a thread that may block).
    fn read_blocks(
        &self,
        name: &str,
        epoch: Epoch,
        offset: Offset,
        len: u64,
        cached_only: bool,
    ) -> Result<Option<Vec<u8>>> {
        let epoch = epoch.get();
        let offset = offset.get();
        let v = self.vol(name)?;
        let g = if cached_only {
            // Never wait for a write batch holding the volume: the caller is not a thread
            // that may block.
            match v.inner.try_read() {
                Ok(g) => g,
                Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
                Err(std::sync::TryLockError::WouldBlock) => return Ok(None),
            }
        } else {
            volume::read(&v)
        };
        check::epoch(name, g.record.epoch, epoch)?;
        check::range(name, g.record.size, offset, len)?;
        check::read_len(name, len)?;
        let mut out = vec![0u8; len as usize];
        let range = blocks(offset, len);
        let entries = if cached_only {
            match self.map_range_cached(v.vid, range.clone())? {
                Some(e) => e,
                None => return Ok(None),
            }
        } else {
            self.map_range(v.vid, range.clone())?
        };
        let bs = BLOCK_SIZE as usize;
        // Read runs of blocks that are consecutive both in the volume and in the file.
        let mut i = 0;
        while i < entries.len() {
            let mut j = i + 1;
            while j < entries.len()
                && entries[j].0 == entries[j - 1].0 + 1
                && entries[j].1.slot == entries[j - 1].1.slot + 1
            {
                j += 1;
            }
            let at = (entries[i].0 - range.start) as usize * bs;
            let buf = &mut out[at..at + (j - i) * bs];
            let slot = entries[i].1.slot;
            let read = if cached_only { v.file.read_cached(slot, buf) } else { v.file.read(slot, buf).map(|()| true) };
            if !read.map_err(|e| Error::io(format!("volume {name}: reading block data"), e))? {
                return Ok(None);
            }
            for (k, (b, e)) in entries[i..j].iter().enumerate() {
                let actual = check::crc(&buf[k * bs..(k + 1) * bs]);
                if actual != e.crc {
                    return Err(Error::Corruption {
                        volume: name.into(),
                        offset: b * BLOCK_SIZE,
                        expected: e.crc,
                        actual,
                    });
                }
            }
            i = j;
        }
        Ok(Some(out))
    }

    /// [`map_range`](Self::map_range) of one map page (None if the range spans pages). The
    /// lookup is not bounded to memory (this RocksDB binding does not expose its read
    /// tiers): a map page that is in neither the memtable nor the block cache is read from
    /// an SST file, almost always in the page cache; the data read is bounded to memory.
    fn map_range_cached(&self, vid: u32, range: std::ops::Range<u64>) -> Result<Option<Vec<(u64, Entry)>>> {
        let mut out = Vec::new();
        if range.is_empty() {
            return Ok(Some(out));
        }
        let page = range.start / keys::PAGE;
        if (range.end - 1) / keys::PAGE != page {
            return Ok(None);
        }
        let v = self.db.get_pinned(keys::map(vid, page)).map_err(meta_err("reading the block map"))?;
        if let Some(v) = v {
            pages::for_each_entry(&v, |i, e| {
                let b = page * keys::PAGE + i as u64;
                if range.contains(&b) {
                    out.push((b, e));
                }
            })
            .ok_or_else(|| corrupt_meta("map page"))?;
        }
        Ok(Some(out))
    }

    /// The seq index from `from_seq` on, as (seq, block, its `QValue`), by seq then block.
    fn seq_index_from(&self, vid: u32, from_seq: u64) -> Result<Vec<(u64, u64, keys::QValue)>> {
        let mut out = Vec::new();
        let prefix = keys::vid_prefix(keys::SEQ, vid);
        for (k, val) in self.scan(&prefix, Some(&keys::with_u64(keys::SEQ, vid, from_seq)))? {
            let seq = keys::u64_at(&k, keys::FIELD0).ok_or_else(|| corrupt_meta("seq-index key"))?;
            let page = keys::u64_at(&k, keys::FIELD1).ok_or_else(|| corrupt_meta("seq-index key"))?;
            let entries = pages::decode_seq(&val).ok_or_else(|| corrupt_meta("seq-index page"))?;
            for (i, q) in entries.iter().enumerate() {
                if let Some(q) = q {
                    out.push((seq, page * keys::PAGE + i as u64, *q));
                }
            }
        }
        Ok(out)
    }

    fn vol(&self, volume: &str) -> Result<Arc<Volume>> {
        self.volumes
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(volume)
            .cloned()
            .ok_or_else(|| Error::NotFound(format!("volume {volume} has no replica on this node")))
    }

    fn commit(&self, batch: Batch, sync: bool, context: &str) -> Result<()> {
        let mut wo = WriteOptions::default();
        wo.set_sync(sync);
        wo.set_memtable_insert_hint_per_batch(true);
        self.db.write_opt(batch.into_write_batch(), &wo).map_err(meta_err(context.to_string()))
    }

    /// Opens the volume's metadata pages for one batch.
    fn pages(&self, v: &Volume, g: &mut VolInner) -> Result<Pages> {
        Pages::open(&self.db, v.vid, &mut g.pages, g.st.last_seq)
    }

    /// Commits `batch` with the pages staged in `pages`.
    fn commit_pages(&self, g: &mut VolInner, mut batch: Batch, pages: Pages, sync: bool, context: &str) -> Result<()> {
        let receipt = pages.stage(&mut batch);
        let committed = self.commit(batch, sync, context);
        receipt.settle(&mut g.pages, committed.is_ok())?;
        committed
    }

    fn put_record(&self, vid: u32, record: &VolumeRecord) -> Result<()> {
        let mut batch = Batch::default();
        Self::stage_record(&mut batch, vid, record)?;
        self.commit(batch, true, "writing volume record")
    }

    fn stage_record(batch: &mut Batch, vid: u32, record: &VolumeRecord) -> Result<()> {
        let sv = StoredVolume { vid, record: record.clone() };
        batch
            .put(keys::volume(&record.volume_id), serde_json::to_vec(&sv).map_err(|e| Error::Internal(e.to_string()))?);
        Ok(())
    }

    /// Writes `data` (whole blocks) for the blocks starting at `first`, each with `seq`.
    /// `olds[i]` is the current entry of block `first + i`. Caller holds the write lock and
    /// has checked epoch and range. Adds the metadata to `batch`; returns the allocations
    /// (so the caller can undo them if the batch fails).
    #[allow(clippy::too_many_arguments)]
    fn stage_blocks(
        &self,
        name: &str,
        v: &Volume,
        g: &mut VolInner,
        batch: &mut Batch,
        pages: &mut Pages,
        first: u64,
        data: &[u8],
        olds: &[Option<Entry>],
        seq: u64,
    ) -> Result<Vec<Alloc>> {
        let n = data.len() / BLOCK_SIZE as usize;
        let hwm_before = g.st.hwm;
        let allocs = g.alloc(n);
        let slots: Vec<u64> = allocs.iter().map(|a| a.slot).collect();
        let bs = BLOCK_SIZE as usize;
        let written = file::runs(&slots, |i, slot, count| v.file.write(slot, &data[i * bs..(i + count as usize) * bs]));
        if let Err(e) = written {
            g.unalloc(&allocs, hwm_before);
            return Err(Error::io(format!("volume {name}: writing block data"), e));
        }
        g.changes += 1;
        let staged = self.stage_entries(v, g, batch, pages, first, data, olds, seq, &allocs);
        if let Err(e) = staged {
            g.unalloc(&allocs, hwm_before);
            return Err(e);
        }
        Ok(allocs)
    }

    /// The metadata part of [`stage_blocks`](Self::stage_blocks).
    #[allow(clippy::too_many_arguments)]
    fn stage_entries(
        &self,
        v: &Volume,
        g: &mut VolInner,
        batch: &mut Batch,
        pages: &mut Pages,
        first: u64,
        data: &[u8],
        olds: &[Option<Entry>],
        seq: u64,
        allocs: &[Alloc],
    ) -> Result<()> {
        let bs = BLOCK_SIZE as usize;
        let db = &self.db;
        for (i, a) in allocs.iter().enumerate() {
            let b = first + i as u64;
            let entry = Entry { slot: a.slot, crc: check::crc(&data[i * bs..(i + 1) * bs]), seq };
            pages.set_entry(db, b, Some(entry))?;
            // What to roll back to if this content is lost: the newest durable entry. If the
            // current one is not durable itself, it rolls back with this one.
            let qv = match olds[i] {
                Some(old) => {
                    let qv = if g.is_unsynced(b, old.seq) {
                        let before = pages.qvalue(db, old.seq, b)?.unwrap_or_default();
                        keys::QValue {
                            prev: before.prev,
                            skipped: Some(before.skipped.map_or(old.seq, |s| s.min(old.seq))),
                        }
                    } else {
                        keys::QValue { prev: Some(old), skipped: None }
                    };
                    pages.set_qvalue(db, old.seq, b, None)?;
                    if volume::preserves(&g.snaps, old.seq, seq) {
                        batch.put(keys::preserved(v.vid, b, old.seq), Entry { seq, ..old }.encode());
                    } else {
                        pages.set_free(db, old.slot, true)?;
                    }
                    qv
                }
                None => keys::QValue::default(),
            };
            pages.set_qvalue(db, seq, b, Some(qv))?;
            // Content at or below the durable mark is not covered by recovery's scan of the
            // seqs above it: mark it until a flush synced it.
            if seq <= g.st.durable_seq {
                pages.set_unsynced(db, b, true)?;
                g.unsynced.insert(b, g.changes);
            } else if g.unsynced.contains_key(&b) {
                pages.set_unsynced(db, b, false)?;
            }
            if a.from_free {
                pages.set_free(db, a.slot, false)?;
            }
        }
        Ok(())
    }

    /// After a staged batch for the blocks from `first` committed: account freed slots,
    /// allocation changes and unsynced marks.
    fn account(g: &mut VolInner, first: u64, olds: &[Option<Entry>], seq: u64) {
        if seq > g.st.durable_seq {
            for b in first..first + olds.len() as u64 {
                g.unsynced.remove(&b);
            }
        }
        for old in olds.iter().flatten() {
            if !volume::preserves(&g.snaps, old.seq, seq) {
                g.pending.push((seq, old.slot, false));
            }
        }
        g.st.allocated_blocks += olds.iter().filter(|o| o.is_none()).count() as u64;
    }

    /// Applies writes whose block ranges do not overlap with one RocksDB batch (each
    /// block's current entry is read from RocksDB, so one batch never writes a block twice).
    /// Caller holds the write lock and has checked epoch, ranges and seqs.
    fn commit_writes(&self, name: &str, v: &Volume, g: &mut VolInner, writes: &[BlockWrite<'_>]) -> Result<()> {
        let mut batch = Batch::default();
        let mut pages = self.pages(v, g)?;
        let hwm_before = g.st.hwm;
        let mut allocs = Vec::new();
        let mut staged = Vec::with_capacity(writes.len());
        for w in writes.iter().filter(|w| !w.data.is_empty()) {
            let range = blocks(w.offset.get(), w.data.len() as u64);
            let olds: Result<Vec<Option<Entry>>> = range.clone().map(|b| pages.entry(&self.db, b)).collect();
            let found = olds.and_then(|olds| {
                let a = self.stage_blocks(name, v, g, &mut batch, &mut pages, range.start, w.data, &olds, w.seq.get());
                a.map(|a| (a, olds))
            });
            let olds = match found {
                Ok((a, olds)) => {
                    allocs.extend(a);
                    olds
                }
                Err(e) => {
                    g.unalloc(&allocs, hwm_before);
                    return Err(e);
                }
            };
            staged.push((range.start, olds, w.seq.get()));
        }
        if staged.is_empty() {
            pages.abandon(&mut g.pages);
            return Ok(());
        }
        let mut st = g.st;
        for (_, olds, seq) in &staged {
            st.last_seq = st.last_seq.max(*seq);
            st.allocated_blocks += olds.iter().filter(|o| o.is_none()).count() as u64;
        }
        batch.put(keys::state(v.vid), st.encode());
        if let Err(e) = self.commit_pages(g, batch, pages, false, "writing block map") {
            g.unalloc(&allocs, hwm_before);
            return Err(e);
        }
        for (first, olds, seq) in &staged {
            Self::account(g, *first, olds, *seq);
        }
        g.st.last_seq = st.last_seq;
        Ok(())
    }

    /// Commits the resync data chunks staged in `group` (one batch) and accounts them.
    fn commit_resync_group(&self, v: &Volume, g: &mut VolInner, group: &mut ResyncGroup) -> Result<()> {
        if group.accounts.is_empty() {
            // Pages read for chunks that were skipped: stale once anything else commits.
            if let Some(p) = std::mem::replace(group, ResyncGroup::new()).pages {
                p.abandon(&mut g.pages);
            }
            return Ok(());
        }
        let group = std::mem::replace(group, ResyncGroup::new());
        let mut batch = group.batch;
        let pages = group.pages.ok_or_else(|| Error::Internal("resync chunks staged without pages".into()))?;
        let mut st = g.st;
        for (_, old, seq) in &group.accounts {
            st.last_seq = st.last_seq.max(*seq);
            st.allocated_blocks += u64::from(old.is_none());
        }
        batch.put(keys::state(v.vid), st.encode());
        if let Err(e) = self.commit_pages(g, batch, pages, false, "applying resync blocks") {
            g.unalloc(&group.allocs, group.hwm_before);
            return Err(e);
        }
        for (first, old, seq) in &group.accounts {
            Self::account(g, *first, &[*old], *seq);
        }
        g.st.last_seq = st.last_seq;
        Ok(())
    }

    /// Removes the blocks in `range` whose seq is older than `older_than` (all if None),
    /// adding the metadata to `batch`. Returns the removed entries.
    #[allow(clippy::too_many_arguments)]
    /// Reads the map as committed: no other change to these blocks may be staged.
    #[allow(clippy::too_many_arguments)]
    fn stage_trim(
        &self,
        v: &Volume,
        snaps: &volume::Snaps,
        batch: &mut Batch,
        pages: &mut Pages,
        range: std::ops::Range<u64>,
        seq: u64,
        older_than: Option<u64>,
    ) -> Result<Vec<Entry>> {
        let mut removed = Vec::new();
        let db = &self.db;
        for (b, e) in self.map_range(v.vid, range.clone())? {
            if older_than.is_some_and(|s| e.seq >= s) {
                continue;
            }
            pages.set_entry(db, b, None)?;
            pages.set_qvalue(db, e.seq, b, None)?;
            if volume::preserves(snaps, e.seq, seq) {
                batch.put(keys::preserved(v.vid, b, e.seq), Entry { seq, ..e }.encode());
            } else {
                pages.set_free(db, e.slot, true)?;
            }
            removed.push(e);
        }
        // One record per (seq, offset): a second trim there (a resync sends a trim and a
        // zero block with the same seq and offset) must not shorten the first.
        let key = keys::trim(v.vid, seq, range.start * BLOCK_SIZE);
        let mut len = (range.end - range.start) * BLOCK_SIZE;
        if let Some(old) = self.db.get(&key).map_err(meta_err("reading a trim record"))? {
            len = len.max(keys::u64_at(&old, 0).ok_or_else(|| corrupt_meta("trim value"))?);
        }
        batch.put(key, len.to_be_bytes());
        Ok(removed)
    }

    fn account_trim(g: &mut VolInner, removed: &[Entry], seq: u64) {
        for e in removed {
            if !volume::preserves(&g.snaps, e.seq, seq) {
                g.pending.push((seq, e.slot, true));
            }
        }
        g.st.allocated_blocks -= removed.len() as u64;
    }

    /// The flush protocol (see module docs). Returns the durable seq.
    fn flush_volume(&self, name: &str, v: &Volume) -> Result<u64> {
        let _serial = v.flush_lock.lock().unwrap_or_else(|p| p.into_inner());
        let (target, changes, unsynced) = {
            let g = volume::read(v);
            // Seqs alone cannot tell whether anything is unsynced: resync chunks carry
            // seqs at or below the durable mark.
            if g.st.last_seq == g.st.durable_seq && g.pending.is_empty() && g.changes == g.synced_changes {
                return Ok(g.st.durable_seq);
            }
            (g.st.last_seq, g.changes, g.unsynced.clone())
        };
        v.file.sync().map_err(|e| Error::io(format!("volume {name}: fdatasync"), e))?;
        {
            let mut g = volume::write(v);
            let mut st = g.st;
            st.durable_seq = st.durable_seq.max(target);
            let mut batch = Batch::default();
            batch.put(keys::state(v.vid), st.encode());
            // Blocks synced above and not rewritten since lose their unsynced mark.
            let mut pages = self.pages(v, &mut g)?;
            let mut cleared = Vec::new();
            for (b, at) in unsynced {
                if g.unsynced.get(&b) == Some(&at) {
                    pages.set_unsynced(&self.db, b, false)?;
                    cleared.push(b);
                }
            }
            self.commit_pages(&mut g, batch, pages, false, "writing durable mark")?;
            for b in cleared {
                g.unsynced.remove(&b);
            }
            g.st.durable_seq = st.durable_seq;
            g.synced_changes = g.synced_changes.max(changes);
        }
        self.db.flush_wal(true).map_err(meta_err(format!("volume {name}: syncing metadata")))?;
        // Slots freed by writes that are now durable can be reused: punch them first.
        let mut slots = {
            let mut g = volume::write(v);
            let (ready, keep): (Vec<_>, Vec<_>) = g.pending.iter().partition(|(s, _, _)| *s <= target);
            g.pending = keep;
            // Slots freed by overwrites stay allocated for reuse (a write into them lands on
            // pages already in the page cache and blocks already allocated), up to a bound;
            // trimmed ones and the rest are punched, so the space goes back to the filesystem.
            let keep_slots = (g.st.allocated_blocks / KEEP_FREE_FRACTION).min(KEEP_FREE_MAX_SLOTS) as usize;
            let mut reuse: Vec<u64> = ready.iter().filter(|p| !p.2).map(|p| p.1).collect();
            // Slots a snapshot delete freed before `changes` was read above.
            g.reclaimed.retain(|&(at, slot)| {
                if at <= changes {
                    reuse.push(slot);
                }
                at > changes
            });
            let mut slots: Vec<u64> = ready.iter().filter(|p| p.2).map(|p| p.1).collect();
            reuse.sort_unstable();
            // Over the bound (the live data shrank): punch the highest kept slots first
            // (out of the free list until punched).
            while g.reusable.len() > keep_slots {
                // (Kept slots are free ones: a slot the free list lacks is not punched.)
                if let Some(slot) = g.reusable.pop_last().filter(|&s| g.free.remove(s)) {
                    slots.push(slot);
                }
            }
            let room = keep_slots.saturating_sub(g.reusable.len()).min(reuse.len());
            slots.extend(reuse.drain(room..));
            g.free.extend(reuse.iter().copied());
            g.reusable.extend(reuse);
            slots
        };
        if slots.is_empty() {
            return Ok(volume::read(v).st.durable_seq);
        }
        // Punched without the volume lock: punching scattered slots is a filesystem
        // transaction per run (and a discard each where the filesystem is mounted with
        // `discard`): a quarter of a replica's time in a 1 MiB rewrite of randomly written
        // blocks, with writes waiting for the lock. Nothing can allocate these slots
        // meanwhile: they are in no free list until punched.
        slots.sort_unstable();
        let punched = file::runs(&slots, |_, slot, count| v.file.punch(slot, count));
        if let Err(e) = punched {
            tracing::warn!(volume.id = name, error = %e, "could not punch freed slots; space is reused but not returned");
        }
        let mut g = volume::write(v);
        g.free.extend(slots);
        Ok(g.st.durable_seq)
    }

    fn with_io<T>(&self, name: &str, epoch: u64, f: impl FnOnce(&Volume, &mut VolInner) -> Result<T>) -> Result<T> {
        let v = self.vol(name)?;
        let mut g = volume::write(&v);
        check::epoch(name, g.record.epoch, epoch)?;
        f(&v, &mut g)
    }
}

impl ReplicaStore for DiskStore {
    fn create(&self, record: VolumeRecord) -> Result<ReplicaInfo> {
        check::record(&record)?;
        let _admin = self.admin.lock().unwrap_or_else(|p| p.into_inner());
        if let Ok(v) = self.vol(&record.volume_id) {
            let g = volume::read(&v);
            if g.record.same_definition(&record) {
                return Ok(ReplicaInfo { record: g.record.clone(), state: g.state() });
            }
            return Err(Error::AlreadyExists(format!(
                "volume {} exists with a different definition",
                record.volume_id
            )));
        }
        let vid = match self.db.get(keys::NEXT_VID).map_err(meta_err("reading volume counter"))? {
            Some(b) => u32::from_be_bytes(b.as_slice().try_into().map_err(|_| corrupt_meta("volume counter"))?),
            None => 1,
        };
        let file = SlotFile::open(&self.slot_path(vid), self.track_unsynced)
            .map_err(|e| Error::io(format!("volume {}: creating slot file", record.volume_id), e))?;
        // The slot file's name must be durable before the record that points to it.
        hlstore_core::durable_file::sync_dir(&self.root.join("volumes"))?;
        let sv = StoredVolume { vid, record: record.clone() };
        let mut batch = Batch::default();
        batch.put(keys::NEXT_VID, (vid + 1).to_be_bytes());
        batch
            .put(keys::volume(&record.volume_id), serde_json::to_vec(&sv).map_err(|e| Error::Internal(e.to_string()))?);
        batch.put(keys::state(vid), PersistState::default().encode());
        self.commit(batch, true, "creating volume")?;
        let vol = Volume {
            vid,
            file,
            inner: RwLock::new(VolInner::new(record, PersistState::default(), Default::default(), Default::default())),
            flush_lock: Mutex::new(()),
        };
        let info = ReplicaInfo { record: volume::read(&vol).record.clone(), state: volume::read(&vol).state() };
        self.volumes.write().unwrap_or_else(|p| p.into_inner()).insert(info.record.volume_id.clone(), Arc::new(vol));
        Ok(info)
    }

    fn delete(&self, name: &str) -> Result<bool> {
        let _admin = self.admin.lock().unwrap_or_else(|p| p.into_inner());
        let Ok(v) = self.vol(name) else { return Ok(false) };
        let _g = volume::write(&v);
        let mut batch = Batch::default();
        batch.delete(keys::volume(name));
        for tag in keys::PER_VOLUME {
            let p = keys::vid_prefix(tag, v.vid);
            batch.delete_range(&p, keys::prefix_end(&p));
        }
        self.commit(batch, true, "deleting volume")?;
        self.volumes.write().unwrap_or_else(|p| p.into_inner()).remove(name);
        if let Err(e) = std::fs::remove_file(self.slot_path(v.vid)) {
            tracing::warn!(volume.id = name, error = %e, "could not remove slot file");
        }
        Ok(true)
    }

    fn list(&self) -> Result<Vec<ReplicaInfo>> {
        let vols: Vec<Arc<Volume>> = self.volumes.read().unwrap_or_else(|p| p.into_inner()).values().cloned().collect();
        let mut out: Vec<ReplicaInfo> = vols
            .iter()
            .map(|v| {
                let g = volume::read(v);
                ReplicaInfo { record: g.record.clone(), state: g.state() }
            })
            .collect();
        out.sort_by(|a, b| a.record.volume_id.cmp(&b.record.volume_id));
        Ok(out)
    }

    fn info(&self, name: &str) -> Result<ReplicaInfo> {
        let v = self.vol(name)?;
        let g = volume::read(&v);
        Ok(ReplicaInfo { record: g.record.clone(), state: g.state() })
    }

    fn claim(&self, name: &str, claim: &Claim) -> Result<ReplicaState> {
        check::new_epoch(name, claim.epoch)?;
        let v = self.vol(name)?;
        let mut g = volume::write(&v);
        if let Some((epoch, owner)) = check::claim(name, g.record.epoch, g.record.owner, claim)? {
            let mut rec = g.record.clone();
            rec.epoch = epoch;
            rec.owner = owner;
            rec.owner_node = if owner == 0 { String::new() } else { claim.owner_node.clone() };
            self.put_record(v.vid, &rec)?;
            g.record = rec;
        }
        Ok(g.state())
    }

    fn state(&self, name: &str) -> Result<ReplicaState> {
        Ok(volume::read(&*self.vol(name)?).state())
    }

    fn write(&self, name: &str, epoch: Epoch, seq: Seq, offset: Offset, data: &[u8], fua: bool) -> Result<Seq> {
        self.write_many(name, epoch, &[BlockWrite { seq, offset, data }], fua)
    }

    fn write_many(&self, name: &str, epoch: Epoch, writes: &[BlockWrite<'_>], fua: bool) -> Result<Seq> {
        let durable = self.with_io(name, epoch.get(), |v, g| {
            for w in writes {
                check::range(name, g.record.size, w.offset.get(), w.data.len() as u64)?;
                check::seq(name, w.seq.get())?;
            }
            let mut rest = writes;
            while !rest.is_empty() {
                let n = disjoint_prefix(rest);
                self.commit_writes(name, v, g, &rest[..n])?;
                rest = &rest[n..];
            }
            Ok(g.st.durable_seq)
        })?;
        if fua {
            let v = self.vol(name)?;
            return self.flush_volume(name, &v).map(Seq);
        }
        Ok(Seq(durable))
    }

    fn read(&self, name: &str, epoch: Epoch, offset: Offset, len: u64) -> Result<Vec<u8>> {
        self.read_blocks(name, epoch, offset, len, false)?
            .ok_or_else(|| Error::Internal("a blocking read did not answer".into()))
    }

    fn try_read_cached(&self, name: &str, epoch: Epoch, offset: Offset, len: u64) -> Result<Option<Vec<u8>>> {
        self.read_blocks(name, epoch, offset, len, true)
    }

    fn flush(&self, name: &str, epoch: Epoch) -> Result<Seq> {
        let epoch = epoch.get();
        let v = self.vol(name)?;
        check::epoch(name, volume::read(&v).record.epoch, epoch)?;
        self.flush_volume(name, &v).map(Seq)
    }

    fn trim(&self, name: &str, epoch: Epoch, seq: Seq, offset: Offset, len: u64) -> Result<()> {
        let epoch = epoch.get();
        let seq = seq.get();
        let offset = offset.get();
        self.with_io(name, epoch, |v, g| {
            check::range(name, g.record.size, offset, len)?;
            check::seq(name, seq)?;
            if len == 0 {
                return Ok(());
            }
            let mut batch = Batch::default();
            let mut pages = self.pages(v, g)?;
            let removed = self.stage_trim(v, &g.snaps, &mut batch, &mut pages, blocks(offset, len), seq, None)?;
            let mut st = g.st;
            st.last_seq = st.last_seq.max(seq);
            st.allocated_blocks -= removed.len() as u64;
            batch.put(keys::state(v.vid), st.encode());
            g.changes += 1;
            self.commit_pages(g, batch, pages, false, "trimming")?;
            Self::account_trim(g, &removed, seq);
            g.st.last_seq = st.last_seq;
            Ok(())
        })
    }

    fn expand(&self, name: &str, epoch: Epoch, new_size: u64) -> Result<ReplicaInfo> {
        let epoch = epoch.get();
        self.with_io(name, epoch, |v, g| {
            check::new_size(name, g.record.size, new_size)?;
            let mut rec = g.record.clone();
            rec.size = new_size;
            self.put_record(v.vid, &rec)?;
            g.record = rec;
            Ok(ReplicaInfo { record: g.record.clone(), state: g.state() })
        })
    }

    fn set_replica_set(&self, name: &str, epoch: Epoch, replica_set: Vec<String>) -> Result<ReplicaInfo> {
        let epoch = epoch.get();
        check::new_epoch(name, epoch)?;
        let v = self.vol(name)?;
        let mut g = volume::write(&v);
        if epoch < g.record.epoch {
            return Err(Error::StaleEpoch { volume: name.into(), got: epoch, current: g.record.epoch });
        }
        let mut rec = g.record.clone();
        if epoch > rec.epoch {
            // A new epoch belongs to no engine until one claims it.
            rec.owner = 0;
            rec.owner_node.clear();
        }
        rec.epoch = epoch;
        rec.replica_set = replica_set;
        self.put_record(v.vid, &rec)?;
        g.record = rec;
        Ok(ReplicaInfo { record: g.record.clone(), state: g.state() })
    }

    fn set_labels(&self, name: &str, labels: BTreeMap<String, String>) -> Result<ReplicaInfo> {
        check::labels(name, &labels)?;
        let v = self.vol(name)?;
        let mut g = volume::write(&v);
        let mut rec = g.record.clone();
        check::apply_labels(&mut rec.labels, labels);
        self.put_record(v.vid, &rec)?;
        g.record = rec;
        Ok(ReplicaInfo { record: g.record.clone(), state: g.state() })
    }

    fn changes_since(&self, name: &str, epoch: Epoch, since: Seq) -> Result<Vec<Change>> {
        let epoch = epoch.get();
        let since = since.get();
        let v = self.vol(name)?;
        let _g = volume::read(&v);
        check::epoch(name, _g.record.epoch, epoch)?;
        let from_seq = since.saturating_add(1);
        let mut out = Vec::new();
        let tp = keys::vid_prefix(keys::TRIM, v.vid);
        for (k, val) in self.scan(&tp, Some(&keys::with_u64(keys::TRIM, v.vid, from_seq)))? {
            let seq = keys::u64_at(&k, keys::FIELD0).ok_or_else(|| corrupt_meta("trim key"))?;
            let offset = keys::u64_at(&k, keys::FIELD1).ok_or_else(|| corrupt_meta("trim key"))?;
            let len = keys::u64_at(&val, 0).ok_or_else(|| corrupt_meta("trim value"))?;
            out.push(Change::Trim { offset, len, seq });
        }
        let mut blocks: Vec<(u64, u64)> = Vec::new();
        for (seq, b, _) in self.seq_index_from(v.vid, from_seq)? {
            blocks.push((b, seq));
        }
        blocks.sort_unstable();
        out.extend(blocks.into_iter().map(|(b, seq)| Change::Block { offset: b * BLOCK_SIZE, seq }));
        Ok(out)
    }

    fn begin_resync(
        &self,
        name: &str,
        epoch: Epoch,
        from_seq: Seq,
        resume: bool,
        history: History,
    ) -> Result<ReplicaState> {
        let epoch = epoch.get();
        let from_seq = from_seq.get();
        check::seq(name, from_seq)?;
        self.with_io(name, epoch, |v, g| {
            let mut st = g.st;
            if !resume || st.resync_from != Some(from_seq) || st.resync_done_epoch != epoch {
                st.resync_done = None;
            }
            st.resync_from = Some(st.resync_from.map_or(from_seq, |f| f.min(from_seq)));
            let mut batch = Batch::default();
            batch.put(keys::state(v.vid), st.encode());
            // The mark and the history it is a point of are durable together.
            let mut rec = g.record.clone();
            if !history.is_empty() {
                rec.history = history.entries().to_vec();
                Self::stage_record(&mut batch, v.vid, &rec)?;
            }
            self.commit(batch, true, "marking resync")?;
            g.st.resync_from = st.resync_from;
            g.st.resync_done = st.resync_done;
            g.record = rec;
            Ok(g.state())
        })
    }

    fn set_history(&self, name: &str, epoch: Epoch, history: History) -> Result<ReplicaState> {
        let epoch = epoch.get();
        self.with_io(name, epoch, |v, g| {
            let mut rec = g.record.clone();
            rec.history = history.entries().to_vec();
            if rec != g.record {
                self.put_record(v.vid, &rec)?;
                g.record = rec;
            }
            Ok(g.state())
        })
    }

    fn checkpoint_resync(&self, name: &str, epoch: Epoch, offset: Offset) -> Result<ReplicaState> {
        let epoch = epoch.get();
        let offset = offset.get();
        let v = self.vol(name)?;
        check::epoch(name, volume::read(&v).record.epoch, epoch)?;
        // Everything applied so far (every chunk below `offset`) becomes durable first.
        let durable = self.flush_volume(name, &v)?;
        self.with_io(name, epoch, |v, g| {
            if g.st.resync_from.is_none() {
                return Err(Error::InvalidArgument(format!("volume {name}: no resync in progress")));
            }
            let mut st = g.st;
            st.resync_done = Some((offset, durable));
            st.resync_done_epoch = epoch;
            let mut batch = Batch::default();
            batch.put(keys::state(v.vid), st.encode());
            self.commit(batch, true, "recording resync progress")?;
            g.st.resync_done = st.resync_done;
            g.st.resync_done_epoch = st.resync_done_epoch;
            Ok(g.state())
        })
    }

    fn apply_resync(&self, name: &str, epoch: Epoch, chunks: &[ResyncChunk]) -> Result<ApplyStats> {
        let epoch = epoch.get();
        let stats = self.with_io(name, epoch, |v, g| {
            let mut stats = ApplyStats::default();
            // Data chunks of distinct blocks are applied with one metadata batch; a trim,
            // a zero block or a block seen again in the group commits the group first.
            let mut group = ResyncGroup::new();
            for c in chunks {
                let len = check::resync_chunk(name, g.record.size, c)?;
                let range = blocks(c.offset, len);
                if let ChunkData::Data(d) = &c.data {
                    if group.blocks.contains(&range.start) {
                        self.commit_resync_group(v, g, &mut group)?;
                    }
                    if group.pages.is_none() {
                        group.pages = Some(self.pages(v, g)?);
                    }
                    let pages = group.pages.as_mut().expect("opened above");
                    let old = pages.entry(&self.db, range.start)?;
                    if old.is_some_and(|e| e.seq >= c.seq) {
                        stats.skipped_newer += 1;
                        continue;
                    }
                    if group.accounts.is_empty() {
                        group.hwm_before = g.st.hwm;
                    }
                    let staged = self.stage_blocks(name, v, g, &mut group.batch, pages, range.start, d, &[old], c.seq);
                    match staged {
                        Ok(allocs) => group.allocs.extend(allocs),
                        Err(e) => {
                            g.unalloc(&group.allocs, group.hwm_before);
                            return Err(e);
                        }
                    }
                    group.blocks.insert(range.start);
                    group.accounts.push((range.start, old, c.seq));
                    stats.applied += 1;
                    continue;
                }
                self.commit_resync_group(v, g, &mut group)?;
                let mut batch = Batch::default();
                let mut st = g.st;
                st.last_seq = st.last_seq.max(c.seq);
                match &c.data {
                    ChunkData::Trim(_) => {
                        let mut pages = self.pages(v, g)?;
                        let removed =
                            self.stage_trim(v, &g.snaps, &mut batch, &mut pages, range, c.seq, Some(c.seq))?;
                        st.allocated_blocks -= removed.len() as u64;
                        batch.put(keys::state(v.vid), st.encode());
                        g.changes += 1;
                        self.commit_pages(g, batch, pages, false, "applying resync trim")?;
                        Self::account_trim(g, &removed, c.seq);
                    }
                    _ => {
                        let old = self.map_range(v.vid, range.clone())?.first().map(|(_, e)| *e);
                        if old.is_some_and(|e| e.seq >= c.seq) {
                            stats.skipped_newer += 1;
                            continue;
                        }
                        let mut pages = self.pages(v, g)?;
                        let removed = self.stage_trim(v, &g.snaps, &mut batch, &mut pages, range, c.seq, None)?;
                        st.allocated_blocks -= removed.len() as u64;
                        batch.put(keys::state(v.vid), st.encode());
                        g.changes += 1;
                        self.commit_pages(g, batch, pages, false, "applying resync zero block")?;
                        Self::account_trim(g, &removed, c.seq);
                    }
                }
                g.st.last_seq = st.last_seq;
                stats.applied += 1;
            }
            self.commit_resync_group(v, g, &mut group)?;
            Ok(stats)
        })?;
        // Resync batches come back to back and end in a flush (a checkpoint or the end of
        // the resync) that the engine waits for: the data's writeback starts now, behind
        // the copy, instead of all of it in that flush (a 1 % resync spent a quarter of its
        // time in the final fdatasync).
        if stats.applied > 0 {
            if let Err(e) = self.vol(name).and_then(|v| {
                v.file.start_writeback().map_err(|e| Error::io(format!("volume {name}: starting writeback"), e))
            }) {
                tracing::debug!(volume.id = name, error = %e, "could not start the writeback of resync data");
            }
        }
        Ok(stats)
    }

    fn create_snapshot(&self, name: &str, epoch: Epoch, snap: SnapshotInfo) -> Result<SnapshotInfo> {
        let epoch = epoch.get();
        self.snap_create(name, epoch, snap)
    }

    fn delete_snapshot(&self, name: &str, epoch: Epoch, snap: &str) -> Result<bool> {
        let epoch = epoch.get();
        self.snap_delete(name, epoch, snap)
    }

    fn install_snapshot(
        &self,
        name: &str,
        epoch: Epoch,
        snap: SnapshotInfo,
        blocks: &[(u64, Option<Vec<u8>>)],
        last: bool,
    ) -> Result<SnapshotInfo> {
        let epoch = epoch.get();
        self.snap_install(name, epoch, snap, blocks, last)
    }

    fn list_snapshots(&self, name: &str) -> Result<Vec<SnapshotInfo>> {
        self.snap_list(name)
    }

    fn read_snapshot(&self, name: &str, snap: &str, offset: Offset, len: u64) -> Result<Vec<u8>> {
        let offset = offset.get();
        self.snap_read(name, snap, offset, len)
    }

    fn changed_blocks(&self, name: &str, from: Option<&str>, to: Option<&str>) -> Result<Vec<u64>> {
        self.snap_changed(name, from, to)
    }

    fn end_resync(&self, name: &str, epoch: Epoch) -> Result<ReplicaState> {
        let epoch = epoch.get();
        let v = self.vol(name)?;
        check::epoch(name, volume::read(&v).record.epoch, epoch)?;
        self.flush_volume(name, &v)?;
        self.with_io(name, epoch, |v, g| {
            let mut st = g.st;
            st.resync_from = None;
            st.resync_done = None;
            let mut batch = Batch::default();
            batch.put(keys::state(v.vid), st.encode());
            self.commit(batch, true, "clearing resync mark")?;
            g.st.resync_from = None;
            g.st.resync_done = None;
            Ok(g.state())
        })
    }
}

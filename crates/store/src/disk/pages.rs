//! Metadata pages: the block map and the seq index in records of [`PAGE`] blocks, the
//! unsynced marks and the free list in bitmaps of [`BITS_PAGE`] blocks (slots), and [`Pages`], the pages one metadata batch
//! changes, read once and written once.
//!
//! Per-block records cost a memtable insert (a skip-list search with key comparisons) per
//! block and per kind: a 1 MiB write was ~1,300 of them per replica, and they were most of
//! the store's CPU time. In pages, a write costs a few inserts per 256 KiB it touches; the
//! logic stays per block (the store reads and sets entries of a page in memory).
//!
//! Encodings (all integers big-endian):
//! - map page: runs `[index u8][count u8][slot u64][seq u64][crc u32 × count]`, a run
//!   being blocks at consecutive indexes with consecutive slots and one seq; an empty
//!   page has no record.
//! - seq-index page: `[bitmap u64]` then, for each set bit in order, `[len u8]` and the
//!   block's [`QValue`] encoding.
//! - free-list and unsynced pages: `[bitmap u64]`.

use std::collections::{BTreeMap, HashMap};

use rocksdb::DB;

use hlstore_core::error::{Error, Result};

use super::batch::Batch;
use super::keys::{self, Entry, QValue, BITS_PAGE, PAGE};
use super::{corrupt_meta, meta_err};

const N: usize = PAGE as usize;

/// A map page: the entry of each of its blocks.
pub type MapPage = [Option<Entry>; N];
/// A seq-index page: the `QValue` of each of its blocks written at the page's seq.
pub type SeqPage = [Option<QValue>; N];

/// The map or seq-index page of a block and its index in the page.
pub fn split(b: u64) -> (u64, usize) {
    (b / PAGE, (b % PAGE) as usize)
}

/// The bitmap page of a slot (block) and its bit.
pub fn split_bits(b: u64) -> (u64, usize) {
    (b / BITS_PAGE, (b % BITS_PAGE) as usize)
}

pub fn encode_map(p: &MapPage) -> Vec<u8> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < N {
        let Some(e) = p[i] else {
            i += 1;
            continue;
        };
        let mut j = i + 1;
        while j < N && p[j].is_some_and(|f| f.seq == e.seq && f.slot == e.slot + (j - i) as u64) {
            j += 1;
        }
        out.push(i as u8);
        out.push((j - i) as u8);
        out.extend_from_slice(&e.slot.to_be_bytes());
        out.extend_from_slice(&e.seq.to_be_bytes());
        for f in p[i..j].iter().flatten() {
            out.extend_from_slice(&f.crc.to_be_bytes());
        }
        i = j;
    }
    out
}

/// Calls `f(index, entry)` for each entry of an encoded map page, in index order, without
/// building the page. Returns None if the page is malformed.
pub fn for_each_entry(mut b: &[u8], mut f: impl FnMut(usize, Entry)) -> Option<()> {
    while !b.is_empty() {
        let (i, n) = (*b.first()? as usize, *b.get(1)? as usize);
        if n == 0 || i + n > N || b.len() < 18 + 4 * n {
            return None;
        }
        let slot = keys::u64_at(b, 2)?;
        let seq = keys::u64_at(b, 10)?;
        slot.checked_add(n as u64)?;
        for k in 0..n {
            let crc = u32::from_be_bytes(b[18 + 4 * k..22 + 4 * k].try_into().ok()?);
            f(i + k, Entry { slot: slot + k as u64, crc, seq });
        }
        b = &b[18 + 4 * n..];
    }
    Some(())
}

pub fn decode_map(b: &[u8]) -> Option<Box<MapPage>> {
    let mut p = Box::new([None; N]);
    for_each_entry(b, |i, e| p[i] = Some(e))?;
    Some(p)
}

pub fn encode_seq(p: &SeqPage) -> Vec<u8> {
    let mut bits = 0u64;
    let mut body = Vec::new();
    for (i, q) in p.iter().enumerate() {
        if let Some(q) = q {
            bits |= 1 << i;
            let e = q.encode();
            body.push(e.len() as u8);
            body.extend_from_slice(&e);
        }
    }
    let mut out = bits.to_be_bytes().to_vec();
    out.extend_from_slice(&body);
    out
}

pub fn decode_seq(b: &[u8]) -> Option<Box<SeqPage>> {
    let bits = keys::u64_at(b, 0)?;
    if N < 64 && bits >> N != 0 {
        return None;
    }
    let mut p = Box::new([None; N]);
    let mut at = 8;
    for (i, slot) in p.iter_mut().enumerate() {
        if bits & (1 << i) != 0 {
            let len = *b.get(at)? as usize;
            *slot = Some(QValue::decode(b.get(at + 1..at + 1 + len)?)?);
            at += 1 + len;
        }
    }
    (at == b.len()).then_some(p)
}

pub fn decode_bits(b: &[u8]) -> Option<u64> {
    (b.len() == 8).then(|| keys::u64_at(b, 0)).flatten()
}

/// The block (or slot) numbers of the set bits of page `page`.
pub fn bits_of(page: u64, bits: u64) -> impl Iterator<Item = u64> {
    (0..BITS_PAGE).filter(move |i| bits & (1 << i) != 0).map(move |i| page * BITS_PAGE + i)
}

struct Staged<T> {
    page: T,
    dirty: bool,
}

/// The pages of one volume that one metadata batch reads and changes: each is read from
/// RocksDB once, changed in memory, and written (or deleted, once empty) by
/// [`stage`](Self::stage).
///
/// **Invariant:** at most one `Pages` of a volume is open at a time (opened and committed
/// within one hold of the volume's write lock), so what it read is what is committed when
/// it commits; a second one committing in between is refused ([`Receipt::settle`]).
///
/// The free list is also kept whole in memory ([`FreePages`], in the volume's state): an
/// open `Pages` holds it, reads free-list pages from it instead of RocksDB, and hands it
/// back, updated, once its batch committed. Seq-index pages of seqs above the volume's last
/// seq do not exist (every seq-index and trim record is at or below it), so they are not
/// looked up.
pub struct Pages {
    vid: u32,
    map: BTreeMap<u64, Staged<Box<MapPage>>>,
    seq: BTreeMap<(u64, u64), Staged<Box<SeqPage>>>,
    free: BTreeMap<u64, Staged<u64>>,
    unsynced: BTreeMap<u64, Staged<u64>>,
    /// The volume's whole free list as committed (None: read pages from RocksDB).
    mirror: Option<FreePages>,
    /// The volume's commit count when opened.
    generation: u64,
    /// Seq-index pages above this seq are known not to exist.
    last_seq: u64,
}

/// The free-list pages of a volume, by page (absent: no free slot in it).
pub type FreePages = HashMap<u64, u64>;

/// The in-memory state a volume keeps for [`Pages`].
#[derive(Default)]
pub struct PageState {
    /// The free list as committed; None while an open `Pages` holds it or after a failed
    /// commit (rebuilt from RocksDB by the next [`Pages::open`]).
    pub free: Option<FreePages>,
    /// Batches committed with `Pages`.
    pub generation: u64,
}

impl PageState {
    /// The state of a volume whose free list was just read (at open).
    pub fn seeded(free: FreePages) -> Self {
        Self { free: Some(free), generation: 0 }
    }
}

/// What a staged `Pages` hands back once its batch committed (or failed).
#[must_use]
pub struct Receipt {
    mirror: Option<FreePages>,
    generation: u64,
}

impl Receipt {
    /// Returns the free list to the volume if the batch committed. Fails if another
    /// `Pages` of the volume committed while this one was open (a bug: what this one read
    /// may have been stale).
    pub fn settle(self, state: &mut PageState, committed: bool) -> Result<()> {
        let overlapped = self.generation != state.generation;
        state.generation += 1;
        state.free = if committed && !overlapped { self.mirror } else { None };
        if overlapped {
            return Err(Error::Internal("two metadata batches of one volume were open at once".into()));
        }
        Ok(())
    }
}

/// Reads a volume's free-list pages from RocksDB.
pub fn load_free(db: &DB, vid: u32) -> Result<FreePages> {
    let prefix = keys::vid_prefix(keys::FREE, vid);
    let mut ro = rocksdb::ReadOptions::default();
    ro.set_iterate_upper_bound(keys::prefix_end(&prefix));
    let mut out = HashMap::new();
    for item in db.iterator_opt(rocksdb::IteratorMode::From(&prefix, rocksdb::Direction::Forward), ro) {
        let (k, v) = item.map_err(meta_err("reading the free list"))?;
        let page = keys::u64_at(&k, keys::FIELD0).ok_or_else(|| corrupt_meta("free-list key"))?;
        out.insert(page, decode_bits(&v).ok_or_else(|| corrupt_meta("free-list page"))?);
    }
    Ok(out)
}

fn get(db: &DB, key: &[u8]) -> Result<Option<Vec<u8>>> {
    db.get(key).map_err(meta_err("reading a metadata page"))
}

impl Pages {
    /// Pages of a volume outside its in-memory state (the format upgrade at open).
    pub fn detached(vid: u32) -> Self {
        Self {
            vid,
            map: BTreeMap::new(),
            seq: BTreeMap::new(),
            free: BTreeMap::new(),
            unsynced: BTreeMap::new(),
            mirror: None,
            generation: 0,
            last_seq: u64::MAX,
        }
    }

    /// Opens the volume's pages for one batch (`last_seq`: the volume's last seq).
    pub fn open(db: &DB, vid: u32, state: &mut PageState, last_seq: u64) -> Result<Self> {
        let mirror = match state.free.take() {
            Some(m) => m,
            None => load_free(db, vid)?,
        };
        Ok(Self { mirror: Some(mirror), generation: state.generation, last_seq, ..Self::detached(vid) })
    }

    /// Closes pages that staged nothing (hands the free list back unchanged).
    pub fn abandon(self, state: &mut PageState) {
        if self.generation == state.generation && state.free.is_none() {
            state.free = self.mirror;
        }
    }

    fn map_page(&mut self, db: &DB, page: u64) -> Result<&mut Staged<Box<MapPage>>> {
        if !self.map.contains_key(&page) {
            let p = match get(db, &keys::map(self.vid, page))? {
                Some(v) => decode_map(&v).ok_or_else(|| corrupt_meta("map page"))?,
                None => Box::new([None; N]),
            };
            self.map.insert(page, Staged { page: p, dirty: false });
        }
        Ok(self.map.get_mut(&page).expect("inserted above"))
    }

    fn seq_page(&mut self, db: &DB, seq: u64, page: u64) -> Result<&mut Staged<Box<SeqPage>>> {
        if !self.seq.contains_key(&(seq, page)) {
            let stored = if seq > self.last_seq { None } else { get(db, &keys::seq(self.vid, seq, page))? };
            let p = match stored {
                Some(v) => decode_seq(&v).ok_or_else(|| corrupt_meta("seq-index page"))?,
                None => Box::new([None; N]),
            };
            self.seq.insert((seq, page), Staged { page: p, dirty: false });
        }
        Ok(self.seq.get_mut(&(seq, page)).expect("inserted above"))
    }

    fn bits_page<'a>(
        db: &DB,
        pages: &'a mut BTreeMap<u64, Staged<u64>>,
        mirror: Option<&FreePages>,
        key: Vec<u8>,
        page: u64,
    ) -> Result<&'a mut Staged<u64>> {
        match pages.entry(page) {
            std::collections::btree_map::Entry::Occupied(o) => Ok(o.into_mut()),
            std::collections::btree_map::Entry::Vacant(slot) => {
                let bits = match mirror {
                    Some(m) => m.get(&page).copied().unwrap_or(0),
                    None => match get(db, &key)? {
                        Some(v) => decode_bits(&v).ok_or_else(|| corrupt_meta("bitmap page"))?,
                        None => 0,
                    },
                };
                Ok(slot.insert(Staged { page: bits, dirty: false }))
            }
        }
    }

    /// The entry of block `b` (as staged so far).
    pub fn entry(&mut self, db: &DB, b: u64) -> Result<Option<Entry>> {
        let (page, i) = split(b);
        Ok(self.map_page(db, page)?.page[i])
    }

    pub fn set_entry(&mut self, db: &DB, b: u64, e: Option<Entry>) -> Result<()> {
        let (page, i) = split(b);
        let p = self.map_page(db, page)?;
        p.page[i] = e;
        p.dirty = true;
        Ok(())
    }

    /// The seq-index value of block `b` written at `seq`, if it has one.
    pub fn qvalue(&mut self, db: &DB, seq: u64, b: u64) -> Result<Option<QValue>> {
        let (page, i) = split(b);
        Ok(self.seq_page(db, seq, page)?.page[i])
    }

    pub fn set_qvalue(&mut self, db: &DB, seq: u64, b: u64, q: Option<QValue>) -> Result<()> {
        let (page, i) = split(b);
        let p = self.seq_page(db, seq, page)?;
        p.page[i] = q;
        p.dirty = true;
        Ok(())
    }

    pub fn set_free(&mut self, db: &DB, slot: u64, free: bool) -> Result<()> {
        let (page, i) = split_bits(slot);
        let p = Self::bits_page(db, &mut self.free, self.mirror.as_ref(), keys::free(self.vid, page), page)?;
        set_bit(p, i, free);
        Ok(())
    }

    pub fn set_unsynced(&mut self, db: &DB, b: u64, unsynced: bool) -> Result<()> {
        let (page, i) = split_bits(b);
        let p = Self::bits_page(db, &mut self.unsynced, None, keys::unsynced(self.vid, page), page)?;
        set_bit(p, i, unsynced);
        Ok(())
    }

    /// Adds every changed page to `batch` (an empty page as a delete); the receipt settles
    /// the volume's in-memory state once the batch committed or failed.
    pub fn stage(mut self, batch: &mut Batch) -> Receipt {
        let vid = self.vid;
        if let Some(m) = self.mirror.as_mut() {
            for (page, s) in self.free.iter().filter(|(_, s)| s.dirty) {
                if s.page == 0 {
                    m.remove(page);
                } else {
                    m.insert(*page, s.page);
                }
            }
        }
        for (page, s) in self.map.into_iter().filter(|(_, s)| s.dirty) {
            let key = keys::map(vid, page);
            if s.page.iter().all(Option::is_none) {
                batch.delete(key);
            } else {
                batch.put(key, encode_map(&s.page));
            }
        }
        for ((seq, page), s) in self.seq.into_iter().filter(|(_, s)| s.dirty) {
            let key = keys::seq(vid, seq, page);
            if s.page.iter().all(Option::is_none) {
                batch.delete(key);
            } else {
                batch.put(key, encode_seq(&s.page));
            }
        }
        for (tag, pages) in [(keys::FREE, self.free), (keys::UNSYNCED, self.unsynced)] {
            for (page, s) in pages.into_iter().filter(|(_, s)| s.dirty) {
                let key = keys::with_u64(tag, vid, page);
                if s.page == 0 {
                    batch.delete(key);
                } else {
                    batch.put(key, s.page.to_be_bytes());
                }
            }
        }
        Receipt { mirror: self.mirror, generation: self.generation }
    }
}

fn set_bit(p: &mut Staged<u64>, i: usize, on: bool) {
    let before = p.page;
    if on {
        p.page |= 1 << i;
    } else {
        p.page &= !(1 << i);
    }
    p.dirty |= p.page != before;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn map_pages_round_trip_as_runs() {
        let mut p: MapPage = [None; N];
        for (i, e) in p.iter_mut().enumerate().take(10) {
            *e = Some(Entry { slot: 100 + i as u64, crc: i as u32 * 7, seq: 5 });
        }
        p[10] = Some(Entry { slot: 110, crc: 1, seq: 6 }); // new seq: new run
        p[11] = Some(Entry { slot: 200, crc: 2, seq: 6 }); // slot jump: new run
        p[N - 1] = Some(Entry { slot: u64::MAX - 1, crc: 3, seq: u64::MAX });
        let enc = encode_map(&p);
        assert_eq!(enc.len(), (18 + 40) + 3 * (18 + 4));
        assert_eq!(*decode_map(&enc).unwrap(), p);
        assert!(encode_map(&[None; N]).is_empty());
        // Truncated, overlong and zero-length runs are refused.
        assert!(decode_map(&enc[..enc.len() - 1]).is_none());
        assert!(decode_map(&[N as u8 - 4, 5, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]).is_none());
        assert!(decode_map(&[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]).is_none());
    }

    #[test]
    fn seq_pages_round_trip() {
        let mut p: SeqPage = [None; N];
        p[0] = Some(QValue::default());
        p[5] = Some(QValue { prev: Some(Entry { slot: 1, crc: 2, seq: 3 }), skipped: None });
        p[N - 1] = Some(QValue { prev: None, skipped: Some(9) });
        let enc = encode_seq(&p);
        assert_eq!(*decode_seq(&enc).unwrap(), p);
        assert!(decode_seq(&enc[..enc.len() - 1]).is_none());
        let mut longer = enc.clone();
        longer.push(0);
        assert!(decode_seq(&longer).is_none());
    }
}

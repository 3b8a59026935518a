//! `MasterIndex`: chunk id → location, over every known pack.

use std::collections::HashMap;

use super::IndexedPack;
use crate::chunk::ChunkId;
use crate::pack::PackEntry;

/// Where a chunk is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Location {
    /// Index into [`MasterIndex::packs`].
    pub pack: u32,
    pub offset: u32,
    pub length: u32,
    pub raw_len: u32,
    pub flags: u8,
}

impl Location {
    /// The entry this location describes.
    pub fn entry(&self, id: ChunkId) -> PackEntry {
        PackEntry { id, offset: self.offset, length: self.length, raw_len: self.raw_len, flags: self.flags }
    }
}

/// Known packs and the chunks in them.
#[derive(Debug, Default, Clone)]
pub struct MasterIndex {
    /// (pack id, pack length).
    pub packs: Vec<(String, u64)>,
    pack_pos: HashMap<String, u32>,
    chunks: HashMap<ChunkId, Location>,
    /// Further locations of chunks stored in more than one pack (a repack copies chunks
    /// before the old pack goes; concurrent backups may store the same new chunk twice).
    dups: HashMap<ChunkId, Vec<Location>>,
}

impl MasterIndex {
    /// Adds a pack's entries (idempotent per pack id).
    pub fn add_pack(&mut self, p: &IndexedPack) {
        if self.pack_pos.contains_key(&p.id) {
            return;
        }
        let n = self.packs.len() as u32;
        self.packs.push((p.id.clone(), p.len));
        self.pack_pos.insert(p.id.clone(), n);
        for e in &p.entries {
            let loc = Location { pack: n, offset: e.offset, length: e.length, raw_len: e.raw_len, flags: e.flags };
            match self.chunks.entry(e.id) {
                std::collections::hash_map::Entry::Vacant(v) => {
                    v.insert(loc);
                }
                std::collections::hash_map::Entry::Occupied(_) => self.dups.entry(e.id).or_default().push(loc),
            }
        }
    }

    /// Location of a chunk.
    pub fn get(&self, id: &ChunkId) -> Option<&Location> {
        self.chunks.get(id)
    }

    /// True when the chunk is stored somewhere.
    pub fn contains(&self, id: &ChunkId) -> bool {
        self.chunks.contains_key(id)
    }

    /// True when the pack is known.
    pub fn has_pack(&self, id: &str) -> bool {
        self.pack_pos.contains_key(id)
    }

    /// Position of a pack in [`MasterIndex::packs`].
    pub fn pack_index(&self, id: &str) -> Option<u32> {
        self.pack_pos.get(id).copied()
    }

    /// Pack id of a location.
    pub fn pack_id(&self, loc: &Location) -> &str {
        &self.packs[loc.pack as usize].0
    }

    /// Number of chunks.
    pub fn len(&self) -> usize {
        self.chunks.len()
    }

    /// No chunks at all.
    pub fn is_empty(&self) -> bool {
        self.chunks.is_empty()
    }

    /// Every (chunk, location), one location per chunk.
    pub fn iter(&self) -> impl Iterator<Item = (&ChunkId, &Location)> {
        self.chunks.iter()
    }

    /// Every (chunk, location), all copies of a chunk stored in several packs.
    pub fn iter_all(&self) -> impl Iterator<Item = (&ChunkId, &Location)> {
        self.chunks.iter().chain(self.dups.iter().flat_map(|(id, v)| v.iter().map(move |l| (id, l))))
    }

    /// Every location of a chunk.
    pub fn locations(&self, id: &ChunkId) -> impl Iterator<Item = &Location> {
        self.chunks.get(id).into_iter().chain(self.dups.get(id).into_iter().flatten())
    }

    /// Every pack with its entries (for writing a consolidated index).
    pub fn to_indexed_packs(&self) -> Vec<IndexedPack> {
        let mut by_pack: HashMap<u32, Vec<PackEntry>> = HashMap::new();
        for (id, loc) in self.iter_all() {
            by_pack.entry(loc.pack).or_default().push(loc.entry(*id));
        }
        self.packs
            .iter()
            .enumerate()
            .map(|(i, (pid, len))| {
                let mut entries = by_pack.remove(&(i as u32)).unwrap_or_default();
                entries.sort_by_key(|e| e.offset);
                IndexedPack { id: pid.clone(), len: *len, entries }
            })
            .collect()
    }

    /// A copy without the given packs (used by backups that must not reuse condemned packs).
    pub fn without_packs(&self, drop: &std::collections::HashSet<String>) -> MasterIndex {
        let mut by_pack: HashMap<u32, Vec<PackEntry>> = HashMap::new();
        for (id, loc) in self.iter_all() {
            by_pack.entry(loc.pack).or_default().push(loc.entry(*id));
        }
        let mut out = MasterIndex::default();
        for (i, (pid, len)) in self.packs.iter().enumerate() {
            if drop.contains(pid) {
                continue;
            }
            out.add_pack(&IndexedPack {
                id: pid.clone(),
                len: *len,
                entries: by_pack.remove(&(i as u32)).unwrap_or_default(),
            });
        }
        out
    }
}

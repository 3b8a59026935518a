//! RocksDB key and value encodings of the disk store (format 2). All integers big-endian
//! so that keys sort numerically.
//!
//! The block map and the seq index are kept in *pages* of [`PAGE`] blocks, the free list
//! and the unsynced marks in bitmaps of [`BITS_PAGE`] slots (blocks), one RocksDB record
//! per page instead of one per block: a 1 MiB write touches a few dozen records, not a
//! thousand ([`super::pages`]).
//!
//! | key                                  | value                                      |
//! |--------------------------------------|--------------------------------------------|
//! | `N`                                  | next volume number (u32)                   |
//! | `V` name                             | `StoredVolume` (JSON)                      |
//! | `S` vid                              | `PersistState` (64 bytes)                  |
//! | `m` vid page                         | `MapPage`: entries (slot, crc, seq) as runs|
//! | `q` vid seq page                     | `SeqPage`: blocks of the page written at seq, each with its `QValue` |
//! | `u` vid page                         | bitmap (u64): unsynced, seq <= durable mark|
//! | `f` vid slot-page                    | bitmap (u64): slots that are free          |
//! | `T` vid seq offset                   | trim length (u64)                          |
//! | `P` vid block seq                    | preserved `Entry` (seq = until)            |
//! | `X` vid seq name                     | `SnapshotInfo` (JSON)                      |
//!
//! Format 1 kept `M` vid block, `Q` vid seq block, `U` vid block and `F` vid slot records
//! (one per block or slot; `super::upgrade` rewrites them into pages at open).
//!
//! Snapshots: `X` records a snapshot at a seq. When a write or trim at seq `u` replaces a
//! block version written at `e` and some snapshot has `e <= s < u`, the old version is
//! kept as `P vid block e` (its slot is not freed) with `until = u`. A snapshot at `s`
//! sees, per block, the live entry if its seq <= s, else the `P` entry with the highest
//! `e <= s` if its `until > s`, else zeroes.
//!
//! The map (`m`) is the allocation map (a missing entry reads as zeroes). The seq index
//! (`q`) indexes each block's current content by the seq that wrote it: it drives
//! incremental resync and, for seqs above the durable point, crash recovery. A block's
//! `QValue` is the newest *durable* entry the block had before (the one to roll back to if
//! this content is lost), plus the lowest seq of the unsynced versions skipped over, if
//! any (lost with it). An unsynced mark (`u`) is set for a block whose current content was
//! written at a seq at or below the durable mark (a resync copying older blocks) and not
//! synced since: recovery verifies it too. A flush that synced it clears the mark.

use serde::{Deserialize, Serialize};

use super::super::record::VolumeRecord;

pub const NEXT_VID: &[u8] = b"N";
pub const VOLUME: u8 = b'V';
pub const STATE: u8 = b'S';
pub const MAP: u8 = b'm';
pub const SEQ: u8 = b'q';
pub const TRIM: u8 = b'T';
pub const FREE: u8 = b'f';
pub const PRESERVED: u8 = b'P';
pub const SNAPSHOT: u8 = b'X';
pub const UNSYNCED: u8 = b'u';

/// Format 1's per-block records (rewritten into pages at open).
pub const V1_MAP: u8 = b'M';
pub const V1_SEQ: u8 = b'Q';
pub const V1_FREE: u8 = b'F';
pub const V1_UNSYNCED: u8 = b'U';

/// Prefixes that hold per-volume keys (deleted with the volume).
pub const PER_VOLUME: [u8; 12] =
    [STATE, MAP, SEQ, TRIM, FREE, PRESERVED, SNAPSHOT, UNSYNCED, V1_MAP, V1_SEQ, V1_FREE, V1_UNSYNCED];

/// Blocks per map and seq-index page. Smaller pages cost more records per large write,
/// larger ones more bytes per small write (a random 4 KiB write rewrites its page; a page
/// fragmented by such writes is up to 22 bytes per block): 16 blocks is 16 records per MiB
/// and at most ~350 bytes per page.
pub const PAGE: u64 = 16;
/// Blocks per unsynced-marks page and slots per free-list page (bitmaps).
pub const BITS_PAGE: u64 = 64;

pub fn volume(name: &str) -> Vec<u8> {
    let mut k = vec![VOLUME];
    k.extend_from_slice(name.as_bytes());
    k
}

pub fn vid_prefix(tag: u8, vid: u32) -> Vec<u8> {
    let mut k = Vec::with_capacity(21);
    k.push(tag);
    k.extend_from_slice(&vid.to_be_bytes());
    k
}

/// The first key after every key starting with `prefix` (prefix is never all 0xff here).
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0xff; prefix.len() + 1]
}

pub fn with_u64(tag: u8, vid: u32, a: u64) -> Vec<u8> {
    let mut k = vid_prefix(tag, vid);
    k.extend_from_slice(&a.to_be_bytes());
    k
}

pub fn with_u64s(tag: u8, vid: u32, a: u64, b: u64) -> Vec<u8> {
    let mut k = with_u64(tag, vid, a);
    k.extend_from_slice(&b.to_be_bytes());
    k
}

/// The map page holding `page * PAGE ..`.
pub fn map(vid: u32, page: u64) -> Vec<u8> {
    with_u64(MAP, vid, page)
}

/// The seq-index page of blocks `page * PAGE ..` written at `seq`.
pub fn seq(vid: u32, seq: u64, page: u64) -> Vec<u8> {
    with_u64s(SEQ, vid, seq, page)
}

pub fn trim(vid: u32, seq: u64, offset: u64) -> Vec<u8> {
    with_u64s(TRIM, vid, seq, offset)
}

/// The unsynced-marks page of blocks `page * BITS_PAGE ..`.
pub fn unsynced(vid: u32, page: u64) -> Vec<u8> {
    with_u64(UNSYNCED, vid, page)
}

/// The free-list page of slots `page * BITS_PAGE ..`.
pub fn free(vid: u32, page: u64) -> Vec<u8> {
    with_u64(FREE, vid, page)
}

pub fn preserved(vid: u32, block: u64, seq: u64) -> Vec<u8> {
    with_u64s(PRESERVED, vid, block, seq)
}

pub fn snapshot(vid: u32, seq: u64, name: &str) -> Vec<u8> {
    let mut k = with_u64(SNAPSHOT, vid, seq);
    k.extend_from_slice(name.as_bytes());
    k
}

pub fn state(vid: u32) -> Vec<u8> {
    vid_prefix(STATE, vid)
}

/// Reads the u64 at `at` of a key (for keys built above; short keys yield None).
pub fn u64_at(key: &[u8], at: usize) -> Option<u64> {
    key.get(at..at + 8).map(|b| u64::from_be_bytes(b.try_into().unwrap_or([0; 8])))
}

/// Offset of the first u64 after `tag + vid`.
pub const FIELD0: usize = 5;
/// Offset of the second u64.
pub const FIELD1: usize = 13;

/// Where a block's current content lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    pub slot: u64,
    pub crc: u32,
    pub seq: u64,
}

impl Entry {
    pub const LEN: usize = 20;

    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut b = [0u8; Self::LEN];
        b[0..8].copy_from_slice(&self.slot.to_be_bytes());
        b[8..12].copy_from_slice(&self.crc.to_be_bytes());
        b[12..20].copy_from_slice(&self.seq.to_be_bytes());
        b
    }

    pub fn decode(b: &[u8]) -> Option<Self> {
        if b.len() != Self::LEN {
            return None;
        }
        Some(Self {
            slot: u64::from_be_bytes(b[0..8].try_into().ok()?),
            crc: u32::from_be_bytes(b[8..12].try_into().ok()?),
            seq: u64::from_be_bytes(b[12..20].try_into().ok()?),
        })
    }
}

/// The `Q` value: what a block rolls back to if the content written at this seq is lost.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct QValue {
    /// The newest durable entry before (None: the block was unallocated).
    pub prev: Option<Entry>,
    /// The lowest seq of the unsynced versions between `prev` and this one (lost with it).
    pub skipped: Option<u64>,
}

impl QValue {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(Entry::LEN + 8);
        if let Some(e) = self.prev {
            out.extend_from_slice(&e.encode());
        }
        if let Some(s) = self.skipped {
            if self.prev.is_none() {
                out.extend_from_slice(&[0xff; Entry::LEN]);
            }
            out.extend_from_slice(&s.to_be_bytes());
        }
        out
    }

    /// Decodes the forms above: empty, an entry, or an entry (all 0xff: none) plus a seq.
    pub fn decode(b: &[u8]) -> Option<Self> {
        let entry = |b: &[u8]| if b == [0xff; Entry::LEN] { Some(None) } else { Entry::decode(b).map(Some) };
        match b.len() {
            0 => Some(Self::default()),
            Entry::LEN => Some(Self { prev: entry(b)?, skipped: None }),
            l if l == Entry::LEN + 8 => Some(Self { prev: entry(&b[..Entry::LEN])?, skipped: u64_at(b, Entry::LEN) }),
            _ => None,
        }
    }
}

/// Per-volume counters, rewritten in every metadata batch of the volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PersistState {
    pub last_seq: u64,
    pub durable_seq: u64,
    /// Slots [0, hwm) exist in the data file; each is mapped, free or pending.
    pub hwm: u64,
    pub allocated_blocks: u64,
    pub resync_from: Option<u64>,
    /// Resync checkpoint `(offset, seq)`, see `ReplicaState::resync_done`.
    pub resync_done: Option<(u64, u64)>,
    /// The epoch the checkpoint was taken under; only that engine may resume from it.
    pub resync_done_epoch: u64,
}

impl PersistState {
    pub fn encode(&self) -> [u8; 64] {
        let mut b = [0u8; 64];
        let (done_off, done_seq) = self.resync_done.unwrap_or((u64::MAX, 0));
        let fields = [
            self.last_seq,
            self.durable_seq,
            self.hwm,
            self.allocated_blocks,
            self.resync_from.unwrap_or(u64::MAX),
            done_off,
            done_seq,
            self.resync_done_epoch,
        ];
        for (i, f) in fields.iter().enumerate() {
            b[i * 8..i * 8 + 8].copy_from_slice(&f.to_be_bytes());
        }
        b
    }

    /// Decodes the current 64-byte form and the 40-byte form without a checkpoint.
    pub fn decode(b: &[u8]) -> Option<Self> {
        if b.len() != 40 && b.len() != 64 {
            return None;
        }
        let f = |i: usize| u64::from_be_bytes(b[i * 8..i * 8 + 8].try_into().unwrap_or([0; 8]));
        Some(Self {
            last_seq: f(0),
            durable_seq: f(1),
            hwm: f(2),
            allocated_blocks: f(3),
            resync_from: Some(f(4)).filter(|&v| v != u64::MAX),
            resync_done: if b.len() == 64 { Some((f(5), f(6))).filter(|&(o, _)| o != u64::MAX) } else { None },
            resync_done_epoch: if b.len() == 64 { f(7) } else { 0 },
        })
    }
}

/// The `V` value: the volume record plus the store-local volume number.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoredVolume {
    pub vid: u32,
    pub record: VolumeRecord,
}

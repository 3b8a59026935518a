//! Domain types of the replica store.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::history::{History, HistoryEntry};

/// The block size of every replica: the unit of checksums, allocation and I/O alignment.
pub const BLOCK_SIZE: u64 = 4096;

/// The self-describing record of a volume, stored with every replica of it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeRecord {
    pub volume_id: String,
    /// Size in bytes, a multiple of `block_size`.
    pub size: u64,
    pub block_size: u32,
    /// The fencing epoch; only requests carrying exactly this epoch may do I/O.
    pub epoch: u64,
    /// Node ids holding the replicas of this volume.
    pub replica_set: Vec<String>,
    /// Writes are acknowledged once this many replicas have them (0 = majority).
    pub write_quorum: u32,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// The engine that holds the volume (see [`Claim`]): its instance id (0: none, the
    /// volume was released or never attached) and its node, for operators.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub owner: u64,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub owner_node: String,
    /// The activations this replica's data descends from (see [`History`]); recorded by
    /// the engine before its writes reach the replica. Empty in records written before
    /// histories were kept: such a replica is then related to others by epochs only.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub history: Vec<HistoryEntry>,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

/// How an engine claims a replica at an epoch (`ReplicaStore::claim`). The stored
/// `(epoch, owner)` pair changes only through these rules, so that two engines racing for
/// one volume cannot both reach a majority, and a stale engine is fenced:
///
/// - `Cas { expect }`: the attach of a new engine. Succeeds when the replica's epoch is
///   still `expect` (what the engine read from it) and `epoch > expect`; or when it already
///   holds exactly `(epoch, owner)` (a retry). Anything else is `Conflict` (another engine
///   changed it meanwhile) or `StaleEpoch` (the epoch is older than the replica's).
/// - `Join`: an engine that already holds a majority at `epoch` brings a straggler in:
///   any epoch up to `epoch` is raised to it and the owner set (a racing engine that took
///   this replica at the same epoch lost the majority, so it can never use it).
/// - `Release`: the owner detached: the owner is cleared if the replica still holds
///   exactly `(epoch, owner)`; otherwise nothing changes (not an error).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    pub epoch: u64,
    pub owner: u64,
    pub owner_node: String,
    pub mode: ClaimMode,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClaimMode {
    Cas { expect: u64 },
    Join,
    Release,
}

impl Claim {
    /// A `Join` claim by no engine in particular (tools and tests that raise an epoch).
    pub fn raise(epoch: u64) -> Self {
        Self { epoch, owner: 0, owner_node: String::new(), mode: ClaimMode::Join }
    }
}

impl VolumeRecord {
    /// A record with the defaults used for a new volume: 4 KiB blocks, epoch 0.
    pub fn new(volume_id: impl Into<String>, size: u64) -> Self {
        Self {
            volume_id: volume_id.into(),
            size,
            block_size: BLOCK_SIZE as u32,
            epoch: 0,
            replica_set: Vec::new(),
            write_quorum: 0,
            labels: BTreeMap::new(),
            owner: 0,
            owner_node: String::new(),
            history: Vec::new(),
        }
    }

    /// Whether two records describe the same volume (ignoring the epoch, owner and
    /// history, which move).
    pub fn same_definition(&self, other: &VolumeRecord) -> bool {
        self.volume_id == other.volume_id
            && self.size == other.size
            && self.block_size == other.block_size
            && self.replica_set == other.replica_set
            && self.write_quorum == other.write_quorum
            && self.labels == other.labels
    }
}

/// The replication-relevant state of one replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ReplicaState {
    pub epoch: u64,
    /// The engine instance holding the replica at `epoch` (0: none).
    pub owner: u64,
    /// Highest sequence number applied.
    pub last_seq: u64,
    /// Every write with seq <= durable_seq that this replica applied is on stable storage.
    /// After a power cut that lost writes from seq `s` on, at most `s - 1` (see
    /// `resync_from`).
    pub durable_seq: u64,
    pub size: u64,
    /// Bytes of blocks that hold data (thin provisioning: unwritten/trimmed blocks cost 0).
    pub allocated_bytes: u64,
    /// Set while a resync into this replica runs, or after a power cut lost writes while
    /// later ones survived: the replica is only complete up to this seq (what it holds
    /// above, up to `last_seq`, may be strays the engine must overwrite).
    pub resync_from: Option<u64>,
    /// Progress of that resync, `(offset, seq)`: every block below `offset` is complete up
    /// to `seq` (a checkpoint taken after a flush), so a resumed resync copies those blocks
    /// only if they changed after `seq`.
    pub resync_done: Option<(u64, u64)>,
    /// The record's history (see [`VolumeRecord::history`]).
    pub history: History,
}

/// A replica's record plus its state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaInfo {
    pub record: VolumeRecord,
    pub state: ReplicaState,
}

/// One change reported by `changes_since`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// The block at `offset` holds content written at `seq`.
    Block { offset: u64, seq: u64 },
    /// `[offset, offset + len)` was trimmed at `seq`.
    Trim { offset: u64, len: u64, seq: u64 },
}

/// The payload of a resync chunk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChunkData {
    /// One block of data (shared: a slice of a larger read or of a received message).
    Data(bytes::Bytes),
    /// One block that reads as zeroes.
    Zero,
    /// A trim of `len` bytes starting at the chunk's offset.
    Trim(u64),
}

/// A unit of resync: what the source sends and the target applies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResyncChunk {
    pub offset: u64,
    pub seq: u64,
    pub data: ChunkData,
}

/// What `apply_resync` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ApplyStats {
    pub applied: u64,
    /// Chunks not applied because the target already had newer content.
    pub skipped_newer: u64,
}

/// A snapshot of one replica: the volume as it was after every write with seq <= `seq`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotInfo {
    pub name: String,
    pub seq: u64,
    /// Volume size when taken.
    pub size: u64,
    /// Unix seconds.
    pub created: i64,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Still being copied to this replica by a resync (not readable here yet).
    #[serde(default)]
    pub partial: bool,
}

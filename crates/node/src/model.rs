//! Domain values of the volume API: what [`crate::volumes::VolumeManager`] takes and
//! returns. Plain Rust: the service (`service.rs`) and the peer client (`peers.rs`)
//! convert them to and from `hlstore.volume.v1` in `convert.rs`, and nowhere else.

use std::collections::BTreeMap;

use hlstore_replication::ScrubReport;

/// A cluster member.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeInfo {
    pub id: String,
    pub endpoint: String,
    pub reachable: bool,
    /// Room for replicas (`None`: unreachable, or an agent that does not report it).
    pub space: Option<hlstore_core::space::FsSpace>,
    /// Bytes its thin replicas may still allocate.
    pub promised_bytes: u64,
    pub replicas: u32,
}

/// A volume as a node sees it: its record, where it is attached, and its replicas.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Volume {
    pub name: String,
    pub size: u64,
    pub replica_set: Vec<String>,
    pub write_quorum: u32,
    pub epoch: u64,
    /// Empty: not attached.
    pub attached_node: String,
    /// Empty: not attached, or still being attached.
    pub nbd_uri: String,
    pub replicas: Vec<VolumeReplica>,
    pub labels: BTreeMap<String, String>,
}

/// One replica of a [`Volume`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VolumeReplica {
    pub node: String,
    /// `healthy`, `resyncing` or `failed` (the words of the CLI and the proto).
    pub state: String,
    pub last_seq: u64,
    pub durable_seq: u64,
    pub allocated_bytes: u64,
    /// Resync chunks sent to this replica since the engine attached.
    pub resync_chunks: u64,
    /// Offset the last resync into this replica resumed from (0: none).
    pub resync_resumed_from: u64,
}

/// What a new volume should be.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NewVolume {
    pub name: String,
    pub size: u64,
    /// 0: three, or as many nodes as the cluster has if fewer.
    pub replicas: u32,
    /// Empty: the least-used nodes.
    pub nodes: Vec<String>,
    /// 0: the majority.
    pub write_quorum: u32,
    pub labels: BTreeMap<String, String>,
}

/// What a clone should be.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CloneSpec {
    pub source: String,
    pub name: String,
    /// Empty: a fresh snapshot of `source`, deleted afterwards.
    pub snapshot: String,
    pub replicas: u32,
    pub nodes: Vec<String>,
    pub labels: BTreeMap<String, String>,
    /// 0: the snapshot's size; larger grows the clone.
    pub size: u64,
}

/// A snapshot of a volume.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub volume: String,
    pub name: String,
    /// Position in the volume's write stream.
    pub seq: u64,
    /// Volume size when taken.
    pub size: u64,
    /// Unix seconds.
    pub created: i64,
    /// Every replica holds it.
    pub ready: bool,
    pub labels: BTreeMap<String, String>,
}

/// A byte range of a volume.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Extent {
    pub offset: u64,
    pub length: u64,
}

/// The extents that may differ between two views of a volume.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChangedBlocks {
    pub extents: Vec<Extent>,
    pub block_size: u64,
}

/// What one scrub pass of a volume found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VolumeScrub {
    pub name: String,
    pub report: ScrubReport,
}

//! `hlstore.replica.v1` ↔ domain conversions, one per type, for the service (`service.rs`),
//! the engine's transport (`grpc_replica.rs`) and the node agent's calls to replicas.
//! Requests are validated here on entry: a malformed one is `INVALID_ARGUMENT`.

use bytes::Bytes;
use hlstore_proto::replica as pb;
use tonic::Status;

use crate::transport;
use crate::types::ReplicaSeqs;
use hlstore_store::{
    ChunkData, Claim, ClaimMode, History, HistoryEntry, ReplicaInfo, ReplicaState, ResyncChunk, SnapshotInfo,
    VolumeRecord,
};

pub fn record_from_pb(r: Option<pb::VolumeRecord>) -> Result<VolumeRecord, Status> {
    let r = r.ok_or_else(|| Status::invalid_argument("record is required"))?;
    if r.volume_id.is_empty() {
        return Err(Status::invalid_argument("record.volume_id is required"));
    }
    Ok(VolumeRecord {
        volume_id: r.volume_id,
        size: r.size,
        block_size: r.block_size,
        epoch: r.epoch,
        replica_set: r.replica_set,
        write_quorum: r.write_quorum,
        labels: r.labels.into_iter().collect(),
        owner: r.owner,
        owner_node: r.owner_node,
        history: Vec::new(),
    })
}

pub fn record_to_pb(r: &VolumeRecord) -> pb::VolumeRecord {
    pb::VolumeRecord {
        volume_id: r.volume_id.clone(),
        size: r.size,
        block_size: r.block_size,
        epoch: r.epoch,
        replica_set: r.replica_set.clone(),
        write_quorum: r.write_quorum,
        labels: r.labels.clone().into_iter().collect(),
        owner: r.owner,
        owner_node: r.owner_node.clone(),
    }
}

pub fn state_to_pb(volume_id: &str, s: &ReplicaState) -> pb::ReplicaState {
    pb::ReplicaState {
        volume_id: volume_id.to_string(),
        epoch: s.epoch,
        last_seq: s.last_seq,
        durable_seq: s.durable_seq,
        size: s.size,
        allocated_bytes: s.allocated_bytes,
        resync_from: s.resync_from,
        resync_done_offset: s.resync_done.map(|d| d.0),
        resync_done_seq: s.resync_done.map_or(0, |d| d.1),
        owner: s.owner,
        history: history_to_pb(&s.history),
    }
}

pub fn history_to_pb(h: &History) -> Vec<pb::HistoryEntry> {
    h.entries().iter().map(|e| pb::HistoryEntry { epoch: e.epoch, start: e.start, base: e.base }).collect()
}

/// A history from a request: malformed ones are `INVALID_ARGUMENT`.
pub fn history_from_pb(h: &[pb::HistoryEntry]) -> Result<History, Status> {
    let entries: Vec<HistoryEntry> =
        h.iter().map(|e| HistoryEntry { epoch: e.epoch, start: e.start, base: e.base }).collect();
    History::from_entries(&entries).map_err(|e| Status::invalid_argument(e.to_string()))
}

pub fn state_from_pb(s: &pb::ReplicaState) -> ReplicaState {
    ReplicaState {
        epoch: s.epoch,
        owner: s.owner,
        last_seq: s.last_seq,
        durable_seq: s.durable_seq,
        size: s.size,
        allocated_bytes: s.allocated_bytes,
        resync_from: s.resync_from,
        resync_done: s.resync_done_offset.map(|o| (o, s.resync_done_seq)),
        // A malformed history from a peer is as good as none (unknown).
        history: history_from_pb(&s.history).unwrap_or_default(),
    }
}

pub fn info_to_pb(i: &ReplicaInfo) -> pb::ReplicaInfo {
    pb::ReplicaInfo {
        record: Some(record_to_pb(&i.record)),
        allocated_bytes: i.state.allocated_bytes,
        last_seq: i.state.last_seq,
        durable_seq: i.state.durable_seq,
    }
}

/// A replica listing entry (`ListReplicas`, `CreateReplica`): the record, and a state with
/// what the message carries (seqs and allocation; epoch, owner and size from the record),
/// the other fields at their defaults.
pub fn info_from_pb(i: pb::ReplicaInfo) -> Result<ReplicaInfo, Status> {
    let record = record_from_pb(i.record)?;
    let state = ReplicaState {
        epoch: record.epoch,
        owner: record.owner,
        last_seq: i.last_seq,
        durable_seq: i.durable_seq,
        allocated_bytes: i.allocated_bytes,
        size: record.size,
        ..ReplicaState::default()
    };
    Ok(ReplicaInfo { record, state })
}

/// The sequence numbers the engine needs from a replica's state.
pub fn seqs_from_pb(s: pb::ReplicaState) -> ReplicaSeqs {
    ReplicaSeqs {
        epoch: s.epoch,
        owner: s.owner,
        last_seq: s.last_seq,
        durable_seq: s.durable_seq,
        resync_from: s.resync_from,
        // A malformed history is as good as none: the replica is then related by epochs.
        history: history_from_pb(&s.history).unwrap_or_default(),
    }
}

pub fn chunk_from_pb(c: pb::ResyncChunk) -> ResyncChunk {
    let data = if c.trim_length > 0 {
        ChunkData::Trim(c.trim_length)
    } else if c.data.is_empty() {
        ChunkData::Zero
    } else {
        ChunkData::Data(c.data)
    };
    ResyncChunk { offset: c.offset, seq: c.seq, data }
}

pub fn chunk_to_pb(c: ResyncChunk) -> pb::ResyncChunk {
    let (data, trim_length) = match c.data {
        ChunkData::Data(d) => (d, 0),
        ChunkData::Zero => (Bytes::new(), 0),
        ChunkData::Trim(len) => (Bytes::new(), len),
    };
    pb::ResyncChunk { offset: c.offset, data, seq: c.seq, trim_length }
}

/// A resync chunk as the engine's transport carries it (shared buffers).
pub fn transport_chunk_from_pb(c: pb::ResyncChunk) -> transport::ResyncChunk {
    let data = if c.trim_length > 0 {
        transport::ChunkData::Trim(c.trim_length)
    } else if c.data.is_empty() {
        transport::ChunkData::Zero
    } else {
        transport::ChunkData::Data(c.data)
    };
    transport::ResyncChunk { offset: c.offset, seq: c.seq, data }
}

pub fn transport_chunk_to_pb(c: transport::ResyncChunk) -> pb::ResyncChunk {
    let (data, trim_length) = match c.data {
        transport::ChunkData::Data(d) => (d, 0),
        transport::ChunkData::Zero => (Bytes::new(), 0),
        transport::ChunkData::Trim(len) => (Bytes::new(), len),
    };
    pb::ResyncChunk { offset: c.offset, data, seq: c.seq, trim_length }
}

pub fn snapshot_to_pb(s: SnapshotInfo) -> pb::SnapshotInfo {
    pb::SnapshotInfo {
        name: s.name,
        seq: s.seq,
        size: s.size,
        created: s.created,
        labels: s.labels.into_iter().collect(),
        partial: s.partial,
    }
}

pub fn snapshot_from_pb(s: pb::SnapshotInfo) -> SnapshotInfo {
    SnapshotInfo {
        name: s.name,
        seq: s.seq,
        size: s.size,
        created: s.created,
        labels: s.labels.into_iter().collect(),
        partial: s.partial,
    }
}

/// Snapshot blocks to install: `(block index, data)`, `None` for a block that reads as
/// zeroes (sent as empty data).
pub fn snapshot_blocks_to_pb(blocks: Vec<(u64, Option<Vec<u8>>)>) -> Vec<pb::SnapshotBlock> {
    blocks.into_iter().map(|(block, d)| pb::SnapshotBlock { block, data: d.unwrap_or_default() }).collect()
}

pub fn snapshot_blocks_from_pb(blocks: Vec<pb::SnapshotBlock>) -> Vec<(u64, Option<Vec<u8>>)> {
    blocks.into_iter().map(|b| (b.block, (!b.data.is_empty()).then_some(b.data))).collect()
}

/// Runs of consecutive block indices (`blocks` ascending).
pub fn runs_to_pb(blocks: &[u64]) -> Vec<pb::BlockRun> {
    crate::types::block_runs(blocks.iter().copied())
        .into_iter()
        .map(|(start, count)| pb::BlockRun { start, count })
        .collect()
}

/// Runs of blocks as `(first block, count)`.
pub fn runs_from_pb(runs: Vec<pb::BlockRun>) -> Vec<(u64, u64)> {
    runs.into_iter().map(|r| (r.start, r.count)).collect()
}

/// An optional name: empty means none.
pub fn opt_name(s: String) -> Option<String> {
    (!s.is_empty()).then_some(s)
}

/// Checks a volume id argument is present.
pub fn volume_id(v: &str) -> Result<&str, Status> {
    if v.is_empty() {
        Err(Status::invalid_argument("volume_id is required"))
    } else {
        Ok(v)
    }
}

pub fn claim_from_pb(r: &pb::OpenRequest) -> Result<Claim, Status> {
    use pb::open_request::Mode;
    let mode = match Mode::try_from(r.mode) {
        Ok(Mode::Join) => ClaimMode::Join,
        Ok(Mode::Cas) => ClaimMode::Cas { expect: r.expect_epoch },
        Ok(Mode::Release) => ClaimMode::Release,
        Err(_) => return Err(Status::invalid_argument(format!("open: unknown mode {}", r.mode))),
    };
    Ok(Claim { epoch: r.epoch, owner: r.owner, owner_node: r.owner_node.clone(), mode })
}

pub fn claim_to_pb(volume_id: &str, c: &Claim) -> pb::OpenRequest {
    use pb::open_request::Mode;
    let (mode, expect_epoch) = match c.mode {
        ClaimMode::Join => (Mode::Join, 0),
        ClaimMode::Cas { expect } => (Mode::Cas, expect),
        ClaimMode::Release => (Mode::Release, 0),
    };
    pb::OpenRequest {
        volume_id: volume_id.to_string(),
        epoch: c.epoch,
        owner: c.owner,
        owner_node: c.owner_node.clone(),
        mode: mode as i32,
        expect_epoch,
    }
}

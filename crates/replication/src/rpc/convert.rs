//! Protobuf ↔ domain conversions, one per type. Requests are validated here on entry.

use hlstore_proto::replica as pb;
use tonic::Status;

use hlstore_store::{
    ChunkData, Claim, ClaimMode, History, HistoryEntry, ReplicaInfo, ReplicaState, ResyncChunk, VolumeRecord,
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
        ChunkData::Zero => (Vec::new(), 0),
        ChunkData::Trim(len) => (Vec::new(), len),
    };
    pb::ResyncChunk { offset: c.offset, data, seq: c.seq, trim_length }
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

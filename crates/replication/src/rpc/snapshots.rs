//! The snapshot calls of the replica service (see `proto/replica.proto`).

use hlstore_proto::replica as pb;
use tonic::{Request, Response, Status};

use super::convert::volume_id;
use super::service::ReplicaService;
use hlstore_core::{Epoch, Offset};
use hlstore_store::{ReplicaStore, SnapshotInfo, BLOCK_SIZE};

/// Largest snapshot read in one call.
const MAX_READ: u64 = 4 << 20;

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

/// Runs of consecutive block indices (`blocks` ascending).
pub fn runs(blocks: &[u64]) -> Vec<pb::BlockRun> {
    let mut out: Vec<pb::BlockRun> = Vec::new();
    for &b in blocks {
        match out.last_mut() {
            Some(r) if r.start + r.count == b => r.count += 1,
            _ => out.push(pb::BlockRun { start: b, count: 1 }),
        }
    }
    out
}

fn opt(s: String) -> Option<String> {
    (!s.is_empty()).then_some(s)
}

impl<S: ReplicaStore> ReplicaService<S> {
    pub(super) async fn snapshot_create(
        &self,
        req: Request<pb::CreateSnapshotRequest>,
    ) -> Result<Response<pb::SnapshotInfo>, Status> {
        let r = req.into_inner();
        volume_id(&r.volume_id)?;
        let snap = r.snapshot.ok_or_else(|| Status::invalid_argument("snapshot is required"))?;
        let got = self.call(move |s| s.create_snapshot(&r.volume_id, Epoch(r.epoch), snapshot_from_pb(snap))).await?;
        Ok(Response::new(snapshot_to_pb(got)))
    }

    pub(super) async fn snapshot_delete(
        &self,
        req: Request<pb::DeleteSnapshotRequest>,
    ) -> Result<Response<pb::DeleteSnapshotResponse>, Status> {
        let r = req.into_inner();
        volume_id(&r.volume_id)?;
        let existed = self.call(move |s| s.delete_snapshot(&r.volume_id, Epoch(r.epoch), &r.name)).await?;
        Ok(Response::new(pb::DeleteSnapshotResponse { existed }))
    }

    pub(super) async fn snapshot_list(
        &self,
        req: Request<pb::ListSnapshotsRequest>,
    ) -> Result<Response<pb::ListSnapshotsResponse>, Status> {
        let r = req.into_inner();
        volume_id(&r.volume_id)?;
        let list = self.call(move |s| s.list_snapshots(&r.volume_id)).await?;
        Ok(Response::new(pb::ListSnapshotsResponse { snapshots: list.into_iter().map(snapshot_to_pb).collect() }))
    }

    pub(super) async fn snapshot_read(
        &self,
        req: Request<pb::ReadSnapshotRequest>,
    ) -> Result<Response<pb::ReadResponse>, Status> {
        let r = req.into_inner();
        volume_id(&r.volume_id)?;
        if r.length > MAX_READ {
            return Err(Status::invalid_argument(format!("read of {} bytes: at most {MAX_READ} per call", r.length)));
        }
        let data = self.call(move |s| s.read_snapshot(&r.volume_id, &r.name, Offset(r.offset), r.length)).await?;
        Ok(Response::new(pb::ReadResponse { data }))
    }

    pub(super) async fn snapshot_changed(
        &self,
        req: Request<pb::ChangedBlocksRequest>,
    ) -> Result<Response<pb::ChangedBlocksResponse>, Status> {
        let r = req.into_inner();
        volume_id(&r.volume_id)?;
        let (from, to) = (opt(r.from), opt(r.to));
        let blocks = self.call(move |s| s.changed_blocks(&r.volume_id, from.as_deref(), to.as_deref())).await?;
        Ok(Response::new(pb::ChangedBlocksResponse { runs: runs(&blocks), block_size: BLOCK_SIZE as u32 }))
    }

    pub(super) async fn snapshot_install(
        &self,
        req: Request<pb::InstallSnapshotRequest>,
    ) -> Result<Response<pb::SnapshotInfo>, Status> {
        let r = req.into_inner();
        volume_id(&r.volume_id)?;
        let snap = r.snapshot.ok_or_else(|| Status::invalid_argument("snapshot is required"))?;
        let blocks: Vec<(u64, Option<Vec<u8>>)> =
            r.blocks.into_iter().map(|b| (b.block, (!b.data.is_empty()).then_some(b.data))).collect();
        let got = self
            .call(move |s| s.install_snapshot(&r.volume_id, Epoch(r.epoch), snapshot_from_pb(snap), &blocks, r.last))
            .await?;
        Ok(Response::new(snapshot_to_pb(got)))
    }
}

//! `GrpcReplica` against real tonic servers on loopback.
//!
//! Each server is a minimal implementation of the replica service (proto/replica.proto)
//! over a `MemReplica`, so these tests exercise the client side of the wire contract
//! (streams, status mapping, fencing, resync RPCs) independently of the replica store.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use futures::StreamExt;
use hlstore_core::{BlockDevice, Error, ErrorKind};
use hlstore_core::{Epoch, Offset};
use hlstore_proto::replica as pb;
use hlstore_proto::replica::replica_server::{Replica, ReplicaServer};
use hlstore_replication::{
    ChunkData, GrpcReplica, MachineConfig, MemReplica, ReplicaStatus, ReplicaTransport, ReplicatedVolume, ResyncChunk,
    VolumeConfig, WriteReq,
};
use hlstore_store::{Claim, ClaimMode, History, HistoryEntry};
use tokio::sync::mpsc;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::{Request, Response, Status, Streaming};

const BS: u64 = 4096;
const SIZE: u64 = 64 * BS;
const VOLUME: &str = "vol-grpc";

/// Errors go on the wire through the one mapping every hlstore server uses.
fn status(e: Error) -> Status {
    hlstore_replication::rpc::status::to_status(&e)
}

fn state(s: hlstore_replication::ReplicaSeqs) -> pb::ReplicaState {
    pb::ReplicaState {
        volume_id: VOLUME.into(),
        epoch: s.epoch,
        last_seq: s.last_seq,
        durable_seq: s.durable_seq,
        size: SIZE,
        allocated_bytes: 0,
        resync_from: s.resync_from,
        history: s
            .history
            .entries()
            .iter()
            .map(|e| pb::HistoryEntry { epoch: e.epoch, start: e.start, base: e.base })
            .collect(),
        ..Default::default()
    }
}

fn history(h: &[pb::HistoryEntry]) -> Result<History, Status> {
    let entries: Vec<HistoryEntry> =
        h.iter().map(|e| HistoryEntry { epoch: e.epoch, start: e.start, base: e.base }).collect();
    History::from_entries(&entries).map_err(status)
}

struct Fake(MemReplica);

#[tonic::async_trait]
impl Replica for Fake {
    async fn create_replica(&self, _: Request<pb::CreateReplicaRequest>) -> Result<Response<pb::ReplicaInfo>, Status> {
        Err(Status::unimplemented("create"))
    }
    async fn delete_replica(
        &self,
        _: Request<pb::DeleteReplicaRequest>,
    ) -> Result<Response<pb::DeleteReplicaResponse>, Status> {
        Err(Status::unimplemented("delete"))
    }
    async fn list_replicas(
        &self,
        _: Request<pb::ListReplicasRequest>,
    ) -> Result<Response<pb::ListReplicasResponse>, Status> {
        Err(Status::unimplemented("list"))
    }
    async fn open(&self, r: Request<pb::OpenRequest>) -> Result<Response<pb::ReplicaState>, Status> {
        let r = r.into_inner();
        let mode = match r.mode {
            1 => ClaimMode::Cas { expect: r.expect_epoch },
            2 => ClaimMode::Release,
            _ => ClaimMode::Join,
        };
        let claim = Claim { epoch: r.epoch, owner: r.owner, owner_node: r.owner_node, mode };
        Ok(Response::new(state(self.0.open(claim).await.map_err(status)?)))
    }
    async fn ping(&self, r: Request<pb::PingRequest>) -> Result<Response<pb::ReplicaState>, Status> {
        Ok(Response::new(state(self.0.ping(Epoch(r.into_inner().epoch)).await.map_err(status)?)))
    }
    async fn state(&self, _: Request<pb::StateRequest>) -> Result<Response<pb::ReplicaState>, Status> {
        Ok(Response::new(state(self.0.state().await.map_err(status)?)))
    }

    type WriteStream = ReceiverStream<Result<pb::WriteAck, Status>>;

    async fn write(&self, r: Request<Streaming<pb::WriteRequest>>) -> Result<Response<Self::WriteStream>, Status> {
        let mut inbound = r.into_inner();
        let (tx, rx) = mpsc::channel(64);
        let mem = self.0.clone();
        tokio::spawn(async move {
            let mut stream = None;
            while let Some(Ok(m)) = inbound.next().await {
                if stream.is_none() {
                    match mem.write_stream(Epoch(m.epoch)).await {
                        Ok(s) => stream = Some(s),
                        Err(e) => {
                            let _ = tx.send(Err(status(e))).await;
                            return;
                        }
                    }
                }
                let Some(s) = stream.as_mut() else { return };
                let req = WriteReq { seq: m.seq, offset: m.offset, data: m.data, fua: m.fua };
                if s.requests.send(req).await.is_err() {
                    return;
                }
                let reply = match s.acks.next().await {
                    Some(Ok(a)) => Ok(pb::WriteAck { seq: a.seq, durable_seq: a.durable_seq }),
                    Some(Err(e)) => Err(status(e)),
                    None => return,
                };
                let failed = reply.is_err();
                if tx.send(reply).await.is_err() || failed {
                    return;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn read(&self, r: Request<pb::ReadRequest>) -> Result<Response<pb::ReadResponse>, Status> {
        let r = r.into_inner();
        let data = self.0.read(Epoch(r.epoch), Offset(r.offset), r.length).await.map_err(status)?;
        Ok(Response::new(pb::ReadResponse { data }))
    }
    async fn flush(&self, r: Request<pb::FlushRequest>) -> Result<Response<pb::FlushResponse>, Status> {
        let durable_seq = self.0.flush(Epoch(r.into_inner().epoch)).await.map_err(status)?;
        Ok(Response::new(pb::FlushResponse { durable_seq }))
    }
    async fn trim(&self, r: Request<pb::TrimRequest>) -> Result<Response<pb::WriteAck>, Status> {
        let r = r.into_inner();
        self.0.trim(Epoch(r.epoch), r.seq, Offset(r.offset), r.length).await.map_err(status)?;
        Ok(Response::new(pb::WriteAck { seq: r.seq, durable_seq: 0 }))
    }
    async fn expand(&self, _: Request<pb::ExpandRequest>) -> Result<Response<pb::ReplicaInfo>, Status> {
        Err(Status::unimplemented("expand"))
    }

    async fn set_replica_set(&self, _: Request<pb::SetReplicaSetRequest>) -> Result<Response<pb::ReplicaInfo>, Status> {
        Err(Status::unimplemented("set_replica_set"))
    }

    async fn set_labels(&self, _: Request<pb::SetLabelsRequest>) -> Result<Response<pb::ReplicaInfo>, Status> {
        Err(Status::unimplemented("set_labels"))
    }

    // Snapshots are exercised against the real service (store and cluster tests).
    async fn create_snapshot(
        &self,
        _: Request<pb::CreateSnapshotRequest>,
    ) -> Result<Response<pb::SnapshotInfo>, Status> {
        Err(Status::unimplemented("create_snapshot"))
    }
    async fn delete_snapshot(
        &self,
        _: Request<pb::DeleteSnapshotRequest>,
    ) -> Result<Response<pb::DeleteSnapshotResponse>, Status> {
        Err(Status::unimplemented("delete_snapshot"))
    }
    async fn list_snapshots(
        &self,
        _: Request<pb::ListSnapshotsRequest>,
    ) -> Result<Response<pb::ListSnapshotsResponse>, Status> {
        Err(Status::unimplemented("list_snapshots"))
    }
    async fn install_snapshot(
        &self,
        _: Request<pb::InstallSnapshotRequest>,
    ) -> Result<Response<pb::SnapshotInfo>, Status> {
        Err(Status::unimplemented("install_snapshot"))
    }
    async fn read_snapshot(&self, _: Request<pb::ReadSnapshotRequest>) -> Result<Response<pb::ReadResponse>, Status> {
        Err(Status::unimplemented("read_snapshot"))
    }
    async fn changed_blocks(
        &self,
        _: Request<pb::ChangedBlocksRequest>,
    ) -> Result<Response<pb::ChangedBlocksResponse>, Status> {
        Err(Status::unimplemented("changed_blocks"))
    }

    type ResyncStream = ReceiverStream<Result<pb::ResyncChunk, Status>>;

    async fn resync(&self, r: Request<pb::ResyncRequest>) -> Result<Response<Self::ResyncStream>, Status> {
        let r = r.into_inner();
        let resume = (r.resume_below > 0).then_some((r.resume_below, r.resume_seq));
        let mut chunks = self.0.resync_stream(Epoch(r.epoch), r.since_seq, resume).await.map_err(status)?;
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(async move {
            while let Some(c) = chunks.next().await {
                let msg = c.map_err(status).map(|c| {
                    let (data, trim_length) = match c.data {
                        ChunkData::Data(d) => (d, 0),
                        ChunkData::Zero => (Default::default(), 0),
                        ChunkData::Trim(len) => (Default::default(), len),
                    };
                    pb::ResyncChunk { offset: c.offset, data, seq: c.seq, trim_length }
                });
                if tx.send(msg).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
    async fn begin_resync(&self, r: Request<pb::BeginResyncRequest>) -> Result<Response<pb::ReplicaState>, Status> {
        let r = r.into_inner();
        let done =
            self.0.begin_resync(Epoch(r.epoch), r.from_seq, r.resume, history(&r.history)?).await.map_err(status)?;
        let mut st = state(self.0.state().await.map_err(status)?);
        st.resync_done_offset = done.map(|d| d.0);
        st.resync_done_seq = done.map_or(0, |d| d.1);
        Ok(Response::new(st))
    }
    async fn set_history(&self, r: Request<pb::SetHistoryRequest>) -> Result<Response<pb::ReplicaState>, Status> {
        let r = r.into_inner();
        self.0.set_history(Epoch(r.epoch), history(&r.history)?).await.map_err(status)?;
        Ok(Response::new(state(self.0.state().await.map_err(status)?)))
    }
    async fn checkpoint_resync(
        &self,
        r: Request<pb::CheckpointResyncRequest>,
    ) -> Result<Response<pb::ReplicaState>, Status> {
        let r = r.into_inner();
        self.0.checkpoint_resync(Epoch(r.epoch), Offset(r.offset)).await.map_err(status)?;
        Ok(Response::new(state(self.0.state().await.map_err(status)?)))
    }
    async fn apply_resync(
        &self,
        r: Request<pb::ApplyResyncRequest>,
    ) -> Result<Response<pb::ApplyResyncResponse>, Status> {
        let r = r.into_inner();
        let chunks = r
            .chunks
            .into_iter()
            .map(|c| ResyncChunk {
                offset: c.offset,
                seq: c.seq,
                data: if c.trim_length > 0 {
                    ChunkData::Trim(c.trim_length)
                } else if c.data.is_empty() {
                    ChunkData::Zero
                } else {
                    ChunkData::Data(c.data)
                },
            })
            .collect();
        let applied = self.0.apply_resync(Epoch(r.epoch), chunks).await.map_err(status)?;
        Ok(Response::new(pb::ApplyResyncResponse { applied, skipped_newer: 0 }))
    }
    async fn end_resync(&self, r: Request<pb::EndResyncRequest>) -> Result<Response<pb::ReplicaState>, Status> {
        self.0.end_resync(Epoch(r.into_inner().epoch)).await.map_err(status)?;
        Ok(Response::new(state(self.0.state().await.map_err(status)?)))
    }
}

/// A replica server on a free loopback port; stopped when dropped.
struct Server {
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(mem: MemReplica) -> Server {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let _ = tonic::transport::Server::builder()
            .add_service(ReplicaServer::new(Fake(mem)))
            .serve_with_incoming(TcpListenerStream::new(listener))
            .await;
    });
    Server { addr, task }
}

fn config() -> VolumeConfig {
    let mut m = MachineConfig::new(3);
    m.ack_timeout_ms = 200;
    m.failure_timeout_ms = 1_000;
    m.io_timeout_ms = 3_000;
    m.retry_interval_ms = 100;
    let mut c = VolumeConfig::new(VOLUME, SIZE, m);
    c.tick = Duration::from_millis(20);
    c
}

fn block(tag: u8) -> Vec<u8> {
    vec![tag; BS as usize]
}

async fn cluster() -> (Vec<MemReplica>, Vec<Server>, Vec<GrpcReplica>) {
    let mems: Vec<MemReplica> = (0..3).map(|i| MemReplica::new(format!("node-{i}"), SIZE)).collect();
    let mut servers = Vec::new();
    for m in &mems {
        servers.push(serve(m.clone()).await);
    }
    let clients = servers
        .iter()
        .enumerate()
        .map(|(i, s)| GrpcReplica::connect_lazy(format!("node-{i}"), VOLUME, &format!("http://{}", s.addr)).unwrap())
        .collect();
    (mems, servers, clients)
}

#[tokio::test]
async fn a_volume_over_grpc_replicates_resyncs_and_is_fenced() {
    let (mems, _servers, clients) = cluster().await;
    let vol = ReplicatedVolume::attach(config(), clients.clone()).await.unwrap();
    assert_eq!(vol.epoch(), 1);
    for i in 0..8 {
        vol.write(i * BS, block(i as u8 + 1), i == 7).await.unwrap();
    }
    vol.trim(2 * BS, BS).await.unwrap();
    vol.flush().await.unwrap();
    let expect = vol.read(0, SIZE).await.unwrap();
    assert_eq!(&expect[..BS as usize], &block(1)[..]);
    assert_eq!(&expect[2 * BS as usize..3 * BS as usize], &block(0)[..]);

    // A replica goes away; writes continue; it comes back and resyncs over gRPC.
    let start = Instant::now();
    while vol.replicas()[1].durable_seq < vol.replicas()[0].acked_seq {
        assert!(start.elapsed() < Duration::from_secs(10), "{:?}", vol.replicas());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    mems[1].set_down(true);
    vol.write(10 * BS, block(42), false).await.unwrap();
    vol.trim(3 * BS, BS).await.unwrap();
    while vol.replicas()[1].status != ReplicaStatus::Failed {
        assert!(start.elapsed() < Duration::from_secs(10), "{:?}", vol.replicas());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    mems[1].set_down(false);
    while vol.replicas()[1].status != ReplicaStatus::Healthy {
        assert!(start.elapsed() < Duration::from_secs(10), "{:?}", vol.replicas());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(vol.replicas()[1].resync_chunks, 2, "one block and one trim changed while it was down");
    assert!(mems[1].contents() == mems[0].contents(), "replica 1 converged");
    assert_eq!(mems[1].state().await.unwrap().resync_from, None, "resync mark cleared");

    // A second engine takes over: the first one's writes fail with StaleEpoch.
    let second = ReplicatedVolume::attach(config(), clients).await.unwrap();
    assert_eq!(second.epoch(), 2);
    let err = vol.write(0, block(9), false).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::StaleEpoch, "{err}");
    match err {
        Error::StaleEpoch { got, current, .. } => assert_eq!((got, current), (1, 2)),
        other => panic!("unexpected error {other}"),
    }
    second.write(0, block(7), false).await.unwrap();
    assert_eq!(second.read(0, BS).await.unwrap(), block(7));
    second.close().await;
    vol.close().await;
}

#[tokio::test]
async fn grpc_errors_map_to_engine_kinds() {
    let (mems, _servers, clients) = cluster().await;
    let c = &clients[0];
    let s = c.open(Claim::raise(3)).await.unwrap();
    assert_eq!(s.epoch, 3);
    let err = c.open(Claim::raise(2)).await.unwrap_err();
    match err {
        Error::StaleEpoch { got, current, .. } => assert_eq!((got, current), (2, 3)),
        other => panic!("unexpected error {other}"),
    }
    let lost = Claim { epoch: 4, owner: 9, owner_node: "n9".into(), mode: ClaimMode::Cas { expect: 1 } };
    assert_eq!(c.open(lost).await.unwrap_err().kind(), ErrorKind::Conflict);
    assert_eq!(c.ping(Epoch(3)).await.unwrap().epoch, 3);
    assert_eq!(c.ping(Epoch(2)).await.unwrap_err().kind(), ErrorKind::StaleEpoch);
    assert_eq!(c.read(Epoch(3), Offset(BS), BS).await.unwrap(), block(0));
    assert_eq!(c.read(Epoch(3), Offset(SIZE), BS).await.unwrap_err().kind(), ErrorKind::Unavailable);
    mems[0].set_down(true);
    assert_eq!(c.state().await.unwrap_err().kind(), ErrorKind::Unavailable);
    // A replica that is not listening at all.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let gone = GrpcReplica::connect_lazy("gone", VOLUME, &format!("http://{addr}")).unwrap();
    assert_eq!(gone.state().await.unwrap_err().kind(), ErrorKind::Unavailable);
    assert_eq!(GrpcReplica::connect_lazy("bad", VOLUME, "not a url").unwrap_err().kind(), ErrorKind::InvalidArgument);
}

/// The current epoch of a fencing answer and the offset of a corrupt block cross the wire
/// as structured data, on unary calls and in the trailers of streams alike.
#[tokio::test]
async fn fencing_epoch_and_corrupt_offset_cross_the_wire() {
    let (mems, _servers, clients) = cluster().await;
    let c = &clients[0];
    c.open(Claim::raise(5)).await.unwrap();
    match c.open(Claim::raise(2)).await.unwrap_err() {
        Error::StaleEpoch { volume, got, current } => assert_eq!((volume.as_str(), got, current), (VOLUME, 2, 5)),
        other => panic!("unexpected error {other:?}"),
    }
    let mut ws = c.write_stream(Epoch(3)).await.unwrap();
    ws.requests.send(WriteReq { seq: 1, offset: 0, data: block(7).into(), fua: false }).await.unwrap();
    match ws.acks.next().await {
        Some(Err(Error::StaleEpoch { got, current, .. })) => assert_eq!((got, current), (3, 5)),
        other => panic!("unexpected ack {other:?}"),
    }
    let mut ws = c.write_stream(Epoch(5)).await.unwrap();
    ws.requests.send(WriteReq { seq: 1, offset: 3 * BS, data: block(7).into(), fua: true }).await.unwrap();
    assert!(ws.acks.next().await.unwrap().is_ok());
    mems[0].corrupt_block(3);
    match c.read(Epoch(5), Offset(2 * BS), 2 * BS).await.unwrap_err() {
        Error::Corruption { volume, offset, .. } => assert_eq!((volume.as_str(), offset), (VOLUME, 3 * BS)),
        other => panic!("unexpected error {other:?}"),
    }
    let mut rs = c.resync_stream(Epoch(5), 0, None).await.unwrap();
    let mut failed = None;
    while let Some(item) = rs.next().await {
        if let Err(e) = item {
            failed = Some(e);
            break;
        }
    }
    match failed {
        Some(Error::Corruption { offset, .. }) => assert_eq!(offset, 3 * BS),
        other => panic!("the resync stream should end at the corrupt block: {other:?}"),
    }
}

/// Far more concurrent writes than the per-replica in-flight limit: the pipeline must
/// neither deadlock nor reorder them. Each block's writes form a chain (the next starts
/// when the previous is acknowledged), so the last write of every block is known even
/// though the engine's queue admits concurrent callers in no particular order; 32 chains
/// plus 1,000 one-off writes keep far more than the limit in flight.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_concurrent_writes_over_grpc_complete_in_order() {
    let (mems, _servers, clients) = cluster().await;
    let vol = std::sync::Arc::new(ReplicatedVolume::attach(config(), clients).await.unwrap());
    let chains = (0..32u64).map(|b| {
        let vol = vol.clone();
        async move {
            for tag in 1..=16u8 {
                vol.write(b * BS, block(tag), false).await?;
            }
            Ok::<_, hlstore_core::Error>(())
        }
    });
    let one_offs = (0..1_000u64).map(|n| {
        let vol = vol.clone();
        async move { vol.write((32 + n % 32) * BS, block(100), false).await }
    });
    let (chains, one_offs) = futures::join!(futures::future::join_all(chains), futures::future::join_all(one_offs));
    for r in chains.into_iter().chain(one_offs) {
        r.unwrap();
    }
    vol.flush().await.unwrap();
    let image = vol.read(0, SIZE).await.unwrap();
    for b in 0..64u64 {
        let at = (b * BS) as usize;
        assert_eq!(image[at], if b < 32 { 16 } else { 100 }, "block {b}");
    }
    let start = Instant::now();
    while vol.replicas().iter().any(|r| r.acked_seq != vol.replicas()[0].acked_seq) {
        assert!(start.elapsed() < Duration::from_secs(10));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(mems[1].contents() == mems[0].contents() && mems[2].contents() == mems[0].contents());
}

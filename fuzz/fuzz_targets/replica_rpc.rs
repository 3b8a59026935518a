//! The replica service (`hlstore.replica.v1`): prost decoding of its messages, the
//! conversions of `hlstore_replication::rpc::convert` (server side: requests on entry;
//! client side: the replies the engine and the node agent decode), and the service's own
//! handlers (`ReplicaService`) over an in-memory store holding one volume, so requests
//! also go through the service's and the store's validation (`hlstore_store` checks
//! shared by every store).
//!
//! Input: up to 16 steps of `selector u8 | u16 length | message bytes`, applied in order to
//! one fresh store (so an `Open` can raise the epoch a later write uses). Nothing may panic.

#![no_main]

use std::sync::{Arc, OnceLock};

use futures::StreamExt;
use hlstore_fuzz::Input;
use hlstore_proto::replica as pb;
use hlstore_proto::replica::replica_server::Replica;
use hlstore_replication::rpc::{convert, ReplicaService, MAX_MESSAGE_BYTES};
use hlstore_store::{MemStore, ReplicaStore, VolumeRecord, BLOCK_SIZE};
use libfuzzer_sys::fuzz_target;
use prost::Message;
use tonic::{Request, Status};

/// Most steps per input.
const MAX_STEPS: usize = 16;
/// Most stream items read from a streaming reply.
const MAX_STREAM_ITEMS: usize = 64;

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| tokio::runtime::Builder::new_current_thread().build().expect("runtime"))
}

/// A store with one volume: `vol`, 1 MiB, epoch 1, unowned.
fn store() -> Arc<MemStore> {
    let store = MemStore::new();
    store
        .create(VolumeRecord {
            volume_id: "vol".into(),
            size: 256 * BLOCK_SIZE,
            block_size: BLOCK_SIZE as u32,
            epoch: 1,
            replica_set: vec!["n1".into(), "n2".into(), "n3".into()],
            write_quorum: 0,
            labels: Default::default(),
            owner: 0,
            owner_node: String::new(),
            history: Vec::new(),
        })
        .expect("create the fuzz volume");
    Arc::new(store)
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    let svc = ReplicaService::new(store());
    runtime().block_on(async {
        for _ in 0..MAX_STEPS {
            let selector = input.u8();
            let msg = input.chunk();
            if msg.is_empty() && selector == 0 {
                break;
            }
            step(&svc, selector, msg).await;
        }
    });
});

fn decode<M: Message + Default>(b: &[u8]) -> Option<M> {
    M::decode(b).ok()
}

/// What the client side does with a `ReplicaState` reply.
fn client_state(s: pb::ReplicaState) {
    let _ = convert::state_from_pb(&s);
    let _ = convert::seqs_from_pb(s);
}

fn client_info(i: pb::ReplicaInfo) {
    let _ = convert::info_from_pb(i);
}

fn client_snapshot(s: pb::SnapshotInfo) {
    let _ = convert::snapshot_from_pb(s);
}

async fn step(svc: &ReplicaService<MemStore>, selector: u8, b: &[u8]) {
    match selector % 33 {
        0 => {
            let Some(m) = decode::<pb::CreateReplicaRequest>(b) else { return };
            let _ = convert::record_from_pb(m.record.clone());
            if let Ok(r) = svc.create_replica(Request::new(m)).await {
                client_info(r.into_inner());
            }
        }
        1 => {
            let Some(m) = decode::<pb::DeleteReplicaRequest>(b) else { return };
            let _ = svc.delete_replica(Request::new(m)).await;
        }
        2 => {
            let Some(m) = decode::<pb::ListReplicasRequest>(b) else { return };
            if let Ok(r) = svc.list_replicas(Request::new(m)).await {
                r.into_inner().replicas.into_iter().for_each(client_info);
            }
        }
        3 => {
            let Some(m) = decode::<pb::OpenRequest>(b) else { return };
            if let Ok(claim) = convert::claim_from_pb(&m) {
                // What the client sends for this claim is the same claim.
                let back = convert::claim_to_pb(&m.volume_id, &claim);
                assert_eq!(convert::claim_from_pb(&back).ok(), Some(claim));
            }
            if let Ok(r) = svc.open(Request::new(m)).await {
                client_state(r.into_inner());
            }
        }
        4 => {
            let Some(m) = decode::<pb::PingRequest>(b) else { return };
            if let Ok(r) = svc.ping(Request::new(m)).await {
                client_state(r.into_inner());
            }
        }
        5 => {
            let Some(m) = decode::<pb::StateRequest>(b) else { return };
            if let Ok(r) = svc.state(Request::new(m)).await {
                client_state(r.into_inner());
            }
        }
        6 => write_stream(svc, framed_writes(b)).await,
        7 => write_stream(svc, b.to_vec()).await,
        8 => {
            let Some(m) = decode::<pb::ReadRequest>(b) else { return };
            let _ = svc.read(Request::new(m)).await;
        }
        9 => {
            let Some(m) = decode::<pb::FlushRequest>(b) else { return };
            let _ = svc.flush(Request::new(m)).await;
        }
        10 => {
            let Some(m) = decode::<pb::TrimRequest>(b) else { return };
            let _ = svc.trim(Request::new(m)).await;
        }
        11 => {
            let Some(m) = decode::<pb::ExpandRequest>(b) else { return };
            if let Ok(r) = svc.expand(Request::new(m)).await {
                client_info(r.into_inner());
            }
        }
        12 => {
            let Some(m) = decode::<pb::SetReplicaSetRequest>(b) else { return };
            let _ = svc.set_replica_set(Request::new(m)).await;
        }
        13 => {
            let Some(m) = decode::<pb::ResyncRequest>(b) else { return };
            if let Ok(r) = svc.resync(Request::new(m)).await {
                let chunks: Vec<Result<pb::ResyncChunk, Status>> =
                    r.into_inner().take(MAX_STREAM_ITEMS).collect().await;
                for c in chunks.into_iter().flatten() {
                    let _ = convert::transport_chunk_from_pb(c.clone());
                    let _ = convert::chunk_from_pb(c);
                }
            }
        }
        14 => {
            let Some(m) = decode::<pb::BeginResyncRequest>(b) else { return };
            if let Ok(r) = svc.begin_resync(Request::new(m)).await {
                client_state(r.into_inner());
            }
        }
        15 => {
            let Some(m) = decode::<pb::SetHistoryRequest>(b) else { return };
            if let Ok(h) = convert::history_from_pb(&m.history) {
                assert!(convert::history_from_pb(&convert::history_to_pb(&h)).is_ok());
            }
            let _ = svc.set_history(Request::new(m)).await;
        }
        16 => {
            let Some(m) = decode::<pb::CheckpointResyncRequest>(b) else { return };
            let _ = svc.checkpoint_resync(Request::new(m)).await;
        }
        17 => {
            let Some(m) = decode::<pb::ApplyResyncRequest>(b) else { return };
            let _ = svc.apply_resync(Request::new(m)).await;
        }
        18 => {
            let Some(m) = decode::<pb::EndResyncRequest>(b) else { return };
            let _ = svc.end_resync(Request::new(m)).await;
        }
        19 => {
            let Some(m) = decode::<pb::CreateSnapshotRequest>(b) else { return };
            if let Ok(r) = svc.create_snapshot(Request::new(m)).await {
                client_snapshot(r.into_inner());
            }
        }
        20 => {
            let Some(m) = decode::<pb::DeleteSnapshotRequest>(b) else { return };
            let _ = svc.delete_snapshot(Request::new(m)).await;
        }
        21 => {
            let Some(m) = decode::<pb::ListSnapshotsRequest>(b) else { return };
            if let Ok(r) = svc.list_snapshots(Request::new(m)).await {
                r.into_inner().snapshots.into_iter().for_each(client_snapshot);
            }
        }
        22 => {
            let Some(m) = decode::<pb::InstallSnapshotRequest>(b) else { return };
            let _ = svc.install_snapshot(Request::new(m)).await;
        }
        23 => {
            let Some(m) = decode::<pb::ReadSnapshotRequest>(b) else { return };
            let _ = svc.read_snapshot(Request::new(m)).await;
        }
        24 => {
            let Some(m) = decode::<pb::ChangedBlocksRequest>(b) else { return };
            if let Ok(r) = svc.changed_blocks(Request::new(m)).await {
                let _ = convert::runs_from_pb(r.into_inner().runs);
            }
        }
        // Replies as the engine's transport and the node agent decode them.
        25 => {
            let Some(m) = decode::<pb::ReplicaState>(b) else { return };
            client_state(m);
        }
        26 => {
            let Some(m) = decode::<pb::ListReplicasResponse>(b) else { return };
            m.replicas.into_iter().for_each(client_info);
        }
        27 => {
            let Some(m) = decode::<pb::ResyncChunk>(b) else { return };
            let _ = convert::transport_chunk_from_pb(m.clone());
            let store_chunk = convert::chunk_from_pb(m);
            let _ = convert::chunk_to_pb(store_chunk);
        }
        28 => {
            let Some(m) = decode::<pb::ListSnapshotsResponse>(b) else { return };
            m.snapshots.into_iter().for_each(client_snapshot);
        }
        29 => {
            let Some(m) = decode::<pb::ChangedBlocksResponse>(b) else { return };
            let _ = convert::runs_from_pb(m.runs);
        }
        30 => {
            let Some(m) = decode::<pb::InstallSnapshotRequest>(b) else { return };
            let blocks = convert::snapshot_blocks_from_pb(m.blocks);
            let _ = convert::snapshot_blocks_to_pb(blocks);
        }
        31 => {
            let Some(m) = decode::<pb::SetLabelsRequest>(b) else { return };
            let _ = svc.set_labels(Request::new(m)).await;
        }
        _ => {
            let Some(m) = decode::<pb::WriteAck>(b) else { return };
            let _ = (m.seq, m.durable_seq);
        }
    }
}

/// gRPC frames (uncompressed) of the `u16 length | message` items in `b`.
fn framed_writes(b: &[u8]) -> Vec<u8> {
    let mut input = Input::new(b);
    let mut body = Vec::new();
    loop {
        let msg = input.chunk();
        if msg.is_empty() {
            break;
        }
        body.push(0);
        body.extend_from_slice(&(msg.len() as u32).to_be_bytes());
        body.extend_from_slice(msg);
    }
    body
}

/// A `Write` stream whose request body is `body` (gRPC frames), acks read to the end.
async fn write_stream(svc: &ReplicaService<MemStore>, body: Vec<u8>) {
    let decoder = tonic_prost::ProstCodec::<pb::WriteAck, pb::WriteRequest>::default();
    let body = tonic::body::Body::new(http_body_util::Full::new(bytes::Bytes::from(body)));
    let streaming = tonic::Streaming::new_request(
        tonic::codec::Codec::decoder(&mut decoder.clone()),
        body,
        None,
        Some(MAX_MESSAGE_BYTES),
    );
    if let Ok(acks) = svc.write(Request::new(streaming)).await {
        let _ = acks.into_inner().take(MAX_STREAM_ITEMS).collect::<Vec<_>>().await;
    }
}

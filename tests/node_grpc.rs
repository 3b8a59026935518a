//! The real `hlstore node` binary, driven over gRPC: create, open with epochs, streamed
//! writes, reads, flush, trim, resync, fencing, metrics, and restart persistence.

mod support;

use hlstore_proto::replica as pb;
use hlstore_proto::replica::replica_client::ReplicaClient;
use support::{hlstore, http_get, NodeProc};
use tonic::Code;

const BS: u64 = 4096;

async fn client(node: &NodeProc) -> ReplicaClient<tonic::transport::Channel> {
    ReplicaClient::connect(node.grpc.clone()).await.expect("connect")
}

fn w(epoch: u64, seq: u64, offset: u64, fill: u8, blocks: u64) -> pb::WriteRequest {
    pb::WriteRequest {
        volume_id: "vol".into(),
        epoch,
        seq,
        offset,
        data: vec![fill; (blocks * BS) as usize].into(),
        fua: false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_round_trip_over_grpc() {
    let dir = tempfile::tempdir().unwrap();
    let mut node = NodeProc::start("n1", dir.path());
    let mut c = client(&node).await;
    let record = pb::VolumeRecord {
        volume_id: "vol".into(),
        size: 256 * BS,
        block_size: BS as u32,
        replica_set: vec!["n1".into()],
        ..Default::default()
    };
    c.create_replica(pb::CreateReplicaRequest { record: Some(record.clone()) }).await.unwrap();
    // Attach claims are a compare-and-set on the epoch the engine read.
    use pb::open_request::Mode;
    let claim = |epoch, owner, mode: Mode, expect_epoch| pb::OpenRequest {
        volume_id: "vol".into(),
        epoch,
        owner,
        owner_node: "n1".into(),
        mode: mode as i32,
        expect_epoch,
    };
    let err = c.open(claim(2, 0xa, Mode::Cas, 1)).await.unwrap_err();
    assert_eq!(err.code(), Code::Aborted, "a claim expecting the wrong epoch loses: {err:?}");
    let st = c.open(claim(2, 0xa, Mode::Cas, 0)).await.unwrap().into_inner();
    assert_eq!((st.epoch, st.owner), (2, 0xa));
    let err = c.open(claim(2, 0xb, Mode::Cas, 0)).await.unwrap_err();
    assert_eq!(err.code(), Code::Aborted, "a racing claim for the same epoch loses: {err:?}");
    let st = c.open(claim(2, 0xa, Mode::Cas, 0)).await.unwrap().into_inner();
    assert_eq!((st.epoch, st.owner), (2, 0xa), "the winner's retry is accepted");
    let listed = c.list_replicas(pb::ListReplicasRequest {}).await.unwrap().into_inner().replicas;
    let rec = listed[0].record.clone().unwrap();
    assert_eq!((rec.owner, rec.owner_node.as_str()), (0xa, "n1"), "the holder is listed");
    // Pings prove the epoch is current; a stale one is fenced, a newer one is invalid.
    let ping = |epoch| pb::PingRequest { volume_id: "vol".into(), epoch };
    assert_eq!(c.ping(ping(2)).await.unwrap().into_inner().epoch, 2);
    assert_eq!(c.ping(ping(1)).await.unwrap_err().code(), Code::FailedPrecondition);
    assert_eq!(c.ping(ping(3)).await.unwrap_err().code(), Code::InvalidArgument);
    // Release by someone else changes nothing; by the holder it clears the owner.
    assert_eq!(c.open(claim(2, 0xb, Mode::Release, 0)).await.unwrap().into_inner().owner, 0xa);
    assert_eq!(c.open(claim(2, 0xa, Mode::Release, 0)).await.unwrap().into_inner().owner, 0);
    assert_eq!(
        c.open(pb::OpenRequest { volume_id: "vol".into(), mode: 7, ..claim(2, 1, Mode::Join, 0) })
            .await
            .unwrap_err()
            .code(),
        Code::InvalidArgument
    );

    // A stream of writes, acknowledged in order.
    let reqs = vec![w(2, 1, 0, 0xaa, 4), w(2, 2, 8 * BS, 0xbb, 2), w(2, 3, 0, 0xcc, 1)];
    let mut acks = c.write(tokio_stream::iter(reqs)).await.unwrap().into_inner();
    let mut seqs = Vec::new();
    while let Some(a) = acks.message().await.unwrap() {
        seqs.push(a.seq);
    }
    assert_eq!(seqs, [1, 2, 3]);
    let flushed = c.flush(pb::FlushRequest { volume_id: "vol".into(), epoch: 2 }).await.unwrap().into_inner();
    assert_eq!(flushed.durable_seq, 3);

    let r = c.read(pb::ReadRequest { volume_id: "vol".into(), epoch: 2, offset: 0, length: 4 * BS }).await.unwrap();
    let data = r.into_inner().data;
    assert!(data[..BS as usize].iter().all(|&b| b == 0xcc));
    assert!(data[BS as usize..].iter().all(|&b| b == 0xaa));

    // Stale epoch: fenced with FAILED_PRECONDITION, and nothing is written.
    let err =
        c.write(tokio_stream::iter(vec![w(1, 4, 0, 0x11, 1)])).await.unwrap().into_inner().message().await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    let err = c.open(pb::OpenRequest { volume_id: "vol".into(), epoch: 1, ..Default::default() }).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    // The current epoch travels as structured data (status metadata), not only as text.
    match hlstore_replication::rpc::status::from_status(&err) {
        hlstore_core::Error::StaleEpoch { volume, got, current } => {
            assert_eq!((volume.as_str(), got, current), ("vol", 1, 2))
        }
        other => panic!("unexpected error {other:?}"),
    }

    // Bad input gets clear errors.
    let err = c.read(pb::ReadRequest { volume_id: "vol".into(), epoch: 2, offset: 100, length: BS }).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let err =
        c.read(pb::ReadRequest { volume_id: "vol".into(), epoch: 2, offset: 256 * BS, length: BS }).await.unwrap_err();
    assert_eq!(err.code(), Code::OutOfRange);
    let err = c.read(pb::ReadRequest { volume_id: "nope".into(), epoch: 2, offset: 0, length: BS }).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);

    // Trim frees allocation.
    let before = c.state(pb::StateRequest { volume_id: "vol".into() }).await.unwrap().into_inner().allocated_bytes;
    assert_eq!(before, 6 * BS);
    c.trim(pb::TrimRequest { volume_id: "vol".into(), epoch: 2, seq: 5, offset: 8 * BS, length: 2 * BS })
        .await
        .unwrap();
    let after = c.state(pb::StateRequest { volume_id: "vol".into() }).await.unwrap().into_inner().allocated_bytes;
    assert_eq!(after, 4 * BS);

    // Resync stream since seq 1: the trim, then blocks written by seqs 2..: block 0 (seq 3).
    let mut rs = c
        .resync(pb::ResyncRequest { volume_id: "vol".into(), epoch: 2, since_seq: 1, ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    let mut chunks = Vec::new();
    while let Some(ch) = rs.message().await.unwrap() {
        chunks.push(ch);
    }
    assert_eq!(chunks.len(), 2, "{chunks:?}");
    assert_eq!((chunks[0].offset, chunks[0].trim_length, chunks[0].seq), (8 * BS, 2 * BS, 5));
    assert_eq!((chunks[1].offset, chunks[1].seq), (0, 3));
    assert!(chunks[1].data.iter().all(|&b| b == 0xcc));

    // Metrics are served and count what happened.
    let body = http_get(&node.metrics, "/metrics");
    assert!(body.contains("hlstore_replica_writes_total 3"), "{body}");
    assert!(body.contains("hlstore_replica_stale_epoch_rejections_total 2"), "{body}");
    assert!(body.contains("hlstore_replica_allocated_bytes{volume=\"vol\"} 16384"), "{body}");

    // Restart: the replica, its data and its epoch are still there.
    drop(c);
    node.terminate();
    let node = NodeProc::start("n1", dir.path());
    let mut c = client(&node).await;
    let st = c.state(pb::StateRequest { volume_id: "vol".into() }).await.unwrap().into_inner();
    assert_eq!((st.epoch, st.last_seq), (2, 5));
    let r = c.read(pb::ReadRequest { volume_id: "vol".into(), epoch: 2, offset: 0, length: BS }).await.unwrap();
    assert!(r.into_inner().data.iter().all(|&b| b == 0xcc));
    let list = c.list_replicas(pb::ListReplicasRequest {}).await.unwrap().into_inner();
    assert_eq!(list.replicas.len(), 1);
    assert_eq!(list.replicas[0].record.as_ref().unwrap().replica_set, ["n1"]);
}

#[test]
fn node_refuses_a_data_dir_of_another_node() {
    let dir = tempfile::tempdir().unwrap();
    drop(NodeProc::start("n1", dir.path()));
    let (ok, _, err) =
        hlstore(&["node", "--id", "n2", "--listen", "127.0.0.1:0", "--data-dir", dir.path().to_str().unwrap()]);
    assert!(!ok);
    assert!(err.contains("belongs to node \"n1\""), "{err}");
}

#[test]
fn node_keeps_nbd_on_loopback_unless_told_otherwise() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    let (ok, _, err) =
        hlstore(&["node", "--id", "n1", "--listen", "127.0.0.1:0", "--nbd-listen", "0.0.0.0:0", "--data-dir", d]);
    assert!(!ok);
    assert!(err.contains("--allow-remote-nbd") && err.contains("0.0.0.0:0"), "{err}");
}

#[test]
fn replica_cli_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let node = NodeProc::start("n1", dir.path());
    let ep = ["--endpoint", node.grpc.as_str()];
    let run = |args: &[&str]| {
        let mut all: Vec<&str> = vec!["replica"];
        all.extend_from_slice(args);
        all.extend_from_slice(&ep);
        hlstore(&all)
    };
    let (ok, out, err) = run(&["create", "demo", "--size", "1GiB"]);
    assert!(ok, "{err}");
    assert!(out.contains("created replica demo (1 GiB)"), "{out}");
    let input = dir.path().join("in.bin");
    let payload: Vec<u8> = (0..10_000u32).map(|i| (i * 7 % 256) as u8).collect();
    std::fs::write(&input, &payload).unwrap();
    let (ok, _, err) = run(&["write", "demo", "--offset", "1MiB", "--input", input.to_str().unwrap()]);
    assert!(ok, "{err}");
    let output = dir.path().join("out.bin");
    let (ok, _, err) =
        run(&["read", "demo", "--offset", "1MiB", "--length", "12KiB", "--output", output.to_str().unwrap()]);
    assert!(ok, "{err}");
    let back = std::fs::read(&output).unwrap();
    assert_eq!(&back[..payload.len()], &payload[..]);
    assert!(back[payload.len()..].iter().all(|&b| b == 0));
    let (ok, out, _) = run(&["list", "--json"]);
    assert!(ok);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v[0]["volume_id"], "demo");
    assert_eq!(v[0]["allocated_bytes"], 12288);
    let (ok, _, err) = run(&["read", "demo", "--offset", "1GiB", "--length", "4KiB"]);
    assert!(!ok);
    assert!(err.contains("outside the volume"), "{err}");
    let (ok, _, err) = hlstore(&["replica", "list", "--endpoint", "http://127.0.0.1:1"]);
    assert!(!ok);
    assert!(err.contains("cannot reach the node agent"), "{err}");
}

/// Hostile field values over real gRPC: epochs, seqs and lengths that would overflow or
/// exhaust memory, and NBD listen addresses outside the agent's own socket directory, all
/// get INVALID_ARGUMENT and change nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_fields_get_invalid_argument() {
    use hlstore_proto::volume as vpb;
    use hlstore_proto::volume::volumes_client::VolumesClient;
    let dir = tempfile::tempdir().unwrap();
    let node = NodeProc::start("n1", dir.path().join("data").as_path());
    let mut c = client(&node).await;
    let record = pb::VolumeRecord {
        volume_id: "vol".into(),
        size: 1 << 30,
        block_size: BS as u32,
        replica_set: vec!["n1".into()],
        ..Default::default()
    };
    c.create_replica(pb::CreateReplicaRequest { record: Some(record.clone()) }).await.unwrap();
    c.open(pb::OpenRequest { volume_id: "vol".into(), epoch: 2, ..Default::default() }).await.unwrap();

    let err =
        c.open(pb::OpenRequest { volume_id: "vol".into(), epoch: u64::MAX, ..Default::default() }).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("epoch"), "{err:?}");
    let err = c
        .set_replica_set(pb::SetReplicaSetRequest {
            volume_id: "vol".into(),
            epoch: u64::MAX,
            replica_set: vec!["n1".into()],
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    let err = c.write(tokio_stream::iter(vec![w(2, u64::MAX, 0, 1, 1)])).await.unwrap().into_inner().message().await;
    assert_eq!(err.unwrap_err().code(), Code::InvalidArgument);
    let err = c
        .trim(pb::TrimRequest { volume_id: "vol".into(), epoch: 2, seq: u64::MAX, offset: 0, length: BS })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    let err =
        c.read(pb::ReadRequest { volume_id: "vol".into(), epoch: 2, offset: 0, length: 256 << 20 }).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    let mut big = record.clone();
    big.volume_id = "huge".into();
    big.size = u64::MAX - BS + 1;
    let err = c.create_replica(pb::CreateReplicaRequest { record: Some(big) }).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    let st = c.state(pb::StateRequest { volume_id: "vol".into() }).await.unwrap().into_inner();
    assert_eq!((st.epoch, st.last_seq), (2, 0), "nothing changed");

    // NBD listen addresses: never a path outside the agent's socket directory (the agent
    // would remove whatever is there), never a non-loopback address.
    let victim = dir.path().join("victim");
    std::fs::write(&victim, b"keep me").unwrap();
    let mut vc = VolumesClient::connect(node.grpc.clone()).await.unwrap();
    for listen in [
        format!("unix:{}", victim.display()),
        format!("unix:{}/data/nbd/../../victim", dir.path().display()),
        "unix:".to_string(),
        "0.0.0.0:10999".to_string(),
        "not-an-address".to_string(),
    ] {
        let req = vpb::AttachVolumeRequest {
            name: "vol".into(),
            node: "n1".into(),
            nbd_listen: listen.clone(),
            force: false,
        };
        let err = vc.attach_volume(req).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{listen}: {err:?}");
    }
    assert_eq!(std::fs::read(&victim).unwrap(), b"keep me");
    let req = vpb::ReadSnapshotRequest { volume: "vol".into(), name: "s".into(), offset: BS, length: u64::MAX };
    let err = vc.read_snapshot(req).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    // A socket in the agent's own directory works.
    let sock = dir.path().join("data/nbd/vol.sock");
    let req = vpb::AttachVolumeRequest {
        name: "vol".into(),
        node: "n1".into(),
        nbd_listen: format!("unix:{}", sock.display()),
        force: false,
    };
    let v = vc.attach_volume(req).await.unwrap().into_inner();
    assert!(v.nbd_uri.contains(&format!("socket={}", sock.display())), "{v:?}");
}

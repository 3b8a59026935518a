//! The CSI Node service of `hlstore csi --attach loop` with real mounts: stage = FUSE block
//! file + loop device + mkfs.ext4 (only when blank) + mount; publish = bind mount (or a
//! bind-mounted device file for raw block); stats; unpublish removes the target; every
//! error code and idempotency rule. The driver runs in a private mount namespace (see
//! `support/csi.rs`); the tests look at its mounts through `/proc/<pid>/`.

mod support;

use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileTypeExt;
use std::path::Path;
use std::time::{Duration, Instant};

use hlstore_proto::csi;
use hlstore_proto::csi::node_client::NodeClient;
use support::cluster::Cluster;
use support::csi::{
    block_cap, create_req, expect_code, have_cap_sys_resource, is_io_flusher, mount_cap, unimplemented_note, CsiDriver,
};
use tonic::transport::Channel;
use tonic::Code;

const MIB: i64 = 1 << 20;

fn stage_req(
    id: &str,
    staging: &Path,
    cap: csi::VolumeCapability,
    ctx: &std::collections::HashMap<String, String>,
) -> csi::NodeStageVolumeRequest {
    csi::NodeStageVolumeRequest {
        volume_id: id.into(),
        publish_context: ctx.clone(),
        staging_target_path: staging.to_string_lossy().into(),
        volume_capability: Some(cap),
        ..Default::default()
    }
}

fn unstage_req(id: &str, staging: &Path) -> csi::NodeUnstageVolumeRequest {
    csi::NodeUnstageVolumeRequest { volume_id: id.into(), staging_target_path: staging.to_string_lossy().into() }
}

fn publish_req(id: &str, staging: &Path, target: &Path, cap: csi::VolumeCapability) -> csi::NodePublishVolumeRequest {
    csi::NodePublishVolumeRequest {
        volume_id: id.into(),
        staging_target_path: staging.to_string_lossy().into(),
        target_path: target.to_string_lossy().into(),
        volume_capability: Some(cap),
        ..Default::default()
    }
}

fn unpublish_req(id: &str, target: &Path) -> csi::NodeUnpublishVolumeRequest {
    csi::NodeUnpublishVolumeRequest { volume_id: id.into(), target_path: target.to_string_lossy().into() }
}

/// Creates `name` and publishes it to the driver's node; returns the publish context.
async fn create_and_publish(
    d: &CsiDriver,
    name: &str,
    bytes: i64,
    cap: csi::VolumeCapability,
) -> std::collections::HashMap<String, String> {
    let mut ctl = d.controller().await;
    ctl.create_volume(create_req(name, bytes, cap.clone())).await.expect("create volume");
    let req = csi::ControllerPublishVolumeRequest {
        volume_id: name.into(),
        node_id: d.node_id.clone(),
        volume_capability: Some(cap),
        ..Default::default()
    };
    ctl.controller_publish_volume(req).await.expect("controller publish").into_inner().publish_context
}

async fn unpublish_and_delete(d: &CsiDriver, name: &str) {
    let mut ctl = d.controller().await;
    ctl.controller_unpublish_volume(csi::ControllerUnpublishVolumeRequest {
        volume_id: name.into(),
        node_id: d.node_id.clone(),
        ..Default::default()
    })
    .await
    .expect("controller unpublish");
    ctl.delete_volume(csi::DeleteVolumeRequest { volume_id: name.into(), ..Default::default() }).await.expect("delete");
}

fn assert_clean(d: &CsiDriver) {
    assert!(d.loop_devices().is_empty(), "loop devices left: {:?}", d.loop_devices());
    assert!(d.fuse_pids().is_empty(), "fuse-attach processes left: {:?}", d.fuse_pids());
    let ours = d.dir.path().to_string_lossy().to_string();
    let ns: Vec<_> = d.ns_mounts().into_iter().filter(|(m, _)| m.contains(&ours)).collect();
    assert!(ns.is_empty(), "mounts left in the driver's namespace: {ns:?}");
    assert!(d.host_leaks().is_empty(), "mounts leaked to the host: {:?}", d.host_leaks());
}

async fn stats(node: &mut NodeClient<Channel>, id: &str, path: &Path) -> Vec<csi::VolumeUsage> {
    let req = csi::NodeGetVolumeStatsRequest {
        volume_id: id.into(),
        volume_path: path.to_string_lossy().into(),
        staging_target_path: String::new(),
    };
    node.node_get_volume_stats(req).await.expect("volume stats").into_inner().usage
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filesystem_volume_is_staged_published_and_never_reformatted() {
    let c = Cluster::new();
    c.up(&["--nodes", "3"]);
    let mut d = CsiDriver::start(&c, "n1");
    let mut node = d.node().await;
    let (staging, target) = (d.path("staging/fs"), d.path("pods/p1/mount"));
    let ctx = create_and_publish(&d, "pvc-fs", 64 * MIB, mount_cap("ext4")).await;

    // Validation first.
    let mut r = stage_req("pvc-fs", &staging, mount_cap("ext4"), &ctx);
    r.volume_id.clear();
    expect_code(node.node_stage_volume(r).await, Code::InvalidArgument, "stage without volume id");
    let mut r = stage_req("pvc-fs", &staging, mount_cap("ext4"), &ctx);
    r.staging_target_path.clear();
    expect_code(node.node_stage_volume(r).await, Code::InvalidArgument, "stage without staging path");
    let mut r = stage_req("pvc-fs", &staging, mount_cap("ext4"), &ctx);
    r.volume_capability = None;
    expect_code(node.node_stage_volume(r).await, Code::InvalidArgument, "stage without capability");
    expect_code(
        node.node_stage_volume(stage_req("nope", &staging, mount_cap("ext4"), &Default::default())).await,
        Code::NotFound,
        "stage unknown volume",
    );
    assert!(d.loop_devices().is_empty(), "rejected stages attached something");

    // A concurrent second operation on the volume is ABORTED. The first stage is held
    // inside its lock by an "NBD server" that accepts the connection and never answers.
    let hang = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let hang_ctx = HashMap::from([("nbdUri".to_string(), format!("nbd://{}/pvc-fs", hang.local_addr().unwrap()))]);
    let mut n2 = node.clone();
    let first = tokio::spawn({
        let req = stage_req("pvc-fs", &staging, mount_cap("ext4"), &hang_ctx);
        async move { n2.node_stage_volume(req).await }
    });
    let conn = tokio::task::spawn_blocking(move || {
        hang.set_nonblocking(true).unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match hang.accept() {
                Ok((s, _)) => return s,
                Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
                Err(e) => panic!("the first stage never connected: {e}"),
            }
        }
    })
    .await
    .unwrap();
    expect_code(
        node.node_stage_volume(stage_req("pvc-fs", &staging, mount_cap("ext4"), &ctx)).await,
        Code::Aborted,
        "second stage while the first runs",
    );
    expect_code(
        node.node_unstage_volume(unstage_req("pvc-fs", &staging)).await,
        Code::Aborted,
        "unstage while a stage runs",
    );
    drop(conn);
    let e = first.await.unwrap().expect_err("the stage whose server hung up fails");
    assert_eq!(e.code(), Code::Internal, "{}", e.message());
    assert!(d.loop_devices().is_empty(), "the failed stage attached nothing");

    node.node_stage_volume(stage_req("pvc-fs", &staging, mount_cap("ext4"), &ctx)).await.expect("stage");
    assert_eq!(d.ns_mount_type(&staging).as_deref(), Some("ext4"), "staging path holds the new ext4");
    assert_eq!(d.loop_devices().len(), 1);
    node.node_stage_volume(stage_req("pvc-fs", &staging, mount_cap("ext4"), &ctx)).await.expect("stage again is OK");
    assert_eq!(d.loop_devices().len(), 1, "a repeated stage attaches nothing new");
    let other = d.path("staging/other");
    std::fs::create_dir_all(d.in_ns(&other)).unwrap();

    // Publish.
    let mut r = publish_req("pvc-fs", &staging, &target, mount_cap("ext4"));
    r.target_path.clear();
    expect_code(node.node_publish_volume(r).await, Code::InvalidArgument, "publish without target");
    let mut r = publish_req("pvc-fs", &staging, &target, mount_cap("ext4"));
    r.staging_target_path.clear();
    expect_code(node.node_publish_volume(r).await, Code::InvalidArgument, "publish without staging path");
    expect_code(
        node.node_publish_volume(publish_req("pvc-fs", &other, &target, mount_cap("ext4"))).await,
        Code::FailedPrecondition,
        "publish from a path that is not staged",
    );
    expect_code(
        node.node_publish_volume(publish_req("nope", &other, &target, mount_cap("ext4"))).await,
        Code::NotFound,
        "publish unknown volume",
    );
    node.node_publish_volume(publish_req("pvc-fs", &staging, &target, mount_cap("ext4"))).await.expect("publish");
    node.node_publish_volume(publish_req("pvc-fs", &staging, &target, mount_cap("ext4"))).await.expect("again");
    assert_eq!(d.ns_mount_type(&target).as_deref(), Some("ext4"));
    let file = d.in_ns(&target.join("hello.txt"));
    let payload: Vec<u8> = (0..300_000u32).map(|i| (i * 31 % 251) as u8).collect();
    {
        let mut f = std::fs::File::create(&file).expect("write through the published mount");
        f.write_all(&payload).unwrap();
        f.sync_all().unwrap();
    }
    assert!(d.in_ns(&staging.join("hello.txt")).exists(), "the bind mount shows the staged filesystem");
    let fuse = d.fuse_pids();
    assert_eq!(fuse.len(), 1, "one fuse-attach per staged volume");
    if have_cap_sys_resource() {
        assert!(is_io_flusher(fuse[0]), "fuse-attach serves a loop device: it must run with PR_SET_IO_FLUSHER");
        let agent = c.pid("n1").expect("n1 runs");
        assert!(is_io_flusher(agent), "the node agent serves block devices: PR_SET_IO_FLUSHER");
    } else {
        eprintln!("NOTE: no CAP_SYS_RESOURCE here: PR_SET_IO_FLUSHER cannot be set, not checked");
    }

    // A restarted plugin finds its device and mounts: every call is still idempotent.
    d.restart();
    let mut node = d.node().await;
    node.node_stage_volume(stage_req("pvc-fs", &staging, mount_cap("ext4"), &ctx)).await.expect("stage after restart");
    node.node_publish_volume(publish_req("pvc-fs", &staging, &target, mount_cap("ext4")))
        .await
        .expect("publish after restart");
    assert_eq!(d.loop_devices().len(), 1, "the restarted plugin reused the device");
    assert_eq!(d.fuse_pids(), fuse, "and the FUSE block file");

    // A read-only publish of the same staged filesystem.
    let ro_target = d.path("pods/p1/ro");
    let mut ro = publish_req("pvc-fs", &staging, &ro_target, mount_cap("ext4"));
    ro.readonly = true;
    node.node_publish_volume(ro.clone()).await.expect("read-only publish");
    node.node_publish_volume(ro).await.expect("read-only publish again");
    assert!(d.in_ns(&ro_target.join("hello.txt")).exists());
    let err = std::fs::write(d.in_ns(&ro_target.join("nope.txt")), b"x").expect_err("read-only mount");
    assert_eq!(err.raw_os_error(), Some(libc::EROFS), "{err}");
    node.node_unpublish_volume(unpublish_req("pvc-fs", &ro_target)).await.expect("unpublish read-only");

    // Stats.
    let usage = stats(&mut node, "pvc-fs", &target).await;
    let bytes = usage.iter().find(|u| u.unit == csi::volume_usage::Unit::Bytes as i32).expect("bytes");
    let inodes = usage.iter().find(|u| u.unit == csi::volume_usage::Unit::Inodes as i32).expect("inodes");
    assert!(bytes.total > 40 * MIB && bytes.total <= 64 * MIB, "{bytes:?}");
    assert!(bytes.used >= 300_000 && bytes.available > 0 && bytes.available < bytes.total, "{bytes:?}");
    assert!(inodes.total > 0 && inodes.used > 0, "{inodes:?}");
    let missing = csi::NodeGetVolumeStatsRequest {
        volume_id: "pvc-fs".into(),
        volume_path: d.path("no/such/dir").to_string_lossy().into(),
        staging_target_path: String::new(),
    };
    expect_code(node.node_get_volume_stats(missing).await, Code::NotFound, "stats of a missing path");
    let mut nopath = csi::NodeGetVolumeStatsRequest { volume_id: "pvc-fs".into(), ..Default::default() };
    expect_code(node.node_get_volume_stats(nopath.clone()).await, Code::InvalidArgument, "stats without path");
    nopath.volume_path = target.to_string_lossy().into();
    nopath.volume_id.clear();
    expect_code(node.node_get_volume_stats(nopath).await, Code::InvalidArgument, "stats without id");

    // Unstage refuses while published; unpublish removes the target.
    expect_code(
        node.node_unstage_volume(unstage_req("pvc-fs", &staging)).await,
        Code::FailedPrecondition,
        "unstage while published",
    );
    let mut r = unpublish_req("pvc-fs", &target);
    r.target_path.clear();
    expect_code(node.node_unpublish_volume(r).await, Code::InvalidArgument, "unpublish without target");
    node.node_unpublish_volume(unpublish_req("pvc-fs", &target)).await.expect("unpublish");
    assert!(d.ns_mount_type(&target).is_none());
    assert!(!d.in_ns(&target).exists(), "NodeUnpublishVolume removes the target path");
    node.node_unpublish_volume(unpublish_req("pvc-fs", &target)).await.expect("unpublish again is OK");
    expect_code(
        node.node_unpublish_volume(unpublish_req("nope", &d.path("pods/none"))).await,
        Code::NotFound,
        "unpublish unknown volume",
    );

    // Unstage detaches everything; repeating is OK.
    let mut r = unstage_req("pvc-fs", &staging);
    r.staging_target_path.clear();
    expect_code(node.node_unstage_volume(r).await, Code::InvalidArgument, "unstage without path");
    node.node_unstage_volume(unstage_req("pvc-fs", &staging)).await.expect("unstage");
    assert!(d.ns_mount_type(&staging).is_none());
    assert!(d.loop_devices().is_empty() && d.fuse_pids().is_empty(), "unstage leaves no device behind");
    node.node_unstage_volume(unstage_req("pvc-fs", &staging)).await.expect("unstage again is OK");
    expect_code(node.node_unstage_volume(unstage_req("nope", &staging)).await, Code::NotFound, "unstage unknown");

    // Stage again: the filesystem is mounted, not recreated; the file is still there.
    node.node_stage_volume(stage_req("pvc-fs", &staging, mount_cap("ext4"), &ctx)).await.expect("restage");
    node.node_publish_volume(publish_req("pvc-fs", &staging, &target, mount_cap("ext4"))).await.expect("republish");
    let got = std::fs::read(d.in_ns(&target.join("hello.txt"))).expect("file survives unstage and restage");
    assert!(got == payload, "content changed across restage");
    expect_code(
        node.node_stage_volume(stage_req("pvc-fs", &staging, mount_cap("xfs"), &ctx)).await,
        Code::AlreadyExists,
        "same staging path, incompatible filesystem",
    );
    expect_code(
        node.node_stage_volume(stage_req("pvc-fs", &staging, block_cap(), &ctx)).await,
        Code::AlreadyExists,
        "same staging path, raw block asked for",
    );
    expect_code(
        node.node_stage_volume(stage_req("pvc-fs", &other, mount_cap("ext4"), &ctx)).await,
        Code::FailedPrecondition,
        "stage at a second path while staged",
    );
    // Asking for another filesystem never reformats.
    node.node_unpublish_volume(unpublish_req("pvc-fs", &target)).await.expect("unpublish");
    node.node_unstage_volume(unstage_req("pvc-fs", &staging)).await.expect("unstage");
    let msg = expect_code(
        node.node_stage_volume(stage_req("pvc-fs", &staging, mount_cap("xfs"), &ctx)).await,
        Code::FailedPrecondition,
        "stage as xfs over ext4",
    );
    assert!(msg.contains("not reformatted"), "{msg}");
    node.node_unstage_volume(unstage_req("pvc-fs", &staging)).await.expect("unstage after the refused stage");
    node.node_stage_volume(stage_req("pvc-fs", &staging, mount_cap(""), &ctx))
        .await
        .expect("stage, fs left to the driver");
    assert_eq!(d.ns_mount_type(&staging).as_deref(), Some("ext4"), "the existing filesystem is used");
    node.node_publish_volume(publish_req("pvc-fs", &staging, &target, mount_cap(""))).await.expect("republish");
    let got = std::fs::read(d.in_ns(&target.join("hello.txt"))).expect("file still there");
    assert!(got == payload, "content changed");

    node_expand(&d, &mut node, &ctx, &staging, &target).await;

    node.node_unpublish_volume(unpublish_req("pvc-fs", &target)).await.expect("unpublish");
    node.node_unstage_volume(unstage_req("pvc-fs", &staging)).await.expect("unstage");
    unpublish_and_delete(&d, "pvc-fs").await;
    assert_clean(&d);
}

/// ControllerExpandVolume + NodeExpandVolume: with the loop backend the device shows the
/// new size after a restage, then NodeExpandVolume grows ext4 online.
async fn node_expand(
    d: &CsiDriver,
    node: &mut NodeClient<Channel>,
    ctx: &std::collections::HashMap<String, String>,
    staging: &Path,
    target: &Path,
) {
    let expand = |bytes: i64| csi::NodeExpandVolumeRequest {
        volume_id: "pvc-fs".into(),
        volume_path: target.to_string_lossy().into(),
        capacity_range: Some(csi::CapacityRange { required_bytes: bytes, limit_bytes: 0 }),
        ..Default::default()
    };
    let mut r = expand(64 * MIB);
    r.volume_path.clear();
    expect_code(node.node_expand_volume(r).await, Code::InvalidArgument, "node expand without path");
    let mut r = expand(64 * MIB);
    r.volume_id = "nope".into();
    expect_code(node.node_expand_volume(r).await, Code::NotFound, "node expand of a volume not staged here");
    let same = node.node_expand_volume(expand(64 * MIB)).await.expect("expand to the current size").into_inner();
    assert_eq!(same.capacity_bytes, 64 * MIB);

    let mut ctl = d.controller().await;
    let grow = csi::ControllerExpandVolumeRequest {
        volume_id: "pvc-fs".into(),
        capacity_range: Some(csi::CapacityRange { required_bytes: 128 * MIB, limit_bytes: 0 }),
        ..Default::default()
    };
    let r = ctl.controller_expand_volume(grow).await;
    if unimplemented_note(&r, "node expand") {
        return;
    }
    assert!(r.expect("controller expand").into_inner().node_expansion_required);
    node.node_unpublish_volume(unpublish_req("pvc-fs", target)).await.expect("unpublish");
    node.node_unstage_volume(unstage_req("pvc-fs", staging)).await.expect("unstage");
    node.node_stage_volume(stage_req("pvc-fs", staging, mount_cap("ext4"), ctx)).await.expect("restage");
    node.node_publish_volume(publish_req("pvc-fs", staging, target, mount_cap("ext4"))).await.expect("republish");
    let before = stats(node, "pvc-fs", target).await[0].total;
    let r = node.node_expand_volume(expand(128 * MIB)).await.expect("node expand").into_inner();
    assert_eq!(r.capacity_bytes, 128 * MIB);
    let after = stats(node, "pvc-fs", target).await[0].total;
    assert!(after > before + 50 * MIB, "ext4 grew from {before} to {after}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_block_and_xfs_volumes() {
    let c = Cluster::new();
    c.up(&["--nodes", "3"]);
    let d = CsiDriver::start(&c, "n1");
    let mut node = d.node().await;

    let info = node.node_get_info(csi::NodeGetInfoRequest {}).await.unwrap().into_inner();
    assert_eq!(info.node_id, "n1");
    assert!(info.max_volumes_per_node > 0);
    assert_eq!(info.accessible_topology.unwrap().segments["topology.hlstore.io/node"], "n1");
    let caps = node.node_get_capabilities(csi::NodeGetCapabilitiesRequest {}).await.unwrap().into_inner();
    use csi::node_service_capability::rpc::Type;
    let types: Vec<i32> = caps
        .capabilities
        .iter()
        .filter_map(|c| c.r#type.as_ref().map(|csi::node_service_capability::Type::Rpc(r)| r.r#type))
        .collect();
    for t in [Type::StageUnstageVolume, Type::GetVolumeStats] {
        assert!(types.contains(&(t as i32)), "{t:?} missing from {types:?}");
    }
    let mut agent = hlstore_proto::volume::volumes_client::VolumesClient::connect(c.endpoint("n1")).await.unwrap();
    let agent_expands = !matches!(
        agent.expand_volume(hlstore_proto::volume::ExpandVolumeRequest::default()).await,
        Err(s) if s.code() == Code::Unimplemented
    );
    assert_eq!(types.contains(&(Type::ExpandVolume as i32)), agent_expands, "node EXPAND_VOLUME iff the agent expands");

    let (staging, target) = (d.path("staging/blk"), d.path("pods/p2/dev/blk"));
    let ctx = create_and_publish(&d, "pvc-blk", 16 * MIB, block_cap()).await;
    expect_code(
        node.node_publish_volume(publish_req("pvc-blk", &staging, &target, block_cap())).await,
        Code::FailedPrecondition,
        "block publish before stage",
    );
    node.node_stage_volume(stage_req("pvc-blk", &staging, block_cap(), &ctx)).await.expect("stage block");
    node.node_stage_volume(stage_req("pvc-blk", &staging, block_cap(), &ctx)).await.expect("stage block again");
    assert_eq!(d.loop_devices().len(), 1);
    assert!(d.ns_mount_type(&staging).is_none(), "a raw block stage mounts nothing");
    node.node_publish_volume(publish_req("pvc-blk", &staging, &target, block_cap())).await.expect("publish block");
    node.node_publish_volume(publish_req("pvc-blk", &staging, &target, block_cap())).await.expect("again");
    let dev = d.in_ns(&target);
    let md = std::fs::metadata(&dev).expect("target");
    assert!(md.file_type().is_block_device(), "the target is the device node");

    let pattern: Vec<u8> = (0..(1 << 20)).map(|i: u32| (i % 253) as u8).collect();
    {
        let mut f = std::fs::OpenOptions::new().write(true).open(&dev).expect("open device");
        f.seek(SeekFrom::Start(4 << 20)).unwrap();
        f.write_all(&pattern).unwrap();
        f.sync_all().unwrap();
    }
    let usage = stats(&mut node, "pvc-blk", &target).await;
    assert_eq!(usage[0].total, 16 * MIB, "{usage:?}");

    node.node_unpublish_volume(unpublish_req("pvc-blk", &target)).await.expect("unpublish block");
    assert!(!d.in_ns(&target).exists(), "the device file is removed");
    node.node_unstage_volume(unstage_req("pvc-blk", &staging)).await.expect("unstage block");
    assert!(d.loop_devices().is_empty());

    // The data went to the replicated volume: a fresh attach reads it back.
    node.node_stage_volume(stage_req("pvc-blk", &staging, block_cap(), &ctx)).await.expect("restage block");
    node.node_publish_volume(publish_req("pvc-blk", &staging, &target, block_cap())).await.expect("republish");
    let mut back = vec![0u8; pattern.len()];
    {
        let mut f = std::fs::File::open(d.in_ns(&target)).expect("open device");
        f.seek(SeekFrom::Start(4 << 20)).unwrap();
        f.read_exact(&mut back).unwrap();
    }
    assert!(back == pattern, "block content differs after detach and re-attach");
    node.node_unpublish_volume(unpublish_req("pvc-blk", &target)).await.expect("unpublish");
    node.node_unstage_volume(unstage_req("pvc-blk", &staging)).await.expect("unstage");
    unpublish_and_delete(&d, "pvc-blk").await;

    // xfs: created on a blank volume, found again (not recreated) by a later stage.
    let (staging, target) = (d.path("staging/xfs"), d.path("pods/p3/mount"));
    let ctx = create_and_publish(&d, "pvc-xfs", 512 * MIB, mount_cap("xfs")).await;
    node.node_stage_volume(stage_req("pvc-xfs", &staging, mount_cap("xfs"), &ctx)).await.expect("stage xfs");
    assert_eq!(d.ns_mount_type(&staging).as_deref(), Some("xfs"));
    node.node_publish_volume(publish_req("pvc-xfs", &staging, &target, mount_cap("xfs"))).await.expect("publish xfs");
    std::fs::write(d.in_ns(&target.join("x.txt")), b"on xfs").expect("write on xfs");
    node.node_unpublish_volume(unpublish_req("pvc-xfs", &target)).await.expect("unpublish");
    node.node_unstage_volume(unstage_req("pvc-xfs", &staging)).await.expect("unstage");
    node.node_stage_volume(stage_req("pvc-xfs", &staging, mount_cap(""), &ctx)).await.expect("restage");
    assert_eq!(d.ns_mount_type(&staging).as_deref(), Some("xfs"), "the existing xfs is mounted");
    assert_eq!(std::fs::read(d.in_ns(&staging.join("x.txt"))).expect("file survives"), b"on xfs");
    node.node_unstage_volume(unstage_req("pvc-xfs", &staging)).await.expect("unstage");
    unpublish_and_delete(&d, "pvc-xfs").await;
    assert_clean(&d);
}

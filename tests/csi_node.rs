//! The CSI Node service of `hlstore csi --attach loop` with real mounts and ext4: stage =
//! FUSE block file + loop device + mkfs.ext4 (only when blank) + mount; publish = bind
//! mount; stats; unpublish removes the target; every error code and idempotency rule;
//! a plugin restart. Raw block and xfs: `csi_node_block.rs`. The driver runs in a private mount namespace (see
//! `support/csi.rs`); the tests look at its mounts through `/proc/<pid>/`.

mod support;

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use hlstore_proto::csi;
use hlstore_proto::csi::node_client::NodeClient;
use support::cluster::Cluster;
use support::csi::*;
use tonic::transport::Channel;
use tonic::Code;

const MIB: i64 = 1 << 20;

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
    // A well-formed capability this plugin does not have: "Exceeds capabilities".
    expect_code(
        node.node_stage_volume(stage_req("pvc-fs", &staging, mount_cap("btrfs"), &ctx)).await,
        Code::FailedPrecondition,
        "stage with an unsupported filesystem",
    );
    expect_code(
        node.node_stage_volume(stage_req("nope", &staging, mount_cap("ext4"), &Default::default())).await,
        Code::NotFound,
        "stage unknown volume",
    );
    let mut ctl = d.controller().await;
    ctl.create_volume(create_req("pvc-elsewhere", 8 * MIB, mount_cap("ext4"))).await.expect("create");
    let on_n2 = csi::ControllerPublishVolumeRequest {
        volume_id: "pvc-elsewhere".into(),
        node_id: "n2".into(),
        volume_capability: Some(mount_cap("ext4")),
        ..Default::default()
    };
    let ctx2 = ctl.controller_publish_volume(on_n2).await.expect("publish to n2").into_inner().publish_context;
    expect_code(
        node.node_stage_volume(stage_req("pvc-elsewhere", &d.path("staging/x"), mount_cap("ext4"), &ctx2)).await,
        Code::FailedPrecondition,
        "stage on n1 of a volume published to n2",
    );
    let unpub = csi::ControllerUnpublishVolumeRequest { volume_id: "pvc-elsewhere".into(), ..Default::default() };
    ctl.controller_unpublish_volume(unpub).await.expect("unpublish from every node");
    ctl.delete_volume(csi::DeleteVolumeRequest { volume_id: "pvc-elsewhere".into(), ..Default::default() })
        .await
        .expect("delete");
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
    // The spec's "Staging target path not set" (this plugin has STAGE_UNSTAGE_VOLUME).
    expect_code(node.node_publish_volume(r).await, Code::FailedPrecondition, "publish without staging path");
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
    node.node_publish_volume(ro.clone()).await.expect("read-only publish again");
    ro.readonly = false;
    expect_code(node.node_publish_volume(ro).await, Code::AlreadyExists, "same target, read-write this time");
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
    // Nothing mounted there: OK, whatever the agent knows (a node cut off from the
    // replicas must still let kubelet finish tearing the pod down).
    node.node_unpublish_volume(unpublish_req("nope", &d.path("pods/none"))).await.expect("unpublish of nothing is OK");

    // Unstage detaches everything; repeating is OK.
    let mut r = unstage_req("pvc-fs", &staging);
    r.staging_target_path.clear();
    expect_code(node.node_unstage_volume(r).await, Code::InvalidArgument, "unstage without path");
    node.node_unstage_volume(unstage_req("pvc-fs", &staging)).await.expect("unstage");
    assert!(d.ns_mount_type(&staging).is_none());
    assert!(d.loop_devices().is_empty() && d.fuse_pids().is_empty(), "unstage leaves no device behind");
    node.node_unstage_volume(unstage_req("pvc-fs", &staging)).await.expect("unstage again is OK");
    node.node_unstage_volume(unstage_req("nope", &staging)).await.expect("unstage of a volume not staged is OK");

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
    let before = stats(node, "pvc-fs", target).await[0].total;
    node.node_unpublish_volume(unpublish_req("pvc-fs", target)).await.expect("unpublish");
    node.node_unstage_volume(unstage_req("pvc-fs", staging)).await.expect("unstage");
    node.node_stage_volume(stage_req("pvc-fs", staging, mount_cap("ext4"), ctx)).await.expect("restage");
    node.node_publish_volume(publish_req("pvc-fs", staging, target, mount_cap("ext4"))).await.expect("republish");
    // Staging grew ext4 offline already; NodeExpandVolume finds nothing left to do.
    let r = node.node_expand_volume(expand(128 * MIB)).await.expect("node expand").into_inner();
    assert_eq!(r.capacity_bytes, 128 * MIB);
    let after = stats(node, "pvc-fs", target).await[0].total;
    assert!(after > before + 50 * MIB, "ext4 grew from {before} to {after}");
}

/// SINGLE_NODE_SINGLE_WRITER (Kubernetes' ReadWriteOncePod) is published for one workload
/// at a time: a second target path is FAILED_PRECONDITION until the first is unpublished.
/// SINGLE_NODE_MULTI_WRITER is published at several. Both are advertised through the
/// SINGLE_NODE_MULTI_WRITER capability of the controller and the node (CSI 1.5).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_node_single_writer_is_published_once_and_multi_writer_many_times() {
    use csi::volume_capability::access_mode::Mode;
    let c = Cluster::new();
    c.up(&["--nodes", "3"]);
    let d = CsiDriver::start(&c, "n1");
    let mut node = d.node().await;
    let mut ctl = d.controller().await;
    let ncaps = node.node_get_capabilities(csi::NodeGetCapabilitiesRequest {}).await.unwrap().into_inner();
    let has_node_cap = ncaps.capabilities.iter().any(|c| {
        matches!(&c.r#type, Some(csi::node_service_capability::Type::Rpc(r))
            if r.r#type == csi::node_service_capability::rpc::Type::SingleNodeMultiWriter as i32)
    });
    assert!(has_node_cap, "{ncaps:?}");
    let ccaps = ctl.controller_get_capabilities(csi::ControllerGetCapabilitiesRequest {}).await.unwrap().into_inner();
    let has_ctl_cap = ccaps.capabilities.iter().any(|c| {
        matches!(&c.r#type, Some(csi::controller_service_capability::Type::Rpc(r))
            if r.r#type == csi::controller_service_capability::rpc::Type::SingleNodeMultiWriter as i32)
    });
    assert!(has_ctl_cap, "{ccaps:?}");

    let with_mode = |mode: Mode| {
        let mut cap = mount_cap("ext4");
        cap.access_mode = Some(csi::volume_capability::AccessMode { mode: mode as i32 });
        cap
    };
    let (single, multi) = (with_mode(Mode::SingleNodeSingleWriter), with_mode(Mode::SingleNodeMultiWriter));
    let ctx = create_and_publish(&d, "pvc-once", 32 * MIB, single.clone()).await;
    let staging = d.path("staging/once");
    node.node_stage_volume(stage_req("pvc-once", &staging, single.clone(), &ctx)).await.expect("stage");
    let (t1, t2) = (d.path("pods/a/mount"), d.path("pods/b/mount"));
    let publish = |t: &Path, cap: &csi::VolumeCapability| publish_req("pvc-once", &staging, t, cap.clone());
    node.node_publish_volume(publish(&t1, &single)).await.expect("publish");
    node.node_publish_volume(publish(&t1, &single)).await.expect("the same target again is OK");
    let m = expect_code(
        node.node_publish_volume(publish(&t2, &single)).await,
        Code::FailedPrecondition,
        "a second workload of a SINGLE_NODE_SINGLE_WRITER volume",
    );
    assert!(m.contains("pods/a/mount") && m.contains("SINGLE_NODE_SINGLE_WRITER"), "{m}");
    node.node_unpublish_volume(unpublish_req("pvc-once", &t1)).await.expect("unpublish");
    node.node_publish_volume(publish(&t2, &single)).await.expect("the only workload now");
    node.node_publish_volume(publish(&t1, &multi)).await.expect("SINGLE_NODE_MULTI_WRITER: several workloads");
    for t in [&t1, &t2] {
        node.node_unpublish_volume(unpublish_req("pvc-once", t)).await.expect("unpublish");
    }
    node.node_unstage_volume(unstage_req("pvc-once", &staging)).await.expect("unstage");
    unpublish_and_delete(&d, "pvc-once").await;
    assert_clean(&d);
}

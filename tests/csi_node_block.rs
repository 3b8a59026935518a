//! The CSI Node service with raw block volumes (the device node bind-mounted onto a file)
//! and xfs, through `hlstore csi --attach loop` in a private mount namespace (see
//! `support/csi.rs`), plus NodeGetInfo and NodeGetCapabilities.

mod support;

use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileTypeExt;

use hlstore_proto::csi;
use support::cluster::Cluster;
use support::csi::*;
use tonic::Code;

const MIB: i64 = 1 << 20;

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
    for t in [Type::StageUnstageVolume, Type::GetVolumeStats, Type::VolumeCondition] {
        assert!(types.contains(&(t as i32)), "{t:?} missing from {types:?}");
    }
    let mut agent = c.volumes("n1").await;
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

    // Volume condition: healthy while the FUSE block file serves; abnormal once its process
    // died; unpublish and unstage still clean up everything.
    let health = |r: csi::NodeGetVolumeStatsResponse| r.volume_condition.expect("volume condition");
    let req = csi::NodeGetVolumeStatsRequest {
        volume_id: "pvc-blk".into(),
        volume_path: target.to_string_lossy().into(),
        staging_target_path: String::new(),
    };
    let ok = health(node.node_get_volume_stats(req.clone()).await.expect("stats").into_inner());
    assert!(!ok.abnormal, "{ok:?}");
    for pid in d.fuse_pids() {
        // SAFETY: kill(2) on a fuse-attach of this test's driver.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !d.fuse_pids().is_empty() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let bad = health(node.node_get_volume_stats(req).await.expect("stats").into_inner());
    assert!(bad.abnormal && bad.message.contains("fuse-attach"), "{bad:?}");
    node.node_unpublish_volume(unpublish_req("pvc-blk", &target)).await.expect("unpublish");
    node.node_unstage_volume(unstage_req("pvc-blk", &staging)).await.expect("unstage after the FUSE process died");
    assert!(d.loop_devices().is_empty(), "loop device detached");
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

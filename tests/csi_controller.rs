//! The CSI Identity and Controller services of `hlstore csi`, driven over their unix socket
//! against a 3-node local cluster: every RPC, the spec's error codes and idempotency rules,
//! replica placement, paging, publish = an engine exporting the volume over NBD.
//!
//! Snapshot, clone and expand checks run for real when the node agent implements those
//! RPCs and are skipped with a printed note while it answers UNIMPLEMENTED.

mod support;

use std::collections::HashMap;
use std::process::Command;
use std::time::Duration;

use hlstore_proto::csi;
use hlstore_proto::volume as vpb;
use hlstore_proto::volume::volumes_client::VolumesClient;
use support::cluster::{run_tool, Cluster};
use support::csi::{block_cap, create_req, expect_code, mount_cap, unimplemented_note, CsiDriver};
use tonic::Code;

const MIB: i64 = 1 << 20;

fn qemu_io(uri: &str, cmd: &str) -> String {
    let out = run_tool(Command::new("qemu-io").args(["-f", "raw", "-c", cmd, uri]), Duration::from_secs(60));
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && !text.contains("failed"), "qemu-io {cmd} on {uri}: {text}");
    text
}

async fn agent_volume(agent: &mut VolumesClient<tonic::transport::Channel>, name: &str) -> vpb::Volume {
    agent.get_volume(vpb::GetVolumeRequest { name: name.into() }).await.expect("agent get volume").into_inner()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_and_controller_follow_the_spec() {
    let c = Cluster::new();
    c.up(&["--nodes", "3"]);
    let d = CsiDriver::start(&c, "n1");
    let mut agent = c.volumes("n2").await;

    // ----- Identity -----
    let mut id = d.identity().await;
    let info = id.get_plugin_info(csi::GetPluginInfoRequest {}).await.unwrap().into_inner();
    assert_eq!(info.name, "csi.hlstore.io");
    assert!(!info.vendor_version.is_empty());
    let caps = id.get_plugin_capabilities(csi::GetPluginCapabilitiesRequest {}).await.unwrap().into_inner();
    let has_service = |t: csi::plugin_capability::service::Type| {
        caps.capabilities
            .iter()
            .any(|c| matches!(&c.r#type, Some(csi::plugin_capability::Type::Service(s)) if s.r#type == t as i32))
    };
    assert!(has_service(csi::plugin_capability::service::Type::ControllerService));
    let online_expansion = caps.capabilities.iter().any(|c| {
        matches!(
            &c.r#type,
            Some(csi::plugin_capability::Type::VolumeExpansion(e))
                if e.r#type == csi::plugin_capability::volume_expansion::Type::Online as i32
        )
    });
    let probe = id.probe(csi::ProbeRequest {}).await.unwrap().into_inner();
    assert_eq!(probe.ready, Some(true));

    let mut ctl = d.controller().await;
    let ccaps = ctl.controller_get_capabilities(csi::ControllerGetCapabilitiesRequest {}).await.unwrap().into_inner();
    let rpcs: Vec<i32> = ccaps
        .capabilities
        .iter()
        .filter_map(|c| c.r#type.as_ref().map(|csi::controller_service_capability::Type::Rpc(r)| r.r#type))
        .collect();
    use csi::controller_service_capability::rpc::Type as Rpc;
    for want in [Rpc::CreateDeleteVolume, Rpc::PublishUnpublishVolume, Rpc::ListVolumes, Rpc::GetCapacity] {
        assert!(rpcs.contains(&(want as i32)), "missing {want:?} in {rpcs:?}");
    }
    // Capabilities follow what the agent implements.
    let agent_expands = !matches!(
        agent.expand_volume(vpb::ExpandVolumeRequest::default()).await,
        Err(s) if s.code() == Code::Unimplemented
    );
    assert_eq!(rpcs.contains(&(Rpc::ExpandVolume as i32)), agent_expands, "EXPAND_VOLUME iff the agent expands");
    assert_eq!(online_expansion, agent_expands, "online expansion plugin capability iff the agent expands");
    let agent_snapshots = !matches!(
        agent.list_snapshots(vpb::ListSnapshotsRequest::default()).await,
        Err(s) if s.code() == Code::Unimplemented
    );
    assert_eq!(rpcs.contains(&(Rpc::CreateDeleteSnapshot as i32)), agent_snapshots);
    assert_eq!(rpcs.contains(&(Rpc::ListSnapshots as i32)), agent_snapshots);

    // ----- CreateVolume: validation before any work -----
    let mut no_name = create_req("", 8 * MIB, mount_cap("ext4"));
    no_name.name.clear();
    expect_code(ctl.create_volume(no_name).await, Code::InvalidArgument, "create without name");
    let mut no_caps = create_req("v-nocaps", 8 * MIB, mount_cap("ext4"));
    no_caps.volume_capabilities.clear();
    expect_code(ctl.create_volume(no_caps).await, Code::InvalidArgument, "create without capabilities");
    let mut bad_param = create_req("v-badparam", 8 * MIB, mount_cap("ext4"));
    bad_param.parameters.insert("replicaz".into(), "3".into());
    expect_code(ctl.create_volume(bad_param).await, Code::InvalidArgument, "unknown parameter");
    let mut multi = create_req("v-multi", 8 * MIB, mount_cap("ext4"));
    multi.volume_capabilities[0].access_mode = Some(csi::volume_capability::AccessMode {
        mode: csi::volume_capability::access_mode::Mode::MultiNodeMultiWriter as i32,
    });
    expect_code(ctl.create_volume(multi).await, Code::InvalidArgument, "multi-node writer");
    let listed = agent.list_volumes(vpb::ListVolumesRequest {}).await.unwrap().into_inner().volumes;
    assert!(listed.is_empty(), "rejected requests created volumes: {listed:?}");

    // ----- CreateVolume: sizes, idempotency, placement -----
    let v1 = ctl.create_volume(create_req("pvc-one", 10 * MIB + 1, mount_cap("ext4"))).await.unwrap().into_inner();
    let v1 = v1.volume.expect("volume");
    assert_eq!(v1.volume_id, "pvc-one");
    assert_eq!(v1.capacity_bytes, 10 * MIB + 4096, "rounded up to whole 4 KiB blocks");
    let again = ctl.create_volume(create_req("pvc-one", 10 * MIB + 1, mount_cap("ext4"))).await.unwrap().into_inner();
    assert_eq!(again.volume.unwrap(), v1, "same name and size: the same volume");
    let mut range = create_req("pvc-one", 0, mount_cap("ext4"));
    range.capacity_range = Some(csi::CapacityRange { required_bytes: MIB, limit_bytes: 64 * MIB });
    ctl.create_volume(range).await.expect("a compatible capacity range returns the existing volume");
    expect_code(
        ctl.create_volume(create_req("pvc-one", 20 * MIB, mount_cap("ext4"))).await,
        Code::AlreadyExists,
        "same name, other size",
    );
    let av = agent_volume(&mut agent, "pvc-one").await;
    let mut set = av.replica_set.clone();
    set.sort();
    assert_eq!(set, ["n1", "n2", "n3"], "three replicas, one per node");

    let mut two = create_req("pvc-two", 4 * MIB, block_cap());
    two.parameters = HashMap::from([
        ("replicas".into(), "2".into()),
        ("dataLocality".into(), "best-effort".into()),
        // What the external-provisioner adds with --extra-create-metadata.
        ("csi.storage.k8s.io/pvc/name".into(), "media".into()),
        ("csi.storage.k8s.io/pvc/namespace".into(), "apps".into()),
        ("csi.storage.k8s.io/pv/name".into(), "pvc-two".into()),
    ]);
    two.accessibility_requirements = Some(csi::TopologyRequirement {
        requisite: vec![],
        preferred: vec![csi::Topology {
            segments: HashMap::from([("topology.hlstore.io/node".to_string(), "n3".to_string())]),
        }],
    });
    ctl.create_volume(two).await.expect("create with replicas=2, dataLocality");
    let mut two_again = create_req("pvc-two", 4 * MIB, block_cap());
    two_again.parameters = HashMap::from([("replicas".into(), "3".into())]);
    expect_code(ctl.create_volume(two_again).await, Code::AlreadyExists, "same name, other replica count");
    let av = agent_volume(&mut agent, "pvc-two").await;
    assert_eq!(av.replica_set.len(), 2, "{:?}", av.replica_set);
    assert_eq!(av.replica_set[0], "n3", "best-effort locality puts a replica on the preferred node");
    assert_eq!(av.labels.get("csi.hlstore.io/pvc-namespace").map(String::as_str), Some("apps"), "{:?}", av.labels);
    assert_eq!(av.labels.get("csi.hlstore.io/pvc-name").map(String::as_str), Some("media"), "{:?}", av.labels);
    assert_eq!(av.labels.get("csi.hlstore.io/pv-name").map(String::as_str), Some("pvc-two"), "{:?}", av.labels);
    assert_ne!(av.replica_set[0], av.replica_set[1]);

    let mut too_many = create_req("pvc-five", 4 * MIB, mount_cap(""));
    too_many.parameters.insert("replicas".into(), "5".into());
    let msg = expect_code(ctl.create_volume(too_many).await, Code::InvalidArgument, "more replicas than nodes");
    assert!(msg.contains("5 replicas"), "{msg}");
    let odd = ctl.create_volume(create_req("Odd Name/x", 4 * MIB, mount_cap(""))).await.unwrap().into_inner();
    let odd_id = odd.volume.unwrap().volume_id;
    assert!(odd_id.starts_with("Odd-Name-x-"), "{odd_id}");
    let odd2 = ctl.create_volume(create_req("Odd Name/x", 4 * MIB, mount_cap(""))).await.unwrap().into_inner();
    assert_eq!(odd2.volume.unwrap().volume_id, odd_id, "a mapped name maps the same way again");

    // ----- ValidateVolumeCapabilities -----
    let val = |id: &str, caps: Vec<csi::VolumeCapability>| csi::ValidateVolumeCapabilitiesRequest {
        volume_id: id.into(),
        volume_capabilities: caps,
        ..Default::default()
    };
    let ok = ctl.validate_volume_capabilities(val("pvc-one", vec![mount_cap("ext4")])).await.unwrap().into_inner();
    assert_eq!(ok.confirmed.expect("confirmed").volume_capabilities, vec![mount_cap("ext4")]);
    let no = ctl.validate_volume_capabilities(val("pvc-one", vec![mount_cap("btrfs")])).await.unwrap().into_inner();
    assert!(no.confirmed.is_none() && no.message.contains("btrfs"), "{no:?}");
    expect_code(ctl.validate_volume_capabilities(val("", vec![mount_cap("")])).await, Code::InvalidArgument, "no id");
    expect_code(ctl.validate_volume_capabilities(val("pvc-one", vec![])).await, Code::InvalidArgument, "no caps");
    expect_code(ctl.validate_volume_capabilities(val("nope", vec![mount_cap("")])).await, Code::NotFound, "unknown");

    // ----- ListVolumes with paging -----
    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let page = ctl
            .list_volumes(csi::ListVolumesRequest { max_entries: 2, starting_token: token.clone() })
            .await
            .unwrap()
            .into_inner();
        assert!(page.entries.len() <= 2);
        seen.extend(page.entries.iter().map(|e| e.volume.as_ref().unwrap().volume_id.clone()));
        if page.next_token.is_empty() {
            break;
        }
        token = page.next_token;
    }
    let mut want = vec!["pvc-one".to_string(), "pvc-two".to_string(), odd_id.clone()];
    want.sort();
    assert_eq!(seen, want, "every volume exactly once, in order");
    let bad = csi::ListVolumesRequest { max_entries: 1, starting_token: "not-a-token".into() };
    expect_code(ctl.list_volumes(bad).await, Code::Aborted, "bad paging token");
    let past = csi::ListVolumesRequest { max_entries: 1, starting_token: "99".into() };
    expect_code(ctl.list_volumes(past).await, Code::Aborted, "token past the end");
    expect_code(
        ctl.list_volumes(csi::ListVolumesRequest { max_entries: -1, starting_token: String::new() }).await,
        Code::InvalidArgument,
        "negative max_entries",
    );

    // ----- GetCapacity -----
    let cap = ctl
        .get_capacity(csi::GetCapacityRequest { volume_capabilities: vec![mount_cap("ext4")], ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    assert!(cap.available_capacity > 0);
    // A real number: the room of the third-roomiest node (no more than the filesystem's
    // free bytes, all three local nodes share one), and the largest volume that fits.
    let mut agent_nodes = agent.list_nodes(vpb::ListNodesRequest {}).await.unwrap().into_inner().nodes;
    agent_nodes.sort_by_key(|n| std::cmp::Reverse(n.available_bytes.saturating_sub(n.promised_bytes)));
    let third = agent_nodes[2].available_bytes.saturating_sub(agent_nodes[2].promised_bytes) as i64;
    assert!(cap.available_capacity < i64::MAX && cap.available_capacity <= agent_nodes[0].available_bytes as i64);
    assert!((cap.available_capacity - third).abs() < 1 << 30, "{} vs {third}", cap.available_capacity);
    assert_eq!(cap.maximum_volume_size, Some(cap.available_capacity));
    let none = ctl
        .get_capacity(csi::GetCapacityRequest { volume_capabilities: vec![mount_cap("btrfs")], ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(none.available_capacity, 0, "nothing can be provisioned for an unsupported filesystem");

    // ----- ControllerPublish / Unpublish -----
    let publ = |vol: &str, node: &str| csi::ControllerPublishVolumeRequest {
        volume_id: vol.into(),
        node_id: node.into(),
        volume_capability: Some(mount_cap("ext4")),
        ..Default::default()
    };
    expect_code(ctl.controller_publish_volume(publ("", "n1")).await, Code::InvalidArgument, "publish without id");
    expect_code(ctl.controller_publish_volume(publ("pvc-one", "")).await, Code::InvalidArgument, "without node");
    let mut nocap = publ("pvc-one", "n1");
    nocap.volume_capability = None;
    expect_code(ctl.controller_publish_volume(nocap).await, Code::InvalidArgument, "without capability");
    expect_code(ctl.controller_publish_volume(publ("nope", "n1")).await, Code::NotFound, "unknown volume");
    expect_code(ctl.controller_publish_volume(publ("pvc-one", "n9")).await, Code::NotFound, "unknown node");
    let ctx = ctl.controller_publish_volume(publ("pvc-one", "n1")).await.unwrap().into_inner().publish_context;
    let uri = ctx.get("nbdUri").expect("nbdUri in publish_context").clone();
    let again = ctl.controller_publish_volume(publ("pvc-one", "n1")).await.unwrap().into_inner().publish_context;
    assert_eq!(again, ctx, "publishing again to the same node is OK and says the same");
    expect_code(
        ctl.controller_publish_volume(publ("pvc-one", "n2")).await,
        Code::FailedPrecondition,
        "published on another node",
    );
    assert_eq!(agent_volume(&mut agent, "pvc-one").await.attached_node, "n1");
    let size =
        String::from_utf8(run_tool(Command::new("nbdinfo").args(["--size", &uri]), Duration::from_secs(60)).stdout)
            .unwrap();
    assert_eq!(size.trim(), (10 * MIB + 4096).to_string(), "the engine exports the volume at {uri}");
    qemu_io(&uri, "write -P 0x5a 0 1M");
    let listed = ctl.list_volumes(csi::ListVolumesRequest::default()).await.unwrap().into_inner();
    let e = listed.entries.iter().find(|e| e.volume.as_ref().unwrap().volume_id == "pvc-one").unwrap();
    assert_eq!(e.status.as_ref().unwrap().published_node_ids, ["n1"]);
    let got = ctl
        .controller_get_volume(csi::ControllerGetVolumeRequest { volume_id: "pvc-one".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.status.unwrap().published_node_ids, ["n1"]);
    expect_code(
        ctl.controller_get_volume(csi::ControllerGetVolumeRequest { volume_id: "nope".into() }).await,
        Code::NotFound,
        "get unknown volume",
    );

    expect_code(
        ctl.delete_volume(csi::DeleteVolumeRequest { volume_id: "pvc-one".into(), ..Default::default() }).await,
        Code::FailedPrecondition,
        "delete while published",
    );

    // ----- snapshots, clones, expansion (when the agent implements them) -----
    snapshots_and_clones(&mut ctl, &uri).await;
    expand(&mut ctl, &mut agent).await;

    let unpubl = |vol: &str, node: &str| csi::ControllerUnpublishVolumeRequest {
        volume_id: vol.into(),
        node_id: node.into(),
        ..Default::default()
    };
    expect_code(ctl.controller_unpublish_volume(unpubl("", "n1")).await, Code::InvalidArgument, "unpublish no id");
    // A volume that no longer exists is unpublished everywhere: OK (CSI idempotency rule).
    ctl.controller_unpublish_volume(unpubl("nope", "n1")).await.expect("unpublish of an unknown volume is OK");
    ctl.controller_unpublish_volume(unpubl("nope", ""))
        .await
        .expect("unpublish of an unknown volume from every node is OK");
    ctl.controller_unpublish_volume(unpubl("pvc-one", "n2")).await.expect("not published on n2: nothing to do");
    assert_eq!(agent_volume(&mut agent, "pvc-one").await.attached_node, "n1", "unpublish from n2 left n1 alone");
    ctl.controller_unpublish_volume(unpubl("pvc-one", "n1")).await.expect("unpublish");
    ctl.controller_unpublish_volume(unpubl("pvc-one", "n1")).await.expect("unpublish again");
    assert_eq!(agent_volume(&mut agent, "pvc-one").await.attached_node, "");

    // ----- DeleteVolume -----
    let del = |vol: &str| csi::DeleteVolumeRequest { volume_id: vol.into(), ..Default::default() };
    expect_code(ctl.delete_volume(del("")).await, Code::InvalidArgument, "delete without id");
    for v in ["pvc-one", "pvc-two", odd_id.as_str()] {
        ctl.delete_volume(del(v)).await.expect("delete");
        ctl.delete_volume(del(v)).await.expect("delete again is OK");
    }
    ctl.delete_volume(del("never-existed")).await.expect("delete of an unknown id is OK");
    let left = agent.list_volumes(vpb::ListVolumesRequest {}).await.unwrap().into_inner().volumes;
    assert!(left.iter().all(|v| !v.name.starts_with("pvc-")), "volumes left: {left:?}");
    assert!(d.host_leaks().is_empty(), "mounts leaked to the host: {:?}", d.host_leaks());

    // Every call above is on the driver's /metrics, by method and gRPC code.
    let page = support::http_get(&d.metrics, "/metrics");
    let count = |method: &str, code: i32| {
        let key = format!("hlstore_csi_calls_total{{method=\"{method}\",code=\"{code}\"}} ");
        page.lines().find_map(|l| l.strip_prefix(key.as_str())).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0)
    };
    assert!(count("DeleteVolume", 0) >= 7.0, "successful deletes missing:\n{page}");
    assert!(count("DeleteVolume", Code::InvalidArgument as i32) >= 1.0, "the rejected delete missing:\n{page}");
    assert!(count("ControllerUnpublishVolume", 0) >= 4.0, "{page}");
    assert!(page.contains("hlstore_csi_call_seconds_total{method=\"CreateVolume\"}"), "{page}");
    // And in the latency histogram (the dashboard's CSI latency panel).
    let key = "hlstore_csi_call_duration_seconds_count{method=\"DeleteVolume\"} ";
    let n = page.lines().find_map(|l| l.strip_prefix(key)).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    assert!(n >= 8.0, "DeleteVolume latencies missing:\n{page}");
    assert!(page.contains("hlstore_csi_call_duration_seconds_bucket{method=\"DeleteVolume\",le=\"+Inf\"}"), "{page}");
}

/// A volume just created, never attached or written: expandable, its snapshots ready at
/// once, and a deleted snapshot gone from ListSnapshots. Each of these failed when the
/// short-lived engine doing the work acted before its last replica had joined.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_volume_expands_and_its_snapshots_are_ready_and_deletable() {
    let c = Cluster::new();
    c.up(&["--nodes", "3"]);
    let d = CsiDriver::start(&c, "n1");
    let mut ctl = d.controller().await;
    for i in 0..3 {
        let name = format!("pvc-new-{i}");
        let v = ctl.create_volume(create_req(&name, 16 * MIB, block_cap())).await.expect("create").into_inner();
        let id = v.volume.expect("volume").volume_id;
        let r = ctl
            .controller_expand_volume(csi::ControllerExpandVolumeRequest {
                volume_id: id.clone(),
                capacity_range: Some(csi::CapacityRange { required_bytes: 32 * MIB, limit_bytes: 0 }),
                ..Default::default()
            })
            .await
            .unwrap_or_else(|e| panic!("expanding new volume {id}: {e}"))
            .into_inner();
        assert_eq!(r.capacity_bytes, 32 * MIB, "{id}");
        let snap = ctl
            .create_snapshot(csi::CreateSnapshotRequest {
                source_volume_id: id.clone(),
                name: format!("snap-{i}"),
                ..Default::default()
            })
            .await
            .unwrap_or_else(|e| panic!("snapshot of new volume {id}: {e}"))
            .into_inner()
            .snapshot
            .expect("snapshot");
        assert!(snap.ready_to_use, "a snapshot of never-written volume {id} is ready at once: {snap:?}");
        let listed = |r: csi::ListSnapshotsResponse| -> Vec<String> {
            r.entries.into_iter().filter_map(|e| e.snapshot).map(|s| s.snapshot_id).collect()
        };
        let before = ctl
            .list_snapshots(csi::ListSnapshotsRequest { source_volume_id: id.clone(), ..Default::default() })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(listed(before), vec![snap.snapshot_id.clone()]);
        ctl.delete_snapshot(csi::DeleteSnapshotRequest { snapshot_id: snap.snapshot_id.clone(), ..Default::default() })
            .await
            .expect("delete snapshot");
        for req in [
            csi::ListSnapshotsRequest { source_volume_id: id.clone(), ..Default::default() },
            csi::ListSnapshotsRequest { snapshot_id: snap.snapshot_id.clone(), ..Default::default() },
            csi::ListSnapshotsRequest::default(),
        ] {
            let after = listed(ctl.list_snapshots(req.clone()).await.unwrap().into_inner());
            assert!(!after.contains(&snap.snapshot_id), "deleted snapshot still listed by {req:?}: {after:?}");
        }
    }
}

/// GetCapacity's available bytes for 2 replicas with `dataLocality` and `top`.
async fn capacity(
    ctl: &mut csi::controller_client::ControllerClient<tonic::transport::Channel>,
    locality: &str,
    top: Option<csi::Topology>,
) -> i64 {
    let parameters =
        HashMap::from([("replicas".to_string(), "2".to_string()), ("dataLocality".to_string(), locality.to_string())]);
    let r =
        csi::GetCapacityRequest { volume_capabilities: vec![mount_cap("ext4")], parameters, accessible_topology: top };
    ctl.get_capacity(r).await.expect("GetCapacity").into_inner().available_capacity
}

/// GetCapacity for one node's topology segment (the provisioner's capacity tracking): a
/// segment naming no hlstore node has none; with `dataLocality: best-effort` the answer is
/// bounded by that node's own room (it gets the first replica); otherwise it is the
/// cluster-wide answer (replicas go anywhere, every node reaches the volume).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_capacity_answers_for_a_topology_segment() {
    let c = Cluster::new();
    c.up(&["--nodes", "3"]);
    let d = CsiDriver::start(&c, "n1");
    let mut ctl = d.controller().await;
    let mut agent = c.volumes("n2").await;
    let nodes = agent.list_nodes(vpb::ListNodesRequest {}).await.unwrap().into_inner().nodes;
    let room = nodes.iter().map(|n| n.available_bytes.saturating_sub(n.promised_bytes)).min().unwrap();
    assert!(room > 1 << 30, "the test needs some free space: {nodes:?}");
    // Half of n1's room promised to a thin volume whose only replica is there.
    let half = room / 2 / 4096 * 4096;
    agent
        .create_volume(vpb::CreateVolumeRequest {
            name: "big".into(),
            size: half,
            replicas: 1,
            nodes: vec!["n1".into()],
            ..Default::default()
        })
        .await
        .expect("thin volume on n1");
    let segment = |k: &str, v: &str| Some(csi::Topology { segments: HashMap::from([(k.to_string(), v.to_string())]) });
    let node = |n: &str| segment("topology.hlstore.io/node", n);
    let (lo, hi) = ((room as i64) * 2 / 3, (room as i64) * 3 / 4);
    let whole = capacity(&mut ctl, "disabled", None).await;
    assert!(whole > hi, "two replicas fit on n2 and n3: {whole} of {room}");
    // The nodes share a filesystem other work writes to: equal within a margin.
    let near = |a: i64, b: i64| (a - b).abs() < 256 << 20;
    let n1 = capacity(&mut ctl, "disabled", node("n1")).await;
    assert!(near(n1, whole), "without locality, any member node: the whole answer ({n1} vs {whole})");
    let local_n1 = capacity(&mut ctl, "best-effort", node("n1")).await;
    assert!(local_n1 < lo && local_n1 > 0, "n1 has half its room left: {local_n1} of {room}");
    let local_n2 = capacity(&mut ctl, "best-effort", node("n2")).await;
    assert!(local_n2 > hi, "n2 and n3 have their room: {local_n2} of {room}");
    assert_eq!(capacity(&mut ctl, "best-effort", node("elsewhere")).await, 0, "a segment without an hlstore node");
    assert_eq!(capacity(&mut ctl, "disabled", node("elsewhere")).await, 0);
    assert_eq!(
        capacity(&mut ctl, "disabled", segment("topology.kubernetes.io/zone", "a")).await,
        0,
        "a key this driver has not"
    );
    let no_segment = capacity(&mut ctl, "best-effort", None).await;
    assert!(near(no_segment, whole), "no segment: the whole cluster ({no_segment} vs {whole})");
}

/// A snapshot is ready_to_use only once every replica of its volume holds it: taken while
/// one replica's node is down, CreateSnapshot and ListSnapshots say not ready (the
/// external-snapshotter keeps waiting), as `hlstore snapshot list --json` does; once that
/// node is back and its replica has resynced (the snapshot installed on it), ready.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_is_ready_only_once_every_replica_holds_it() {
    let c = Cluster::new();
    c.up(&["--nodes", "3"]);
    let ep = c.endpoint("n1");
    let d = CsiDriver::start(&c, "n1");
    let mut ctl = d.controller().await;
    ctl.create_volume(create_req("pvc-r", 32 * MIB, block_cap())).await.expect("create");
    // Attached (its engine on n1) for the whole test, as a volume in use is.
    let uri = c.cli(&["volume", "attach", "pvc-r", "--node", "n1", "--endpoint", &ep]).trim().to_string();
    qemu_io(&uri, "write -P 0x42 0 4M");
    let snap = |name: &str| csi::CreateSnapshotRequest {
        source_volume_id: "pvc-r".into(),
        name: name.into(),
        ..Default::default()
    };
    let all_up = ctl.create_snapshot(snap("snap-up")).await.expect("snapshot").into_inner().snapshot.unwrap();
    assert!(all_up.ready_to_use, "every replica up: ready at once: {all_up:?}");

    c.kill9("n3");
    // A write finds n3 gone.
    qemu_io(&uri, "write -P 0x43 4M 4M");
    c.wait_until("n3's replica marked failed", Duration::from_secs(60), || {
        let v = c.volume_show("n1", "pvc-r");
        (Cluster::replica_of(&v, "n3")?["state"] == "failed").then_some(())
    });
    let down = ctl.create_snapshot(snap("snap-down")).await.expect("snapshot with n3 down").into_inner();
    let down = down.snapshot.unwrap();
    assert!(!down.ready_to_use, "n3 does not hold it: not ready: {down:?}");
    let again = ctl.create_snapshot(snap("snap-down")).await.expect("again").into_inner().snapshot.unwrap();
    assert!(!again.ready_to_use, "{again:?}");
    let ready_of = |r: csi::ListSnapshotsResponse| -> Vec<(String, bool)> {
        r.entries.into_iter().filter_map(|e| e.snapshot).map(|s| (s.snapshot_id, s.ready_to_use)).collect()
    };
    let list = csi::ListSnapshotsRequest { source_volume_id: "pvc-r".into(), ..Default::default() };
    let listed = ready_of(ctl.list_snapshots(list.clone()).await.unwrap().into_inner());
    assert!(listed.contains(&("pvc-r@snap-down".to_string(), false)), "{listed:?}");
    let cli = c.cli(&["snapshot", "list", "pvc-r", "--json", "--endpoint", &ep]);
    let cli: serde_json::Value = serde_json::from_str(&cli).unwrap();
    let row = cli.as_array().unwrap().iter().find(|s| s["name"] == "snap-down").cloned();
    assert_eq!(row.as_ref().map(|s| s["ready"].clone()), Some(serde_json::Value::Bool(false)), "{cli}");

    c.start_one("n3");
    c.wait_all_healthy("pvc-r", Duration::from_secs(120));
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let listed = ready_of(ctl.list_snapshots(list.clone()).await.unwrap().into_inner());
        if listed.iter().all(|(_, ready)| *ready) && listed.len() == 2 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "n3 resynced but snapshots not ready: {listed:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let again = ctl.create_snapshot(snap("snap-down")).await.expect("again").into_inner().snapshot.unwrap();
    assert!(again.ready_to_use, "every replica holds it now: {again:?}");
    c.cli(&["volume", "detach", "pvc-r", "--endpoint", &ep]);
}

async fn snapshots_and_clones(
    ctl: &mut csi::controller_client::ControllerClient<tonic::transport::Channel>,
    uri: &str,
) {
    let snap = |src: &str, name: &str| csi::CreateSnapshotRequest {
        source_volume_id: src.into(),
        name: name.into(),
        ..Default::default()
    };
    // Validation happens before the agent is asked, whatever it implements.
    expect_code(ctl.create_snapshot(snap("", "s1")).await, Code::InvalidArgument, "snapshot without source");
    expect_code(ctl.create_snapshot(snap("pvc-one", "")).await, Code::InvalidArgument, "snapshot without name");
    expect_code(
        ctl.delete_snapshot(csi::DeleteSnapshotRequest { snapshot_id: String::new(), ..Default::default() }).await,
        Code::InvalidArgument,
        "delete snapshot without id",
    );
    ctl.delete_snapshot(csi::DeleteSnapshotRequest { snapshot_id: "garbage".into(), ..Default::default() })
        .await
        .expect("deleting an id that names no snapshot is OK");

    let from_snapshot = |name: &str, id: &str| {
        let mut r = create_req(name, 0, mount_cap("ext4"));
        r.capacity_range = None;
        r.volume_content_source = Some(csi::VolumeContentSource {
            r#type: Some(csi::volume_content_source::Type::Snapshot(csi::volume_content_source::SnapshotSource {
                snapshot_id: id.into(),
            })),
        });
        r
    };
    let first = ctl.create_snapshot(snap("pvc-one", "snap-a")).await;
    if unimplemented_note(&first, "snapshot and clone") {
        // The agent's UNIMPLEMENTED reaches the CO as UNIMPLEMENTED, not as an internal error.
        expect_code(
            ctl.list_snapshots(csi::ListSnapshotsRequest::default()).await,
            Code::Unimplemented,
            "list snapshots without agent snapshots",
        );
        expect_code(
            ctl.create_volume(from_snapshot("pvc-x", "pvc-one@snap-a")).await,
            Code::Unimplemented,
            "volume from a snapshot without agent snapshots",
        );
        return;
    }
    let s = first.expect("create snapshot").into_inner().snapshot.unwrap();
    assert_eq!(s.source_volume_id, "pvc-one");
    assert_eq!(s.snapshot_id, "pvc-one@snap-a");
    assert!(s.creation_time.is_some());
    let again = ctl.create_snapshot(snap("pvc-one", "snap-a")).await.expect("again").into_inner().snapshot.unwrap();
    assert_eq!(again.snapshot_id, s.snapshot_id, "same name and source: the same snapshot");
    expect_code(ctl.create_snapshot(snap("pvc-two", "snap-a")).await, Code::AlreadyExists, "name used elsewhere");
    expect_code(ctl.create_snapshot(snap("nope", "snap-x")).await, Code::NotFound, "snapshot of unknown volume");
    ctl.create_snapshot(snap("pvc-one", "snap-b")).await.expect("second snapshot");

    let list = |src: &str, id: &str, max: i32, token: &str| csi::ListSnapshotsRequest {
        source_volume_id: src.into(),
        snapshot_id: id.into(),
        max_entries: max,
        starting_token: token.into(),
        ..Default::default()
    };
    let ids = |r: csi::ListSnapshotsResponse| -> Vec<String> {
        r.entries.into_iter().map(|e| e.snapshot.unwrap().snapshot_id).collect()
    };
    let all = ids(ctl.list_snapshots(list("pvc-one", "", 0, "")).await.unwrap().into_inner());
    assert_eq!(all, ["pvc-one@snap-a", "pvc-one@snap-b"]);
    let p1 = ctl.list_snapshots(list("", "", 1, "")).await.unwrap().into_inner();
    assert_eq!(p1.entries.len(), 1);
    assert!(!p1.next_token.is_empty());
    expect_code(ctl.list_snapshots(list("", "", 1, "zz")).await, Code::Aborted, "bad snapshot paging token");
    let one = ids(ctl.list_snapshots(list("", "pvc-one@snap-b", 0, "")).await.unwrap().into_inner());
    assert_eq!(one, ["pvc-one@snap-b"]);
    assert!(ids(ctl.list_snapshots(list("", "pvc-one@nope", 0, "")).await.unwrap().into_inner()).is_empty());
    assert!(ids(ctl.list_snapshots(list("nope", "", 0, "")).await.unwrap().into_inner()).is_empty());

    // Clone from the snapshot: same content (written before the snapshot through `uri`).
    // The copy runs in the background: ABORTED (pending) until it is done.
    let from_snap = from_snapshot("pvc-clone", "pvc-one@snap-a");
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    let cl = loop {
        match ctl.create_volume(from_snap.clone()).await {
            Ok(r) => break r.into_inner().volume.unwrap(),
            Err(s) if s.code() == Code::Aborted && std::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(200)).await
            }
            Err(s) => panic!("clone from snapshot: {s:?}"),
        }
    };
    assert!(cl.content_source.is_some());
    ctl.create_volume(from_snap).await.expect("clone again is idempotent");
    let publ = csi::ControllerPublishVolumeRequest {
        volume_id: "pvc-clone".into(),
        node_id: "n2".into(),
        volume_capability: Some(mount_cap("ext4")),
        ..Default::default()
    };
    let curi = ctl.controller_publish_volume(publ).await.expect("publish clone").into_inner().publish_context["nbdUri"]
        .clone();
    qemu_io(&curi, "read -P 0x5a 0 1M");
    ctl.controller_unpublish_volume(csi::ControllerUnpublishVolumeRequest {
        volume_id: "pvc-clone".into(),
        node_id: "n2".into(),
        ..Default::default()
    })
    .await
    .expect("unpublish clone");
    let missing = from_snapshot("pvc-clone-missing", "pvc-one@nope");
    expect_code(ctl.create_volume(missing).await, Code::NotFound, "clone from an unknown snapshot");
    // A limit below the source's size cannot be honoured: OUT_OF_RANGE, nothing created.
    let mut small = from_snapshot("pvc-clone-small", "pvc-one@snap-a");
    small.capacity_range = Some(csi::CapacityRange { required_bytes: 0, limit_bytes: 4 * MIB });
    expect_code(ctl.create_volume(small).await, Code::OutOfRange, "clone limited below the source size");
    // Snapshots live in their volume's replicas: deleting the volume while one exists is
    // refused (it would delete the VolumeSnapshot's data), and works once it is gone.
    ctl.create_snapshot(snap("pvc-clone", "snap-c")).await.expect("snapshot of the clone");
    let refused = ctl
        .delete_volume(csi::DeleteVolumeRequest { volume_id: "pvc-clone".into(), ..Default::default() })
        .await
        .expect_err("delete a volume that has snapshots");
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert!(refused.message().contains("has snapshots (pvc-clone@snap-c)"), "{refused:?}");
    ctl.delete_snapshot(csi::DeleteSnapshotRequest { snapshot_id: "pvc-clone@snap-c".into(), ..Default::default() })
        .await
        .expect("delete the clone's snapshot");
    let _ = uri;

    for id in ["pvc-one@snap-a", "pvc-one@snap-b"] {
        let del = csi::DeleteSnapshotRequest { snapshot_id: id.into(), ..Default::default() };
        ctl.delete_snapshot(del.clone()).await.expect("delete snapshot");
        ctl.delete_snapshot(del).await.expect("delete snapshot again is OK");
    }
    assert!(ids(ctl.list_snapshots(list("pvc-one", "", 0, "")).await.unwrap().into_inner()).is_empty());
    ctl.delete_volume(csi::DeleteVolumeRequest { volume_id: "pvc-clone".into(), ..Default::default() })
        .await
        .expect("delete clone");
}

async fn expand(
    ctl: &mut csi::controller_client::ControllerClient<tonic::transport::Channel>,
    agent: &mut VolumesClient<tonic::transport::Channel>,
) {
    let req = |id: &str, bytes: i64| csi::ControllerExpandVolumeRequest {
        volume_id: id.into(),
        capacity_range: Some(csi::CapacityRange { required_bytes: bytes, limit_bytes: 0 }),
        ..Default::default()
    };
    expect_code(ctl.controller_expand_volume(req("", 32 * MIB)).await, Code::InvalidArgument, "expand without id");
    let mut norange = req("pvc-one", 0);
    norange.capacity_range = None;
    expect_code(ctl.controller_expand_volume(norange).await, Code::InvalidArgument, "expand without range");
    expect_code(ctl.controller_expand_volume(req("nope", 32 * MIB)).await, Code::NotFound, "expand unknown");
    // Not larger: OK without asking the agent.
    let same = ctl.controller_expand_volume(req("pvc-one", MIB)).await.expect("no-op expand").into_inner();
    assert_eq!(same.capacity_bytes, 10 * MIB + 4096);
    let r = ctl.controller_expand_volume(req("pvc-one", 32 * MIB)).await;
    if unimplemented_note(&r, "expand") {
        return;
    }
    let r = r.expect("expand").into_inner();
    assert_eq!(r.capacity_bytes, 32 * MIB);
    assert!(r.node_expansion_required);
    assert_eq!(agent_volume(agent, "pvc-one").await.size, 32 * MIB as u64);
    let again = ctl.controller_expand_volume(req("pvc-one", 32 * MIB)).await.expect("expand again").into_inner();
    assert_eq!(again.capacity_bytes, 32 * MIB);
}

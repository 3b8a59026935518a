//! CSI clones (CreateVolume from a snapshot or a volume) copy in the background: the first
//! call starts the copy and answers ABORTED, later calls answer ABORTED until the copy is
//! complete and marked (the agent's label `hlstore.io/clone-state: done`; earlier
//! controllers took a snapshot `csi-clone-done`, which still counts and is replaced by a
//! label), then return the volume. A volume left half-copied (a controller killed
//! mid-copy) is never handed out: the next controller copies it again. A copy that fails
//! is reported with its cause, then started again. Markers and temporary snapshots hold
//! no blocks and are not listed by ListSnapshots.
//! Needs root (the driver runs in a private mount namespace).

mod support;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use hlstore_proto::csi;
use hlstore_proto::volume as vpb;
use support::cluster::{qemu_io, Cluster};
use support::csi::{create_req, expect_code, mount_cap, CsiDriver};
use tonic::transport::Channel;
use tonic::Code;

const MIB: u64 = 1 << 20;
const MARKER: &str = "csi-clone-done";
const STATE: &str = "hlstore.io/clone-state";

type Ctl = csi::controller_client::ControllerClient<Channel>;

fn clone_req(name: &str, source: csi::volume_content_source::Type) -> csi::CreateVolumeRequest {
    let mut r = create_req(name, 0, mount_cap("ext4"));
    r.capacity_range = None;
    r.volume_content_source = Some(csi::VolumeContentSource { r#type: Some(source) });
    r
}

fn from_snapshot(name: &str, id: &str) -> csi::CreateVolumeRequest {
    let s = csi::volume_content_source::SnapshotSource { snapshot_id: id.into() };
    clone_req(name, csi::volume_content_source::Type::Snapshot(s))
}

fn from_volume(name: &str, id: &str) -> csi::CreateVolumeRequest {
    let v = csi::volume_content_source::VolumeSource { volume_id: id.into() };
    clone_req(name, csi::volume_content_source::Type::Volume(v))
}

/// Calls CreateVolume until it succeeds (ABORTED = pending); returns the volume and how
/// many calls answered pending.
async fn until_created(ctl: &mut Ctl, req: &csi::CreateVolumeRequest, d: &CsiDriver) -> (csi::Volume, usize) {
    let deadline = Instant::now() + Duration::from_secs(180);
    let mut pending = 0;
    loop {
        match ctl.create_volume(req.clone()).await {
            Ok(r) => return (r.into_inner().volume.expect("volume"), pending),
            Err(s) if s.code() == Code::Aborted => {
                pending += 1;
                assert!(Instant::now() < deadline, "{} never finished: {s:?}; log:\n{}", req.name, d.log());
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(s) => panic!("CreateVolume {}: {s:?}; log:\n{}", req.name, d.log()),
        }
    }
}

async fn volume_labels(
    agent: &mut vpb::volumes_client::VolumesClient<Channel>,
    volume: &str,
) -> HashMap<String, String> {
    agent.get_volume(vpb::GetVolumeRequest { name: volume.into() }).await.expect(volume).into_inner().labels
}

/// Whether the agent marked clone `volume` complete.
async fn clone_done(agent: &mut vpb::volumes_client::VolumesClient<Channel>, volume: &str) -> bool {
    volume_labels(agent, volume).await.get(STATE).map(String::as_str) == Some("done")
}

async fn snapshot_names(agent: &mut vpb::volumes_client::VolumesClient<Channel>, volume: &str) -> Vec<String> {
    match agent.list_snapshots(vpb::ListSnapshotsRequest { volume: volume.into() }).await {
        Ok(r) => r.into_inner().snapshots.into_iter().map(|s| s.name).collect(),
        Err(s) if s.code() == Code::NotFound => Vec::new(),
        Err(s) => panic!("snapshots of {volume}: {s:?}"),
    }
}

/// Attaches `volume` on n1, runs the qemu-io commands, detaches it.
fn check(c: &Cluster, volume: &str, cmds: &[&str]) {
    let ep = c.endpoint("n1");
    let uri = c.cli(&["volume", "attach", volume, "--node", "n1", "--endpoint", &ep]).trim().to_string();
    qemu_io(&uri, cmds);
    c.cli(&["volume", "detach", volume, "--endpoint", &ep]);
}

/// What the source holds when snapshot `snap-1` is taken.
const SOURCE: &[&str] = &["read -P 0x5a 0 8M", "read -P 0 8M 32M", "read -P 0x6b 40M 4M", "read -P 0 44M 20M"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clone_is_pending_until_copied_and_a_half_copied_volume_is_never_handed_out() {
    let c = Cluster::new();
    c.up(&["--nodes", "3"]);
    let ep = c.endpoint("n1");
    let mut agent = c.volumes("n2").await;
    let d = CsiDriver::start(&c, "n1");
    let mut ctl = d.controller().await;

    ctl.create_volume(create_req("pvc-src", (64 * MIB) as i64, mount_cap("ext4"))).await.expect("source volume");
    let uri = c.cli(&["volume", "attach", "pvc-src", "--node", "n1", "--endpoint", &ep]).trim().to_string();
    qemu_io(&uri, &["write -P 0x5a 0 8M", "write -P 0x6b 40M 4M"]);
    c.cli(&["volume", "detach", "pvc-src", "--endpoint", &ep]);
    let snap = ctl
        .create_snapshot(csi::CreateSnapshotRequest {
            source_volume_id: "pvc-src".into(),
            name: "snap-1".into(),
            ..Default::default()
        })
        .await
        .expect("snapshot")
        .into_inner()
        .snapshot
        .unwrap();
    assert!(snap.ready_to_use);
    // Written after the snapshot: a clone of the snapshot must not see it, a clone of the
    // volume must.
    let uri = c.cli(&["volume", "attach", "pvc-src", "--node", "n1", "--endpoint", &ep]).trim().to_string();
    qemu_io(&uri, &["write -P 0x7c 20M 2M"]);
    c.cli(&["volume", "detach", "pvc-src", "--endpoint", &ep]);

    // ----- from a snapshot: pending first, then the volume, complete and marked -----
    let req = from_snapshot("pvc-clone", "pvc-src@snap-1");
    let first = ctl.create_volume(req.clone()).await.expect_err("the first call only starts the copy");
    assert_eq!(first.code(), Code::Aborted, "{first:?}");
    assert!(first.message().contains("copying snapshot pvc-src@snap-1 started"), "{first:?}");
    let (vol, _) = until_created(&mut ctl, &req, &d).await;
    assert_eq!(vol.volume_id, "pvc-clone");
    assert_eq!(vol.capacity_bytes, (64 * MIB) as i64, "a clone without a range keeps its source's size");
    match vol.content_source.and_then(|s| s.r#type) {
        Some(csi::volume_content_source::Type::Snapshot(s)) => assert_eq!(s.snapshot_id, "pvc-src@snap-1"),
        other => panic!("content source {other:?}"),
    }
    assert!(clone_done(&mut agent, "pvc-clone").await, "marked complete");
    assert_eq!(snapshot_names(&mut agent, "pvc-clone").await, Vec::<String>::new(), "no marker snapshot pins data");
    let src_snaps = snapshot_names(&mut agent, "pvc-src").await;
    assert_eq!(src_snaps, ["snap-1"], "no temporary snapshot left on the source");
    check(&c, "pvc-clone", SOURCE);
    let again = ctl.create_volume(req.clone()).await.expect("a finished clone is returned at once");
    assert_eq!(again.into_inner().volume.unwrap().volume_id, "pvc-clone");

    // ----- from a volume: its current content -----
    let vreq = from_volume("pvc-vclone", "pvc-src");
    let (vol, pending) = until_created(&mut ctl, &vreq, &d).await;
    assert!(pending >= 1, "the first call starts the copy and answers pending");
    assert_eq!(vol.volume_id, "pvc-vclone");
    check(&c, "pvc-vclone", &["read -P 0x5a 0 8M", "read -P 0x7c 20M 2M", "read -P 0x6b 40M 4M"]);

    // ----- a half-copied volume left by a controller that stopped mid-copy -----
    // Made by hand: the labels a copy job gives its volume, some of the data, no marker.
    let labels = [
        ("csi.hlstore.io/name", "pvc-half"),
        ("csi.hlstore.io/source", "snapshot:pvc-src@snap-1"),
        ("csi.hlstore.io/done-marker", MARKER),
        ("hlstore.io/clone-of", "pvc-src"),
    ];
    agent
        .create_volume(vpb::CreateVolumeRequest {
            name: "pvc-half".into(),
            size: 64 * MIB,
            labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            ..Default::default()
        })
        .await
        .expect("half-copied volume");
    let uri = c.cli(&["volume", "attach", "pvc-half", "--node", "n1", "--endpoint", &ep]).trim().to_string();
    qemu_io(&uri, &["write -P 0x5a 0 2M", "write -P 0xee 30M 2M"]);
    c.cli(&["volume", "detach", "pvc-half", "--endpoint", &ep]);
    // A new controller process knows of no copy job.
    drop(ctl);
    drop(d);
    let d = CsiDriver::start(&c, "n1");
    let mut ctl = d.controller().await;
    let half = from_snapshot("pvc-half", "pvc-src@snap-1");
    let first = ctl.create_volume(half.clone()).await.expect_err("a half-copied volume is not handed out");
    assert_eq!(first.code(), Code::Aborted, "{first:?}");
    let (vol, _) = until_created(&mut ctl, &half, &d).await;
    assert_eq!(vol.volume_id, "pvc-half");
    check(&c, "pvc-half", SOURCE);

    // ----- a controller SIGKILLed while it copies -----
    let uri = c.cli(&["volume", "attach", "pvc-src", "--node", "n1", "--endpoint", &ep]).trim().to_string();
    qemu_io(&uri, &["write -P 0x3d 0 64M"]);
    c.cli(&["volume", "detach", "pvc-src", "--endpoint", &ep]);
    let killed = from_volume("pvc-killed", "pvc-src");
    expect_code(ctl.create_volume(killed.clone()).await, Code::Aborted, "copy started");
    // Killed once the copy has created its volume (the copy of 64 MiB runs then).
    let deadline = Instant::now() + Duration::from_secs(30);
    while agent.get_volume(vpb::GetVolumeRequest { name: "pvc-killed".into() }).await.is_err() {
        assert!(Instant::now() < deadline, "the copy never created its volume; log:\n{}", d.log());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // SAFETY: kill(2) on the driver process this test started.
    unsafe { libc::kill(d.pid() as i32, libc::SIGKILL) };
    drop(ctl);
    drop(d);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let left = agent.get_volume(vpb::GetVolumeRequest { name: "pvc-killed".into() }).await;
    let left_state = left.map(|v| v.into_inner().labels.get(STATE).cloned().unwrap_or_default());
    eprintln!("after the kill: pvc-killed {left_state:?}");
    // The agent's copy outlives the controller; the new controller returns the clone only
    // once the agent marked it done.
    let d = CsiDriver::start(&c, "n1");
    let mut ctl = d.controller().await;
    let (vol, _) = until_created(&mut ctl, &killed, &d).await;
    assert_eq!(vol.volume_id, "pvc-killed");
    assert!(clone_done(&mut agent, "pvc-killed").await);
    check(&c, "pvc-killed", &["read -P 0x3d 0 64M"]);

    // ----- a copy that fails is reported with its cause, then started again -----
    let mut bad = from_snapshot("pvc-bad", "pvc-src@snap-1");
    bad.parameters.insert("replicas".into(), "5".into());
    expect_code(ctl.create_volume(bad.clone()).await, Code::Aborted, "copy started");
    let deadline = Instant::now() + Duration::from_secs(60);
    let failed = loop {
        match ctl.create_volume(bad.clone()).await {
            Err(s) if s.code() == Code::Aborted && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(200)).await
            }
            other => break other.expect_err("a clone with 5 replicas on 3 nodes cannot be made"),
        }
    };
    assert_eq!(failed.code(), Code::InvalidArgument, "{failed:?}");
    let m = failed.message();
    assert!(m.contains("copying snapshot pvc-src@snap-1 failed") && m.contains("needs 5 node(s)"), "{m}");
    assert!(m.contains("started again on the next call"), "{m}");
    let again = ctl.create_volume(bad).await.expect_err("started again");
    assert!(again.code() == Code::Aborted && again.message().contains("started"), "{again:?}");

    // ----- a clone of an earlier controller, marked by a snapshot: still done -----
    let legacy = [
        ("csi.hlstore.io/name", "pvc-legacy"),
        ("csi.hlstore.io/source", "snapshot:pvc-src@snap-1"),
        ("csi.hlstore.io/done-marker", MARKER),
        ("hlstore.io/clone-of", "pvc-src"),
    ];
    agent
        .create_volume(vpb::CreateVolumeRequest {
            name: "pvc-legacy".into(),
            size: 64 * MIB,
            labels: legacy.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            ..Default::default()
        })
        .await
        .expect("legacy clone");
    let uri = c.cli(&["volume", "attach", "pvc-legacy", "--node", "n1", "--endpoint", &ep]).trim().to_string();
    qemu_io(&uri, &["write -P 0x1f 0 4M"]);
    c.cli(&["volume", "detach", "pvc-legacy", "--endpoint", &ep]);
    let marker =
        vpb::CreateSnapshotRequest { volume: "pvc-legacy".into(), name: MARKER.into(), labels: HashMap::new() };
    agent.create_snapshot(marker).await.expect("marker snapshot");
    let got = ctl.create_volume(from_snapshot("pvc-legacy", "pvc-src@snap-1")).await.expect("marked done: returned");
    assert_eq!(got.into_inner().volume.unwrap().volume_id, "pvc-legacy");
    // The marker is now a label, and its snapshot (which kept every block it saw) is gone.
    assert!(volume_labels(&mut agent, "pvc-legacy").await.contains_key("csi.hlstore.io/filled"));
    assert_eq!(snapshot_names(&mut agent, "pvc-legacy").await, Vec::<String>::new());
    ctl.create_volume(from_snapshot("pvc-legacy", "pvc-src@snap-1")).await.expect("still done");
    check(&c, "pvc-legacy", &["read -P 0x1f 0 4M"]);

    // ----- ListSnapshots lists no marker and no temporary snapshot -----
    for (name, labels) in [
        (MARKER, HashMap::new()),
        ("csi-restore-done", HashMap::new()),
        ("clone-pvc-old", HashMap::new()),
        ("clone-pvc-new", HashMap::from([("hlstore.io/temporary".to_string(), "clone pvc-new".to_string())])),
    ] {
        let req = vpb::CreateSnapshotRequest { volume: "pvc-src".into(), name: name.into(), labels };
        agent.create_snapshot(req).await.expect(name);
    }
    let listed = |r: csi::ListSnapshotsResponse| -> Vec<String> {
        r.entries.into_iter().map(|e| e.snapshot.unwrap().snapshot_id).collect()
    };
    let all = listed(ctl.list_snapshots(csi::ListSnapshotsRequest::default()).await.unwrap().into_inner());
    assert_eq!(all, ["pvc-src@snap-1"]);
    let of_src = csi::ListSnapshotsRequest { source_volume_id: "pvc-src".into(), ..Default::default() };
    assert_eq!(listed(ctl.list_snapshots(of_src).await.unwrap().into_inner()), ["pvc-src@snap-1"]);
    for name in [MARKER, "clone-pvc-new"] {
        let by_id = csi::ListSnapshotsRequest { snapshot_id: format!("pvc-src@{name}"), ..Default::default() };
        assert!(listed(ctl.list_snapshots(by_id).await.unwrap().into_inner()).is_empty(), "{name}");
        agent
            .delete_snapshot(vpb::DeleteSnapshotRequest { volume: "pvc-src".into(), name: name.into() })
            .await
            .unwrap();
    }
    for name in ["csi-restore-done", "clone-pvc-old"] {
        agent
            .delete_snapshot(vpb::DeleteSnapshotRequest { volume: "pvc-src".into(), name: name.into() })
            .await
            .unwrap();
    }

    // ----- DeleteVolume waits for a running copy; a finished clone deletes -----
    let del = |v: &str| csi::DeleteVolumeRequest { volume_id: v.into(), ..Default::default() };
    let busy = from_volume("pvc-busy", "pvc-src");
    expect_code(ctl.create_volume(busy.clone()).await, Code::Aborted, "copy started");
    // (Unless the copy is done already.)
    if let Err(s) = ctl.delete_volume(del("pvc-busy")).await {
        assert!(s.code() == Code::Aborted && s.message().contains("still being filled"), "{s:?}");
    }
    until_created(&mut ctl, &busy, &d).await;
    for v in ["pvc-busy", "pvc-killed", "pvc-half", "pvc-vclone", "pvc-clone", "pvc-legacy"] {
        ctl.delete_volume(del(v)).await.unwrap_or_else(|e| panic!("delete {v}: {e:?}"));
    }
    let left = agent.list_volumes(vpb::ListVolumesRequest {}).await.unwrap().into_inner().volumes;
    let names: Vec<&str> = left.iter().map(|v| v.name.as_str()).collect();
    assert_eq!(names, ["pvc-src"], "every clone deleted (no leftover of the failed one)");
}

//! A PVC restored from the backup repository the Kubernetes way, at the CSI level: a
//! pre-provisioned VolumeSnapshotContent's handle (`backup:<id>` or
//! `backup:latest:<namespace>/<claim>`) is listed as a ready snapshot, and CreateVolume
//! from it answers ABORTED (pending) while the backup is restored through the agent's
//! API, then returns a volume holding exactly the backup. A second controller (a restart)
//! does not restore it again. Needs root (the driver runs in a private mount namespace).

mod support;

use std::time::{Duration, Instant};

use hlstore_proto::csi;
use hlstore_proto::volume as vpb;
use support::cluster::{qemu_io, Cluster};
use support::csi::{create_req, expect_code, mount_cap, CsiDriver};
use tonic::Code;

const MIB: u64 = 1 << 20;

fn from_snapshot(name: &str, bytes: i64, handle: &str) -> csi::CreateVolumeRequest {
    let mut r = create_req(name, bytes, mount_cap("ext4"));
    r.volume_content_source = Some(csi::VolumeContentSource {
        r#type: Some(csi::volume_content_source::Type::Snapshot(csi::volume_content_source::SnapshotSource {
            snapshot_id: handle.into(),
        })),
    });
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_volume_snapshot_content_naming_a_backup_provisions_a_restored_volume() {
    let mut c = Cluster::new();
    let password = "csi restore test";
    c.env.push(("HLSTORE_REPO_PASSWORD".into(), password.into()));
    c.up(&["--nodes", "3"]);
    let ep = c.endpoint("n1");
    let repo = c.path().join("repo").to_str().unwrap().to_string();
    c.cli(&["backup", "init", "--repo", &repo]);
    c.cli(&["volume", "create", "app-data", "--size", "32MiB", "--endpoint", &ep]);
    let uri = c.cli(&["volume", "attach", "app-data", "--node", "n1", "--endpoint", &ep]).trim().to_string();
    qemu_io(&uri, &["write -P 0x5c 0 3M", "write -P 0x6d 20M 1M"]);
    c.cli(&["volume", "detach", "app-data", "--endpoint", &ep]);
    let out = c.cli(&[
        "backup",
        "create",
        "--repo",
        &repo,
        "--volume",
        "app-data",
        "--endpoint",
        &ep,
        "--json",
        "--label",
        "volume=app-data",
        "--label",
        "pvc=apps/db",
    ]);
    let id = serde_json::from_str::<serde_json::Value>(&out).unwrap()["id"].as_str().unwrap().to_string();

    // A controller without a repository refuses clearly.
    let plain = CsiDriver::start(&c, "n1");
    let mut ctl = plain.controller().await;
    let handle = "backup:latest:apps/db";
    expect_code(
        ctl.create_volume(from_snapshot("pvc-x", (64 * MIB) as i64, handle)).await,
        Code::FailedPrecondition,
        "no repository",
    );
    drop(plain);

    let env = [("HLSTORE_BACKUP_REPO", repo.as_str()), ("HLSTORE_REPO_PASSWORD", password)];
    let d = CsiDriver::start_with_env(&c, "n1", &env);
    let mut ctl = d.controller().await;

    // The external-snapshotter's check of a pre-provisioned content: ready, with its size.
    for h in [handle.to_string(), format!("backup:{}", &id[..12])] {
        let l = ctl
            .list_snapshots(csi::ListSnapshotsRequest { snapshot_id: h.clone(), ..Default::default() })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(l.entries.len(), 1, "{h}: {l:?}");
        let s = l.entries[0].snapshot.as_ref().unwrap();
        assert!(s.ready_to_use && s.size_bytes == (32 * MIB) as i64 && s.snapshot_id == h, "{s:?}");
    }
    let none = ctl
        .list_snapshots(csi::ListSnapshotsRequest {
            snapshot_id: "backup:latest:apps/nope".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(none.entries.is_empty());
    expect_code(
        ctl.create_volume(from_snapshot("pvc-y", (64 * MIB) as i64, "backup:latest:apps/nope")).await,
        Code::NotFound,
        "no such backup",
    );
    // A smaller request than the backup still gets a volume that holds all of it.
    expect_code(ctl.create_volume(from_snapshot("pvc-z", (16 * MIB) as i64, handle)).await, Code::Aborted, "pending");

    // CreateVolume: pending (ABORTED) while the restore runs, then the volume.
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut pending = 0;
    let vol = loop {
        match ctl.create_volume(from_snapshot("pvc-restored", (64 * MIB) as i64, handle)).await {
            Ok(r) => break r.into_inner().volume.unwrap(),
            Err(s) if s.code() == Code::Aborted => {
                pending += 1;
                assert!(Instant::now() < deadline, "restore never finished; log:\n{}", d.log());
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            Err(s) => panic!("CreateVolume from a backup: {s:?}; log:\n{}", d.log()),
        }
    };
    assert!(pending >= 1, "the first call starts the restore and answers pending");
    assert_eq!(vol.volume_id, "pvc-restored");
    assert_eq!(vol.capacity_bytes, (64 * MIB) as i64, "the capacity asked for");
    match vol.content_source.and_then(|s| s.r#type) {
        Some(csi::volume_content_source::Type::Snapshot(s)) => assert_eq!(s.snapshot_id, handle),
        other => panic!("content source {other:?}"),
    }
    let mut agent = c.volumes("n2").await;
    let z = agent.get_volume(vpb::GetVolumeRequest { name: "pvc-z".into() }).await.unwrap().into_inner();
    assert_eq!(z.size, 32 * MIB, "sized for the backup, not the smaller request");
    let v = agent.get_volume(vpb::GetVolumeRequest { name: "pvc-restored".into() }).await.unwrap().into_inner();
    assert_eq!(v.labels.get("csi.hlstore.io/restored-from"), Some(&id), "{:?}", v.labels);
    // Marked complete by a label: no marker snapshot keeps the restored blocks alive.
    assert_eq!(v.labels.get("csi.hlstore.io/filled"), Some(&id), "{:?}", v.labels);
    let snaps = agent.list_snapshots(vpb::ListSnapshotsRequest { volume: "pvc-restored".into() }).await.unwrap();
    assert!(snaps.into_inner().snapshots.is_empty(), "a restore leaves no snapshot");
    assert!(v.attached_node.is_empty(), "left detached for ControllerPublish");
    let uri = c.cli(&["volume", "attach", "pvc-restored", "--node", "n1", "--endpoint", &ep]).trim().to_string();
    qemu_io(&uri, &["read -P 0x5c 0 3M", "read -P 0 3M 17M", "read -P 0x6d 20M 1M", "read -P 0 21M 43M"]);
    // The restored volume is the app's now: it writes.
    qemu_io(&uri, &["write -P 0x7e 0 1M"]);
    c.cli(&["volume", "detach", "pvc-restored", "--endpoint", &ep]);

    // Idempotent, and a new controller process (a restart) finds the restore done: it
    // never writes the backup over the volume again.
    drop(ctl);
    drop(d);
    let d2 = CsiDriver::start_with_env(&c, "n1", &env);
    let mut ctl = d2.controller().await;
    let again = ctl.create_volume(from_snapshot("pvc-restored", (64 * MIB) as i64, handle)).await;
    assert!(again.is_ok(), "{again:?}");
    let uri = c.cli(&["volume", "attach", "pvc-restored", "--node", "n1", "--endpoint", &ep]).trim().to_string();
    qemu_io(&uri, &["read -P 0x7e 0 1M"]);
    c.cli(&["volume", "detach", "pvc-restored", "--endpoint", &ep]);

    // A volume an earlier controller restored carries the snapshot `csi-restore-done`
    // instead of the label: still complete (never restored over), and the snapshot is
    // replaced by the label.
    let req = vpb::SetVolumeLabelsRequest {
        name: "pvc-restored".into(),
        labels: [("csi.hlstore.io/filled".to_string(), String::new())].into_iter().collect(),
    };
    agent.set_volume_labels(req).await.expect("label removed");
    let marker = vpb::CreateSnapshotRequest {
        volume: "pvc-restored".into(),
        name: "csi-restore-done".into(),
        labels: Default::default(),
    };
    agent.create_snapshot(marker).await.expect("old marker");
    let again = ctl.create_volume(from_snapshot("pvc-restored", (64 * MIB) as i64, handle)).await;
    assert!(again.is_ok(), "an old marker still counts: {again:?}");
    let v = agent.get_volume(vpb::GetVolumeRequest { name: "pvc-restored".into() }).await.unwrap().into_inner();
    assert!(v.labels.contains_key("csi.hlstore.io/filled"), "{:?}", v.labels);
    let snaps = agent.list_snapshots(vpb::ListSnapshotsRequest { volume: "pvc-restored".into() }).await.unwrap();
    assert!(snaps.into_inner().snapshots.is_empty(), "the old marker snapshot is deleted");
    let uri = c.cli(&["volume", "attach", "pvc-restored", "--node", "n1", "--endpoint", &ep]).trim().to_string();
    qemu_io(&uri, &["read -P 0x7e 0 1M"]);
    c.cli(&["volume", "detach", "pvc-restored", "--endpoint", &ep]);

    // Deleting the snapshot content never deletes the backup.
    ctl.delete_snapshot(csi::DeleteSnapshotRequest { snapshot_id: handle.into(), ..Default::default() }).await.unwrap();
    assert!(c.cli(&["backup", "list", "--repo", &repo]).contains(&id[..12]));
}

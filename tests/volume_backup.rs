//! Volume backups on a real local cluster: a full then an incremental backup of a live
//! volume (the second reads about what changed), labels, retention of the snapshots made
//! for backups, and a restore into a new 3-replica volume that is byte-identical to the
//! snapshot backed up.

mod support;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use hlstore_proto::volume as vpb;
use hlstore_proto::volume::volumes_client::VolumesClient;
use rand::{RngCore, SeedableRng};
use serde_json::Value;
use support::cluster::{run_ok, Cluster, PYTHON};

const MIB: u64 = 1 << 20;
const CHUNK: u64 = 64 * 1024;
const SIZE: u64 = 64 * MIB;

/// Writes `data` at `offset` through the NBD URI with python3-libnbd, then flushes.
fn nbd_write(uri: &str, work: &Path, offset: u64, data: &[u8]) {
    let f = work.join("payload.bin");
    std::fs::write(&f, data).unwrap();
    let script = "import nbd, sys\n\
        h = nbd.NBD(); h.connect_uri(sys.argv[1])\n\
        d = open(sys.argv[3], 'rb').read(); off = int(sys.argv[2])\n\
        for i in range(0, len(d), 1 << 20):\n    h.pwrite(d[i:i + (1 << 20)], off + i)\n\
        h.flush(); h.shutdown()\n";
    let mut c = Command::new(PYTHON);
    c.args(["-c", script, uri, &offset.to_string(), f.to_str().unwrap()]);
    run_ok(&mut c, Duration::from_secs(120));
}

/// Reads the whole export with nbdcopy.
fn nbd_read_all(uri: &str, work: &Path) -> Vec<u8> {
    let out = work.join("dump.raw");
    let _ = std::fs::remove_file(&out);
    run_ok(Command::new("nbdcopy").args([uri, out.to_str().unwrap()]), Duration::from_secs(120));
    std::fs::read(&out).unwrap()
}

fn random(len: u64, seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; len as usize];
    rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut v);
    v
}

/// The node agent's snapshot API, straight from the test (independent of the CLI).
fn rpc<T>(tls: &Path, ep: &str, f: impl AsyncFnOnce(VolumesClient<tonic::transport::Channel>) -> T) -> T {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let c = support::cluster::volumes_client(tls, ep).await;
        f(c).await
    })
}

fn snapshot_names(tls: &Path, ep: &str, volume: &str) -> Vec<String> {
    let req = vpb::ListSnapshotsRequest { volume: volume.into() };
    let r = rpc(tls, ep, async |mut c| c.list_snapshots(req).await.expect("list snapshots").into_inner());
    let mut names: Vec<String> = r.snapshots.into_iter().filter(|s| s.volume == volume).map(|s| s.name).collect();
    names.sort();
    names
}

fn read_snapshot(tls: &Path, ep: &str, volume: &str, name: &str) -> Vec<u8> {
    let req = vpb::ReadSnapshotRequest { volume: volume.into(), name: name.into(), offset: 0, length: SIZE };
    rpc(tls, ep, async |mut c| {
        let mut s = c.read_snapshot(req).await.expect("read snapshot").into_inner();
        let mut out = Vec::new();
        while let Some(chunk) = s.message().await.expect("snapshot stream") {
            assert_eq!(chunk.offset, out.len() as u64);
            out.extend_from_slice(&chunk.data);
        }
        out
    })
}

fn json(s: &str) -> Value {
    serde_json::from_str(s).unwrap_or_else(|e| panic!("bad JSON ({e}):\n{s}"))
}

#[test]
fn incremental_volume_backup_reads_what_changed_and_restores_to_an_identical_volume() {
    let mut c = Cluster::new();
    c.env.push(("HLSTORE_REPO_PASSWORD".into(), "volume backup test".into()));
    c.env.push(("HLSTORE_KDF_PARAMS".into(), "64,1,1".into()));
    let uri = c.up(&["--nodes", "3", "--volume", "v", "--size", "64MiB", "--replicas", "3"]);
    let ep = c.endpoint("n1");
    let work = tempfile::tempdir().unwrap();
    let repo = format!("file://{}", work.path().join("repo").display());
    c.cli(&["backup", "init", "--repo", &repo]);

    // 12 MiB of data in a 64 MiB volume; the model tracks what the volume holds.
    let mut model = vec![0u8; SIZE as usize];
    for (off, len, seed) in [(0, 8 * MIB, 1), (20 * MIB, 3 * MIB, 2), (50 * MIB + 4096, MIB, 3)] {
        let d = random(len, seed);
        nbd_write(&uri, work.path(), off, &d);
        model[off as usize..(off + len) as usize].copy_from_slice(&d);
    }

    let backup = |extra: &[&str]| -> Value {
        let mut args = vec!["backup", "create", "--repo", &repo, "--volume", "v", "--endpoint", &ep, "--json"];
        args.extend_from_slice(extra);
        json(&c.cli(&args))
    };
    let b1 = backup(&["--label", "app=test"]);
    assert_eq!(b1["incremental"], false, "{b1}");
    let read1 = b1["bytes_read"].as_u64().unwrap();
    // Only allocated blocks are read: 12 MiB, not the 64 MiB volume.
    assert!((12 * MIB..=13 * MIB).contains(&read1), "full backup read {read1} bytes: {b1}");
    assert_eq!(b1["labels"]["volume"], "v");
    assert_eq!(b1["labels"]["volume_size"], SIZE.to_string());
    assert_eq!(b1["labels"]["volume_snapshot"], b1["volume_snapshot"]);
    assert_eq!(b1["labels"]["app"], "test");
    let snap1 = b1["volume_snapshot"].as_str().unwrap().to_string();
    assert_eq!(snapshot_names(&c.admin_tls(), &ep, "v"), vec![snap1.clone()]);

    // Change 1 % of the volume: ten 64 KiB runs at scattered chunk-aligned offsets.
    let mut changed = 0;
    for i in 0..10u64 {
        let off = (i * 97 + 13) % (SIZE / CHUNK) * CHUNK;
        let d = random(CHUNK, 100 + i);
        nbd_write(&uri, work.path(), off, &d);
        model[off as usize..(off + CHUNK) as usize].copy_from_slice(&d);
        changed += CHUNK;
    }
    let b2 = backup(&[]);
    assert_eq!(b2["incremental"], true, "{b2}");
    assert_eq!(b2["base"], b1["id"], "{b2}");
    assert_eq!(b2["parent"], b1["id"], "{b2}");
    let read2 = b2["bytes_read"].as_u64().unwrap();
    assert!(
        read2 >= changed && read2 <= changed + 2 * CHUNK,
        "incremental backup read {read2} bytes for {changed} changed: {b2}"
    );
    assert!(b2["stats"]["bytes_skipped"].as_u64().unwrap() >= 11 * MIB, "{b2}");
    // Retention: the first snapshot is deleted, the second kept for the next run.
    let snap2 = b2["volume_snapshot"].as_str().unwrap().to_string();
    assert_eq!(b2["deleted_snapshots"], serde_json::json!([snap1]));
    assert_eq!(snapshot_names(&c.admin_tls(), &ep, "v"), vec![snap2.clone()]);

    // Writes after the snapshot are not part of the backup.
    nbd_write(&uri, work.path(), 0, &random(MIB, 999));
    let snap_bytes = read_snapshot(&c.admin_tls(), &ep, "v", &snap2);
    assert!(snap_bytes == model, "the snapshot holds what was written before it");

    let id2 = b2["id"].as_str().unwrap();
    let r = json(&c.cli(&[
        "restore",
        &id2[..12],
        "--repo",
        &repo,
        "--to-volume",
        "v2",
        "--replicas",
        "3",
        "--endpoint",
        &ep,
        "--json",
    ]));
    assert_eq!(r["volume"], "v2", "{r}");
    assert_eq!(r["volume_size"], SIZE);
    let v2 = c.volume_show("n1", "v2");
    assert_eq!(v2["size"], SIZE);
    assert!(v2["attached_node"].is_null(), "detached after the restore: {v2}");
    let uri2 = c.cli(&["volume", "attach", "v2", "--node", "n2", "--endpoint", &ep]).trim().to_string();
    let restored = nbd_read_all(&uri2, work.path());
    assert!(restored == snap_bytes, "the restored volume is byte-identical to the snapshot");
    // Written once, replicated by the engine: every replica holds the data, thin.
    let v2 = c.wait_all_healthy("v2", Duration::from_secs(60));
    let reps = v2["replicas"].as_array().unwrap();
    assert_eq!(reps.len(), 3, "{v2}");
    for rep in reps {
        let a = rep["allocated_bytes"].as_u64().unwrap();
        assert!((12 * MIB..=14 * MIB).contains(&a), "replica {rep} is not a thin copy");
    }

    // Clear errors, nothing touched.
    let (ok, _, err) = c.try_cli(&["restore", id2, "--repo", &repo, "--to-volume", "v", "--endpoint", &ep]);
    assert!(!ok && err.contains("already exists"), "{err}");
    let (ok, _, err) = c.try_cli(&["backup", "create", "--repo", &repo, "--volume", "nope", "--endpoint", &ep]);
    assert!(!ok && err.contains("nope"), "{err}");
    assert_eq!(snapshot_names(&c.admin_tls(), &ep, "v"), vec![snap2]);
}

#[test]
fn a_file_backup_restores_into_a_new_replicated_volume() {
    let mut c = Cluster::new();
    c.env.push(("HLSTORE_REPO_PASSWORD".into(), "volume backup test".into()));
    c.env.push(("HLSTORE_KDF_PARAMS".into(), "64,1,1".into()));
    c.up(&["--nodes", "3"]);
    let ep = c.endpoint("n2");
    let work = tempfile::tempdir().unwrap();
    let repo = format!("file://{}", work.path().join("repo").display());
    c.cli(&["backup", "init", "--repo", &repo]);
    // Random data, a zero gap, more random data and an unaligned tail.
    let mut img = random(10 * MIB, 7);
    img.resize(16 * MIB as usize, 0);
    img.extend_from_slice(&random(4 * MIB + 1000, 8));
    let src = work.path().join("disk.img");
    std::fs::write(&src, &img).unwrap();
    let b = json(&c.cli(&["backup", "create", "--repo", &repo, "--source", src.to_str().unwrap(), "--json"]));
    let id = b["id"].as_str().unwrap();

    let r = json(&c.cli(&["restore", id, "--repo", &repo, "--to-volume", "f", "--endpoint", &ep, "--json"]));
    let size = img.len().div_ceil(4096) as u64 * 4096;
    assert_eq!(r["volume_size"], size, "{r}");
    assert_eq!(r["replicas"], 3, "{r}");
    let v = c.volume_show("n1", "f");
    assert_eq!(v["size"], size);
    assert!(v["attached_node"].is_null(), "{v}");
    let uri = c.cli(&["volume", "attach", "f", "--node", "n3", "--endpoint", &ep]).trim().to_string();
    let back = nbd_read_all(&uri, work.path());
    assert_eq!(back.len() as u64, size);
    assert!(back[..img.len()] == img[..], "restored volume differs from the file");
    assert!(back[img.len()..].iter().all(|&x| x == 0));
    let v = c.wait_all_healthy("f", Duration::from_secs(60));
    for rep in v["replicas"].as_array().unwrap() {
        let a = rep["allocated_bytes"].as_u64().unwrap();
        assert!((14 * MIB..16 * MIB).contains(&a), "the zero gap stays unallocated: {rep}");
    }
    // The name is taken now: a second restore is refused and changes nothing.
    let (ok, _, err) = c.try_cli(&["restore", id, "--repo", &repo, "--to-volume", "f", "--endpoint", &ep]);
    assert!(!ok && err.contains("already exists"), "{err}");
}

/// A `restore --to-volume` killed with SIGKILL mid-way (no cleanup runs: the volume stays
/// attached, the state file records some packs) continues when the same command runs
/// again, and the volume is byte-identical to the backed-up file.
#[test]
fn a_restore_to_a_volume_killed_with_sigkill_resumes_byte_identical() {
    let mut c = Cluster::new();
    c.env.push(("HLSTORE_REPO_PASSWORD".into(), "volume backup test".into()));
    c.env.push(("HLSTORE_KDF_PARAMS".into(), "64,1,1".into()));
    c.up(&["--nodes", "3"]);
    let ep = c.endpoint("n2");
    let work = tempfile::tempdir().unwrap();
    let repo = format!("file://{}", work.path().join("repo").display());
    c.cli(&["backup", "init", "--repo", &repo, "--pack-size", "1M"]);
    // Incompressible: one pack per MiB, each recorded in the state file once written.
    let img = random(48 * MIB, 9);
    let src = work.path().join("disk.img");
    std::fs::write(&src, &img).unwrap();
    let b = json(&c.cli(&["backup", "create", "--repo", &repo, "--source", src.to_str().unwrap(), "--json"]));
    let id = b["id"].as_str().unwrap().to_string();

    let state = work.path().join("restore.state");
    let args = [
        "restore",
        &id,
        "--repo",
        &repo,
        "--to-volume",
        "r",
        "--endpoint",
        &ep,
        "--parallel",
        "1",
        "--state-file",
        state.to_str().unwrap(),
        "--json",
    ];
    let mut child = c.command().args(args).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    let started = std::time::Instant::now();
    let recorded = || std::fs::read_to_string(&state).map(|s| s.lines().count()).unwrap_or(0);
    while recorded() < 4 {
        assert!(child.try_wait().unwrap().is_none(), "the restore ended before it could be killed");
        assert!(started.elapsed() < Duration::from_secs(120), "no progress recorded");
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let done_before = recorded();
    assert!(done_before < 48, "killed mid-way ({done_before} lines)");

    let r = json(&c.cli(&args));
    assert!(r["packs_resumed"].as_u64().unwrap() >= 3, "{r}");
    assert!(r["packs_fetched"].as_u64().unwrap() < 48, "resumed, not restarted: {r}");
    assert!(!state.exists(), "state removed on success");
    let v = c.volume_show("n1", "r");
    assert!(v["attached_node"].is_null(), "detached after the restore: {v}");
    let uri = c.cli(&["volume", "attach", "r", "--node", "n3", "--endpoint", &ep]).trim().to_string();
    let back = nbd_read_all(&uri, work.path());
    assert!(back == img, "restored volume differs from the file");
}

/// `backup create --volume V --if-due` backs a volume up only when its schedule (label
/// `hlstore.io/backup-schedule`, the StorageClass's `backupSchedule`) says so against its
/// newest backup in the repository: the backup job can run hourly for volumes on
/// different schedules. `never` is never due; a volume without a schedule is always due
/// unless `--default-schedule` gives it one.
#[test]
fn scheduled_volumes_are_backed_up_only_when_due() {
    let mut c = Cluster::new();
    c.env.push(("HLSTORE_REPO_PASSWORD".into(), "volume backup test".into()));
    c.env.push(("HLSTORE_KDF_PARAMS".into(), "64,1,1".into()));
    c.up(&["--nodes", "3"]);
    let ep = c.endpoint("n1");
    let tls = c.admin_tls();
    for (name, schedule) in [("daily", Some("daily")), ("off", Some("never")), ("plain", None)] {
        let labels = schedule.map(|s| ("hlstore.io/backup-schedule".to_string(), s.to_string())).into_iter().collect();
        let req =
            vpb::CreateVolumeRequest { name: name.into(), size: 8 * MIB, replicas: 3, labels, ..Default::default() };
        rpc(&tls, &ep, async |mut v| v.create_volume(req).await.expect("create volume"));
    }
    let work = tempfile::tempdir().unwrap();
    let repo = format!("file://{}", work.path().join("repo").display());
    c.cli(&["backup", "init", "--repo", &repo]);
    let create = |volume: &str, extra: &[&str]| -> Value {
        let mut args =
            vec!["backup", "create", "--repo", &repo, "--volume", volume, "--endpoint", &ep, "--json", "--if-due"];
        args.extend_from_slice(extra);
        json(&c.cli(&args))
    };
    let backups = |volume: &str| -> usize {
        let out = c.cli(&["backup", "list", "--repo", &repo, "--volume", volume, "--json"]);
        json(&out).as_array().map_or(0, Vec::len)
    };

    assert!(create("daily", &[])["skipped"].is_null(), "first backup of a daily volume");
    let again = create("daily", &[]);
    assert_eq!(again["skipped"], true, "{again}");
    assert_eq!(again["schedule"], "daily");
    assert!(again["due_at"].as_u64().unwrap() > again["last_backup"].as_u64().unwrap() + 20 * 3600, "{again}");
    assert_eq!(backups("daily"), 1);

    assert_eq!(create("off", &[])["skipped"], true);
    assert_eq!(backups("off"), 0, "schedule never");

    create("plain", &[]);
    create("plain", &[]);
    assert_eq!(backups("plain"), 2, "no schedule: due every run");
    assert_eq!(create("plain", &["--default-schedule", "6h"])["skipped"], true);
    assert_eq!(backups("plain"), 2);

    let (ok, _, err) = c.try_cli(&[
        "backup",
        "create",
        "--repo",
        &repo,
        "--volume",
        "plain",
        "--endpoint",
        &ep,
        "--if-due",
        "--default-schedule",
        "0 2 * * *",
    ]);
    assert!(!ok && err.contains("expected hourly"), "{err}");
}

//! Lost-cluster recovery, end to end: volumes of one cluster are backed up (with the claim
//! labels the backup CronJob adds), the cluster is destroyed, and `hlstore recover` on a
//! fresh cluster with empty disks restores the newest backup of every volume under its
//! original name, byte for byte, and writes a PersistentVolume + claim per PVC. Running it
//! again changes nothing.

mod support;

use std::process::Command;

use serde_json::Value;
use support::cluster::{qemu_io, Cluster};

const MIB: u64 = 1 << 20;

#[test]
fn a_fresh_cluster_gets_every_volume_back_by_name_from_the_repository() {
    let work = tempfile::tempdir().unwrap();
    let repo = work.path().join("repo").to_str().unwrap().to_string();
    let manifests = work.path().join("manifests");
    let password = ("HLSTORE_REPO_PASSWORD".to_string(), "recover test".to_string());

    // The old cluster: two volumes used by two claims; the database is backed up twice
    // (the newest must come back), the media library once.
    {
        let mut old = Cluster::new();
        old.env.push(password.clone());
        old.up(&["--nodes", "3"]);
        let ep = old.endpoint("n1");
        old.cli(&["backup", "init", "--repo", &repo]);
        for (name, size) in [("pvc-db", "64MiB"), ("pvc-media", "32MiB")] {
            old.cli(&["volume", "create", name, "--size", size, "--endpoint", &ep]);
        }
        let backup = |volume: &str, ns: &str, claim: &str| {
            let (l1, l2, l3) =
                (format!("pvc={ns}/{claim}"), format!("pvc-namespace={ns}"), format!("pvc-name={claim}"));
            let (l0, l4) = (format!("volume={volume}"), "trigger=cronjob".to_string());
            old.cli(&[
                "backup",
                "create",
                "--repo",
                &repo,
                "--volume",
                volume,
                "--endpoint",
                &ep,
                "--label",
                &l0,
                "--label",
                &l1,
                "--label",
                &l2,
                "--label",
                &l3,
                "--label",
                &l4,
            ]);
        };
        let uri = old.cli(&["volume", "attach", "pvc-db", "--node", "n1", "--endpoint", &ep]).trim().to_string();
        qemu_io(&uri, &["write -P 0x11 0 4M"]);
        old.cli(&["volume", "detach", "pvc-db", "--endpoint", &ep]);
        backup("pvc-db", "databases", "pgdata");
        let uri = old.cli(&["volume", "attach", "pvc-db", "--node", "n1", "--endpoint", &ep]).trim().to_string();
        qemu_io(&uri, &["write -P 0x22 1M 2M", "write -P 0x33 60M 1M"]);
        old.cli(&["volume", "detach", "pvc-db", "--endpoint", &ep]);
        backup("pvc-db", "databases", "pgdata");
        let uri = old.cli(&["volume", "attach", "pvc-media", "--node", "n1", "--endpoint", &ep]).trim().to_string();
        qemu_io(&uri, &["write -P 0x44 0 8M"]);
        old.cli(&["volume", "detach", "pvc-media", "--endpoint", &ep]);
        backup("pvc-media", "media", "library");
        old.down();
    } // its data directories are gone with it

    // A new cluster on empty disks, and the repository.
    let mut new = Cluster::new();
    new.env.push(password);
    new.up(&["--nodes", "3"]);
    let ep = new.endpoint("n2");
    let m = manifests.to_str().unwrap();
    let dry = new.cli(&["recover", "--repo", &repo, "--endpoint", &ep, "--dry-run", "--json"]);
    let dry: Value = serde_json::from_str(&dry).unwrap();
    assert!(dry.as_array().unwrap().iter().all(|o| o["status"] == "would-restore"), "{dry}");
    assert!(new.cli(&["volume", "list", "--endpoint", &ep]).lines().count() <= 1, "a dry run restores nothing");

    let out: Value =
        serde_json::from_str(&new.cli(&["recover", "--repo", &repo, "--endpoint", &ep, "--manifests", m, "--json"]))
            .unwrap();
    let outcomes = out.as_array().unwrap();
    assert_eq!(outcomes.len(), 2, "{out}");
    for o in outcomes {
        assert_eq!(o["status"], "restored", "{out}");
    }
    let db = outcomes.iter().find(|o| o["volume"] == "pvc-db").unwrap();
    assert_eq!(db["pvc"], "databases/pgdata");
    assert_eq!(db["size"], 64 * MIB);

    // Byte for byte: the newest backup of each.
    let uri = new.cli(&["volume", "attach", "pvc-db", "--node", "n1", "--endpoint", &ep]).trim().to_string();
    qemu_io(
        &uri,
        &["read -P 0x11 0 1M", "read -P 0x22 1M 2M", "read -P 0x11 3M 1M", "read -P 0x33 60M 1M", "read -P 0 4M 56M"],
    );
    new.cli(&["volume", "detach", "pvc-db", "--endpoint", &ep]);
    let uri = new.cli(&["volume", "attach", "pvc-media", "--node", "n1", "--endpoint", &ep]).trim().to_string();
    qemu_io(&uri, &["read -P 0x44 0 8M", "read -P 0 8M 24M"]);
    new.cli(&["volume", "detach", "pvc-media", "--endpoint", &ep]);
    let v = new.volume_show("n1", "pvc-db");
    assert_eq!(v["replica_set"].as_array().unwrap().len(), 3, "{v}");

    // One PersistentVolume + claim per PVC, bound to each other and to the volume.
    let text = std::fs::read_to_string(manifests.join("databases--pgdata.yaml")).unwrap();
    let docs: Vec<serde_yaml::Value> =
        serde_yaml::Deserializer::from_str(&text).map(|d| serde::Deserialize::deserialize(d).unwrap()).collect();
    assert_eq!(docs.len(), 2, "{text}");
    let (pv, pvc) = (&docs[0], &docs[1]);
    assert_eq!(pv["kind"], "PersistentVolume");
    assert_eq!(pv["spec"]["csi"]["volumeHandle"], "pvc-db");
    assert_eq!(pv["spec"]["csi"]["driver"], "csi.hlstore.io");
    assert_eq!(pv["spec"]["claimRef"]["namespace"], "databases");
    assert_eq!(pv["spec"]["claimRef"]["name"], "pgdata");
    assert_eq!(pvc["kind"], "PersistentVolumeClaim");
    assert_eq!(pvc["metadata"]["namespace"], "databases");
    assert_eq!(pvc["metadata"]["name"], "pgdata");
    assert_eq!(pvc["spec"]["volumeName"], "pvc-db");
    assert_eq!(pvc["spec"]["resources"]["requests"]["storage"], (64 * MIB).to_string());
    assert!(manifests.join("media--library.yaml").exists());
    for file in ["databases--pgdata.yaml", "media--library.yaml"] {
        let out = Command::new("kubernetes-validate")
            .args(["--strict", "--quiet", "-k", "1.25.0"])
            .arg(manifests.join(file))
            .output()
            .expect("kubernetes-validate (pip install kubernetes-validate)");
        assert!(
            out.status.success(),
            "{file}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    // Again: everything is there already, nothing is written.
    let again: Value =
        serde_json::from_str(&new.cli(&["recover", "--repo", &repo, "--endpoint", &ep, "--json"])).unwrap();
    assert!(again.as_array().unwrap().iter().all(|o| o["status"] == "present"), "{again}");

    // A filter that matches nothing is an error that says so.
    let (ok, _, err) = new.try_cli(&["recover", "--repo", &repo, "--endpoint", &ep, "--label", "pvc-namespace=nope"]);
    assert!(!ok && err.contains("no volume backup with those labels"), "{err}");
}

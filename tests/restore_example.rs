//! The restore example in deploy/ runs as written: the container command of
//! `deploy/examples/restore/restore-job.yaml`, with its `$(VAR)` references expanded from
//! the container's environment the way Kubernetes does, restores a backup into the volume
//! that `restored-pvc.yaml`'s PersistentVolume names, against a local cluster. Only what
//! names the cluster is replaced (agent endpoint, repository, credentials, the backup id
//! the example asks the user to fill in).

mod support;

use std::collections::BTreeMap;
use std::process::Command;
use std::time::Duration;

use serde_yaml::Value;
use support::cluster::{run_ok, Cluster};

fn docs(path: &std::path::Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap();
    serde_yaml::Deserializer::from_str(&text).map(|d| serde::Deserialize::deserialize(d).unwrap()).collect()
}

/// `$(VAR)` → the value of VAR in `env` (unknown references stay, as in Kubernetes).
fn expand(s: &str, env: &BTreeMap<String, String>) -> String {
    let mut out = s.to_string();
    for (k, v) in env {
        out = out.replace(&format!("$({k})"), v);
    }
    out
}

#[test]
fn the_restore_job_example_restores_into_the_volume_the_pv_example_names() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/examples/restore");
    let job = docs(&root.join("restore-job.yaml")).remove(0);
    let container = &job["spec"]["template"]["spec"]["containers"][0];
    let pv = docs(&root.join("restored-pvc.yaml")).into_iter().find(|d| d["kind"] == "PersistentVolume").unwrap();
    let handle = pv["spec"]["csi"]["volumeHandle"].as_str().unwrap().to_string();

    let mut c = Cluster::new();
    c.env.push(("HLSTORE_REPO_PASSWORD".into(), "restore example".into()));
    c.up(&["--nodes", "3", "--volume", "pgdata", "--size", "16MiB"]);
    let ep = c.endpoint("n1");
    let repo = c.path().join("repo").to_str().unwrap().to_string();
    c.cli(&["backup", "init", "--repo", &repo]);
    let uri = c.volume_show("n1", "pgdata")["nbd_uri"].as_str().unwrap().to_string();
    run_ok(Command::new("qemu-io").args(["-f", "raw", "-c", "write -P 0x3c 0 2M", &uri]), Duration::from_secs(60));
    let out = c.cli(&["backup", "create", "--repo", &repo, "--volume", "pgdata", "--endpoint", &ep, "--json"]);
    let id = serde_json::from_str::<serde_json::Value>(&out).unwrap()["id"].as_str().unwrap().to_string();

    // The container's environment, with what names the cluster replaced.
    let mut env = BTreeMap::new();
    for e in container["env"].as_sequence().unwrap() {
        let name = e["name"].as_str().unwrap().to_string();
        let value = match name.as_str() {
            "BACKUP_ID" => {
                assert_eq!(e["value"], "REPLACE_WITH_BACKUP_ID", "the example asks the user for the id");
                id.clone()
            }
            "HLSTORE_ENDPOINT" => ep.clone(),
            "HLSTORE_REPO" => repo.clone(),
            "HLSTORE_TLS_DIR" => c.path().join("tls/admin").to_str().unwrap().to_string(),
            "HLSTORE_REPO_PASSWORD" => "restore example".into(),
            n if n.starts_with("AWS_") => continue, // a local directory repository
            _ => e["value"].as_str().expect("a literal value").to_string(),
        };
        env.insert(name, value);
    }
    let command: Vec<String> =
        container["command"].as_sequence().unwrap().iter().map(|v| expand(v.as_str().unwrap(), &env)).collect();
    assert_eq!(command, ["hlstore"]);
    let args: Vec<String> =
        container["args"].as_sequence().unwrap().iter().map(|v| expand(v.as_str().unwrap(), &env)).collect();
    assert!(args.iter().all(|a| !a.contains("$(")), "unexpanded reference in {args:?}");
    assert!(
        args.iter().any(|a| a == &format!("--to-volume={handle}")),
        "the Job restores into {args:?}, but the PersistentVolume example names {handle}"
    );
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_hlstore"));
    cmd.args(&args).env_clear().env("PATH", std::env::var("PATH").unwrap_or_default()).envs(&env);
    let out = run_ok(&mut cmd, Duration::from_secs(180));
    assert!(out.contains(&format!("into new volume {handle}")), "{out}");

    // The restored volume holds the backup, replicated, detached for the PV to use.
    let v = c.volume_show("n1", &handle);
    assert_eq!(v["replica_set"].as_array().unwrap().len(), 3, "{v}");
    assert!(v["attached_node"].is_null() || v["attached_node"] == "", "{v}");
    let uri = c.cli(&["volume", "attach", &handle, "--node", "n2", "--endpoint", &ep]).trim().to_string();
    let check = run_ok(
        Command::new("qemu-io").args(["-f", "raw", "-c", "read -P 0x3c 0 2M", "-c", "read -P 0 2M 14M", &uri]),
        Duration::from_secs(60),
    );
    assert!(!check.contains("fail"), "{check}");
    // The PV example's size holds the restored volume.
    let want = pv["spec"]["capacity"]["storage"].as_str().unwrap();
    assert!(want.ends_with("Gi"), "{want}");
}

//! deploy/ builds and validates: every overlay renders with `kubectl kustomize`, passes
//! `kubernetes-validate --strict` against the oldest and newest offline schemas it ships
//! and yamllint; the StorageClass names the driver's GetPluginInfo name; and every flag the
//! manifests pass to `hlstore` is one `hlstore <subcommand> --help` lists (no drift between
//! manifests and CLI).

mod deploy_support;

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;

use deploy_support::*;
use serde_yaml::Value;

/// Oldest and newest Kubernetes versions whose schemas kubernetes-validate ships offline.
const K8S_VERSIONS: [&str; 2] = ["1.25.0", "1.37.0"];

fn validate(file: &std::path::Path, version: &str) -> (bool, String) {
    let out = run(Command::new(tool("kubernetes-validate")).args(["--strict", "--quiet", "-k", version]).arg(file));
    (out.status.success(), format!("{}{}", text(&out.stdout), text(&out.stderr)))
}

#[test]
fn overlays_pass_kubernetes_validate_strict() {
    let dir = tempfile::tempdir().unwrap();
    for overlay in OVERLAYS {
        let file = dir.path().join(format!("{overlay}.yaml"));
        std::fs::write(&file, rendered(overlay)).unwrap();
        for v in K8S_VERSIONS {
            let (ok, report) = validate(&file, v);
            assert!(ok, "{overlay} fails kubernetes-validate --strict -k {v}:\n{report}");
            // A schema is missing only for CRDs; anything else (a typo in apiVersion or
            // kind) would otherwise pass silently as a warning.
            for line in report.lines().filter(|l| l.contains("Couldn't find schema")) {
                assert!(
                    CRD_KINDS.iter().any(|k| line.contains(&format!("kind {k} "))),
                    "{overlay}: unexpected unvalidated object: {line}"
                );
            }
        }
    }
}

/// The YAML files under deploy/examples (restore Job, restored PV and PVC).
fn example_files() -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let mut dirs = vec![deploy().join("examples")];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                dirs.push(p);
            } else if p.extension().is_some_and(|x| x == "yaml") {
                out.push(p);
            }
        }
    }
    out.sort();
    assert!(out.len() >= 2, "examples: {out:?}");
    out
}

fn example_objects() -> Vec<Value> {
    example_files().iter().flat_map(|f| load(f)).collect()
}

#[test]
fn examples_pass_kubernetes_validate_strict() {
    for file in example_files() {
        for v in K8S_VERSIONS {
            let (ok, report) = validate(&file, v);
            assert!(ok, "{} -k {v}:\n{report}", file.display());
            // Only the snapshot CRDs' objects go without a schema.
            for line in report.lines().filter(|l| l.contains("Couldn't find schema")) {
                assert!(
                    ["VolumeSnapshot", "VolumeSnapshotContent"].iter().any(|k| line.contains(&format!("kind {k} "))),
                    "{}: unexpected unvalidated object: {line}",
                    file.display()
                );
            }
        }
    }
    // The restored volume's PV names the driver and the claim binds to that PV.
    let objs = example_objects();
    let pv = of_kind(&objs, "PersistentVolume")[0];
    assert_eq!(s(&pv["spec"]["csi"]["driver"], "driver"), hlstore_csi::DRIVER_NAME);
    let pvc = *of_kind(&objs, "PersistentVolumeClaim")
        .iter()
        .find(|c| !c["spec"]["volumeName"].is_null())
        .expect("the restored claim bound by volumeName");
    assert_eq!(s(&pvc["spec"]["volumeName"], "volumeName"), name(pv));
    assert_eq!(s(&pv["spec"]["claimRef"]["name"], "claimRef"), name(pvc));
}

/// The restore-from-git example: a claim whose dataSource is a VolumeSnapshot of a
/// pre-provisioned content naming a backup (handles the CSI controller understands).
#[test]
fn snapshot_restore_example_names_a_backup_handle_the_driver_parses() {
    let objs = example_objects();
    let content = of_kind(&objs, "VolumeSnapshotContent")[0];
    assert_eq!(s(&content["spec"]["driver"], "driver"), hlstore_csi::DRIVER_NAME);
    let handle = s(&content["spec"]["source"]["snapshotHandle"], "snapshotHandle");
    assert!(matches!(hlstore_csi::backups::BackupRef::parse(handle), Some(Ok(_))), "{handle}");
    let snap = of_kind(&objs, "VolumeSnapshot")[0];
    assert_eq!(s(&snap["spec"]["source"]["volumeSnapshotContentName"], "content name"), name(content));
    assert_eq!(s(&content["spec"]["volumeSnapshotRef"]["name"], "ref"), name(snap));
    let pvc = *of_kind(&objs, "PersistentVolumeClaim")
        .iter()
        .find(|c| !c["spec"]["dataSource"].is_null())
        .expect("the claim restored from the snapshot");
    assert_eq!(s(&pvc["spec"]["dataSource"]["kind"], "dataSource.kind"), "VolumeSnapshot");
    assert_eq!(s(&pvc["spec"]["dataSource"]["name"], "dataSource.name"), name(snap));
}

#[test]
fn strict_validation_rejects_an_unknown_field() {
    // The validator must be able to fail: one misspelt field in the agent DaemonSet.
    let mut objs = objects("staging");
    let ds = objs.iter_mut().find(|o| kind(o) == "DaemonSet" && name(o) == "hlstore-agent").expect("agent DaemonSet");
    ds["spec"]["template"]["spec"].as_mapping_mut().unwrap().insert(Value::from("hostNetwrok"), Value::from(true));
    let yaml: String = objs.iter().map(|o| format!("---\n{}", serde_yaml::to_string(o).unwrap())).collect();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("broken.yaml");
    std::fs::write(&file, yaml).unwrap();
    let (ok, report) = validate(&file, K8S_VERSIONS[1]);
    assert!(!ok && report.contains("hostNetwrok"), "a misspelt field passed validation:\n{report}");
}

#[test]
fn yamllint_sources_and_rendered_overlays() {
    let config = deploy().join(".yamllint");
    let out = run(Command::new(tool("yamllint")).args(["-s", "-c"]).arg(&config).arg(deploy()));
    assert!(out.status.success(), "yamllint deploy/:\n{}", text(&out.stdout));
    let dir = tempfile::tempdir().unwrap();
    for overlay in OVERLAYS {
        let file = dir.path().join(format!("{overlay}.yaml"));
        std::fs::write(&file, rendered(overlay)).unwrap();
        let out = run(Command::new(tool("yamllint")).args(["-s", "-c"]).arg(&config).arg(&file));
        assert!(out.status.success(), "yamllint of rendered {overlay}:\n{}", text(&out.stdout));
    }
}

#[test]
fn storage_class_and_csi_objects_name_the_driver() {
    let driver = hlstore_csi::DRIVER_NAME;
    for overlay in OVERLAYS {
        let objs = objects(overlay);
        let classes = of_kind(&objs, "StorageClass");
        assert!(!classes.is_empty(), "{overlay}: no StorageClass");
        for sc in classes {
            assert_eq!(s(&sc["provisioner"], "provisioner"), driver, "{overlay}: StorageClass {}", name(sc));
            let replicas: u32 = s(&sc["parameters"]["replicas"], "replicas").parse().expect("replicas is a number");
            assert!((1..=5).contains(&replicas), "{overlay}: replicas {replicas}");
            let fs = s(&sc["parameters"]["csi.storage.k8s.io/fstype"], "fstype");
            assert!(["ext4", "xfs"].contains(&fs), "{overlay}: fstype {fs}");
            assert_eq!(sc["allowVolumeExpansion"].as_bool(), Some(true), "{overlay}: allowVolumeExpansion");
            assert!(["Delete", "Retain"].contains(&s(&sc["reclaimPolicy"], "reclaimPolicy")));
        }
        let drivers = of_kind(&objs, "CSIDriver");
        assert_eq!(drivers.len(), 1, "{overlay}: one CSIDriver");
        assert_eq!(name(drivers[0]), driver);
        for vsc in of_kind(&objs, "VolumeSnapshotClass") {
            assert_eq!(s(&vsc["driver"], "driver"), driver);
        }
        // The registrar tells kubelet where the node plugin's socket is: the driver's dir.
        let registrar = all_containers(&objs).into_iter().find(|(_, c)| name_of(c) == "node-driver-registrar");
        let (_, c) = registrar.expect("node-driver-registrar container");
        let args = strings(&c["args"]).join(" ");
        assert!(args.contains(&format!("/var/lib/kubelet/plugins/{driver}/csi.sock")), "{overlay}: {args}");
    }
}

fn name_of(c: &Value) -> &str {
    c["name"].as_str().unwrap_or("")
}

fn all_containers(objs: &[Value]) -> Vec<(String, &Value)> {
    let mut out = Vec::new();
    for o in objs {
        if let Some(spec) = pod_spec(o) {
            for c in containers(spec) {
                out.push((format!("{}/{}", kind(o), name(o)), c));
            }
        }
    }
    out
}

/// One `hlstore` command line found in the manifests: where, subcommand path, flags.
#[derive(Debug)]
struct Invocation {
    origin: String,
    path: Vec<String>,
    flags: Vec<String>,
}

fn invocation(origin: String, words: &[String]) -> Invocation {
    // Subcommand words are plain lowercase names; the first other word (a flag, or a
    // positional argument like `$(BACKUP_ID)`) ends the path.
    let path = words
        .iter()
        .take_while(|w| w.chars().all(|c| c.is_ascii_lowercase() || c == '-') && !w.starts_with('-'))
        .cloned()
        .collect();
    let flags =
        words.iter().filter(|w| w.starts_with("--")).map(|w| w.split('=').next().unwrap_or(w).to_string()).collect();
    Invocation { origin, path, flags }
}

/// `hlstore ...` lines of a shell script (joining `\` continuations), split into words
/// (quotes dropped; good enough for flags and subcommands).
fn script_invocations(origin: &str, script: &str) -> Vec<Invocation> {
    let joined = script.replace("\\\n", " ");
    let mut out = Vec::new();
    for line in joined.lines() {
        let words: Vec<String> = line.split_whitespace().map(|w| w.trim_matches('"').to_string()).collect();
        if let Some(i) = words.iter().position(|w| w == "hlstore") {
            let before = &words[..i];
            // A command position: line start, or after `if`/`then`/`!`/`&&`/`||`.
            if before.is_empty() || matches!(before.last().map(String::as_str), Some("if" | "then" | "!" | "&&" | "||"))
            {
                out.push(invocation(format!("{origin} line `{}`", line.trim()), &words[i + 1..]));
            }
        }
    }
    out
}

fn hlstore_invocations(overlay: &str, objs: &[Value]) -> Vec<Invocation> {
    let mut out = Vec::new();
    for (origin, c) in all_containers(objs) {
        let command = strings(&c["command"]);
        let args = strings(&c["args"]);
        let origin = format!("{overlay} {origin} container {}", name_of(c));
        match command.first().map(String::as_str) {
            Some("hlstore") => out.push(invocation(origin, &[&command[1..], &args[..]].concat())),
            Some("/bin/sh") => {
                // A script from one of our ConfigMaps: check its hlstore lines.
                let script = command.get(1).expect("script path");
                let file = script.rsplit('/').next().unwrap();
                let body = objs
                    .iter()
                    .filter(|o| kind(o) == "ConfigMap")
                    .find_map(|o| o["data"][file].as_str())
                    .unwrap_or_else(|| panic!("{origin}: script {script} not in any ConfigMap"));
                let found = script_invocations(&origin, body);
                assert!(!found.is_empty(), "{origin}: no hlstore command in {file}");
                out.extend(found);
            }
            Some("modprobe") | None => {}
            Some(other) => panic!("{origin}: unexpected command {other}"),
        }
    }
    out
}

#[test]
fn every_hlstore_flag_in_the_manifests_is_accepted_by_help() {
    let bin = env!("CARGO_BIN_EXE_hlstore");
    let mut help: BTreeMap<Vec<String>, Result<String, String>> = BTreeMap::new();
    let mut problems = BTreeSet::new();
    let mut checked = 0;
    let mut sets: Vec<(String, Vec<Value>)> = OVERLAYS.iter().map(|o| (o.to_string(), objects(o))).collect();
    sets.push(("examples".into(), example_objects()));
    for (overlay, objs) in &sets {
        let found = hlstore_invocations(overlay, objs);
        assert!(!found.is_empty(), "{overlay}: no hlstore command found");
        if OVERLAYS.contains(&overlay.as_str()) {
            assert!(found.len() >= 5, "{overlay}: expected agent, controller, node plugin and backup commands");
        }
        for inv in found {
            assert!(!inv.path.is_empty(), "{}: no subcommand", inv.origin);
            let page = help.entry(inv.path.clone()).or_insert_with(|| {
                let out = run(Command::new(bin).args(&inv.path).arg("--help"));
                if out.status.success() {
                    Ok(text(&out.stdout))
                } else {
                    Err(text(&out.stderr).lines().next().unwrap_or("").to_string())
                }
            });
            let page = match page {
                Ok(p) => p,
                Err(e) => {
                    problems.insert(format!(
                        "`hlstore {} --help` fails ({e}); used by {}",
                        inv.path.join(" "),
                        inv.origin
                    ));
                    continue;
                }
            };
            for flag in &inv.flags {
                checked += 1;
                let listed = page.match_indices(flag.as_str()).any(|(i, _)| {
                    let next = page[i + flag.len()..].chars().next();
                    !matches!(next, Some(c) if c.is_ascii_alphanumeric() || c == '-' || c == '_')
                });
                if !listed {
                    problems.insert(format!("`hlstore {}` has no {flag}; used by {}", inv.path.join(" "), inv.origin));
                }
            }
        }
    }
    assert!(checked > 20, "only {checked} flags found");
    assert!(
        problems.is_empty(),
        "manifests and CLI disagree:\n{}",
        problems.into_iter().collect::<Vec<_>>().join("\n")
    );
}

#[test]
fn script_parser_finds_commands_and_flags() {
    let job = invocation("t".into(), &["restore".into(), "$(ID)".into(), "--to-volume=v".into()]);
    assert_eq!(job.path, ["restore"]);
    assert_eq!(job.flags, ["--to-volume"]);
    let script = "set -eu\nif hlstore backup create --repo \"$R\" \\\n  --volume \"$v\" --label=a=b; then\n  echo hlstore is not a command here\nfi\nhlstore backup prune --keep-daily 7\n";
    let found = script_invocations("t", script);
    assert_eq!(found.len(), 2, "{found:?}");
    assert_eq!(found[0].path, ["backup", "create"]);
    assert_eq!(found[0].flags, ["--repo", "--volume", "--label"]);
    assert_eq!(found[1].path, ["backup", "prune"]);
    assert_eq!(found[1].flags, ["--keep-daily"]);
}

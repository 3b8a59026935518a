//! Hand-written checks of what the schema validator cannot see in deploy/: CRD objects
//! (VolumeSnapshotClass, PodMonitor, Flux, ArgoCD, kind) have their required fields and
//! point at things that exist; no Secret is ever rendered and the template holds no secret;
//! every ConfigMap/Secret reference resolves; every container has requests and limits and
//! a pinned image; the scripts are shellcheck-clean; the Grafana dashboard uses only metric
//! names the code exports.

mod deploy_support;

use std::collections::BTreeSet;
use std::process::Command;

use deploy_support::*;
use serde_yaml::Value;

const NAMESPACE: &str = "hlstore-system";

#[test]
fn volume_snapshot_class_and_pod_monitor_have_required_fields() {
    for overlay in OVERLAYS {
        let objs = objects(overlay);
        let vscs = of_kind(&objs, "VolumeSnapshotClass");
        assert_eq!(vscs.len(), 1, "{overlay}");
        let vsc = vscs[0];
        assert_eq!(s(&vsc["apiVersion"], "apiVersion"), "snapshot.storage.k8s.io/v1");
        assert!(!name(vsc).is_empty());
        assert!(["Delete", "Retain"].contains(&s(&vsc["deletionPolicy"], "deletionPolicy")));
        assert!(vsc["metadata"]["namespace"].is_null(), "VolumeSnapshotClass is cluster-scoped");
        for pm in of_kind(&objs, "PodMonitor") {
            assert_eq!(s(&pm["apiVersion"], "apiVersion"), "monitoring.coreos.com/v1");
            let sel = pm["spec"]["selector"]["matchLabels"].as_mapping().expect("selector.matchLabels");
            let endpoints = pm["spec"]["podMetricsEndpoints"].as_sequence().expect("podMetricsEndpoints");
            // The selector must match a workload whose pods name the scraped port.
            let target = objs
                .iter()
                .filter(|o| pod_spec(o).is_some())
                .find(|o| {
                    let labels = &o["spec"]["template"]["metadata"]["labels"];
                    sel.iter().all(|(k, v)| &labels[k.as_str().unwrap()] == v)
                })
                .expect("PodMonitor selects no workload");
            let ports: BTreeSet<&str> = containers(pod_spec(target).unwrap())
                .into_iter()
                .flat_map(|c| c["ports"].as_sequence().into_iter().flatten())
                .filter_map(|p| p["name"].as_str())
                .collect();
            for e in endpoints {
                let port = s(&e["port"], "port");
                assert!(ports.contains(port), "{overlay}: PodMonitor port {port} not in {}", name(target));
            }
        }
    }
    let monitors: BTreeSet<String> =
        of_kind(&objects("production"), "PodMonitor").into_iter().map(|p| name(p).to_string()).collect();
    let want = ["hlstore-agent", "hlstore-csi-controller", "hlstore-csi-node"];
    assert_eq!(monitors, want.map(String::from).into(), "production scrapes the agents and the CSI daemons");
}

#[test]
fn gitops_examples_point_at_real_overlays() {
    let gitops = deploy().join("gitops");
    let flux = load(&gitops.join("flux/hlstore.yaml"));
    let repo = flux.iter().find(|o| kind(o) == "GitRepository").expect("GitRepository");
    assert_eq!(s(&repo["apiVersion"], "apiVersion"), "source.toolkit.fluxcd.io/v1");
    assert!(s(&repo["spec"]["url"], "url").starts_with("https://"));
    assert!(repo["spec"]["interval"].is_string() && repo["spec"]["ref"].is_mapping());
    let ks = flux.iter().find(|o| kind(o) == "Kustomization").expect("Flux Kustomization");
    assert_eq!(s(&ks["apiVersion"], "apiVersion"), "kustomize.toolkit.fluxcd.io/v1");
    assert_eq!(s(&ks["spec"]["sourceRef"]["kind"], "sourceRef.kind"), "GitRepository");
    assert_eq!(s(&ks["spec"]["sourceRef"]["name"], "sourceRef.name"), name(repo));
    assert!(ks["spec"]["interval"].is_string());
    assert_eq!(ks["spec"]["prune"].as_bool(), Some(true));
    let path = s(&ks["spec"]["path"], "path").trim_start_matches("./");
    assert!(root().join(path).join("kustomization.yaml").is_file(), "Flux path {path} is no overlay");

    let argo = load(&gitops.join("argocd/application.yaml"));
    assert_eq!(argo.len(), 1);
    let app = &argo[0];
    assert_eq!(kind(app), "Application");
    assert_eq!(s(&app["apiVersion"], "apiVersion"), "argoproj.io/v1alpha1");
    assert!(app["spec"]["project"].is_string());
    assert!(s(&app["spec"]["source"]["repoURL"], "repoURL").starts_with("https://"));
    assert!(app["spec"]["source"]["targetRevision"].is_string());
    let path = s(&app["spec"]["source"]["path"], "path");
    assert!(root().join(path).join("kustomization.yaml").is_file(), "ArgoCD path {path} is no overlay");
    assert_eq!(s(&app["spec"]["destination"]["namespace"], "namespace"), NAMESPACE);
    assert!(app["spec"]["destination"]["server"].is_string());
}

/// `kubectl kustomize` of a temporary directory holding `kustomization` (YAML) whose
/// only resource is `overlay`.
fn render_kustomization(mut kustomization: serde_yaml::Mapping, overlay: &std::path::Path) -> Vec<Value> {
    let dir = tempfile::tempdir().unwrap();
    // kustomize takes no absolute resource paths: climb from the temporary directory to `/`.
    let depth = dir.path().canonicalize().unwrap().components().count() - 1;
    let overlay = overlay.canonicalize().unwrap();
    let relative = format!("{}{}", "../".repeat(depth), overlay.display().to_string().trim_start_matches('/'));
    kustomization.insert("resources".into(), Value::Sequence(vec![relative.into()]));
    let yaml = serde_yaml::to_string(&Value::Mapping(kustomization)).unwrap();
    std::fs::write(dir.path().join("kustomization.yaml"), yaml).unwrap();
    render_dir(dir.path())
}

fn render_dir(dir: &std::path::Path) -> Vec<Value> {
    let out = run(Command::new(tool("kubectl")).arg("kustomize").arg(dir));
    assert!(out.status.success(), "kubectl kustomize {}: {}", dir.display(), text(&out.stderr));
    docs(&text(&out.stdout))
}

/// What Flux and ArgoCD do with the examples' `patches`: apply them on top of the overlay
/// at `path`. The rendered objects must carry the user's peers and backup repository, the
/// agents must use the patched ConfigMap (renamed by its new hash, so they roll), and the
/// overlay itself must name no host: nobody has to fork hlstore to deploy it.
#[test]
fn gitops_examples_carry_the_users_settings_as_patches() {
    let production = objects("production");
    assert_eq!(configmap_value(&production, "hlstore-peers", "peers"), "", "the production overlay names no peers");
    let peers_name = |objs: &[Value]| {
        name(objs.iter().find(|o| kind(o) == "ConfigMap" && name(o).starts_with("hlstore-peers-")).expect("peers"))
            .to_string()
    };
    let unpatched = peers_name(&production);

    let gitops = deploy().join("gitops");
    let flux = load(&gitops.join("flux/hlstore.yaml"));
    let ks = flux.iter().find(|o| kind(o) == "Kustomization").unwrap();
    let argo = &load(&gitops.join("argocd/application.yaml"))[0];
    let wrap = |path: &str, patches: &Value| -> Vec<Value> {
        let overlay = root().join(path.trim_start_matches("./"));
        let mut k = serde_yaml::Mapping::new();
        k.insert("apiVersion".into(), "kustomize.config.k8s.io/v1beta1".into());
        k.insert("kind".into(), "Kustomization".into());
        k.insert("patches".into(), patches.clone());
        render_kustomization(k, &overlay)
    };
    let rendered = [
        ("Flux Kustomization", wrap(s(&ks["spec"]["path"], "path"), &ks["spec"]["patches"])),
        (
            "ArgoCD Application",
            wrap(s(&argo["spec"]["source"]["path"], "path"), &argo["spec"]["source"]["kustomize"]["patches"]),
        ),
        ("deploy/gitops/kustomize", render_dir(&gitops.join("kustomize"))),
    ];
    for (what, objs) in &rendered {
        let peers = configmap_value(objs, "hlstore-peers", "peers");
        let parsed =
            hlstore_node::cluster::parse_peers(&peers).unwrap_or_else(|e| panic!("{what}: peers {peers:?}: {e}"));
        assert!(parsed.len() >= 3, "{what}: peers {peers:?}");
        let repo = configmap_value(objs, "hlstore-backup", "repo");
        assert!(repo.starts_with("s3://") && repo != "s3://hlstore-backups/cluster", "{what}: backup repo {repo:?}");
        assert!(!configmap_value(objs, "hlstore-backup", "s3-endpoint").is_empty(), "{what}: s3-endpoint");
        // The agents read the patched ConfigMap, under its new (hashed) name.
        let cm = peers_name(objs);
        assert_ne!(cm, unpatched, "{what}: the patched peers ConfigMap kept its name, agents would not roll");
        let agent = objs.iter().find(|o| kind(o) == "DaemonSet" && name(o) == "hlstore-agent").unwrap();
        assert!(serde_yaml::to_string(agent).unwrap().contains(&cm), "{what}: the agent does not use {cm}");
        for o in of_kind(objs, "PodMonitor").into_iter().chain(of_kind(objs, "PrometheusRule")) {
            assert!(o["metadata"]["labels"]["release"].is_string(), "{what}: {} lost its release label", name(o));
        }
    }
}

#[test]
fn kind_cluster_has_one_control_plane_and_three_workers() {
    let cfg = load(&deploy().join("kind/cluster.yaml"));
    let c = &cfg[0];
    assert_eq!(kind(c), "Cluster");
    assert_eq!(s(&c["apiVersion"], "apiVersion"), "kind.x-k8s.io/v1alpha4");
    let roles: Vec<&str> = c["nodes"].as_sequence().unwrap().iter().map(|n| s(&n["role"], "role")).collect();
    assert_eq!(roles, ["control-plane", "worker", "worker", "worker"]);
    // The staging overlay's peer list names kind's worker nodes.
    let cluster = s(&c["name"], "name");
    let peers = configmap_value(&objects("staging"), "hlstore-peers", "peers");
    for w in ["worker", "worker2", "worker3"] {
        assert!(peers.contains(&format!("{cluster}-{w}=")), "staging peers {peers:?} lack {cluster}-{w}");
    }
}

fn configmap_value(objs: &[Value], base: &str, key: &str) -> String {
    let cm = objs
        .iter()
        .find(|o| kind(o) == "ConfigMap" && (name(o) == base || name(o).starts_with(&format!("{base}-"))))
        .unwrap_or_else(|| panic!("ConfigMap {base}"));
    s(&cm["data"][key], key).to_string()
}

#[test]
fn no_secret_in_git_and_every_reference_resolves() {
    let template = load(&deploy().join("base/backup/secret.template.yaml"));
    let secret = &template[0];
    assert_eq!(kind(secret), "Secret");
    let keys: BTreeSet<String> = secret["stringData"]
        .as_mapping()
        .expect("stringData")
        .iter()
        .map(|(k, v)| {
            assert_eq!(v.as_str(), Some("REPLACE_ME"), "template value of {k:?} must be a placeholder");
            k.as_str().unwrap().to_string()
        })
        .collect();
    let base = std::fs::read_to_string(deploy().join("base/kustomization.yaml")).unwrap();
    assert!(!base.contains("secret.template"), "the template must not be a kustomize resource");
    for overlay in OVERLAYS {
        let objs = objects(overlay);
        assert!(of_kind(&objs, "Secret").is_empty(), "{overlay} renders a Secret");
        let configmaps: Vec<&Value> = of_kind(&objs, "ConfigMap");
        for o in &objs {
            let Some(spec) = pod_spec(o) else { continue };
            for c in containers(spec) {
                for e in c["env"].as_sequence().into_iter().flatten() {
                    let from = &e["valueFrom"];
                    if let Some(r) = from["secretKeyRef"].as_mapping() {
                        let (n, k) = (r["name"].as_str().unwrap(), r["key"].as_str().unwrap());
                        assert_eq!(n, name(secret), "{overlay}: unknown Secret {n}");
                        assert!(keys.contains(k), "{overlay}: Secret key {k} not in the template");
                    }
                    if let Some(r) = from["configMapKeyRef"].as_mapping() {
                        let (n, k) = (r["name"].as_str().unwrap(), r["key"].as_str().unwrap());
                        let cm = configmaps.iter().find(|cm| name(cm) == n);
                        let cm = cm.unwrap_or_else(|| panic!("{overlay}: {} uses missing ConfigMap {n}", name(o)));
                        assert!(cm["data"][k].is_string(), "{overlay}: ConfigMap {n} has no key {k}");
                    }
                }
            }
            for v in spec["volumes"].as_sequence().into_iter().flatten() {
                if let Some(n) = v["configMap"]["name"].as_str() {
                    assert!(configmaps.iter().any(|cm| name(cm) == n), "{overlay}: missing ConfigMap {n}");
                }
                // TLS secrets come from cert-manager Certificates in the render.
                if let Some(n) = v["secret"]["secretName"].as_str() {
                    let made =
                        of_kind(&objs, "Certificate").iter().any(|c| c["spec"]["secretName"].as_str() == Some(n));
                    assert!(made, "{overlay}: {} mounts Secret {n}, which no Certificate makes", name(o));
                }
            }
        }
    }
}

#[test]
fn every_container_is_sized_and_pinned() {
    for overlay in OVERLAYS {
        let objs = objects(overlay);
        for o in &objs {
            let Some(spec) = pod_spec(o) else { continue };
            for c in containers(spec) {
                let what = format!("{overlay} {}/{} {}", kind(o), name(o), c["name"].as_str().unwrap_or(""));
                for side in ["requests", "limits"] {
                    for res in ["cpu", "memory"] {
                        assert!(!c["resources"][side][res].is_null(), "{what}: no {side}.{res}");
                    }
                }
                let image = s(&c["image"], "image");
                let tag = image.rsplit_once(':').map(|(_, t)| t).unwrap_or("");
                assert!(!tag.is_empty() && tag != "latest" && !tag.contains('/'), "{what}: image {image} not pinned");
            }
        }
        // A Pi 4 has 4 GiB: the per-node pods (agent + CSI node plugin) stay well below.
        let per_node: u64 = objs
            .iter()
            .filter(|o| kind(o) == "DaemonSet")
            .flat_map(|o| containers(pod_spec(o).unwrap()))
            .map(|c| mebibytes(s(&c["resources"]["limits"]["memory"], "memory limit")))
            .sum();
        assert!(per_node <= 1024, "{overlay}: per-node memory limits add up to {per_node} MiB");
    }
}

fn mebibytes(q: &str) -> u64 {
    if let Some(n) = q.strip_suffix("Mi") {
        n.parse().unwrap()
    } else if let Some(n) = q.strip_suffix("Gi") {
        n.parse::<u64>().unwrap() * 1024
    } else {
        panic!("memory quantity {q} not in Mi or Gi")
    }
}

#[test]
fn scripts_are_shellcheck_clean() {
    let scripts = [
        root().join("tests/chaos/kind.sh"),
        deploy().join("base/backup/backup-volumes.sh"),
        root().join("tests/docker/smoke.sh"),
        root().join("scripts/build-hlstore.sh"),
    ];
    let out = run(Command::new(tool("shellcheck")).args(&scripts));
    assert!(out.status.success(), "shellcheck:\n{}", text(&out.stdout));
    // And it does flag a real problem (an unquoted variable), so a pass means something.
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.sh");
    std::fs::write(&bad, "#!/bin/sh\nrm -rf $1/tmp\n").unwrap();
    assert!(!run(Command::new(tool("shellcheck")).arg(&bad)).status.success());
}

/// Metric names a dashboard query uses (`hlstore_...`, histogram suffixes folded).
fn dashboard_metrics(json: &serde_json::Value) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for panel in json["panels"].as_array().unwrap() {
        for t in panel["targets"].as_array().into_iter().flatten() {
            let expr = t["expr"].as_str().unwrap();
            let mut rest = expr;
            while let Some(i) = rest.find("hlstore_") {
                let tail = &rest[i..];
                let end = tail.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(tail.len());
                let name = &tail[..end];
                let base = ["_bucket", "_sum", "_count"].iter().find_map(|s| name.strip_suffix(s)).unwrap_or(name);
                out.insert(base.to_string());
                rest = &tail[end..];
            }
        }
    }
    out
}

/// Every string literal `"hlstore_..."` in the code that renders metrics.
fn exported_metric_names() -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut files = vec![root().join("src/cli/backup_metrics.rs")];
    for dir in ["crates/node/src", "crates/nbd/src", "crates/csi-driver/src"] {
        for e in std::fs::read_dir(root().join(dir)).unwrap().flatten() {
            files.push(e.path());
        }
    }
    for f in files.into_iter().filter(|f| f.extension().is_some_and(|e| e == "rs")) {
        let src = std::fs::read_to_string(&f).unwrap();
        for part in src.split('"').skip(1).step_by(2) {
            if part.starts_with("hlstore_") && part.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                out.insert(part.to_string());
            }
        }
    }
    out
}

#[test]
fn dashboard_uses_only_exported_metrics() {
    let path = deploy().join("components/monitoring/hlstore-dashboard.json");
    let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).expect("valid JSON");
    assert!(json["title"].is_string() && json["uid"].is_string());
    let panels = json["panels"].as_array().expect("panels");
    assert!(panels.iter().filter(|p| p["type"] != "row").count() >= 10);
    for p in panels.iter().filter(|p| p["type"] != "row") {
        assert!(!p["targets"].as_array().unwrap().is_empty(), "panel {} has no query", p["title"]);
    }
    let used = dashboard_metrics(&json);
    let exported = exported_metric_names();
    assert!(exported.len() > 20, "found only {exported:?}");
    let missing: Vec<_> = used.difference(&exported).collect();
    assert!(missing.is_empty(), "dashboard uses metrics no code exports: {missing:?}");
    for group in ["hlstore_volume_", "hlstore_node_", "hlstore_backup_", "hlstore_replica_", "hlstore_csi_"] {
        assert!(used.iter().any(|m| m.starts_with(group)), "dashboard shows no {group}* metric");
    }
    // The dashboard is shipped in the monitoring component.
    let prod = rendered("production");
    assert!(prod.contains("hlstore-dashboard.json") && prod.contains("grafana_dashboard"));
}

#[test]
fn alerts_cover_the_failures_and_use_only_exported_metrics() {
    let objs = objects("production");
    let rules = of_kind(&objs, "PrometheusRule");
    assert_eq!(rules.len(), 1, "production ships one PrometheusRule");
    let rule = rules[0];
    assert_eq!(s(&rule["apiVersion"], "apiVersion"), "monitoring.coreos.com/v1");
    // kube-prometheus-stack selects rules and monitors by its release label.
    for o in rules.iter().chain(of_kind(&objs, "PodMonitor").iter()) {
        assert!(o["metadata"]["labels"]["release"].is_string(), "{} has no release label", name(o));
    }
    let exported = exported_metric_names();
    let mut alerts = BTreeSet::new();
    let groups = rule["spec"]["groups"].as_sequence().expect("spec.groups");
    for g in groups {
        for r in g["rules"].as_sequence().expect("rules") {
            let alert = s(&r["alert"], "alert");
            assert!(alert.starts_with("Hlstore"), "{alert}");
            let expr = s(&r["expr"], "expr");
            assert!(["critical", "warning", "info"].contains(&s(&r["labels"]["severity"], "severity")), "{alert}");
            assert!(!s(&r["annotations"]["summary"], "summary").is_empty());
            assert!(!s(&r["annotations"]["description"], "description").is_empty());
            if let Some(f) = r["for"].as_str() {
                assert!(f.ends_with('m') || f.ends_with('s') || f.ends_with('h'), "{alert}: for {f}");
            }
            let used: Vec<&str> = expr
                .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .filter(|w| w.starts_with("hlstore_"))
                .collect();
            for m in &used {
                assert!(exported.contains(*m), "{alert} uses {m}, which no code exports");
            }
            alerts.insert(alert.to_string());
        }
    }
    for want in [
        "HlstoreVolumeWithoutWriteQuorum",
        "HlstoreVolumeDegraded",
        "HlstoreReplicaFailed",
        "HlstoreResyncStuck",
        "HlstoreAgentDown",
        "HlstoreCertificateExpiresSoon",
        "HlstoreCorruptionDetected",
        "HlstoreUnrecoverableBlocks",
        "HlstoreNodeDiskAlmostFull",
        "HlstoreBackupTooOld",
        "HlstoreBackupJobFailed",
        "HlstoreBackupRepositoryUnreadable",
    ] {
        assert!(alerts.contains(want), "no alert {want}: {alerts:?}");
    }
    // promtool, where a Debian `prometheus` package provides it, checks the PromQL too, and
    // runs the alerts' unit tests (tests/prometheus/alerts.test.yaml: which alerts fire on
    // which series, and when they stay quiet).
    if let Ok(out) = Command::new("promtool").arg("--version").output() {
        if out.status.success() {
            let dir = tempfile::tempdir().unwrap();
            let file = dir.path().join("rules.yaml");
            std::fs::write(&file, serde_yaml::to_string(&rule["spec"]).unwrap()).unwrap();
            let check = Command::new("promtool").arg("check").arg("rules").arg(&file).output().unwrap();
            assert!(
                check.status.success(),
                "promtool check rules:\n{}{}",
                String::from_utf8_lossy(&check.stdout),
                String::from_utf8_lossy(&check.stderr)
            );
            // The unit tests compare labels; annotations are checked above.
            let mut spec = rule["spec"].clone();
            for g in spec["groups"].as_sequence_mut().unwrap() {
                for r in g["rules"].as_sequence_mut().unwrap() {
                    r.as_mapping_mut().unwrap().remove("annotations");
                }
            }
            std::fs::write(&file, serde_yaml::to_string(&spec).unwrap()).unwrap();
            let tests = dir.path().join("alerts.test.yaml");
            std::fs::copy(root().join("tests/prometheus/alerts.test.yaml"), &tests).unwrap();
            let test = Command::new("promtool").arg("test").arg("rules").arg(&tests).output().unwrap();
            assert!(
                test.status.success(),
                "promtool test rules:\n{}{}",
                String::from_utf8_lossy(&test.stdout),
                String::from_utf8_lossy(&test.stderr)
            );
        }
    } else {
        eprintln!("promtool not installed: PromQL syntax not checked");
    }
}

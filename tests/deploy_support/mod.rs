//! Helpers for the deploy/ tests: rendering the Kustomize overlays with the real
//! `kubectl kustomize`, parsing the result, and finding the external validators
//! (kubernetes-validate, yamllint, shellcheck; installed by scripts/setup.sh).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use serde::Deserialize as _;
use serde_yaml::Value;

/// The overlays users deploy; each must build and validate.
pub const OVERLAYS: [&str; 2] = ["staging", "production"];

/// Kinds whose schema kubernetes-validate does not ship (CRDs): checked by hand instead.
pub const CRD_KINDS: [&str; 5] = ["VolumeSnapshotClass", "PodMonitor", "PrometheusRule", "Certificate", "Issuer"];

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn deploy() -> PathBuf {
    root().join("deploy")
}

/// Finds `name` on PATH or in the Python scripts directories pip installs into.
pub fn tool(name: &str) -> PathBuf {
    let mut dirs: Vec<PathBuf> =
        std::env::var_os("PATH").map(|p| std::env::split_paths(&p).collect()).unwrap_or_default();
    for py in ["python3", "/usr/bin/python3"] {
        if let Ok(out) =
            Command::new(py).args(["-c", "import sysconfig; print(sysconfig.get_path('scripts'))"]).output()
        {
            dirs.push(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()));
        }
    }
    dirs.push(PathBuf::from("/usr/local/bin"));
    for d in dirs {
        let p = d.join(name);
        if p.is_file() {
            return p;
        }
    }
    panic!("{name} not found on PATH: run scripts/setup.sh (it installs kubectl, kubernetes-validate, yamllint, shellcheck)");
}

pub fn run(cmd: &mut Command) -> Output {
    cmd.output().unwrap_or_else(|e| panic!("running {cmd:?}: {e}"))
}

pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// `kubectl kustomize deploy/overlays/<overlay>`, once per test process.
pub fn rendered(overlay: &str) -> &'static str {
    static CACHE: OnceLock<Vec<(String, String)>> = OnceLock::new();
    let all = CACHE.get_or_init(|| {
        let kubectl = tool("kubectl");
        OVERLAYS
            .iter()
            .map(|o| {
                let dir = deploy().join("overlays").join(o);
                let out = run(Command::new(&kubectl).arg("kustomize").arg(&dir));
                assert!(out.status.success(), "kubectl kustomize {}: {}", dir.display(), text(&out.stderr));
                (o.to_string(), text(&out.stdout))
            })
            .collect()
    });
    &all.iter().find(|(o, _)| o == overlay).unwrap_or_else(|| panic!("unknown overlay {overlay}")).1
}

/// Every document of a multi-document YAML string.
pub fn docs(yaml: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(yaml)
        .map(|d| Value::deserialize(d).unwrap_or_else(|e| panic!("bad YAML: {e}")))
        .filter(|v| !v.is_null())
        .collect()
}

pub fn load(path: &Path) -> Vec<Value> {
    docs(&std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
}

pub fn objects(overlay: &str) -> Vec<Value> {
    docs(rendered(overlay))
}

pub fn kind(v: &Value) -> &str {
    v["kind"].as_str().unwrap_or("")
}

pub fn name(v: &Value) -> &str {
    v["metadata"]["name"].as_str().unwrap_or("")
}

pub fn of_kind<'a>(objs: &'a [Value], k: &str) -> Vec<&'a Value> {
    objs.iter().filter(|o| kind(o) == k).collect()
}

pub fn s<'a>(v: &'a Value, what: &str) -> &'a str {
    v.as_str().unwrap_or_else(|| panic!("{what}: expected a string, got {v:?}"))
}

/// The pod spec of a workload (Deployment, DaemonSet, CronJob), if it is one.
pub fn pod_spec(o: &Value) -> Option<&Value> {
    match kind(o) {
        "Deployment" | "DaemonSet" | "StatefulSet" | "Job" => Some(&o["spec"]["template"]["spec"]),
        "CronJob" => Some(&o["spec"]["jobTemplate"]["spec"]["template"]["spec"]),
        _ => None,
    }
}

/// Every container and init container of a pod spec.
pub fn containers(spec: &Value) -> Vec<&Value> {
    let mut out = Vec::new();
    for key in ["initContainers", "containers"] {
        if let Some(list) = spec[key].as_sequence() {
            out.extend(list.iter());
        }
    }
    out
}

pub fn strings(v: &Value) -> Vec<String> {
    v.as_sequence().map(|l| l.iter().filter_map(|x| x.as_str().map(str::to_string)).collect()).unwrap_or_default()
}

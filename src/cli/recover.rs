//! `hlstore recover`: rebuilds a lost cluster's volumes from the backup repository. The
//! newest backup of every volume (volume backups carry the label `volume`, and those the
//! CronJob takes `pvc-namespace`/`pvc-name`) is restored into a volume of the original name
//! on the (fresh) cluster, resumably; with `--manifests DIR`, a PersistentVolume bound to a
//! PersistentVolumeClaim of the original namespace and name is written per claim, so
//! `kubectl apply -f DIR` gives every app its data back under the claim it already uses.
//!
//! Idempotent: a volume that exists and has no interrupted restore of its own is left
//! alone ("present"), so the command can run again after a failure or from a Job.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Args;
use hlstore_backup::select::{self, claim_of};
use hlstore_backup::volume::{restore_to_volume, VolumeAgent, VolumeRestoreOptions};
use hlstore_backup::SnapshotMeta;
use serde::Serialize;
use tokio::runtime::Handle;

use super::backup::RepoArgs;
use super::size::format_size;
use super::volume_agent::GrpcAgent;

const EXAMPLE: &str = "\
Examples:
  # what would be restored (newest backup per volume)
  hlstore recover --repo s3://hlstore-backups/homelab --dry-run
  # restore everything into the fresh cluster and write one PV + PVC per claim
  hlstore recover --repo s3://hlstore-backups/homelab --manifests ./recovered
  kubectl apply -f ./recovered     # before the apps (Flux dependsOn / Argo sync waves)
  # one namespace only
  hlstore recover --repo s3://hlstore-backups/homelab --label pvc-namespace=databases";

/// Arguments of `hlstore recover`.
#[derive(Debug, Args)]
#[command(after_help = EXAMPLE)]
pub struct RecoverArgs {
    #[command(flatten)]
    pub repo: RepoArgs,
    /// Node agent gRPC endpoint (any node of the new cluster).
    #[arg(long, env = "HLSTORE_ENDPOINT", default_value = "127.0.0.1:7400")]
    pub endpoint: String,
    /// Only volumes whose newest backup has this label (KEY=VALUE; repeat for several).
    #[arg(long = "label", value_parser = parse_label)]
    pub labels: Vec<(String, String)>,
    /// Replicas of each restored volume.
    #[arg(long, default_value_t = 3)]
    pub replicas: u32,
    /// Write DIR/<namespace>--<claim>.yaml (a PersistentVolume + its claim) for every
    /// restored volume whose backup names its claim.
    #[arg(long)]
    pub manifests: Option<PathBuf>,
    /// StorageClass named in the manifests.
    #[arg(long, default_value = "hlstore")]
    pub storage_class: String,
    /// Filesystem type named in the manifests' PersistentVolumes.
    #[arg(long, default_value = "ext4")]
    pub fs_type: String,
    /// Where interrupted restores record their progress (default: $TMPDIR); rerun the
    /// same command to continue them.
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// Parallel pack downloads per volume.
    #[arg(long, default_value_t = 4)]
    pub parallel: usize,
    /// Only print what would be restored.
    #[arg(long)]
    pub dry_run: bool,
    #[arg(long)]
    pub json: bool,
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("label {s:?} is not KEY=VALUE")),
    }
}

/// What happened to one volume.
#[derive(Debug, Serialize)]
struct Outcome {
    volume: String,
    backup: String,
    /// Backup time, seconds since the epoch.
    time: u64,
    size: u64,
    /// `namespace/name` of the claim, when the backup names it.
    pvc: Option<String>,
    /// `restored`, `present` (the volume exists already), `would-restore` (dry run) or `failed`.
    status: String,
    error: Option<String>,
    manifest: Option<PathBuf>,
}

/// The newest volume backup of every volume, filtered by `labels`.
fn newest_per_volume(metas: Vec<SnapshotMeta>, labels: &[(String, String)]) -> BTreeMap<String, SnapshotMeta> {
    let filter = select::Filter::new(None, labels);
    let mut out = select::newest_per(metas, select::VOLUME_LABEL);
    out.retain(|_, m| filter.matches(m));
    out
}

/// A PersistentVolume for `volume` bound to the claim `ns/name`, and that claim.
fn manifest(volume: &str, size: u64, ns: &str, name: &str, class: &str, fs: &str) -> String {
    format!(
        "# Restored by `hlstore recover` from the backup repository: the volume {volume} and the\n\
         # claim {ns}/{name} that used it. Apply before the app that mounts the claim.\n\
         apiVersion: v1\nkind: PersistentVolume\nmetadata:\n  name: {volume}\n  labels:\n    \
         app.kubernetes.io/managed-by: hlstore-recover\nspec:\n  capacity:\n    storage: \"{size}\"\n  \
         accessModes: [\"ReadWriteOnce\"]\n  persistentVolumeReclaimPolicy: Retain\n  storageClassName: {class}\n  \
         volumeMode: Filesystem\n  csi:\n    driver: csi.hlstore.io\n    volumeHandle: {volume}\n    fsType: {fs}\n  \
         claimRef:\n    namespace: {ns}\n    name: {name}\n---\napiVersion: v1\nkind: PersistentVolumeClaim\n\
         metadata:\n  name: {name}\n  namespace: {ns}\nspec:\n  accessModes: [\"ReadWriteOnce\"]\n  \
         storageClassName: {class}\n  volumeName: {volume}\n  resources:\n    requests:\n      storage: \"{size}\"\n"
    )
}

fn restore_one(
    r: &hlstore_backup::Repository,
    agent: &GrpcAgent,
    args: &RecoverArgs,
    volume: &str,
    m: &SnapshotMeta,
) -> anyhow::Result<&'static str> {
    let state_dir = args.state_dir.clone().unwrap_or_else(std::env::temp_dir);
    std::fs::create_dir_all(&state_dir).with_context(|| format!("creating {}", state_dir.display()))?;
    let state_file = state_dir.join(format!("hlstore-restore-{}.state", volume.replace('/', "_")));
    let resuming = state_file.exists();
    if agent.volume_size(volume)?.is_some() && !resuming {
        return Ok("present");
    }
    if args.dry_run {
        return Ok("would-restore");
    }
    let opts = VolumeRestoreOptions {
        replicas: args.replicas,
        progress: true,
        workers: args.parallel.max(1),
        state_file: Some(state_file),
    };
    restore_to_volume(r, agent, &m.id, volume, opts)?;
    Ok("restored")
}

pub async fn run(args: RecoverArgs) -> anyhow::Result<()> {
    tokio::task::spawn_blocking(move || run_blocking(&args, Handle::current())).await.context("recover task")?
}

fn run_blocking(args: &RecoverArgs, handle: Handle) -> anyhow::Result<()> {
    anyhow::ensure!((1..=5).contains(&args.replicas), "--replicas must be between 1 and 5");
    let r = args.repo.open()?;
    let agent = GrpcAgent::connect(handle, &args.endpoint)?;
    let chosen = newest_per_volume(r.list_snapshots()?, &args.labels);
    if chosen.is_empty() {
        anyhow::bail!(
            "the repository holds no volume backup{}",
            if args.labels.is_empty() { "" } else { " with those labels" }
        );
    }
    if let Some(dir) = &args.manifests {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let mut outcomes = Vec::new();
    for (volume, m) in &chosen {
        let claim = claim_of(m);
        if !args.json {
            eprintln!("volume {volume}: backup {} ({})", m.id, format_size(m.size));
        }
        let (status, error) = match restore_one(&r, &agent, args, volume, m) {
            Ok(s) => (s.to_string(), None),
            Err(e) => (String::from("failed"), Some(format!("{e:#}"))),
        };
        let size = agent.volume_size(volume).ok().flatten().unwrap_or(m.size);
        let manifest_path = match (&args.manifests, &claim, status.as_str()) {
            (Some(dir), Some((ns, name)), "restored" | "present") => {
                let path = dir.join(format!("{ns}--{name}.yaml"));
                let body = manifest(volume, size, ns, name, &args.storage_class, &args.fs_type);
                write_file(&path, &body)?;
                Some(path)
            }
            _ => None,
        };
        outcomes.push(Outcome {
            volume: volume.clone(),
            backup: m.id.clone(),
            time: m.time,
            size,
            pvc: claim.map(|(ns, n)| format!("{ns}/{n}")),
            status,
            error,
            manifest: manifest_path,
        });
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&outcomes)?);
    } else {
        for o in &outcomes {
            let claim = o.pvc.as_deref().map(|c| format!(" (claim {c})")).unwrap_or_default();
            match &o.error {
                Some(e) => println!("{:<40} FAILED: {e}", o.volume),
                None => println!("{:<40} {} from backup {}{claim}", o.volume, o.status, o.backup),
            }
        }
    }
    let failed: Vec<&str> = outcomes.iter().filter(|o| o.status == "failed").map(|o| o.volume.as_str()).collect();
    if !failed.is_empty() {
        anyhow::bail!(
            "{} volume(s) not restored: {}; run the same command again to retry",
            failed.len(),
            failed.join(", ")
        );
    }
    Ok(())
}

fn write_file(path: &Path, body: &str) -> anyhow::Result<()> {
    std::fs::write(path, body).with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(id: &str, time: u64, labels: &[(&str, &str)]) -> SnapshotMeta {
        SnapshotMeta {
            id: id.into(),
            time,
            nanos: 0,
            source: "volume".into(),
            size: 4096,
            host: "h".into(),
            labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            parent: None,
            chunker: Default::default(),
            stats: Default::default(),
        }
    }

    #[test]
    fn newest_backup_per_volume_and_its_claim() {
        let metas = vec![
            meta("a1", 10, &[("volume", "pvc-a"), ("pvc", "apps/db")]),
            meta("a2", 20, &[("volume", "pvc-a"), ("pvc", "apps/db")]),
            meta("b1", 30, &[("volume", "pvc-b"), ("pvc-namespace", "media"), ("pvc-name", "lib")]),
            meta("f1", 40, &[("source", "files")]),
        ];
        let chosen = newest_per_volume(metas.clone(), &[]);
        assert_eq!(chosen.keys().collect::<Vec<_>>(), ["pvc-a", "pvc-b"]);
        assert_eq!(chosen["pvc-a"].id, "a2");
        assert_eq!(claim_of(&chosen["pvc-a"]), Some(("apps".into(), "db".into())));
        assert_eq!(claim_of(&chosen["pvc-b"]), Some(("media".into(), "lib".into())));
        let only = newest_per_volume(metas, &[("pvc-namespace".into(), "media".into())]);
        assert_eq!(only.keys().collect::<Vec<_>>(), ["pvc-b"]);
        assert_eq!(claim_of(&meta("x", 1, &[("pvc", "-/-")])), None);
    }
}

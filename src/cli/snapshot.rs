//! `hlstore snapshot ...`: crash-consistent snapshots of replicated volumes.

use clap::Subcommand;
use hlstore_proto::volume as vpb;

use super::size::format_size;
use super::volume::{connect, status_err};

/// `hlstore snapshot` subcommands (through any node agent, `--endpoint`).
#[derive(Debug, Subcommand)]
pub enum SnapshotCommand {
    /// Take a snapshot: the same point of the write stream on every replica. Instant
    /// (nothing is copied); later writes keep the blocks it sees.
    ///
    /// Example: hlstore snapshot create pgdata before-upgrade
    Create {
        volume: String,
        name: String,
        /// Labels, KEY=VALUE (repeatable).
        #[arg(long = "label", value_parser = parse_label)]
        labels: Vec<(String, String)>,
        #[arg(long)]
        json: bool,
    },
    /// List a volume's snapshots, oldest first (READY: every replica holds it).
    List {
        volume: String,
        #[arg(long)]
        json: bool,
    },
    /// Delete a snapshot; the blocks only it kept are freed.
    Delete {
        volume: String,
        name: String,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Roll a volume back to a snapshot (detach it first). Only blocks changed since the
    /// snapshot are rewritten; the snapshot stays.
    Revert {
        volume: String,
        name: String,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Blocks changed between two snapshots, or since one (for incremental copies).
    Diff {
        volume: String,
        /// Older snapshot.
        from: String,
        /// Newer snapshot (default: the live volume).
        to: Option<String>,
        #[arg(long)]
        json: bool,
    },
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .filter(|(k, _)| !k.is_empty())
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("label {s:?} must be KEY=VALUE"))
}

fn snapshot_json(s: &vpb::Snapshot) -> serde_json::Value {
    serde_json::json!({
        "volume": s.volume, "name": s.name, "seq": s.seq, "size": s.size,
        "created": s.created, "ready": s.ready, "labels": s.labels,
    })
}

pub async fn run(endpoint: &str, cmd: SnapshotCommand) -> anyhow::Result<()> {
    let mut c = connect(endpoint).await?;
    match cmd {
        SnapshotCommand::Create { volume, name, labels, json } => {
            let req = vpb::CreateSnapshotRequest { volume, name, labels: labels.into_iter().collect() };
            let s = c.create_snapshot(req).await.map_err(status_err)?.into_inner();
            if json {
                println!("{}", serde_json::to_string_pretty(&snapshot_json(&s))?);
            } else {
                println!("snapshot {} of {} at seq {}", s.name, s.volume, s.seq);
            }
        }
        SnapshotCommand::List { volume, json } => {
            let list = c.list_snapshots(vpb::ListSnapshotsRequest { volume }).await.map_err(status_err)?;
            let list = list.into_inner().snapshots;
            if json {
                println!("{}", serde_json::to_string_pretty(&list.iter().map(snapshot_json).collect::<Vec<_>>())?);
            } else {
                println!("{:<32} {:>10} {:>20} {:>12} READY", "NAME", "SIZE", "CREATED", "SEQ");
                for s in &list {
                    println!(
                        "{:<32} {:>10} {:>20} {:>12} {}",
                        s.name,
                        format_size(s.size),
                        s.created,
                        s.seq,
                        if s.ready { "yes" } else { "no" }
                    );
                }
            }
        }
        SnapshotCommand::Delete { volume, name, json } => {
            let req = vpb::DeleteSnapshotRequest { volume: volume.clone(), name: name.clone() };
            let existed = c.delete_snapshot(req).await.map_err(status_err)?.into_inner().existed;
            if json {
                let v = serde_json::json!({ "volume": volume, "snapshot": name, "existed": existed });
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else if existed {
                println!("snapshot {name} of {volume} deleted");
            } else {
                println!("snapshot {name} of {volume} did not exist");
            }
        }
        SnapshotCommand::Revert { volume, name, json } => {
            let req = vpb::RevertSnapshotRequest { volume: volume.clone(), name: name.clone() };
            c.revert_snapshot(req).await.map_err(status_err)?;
            if json {
                let v = serde_json::json!({ "volume": volume, "reverted_to": name });
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!("volume {volume} reverted to snapshot {name}");
            }
        }
        SnapshotCommand::Diff { volume, from, to, json } => {
            let req = vpb::ChangedBlocksRequest { volume, from, to: to.unwrap_or_default() };
            let r = c.changed_blocks(req).await.map_err(status_err)?.into_inner();
            let total: u64 = r.extents.iter().map(|e| e.length).sum();
            if json {
                let ext: Vec<_> =
                    r.extents.iter().map(|e| serde_json::json!({"offset": e.offset, "length": e.length})).collect();
                println!("{}", serde_json::to_string_pretty(&serde_json::json!({"extents": ext, "bytes": total}))?);
            } else {
                for e in &r.extents {
                    println!("{:>16} {:>12}", e.offset, e.length);
                }
                println!("{} changed in {} extents", format_size(total), r.extents.len());
            }
        }
    }
    Ok(())
}

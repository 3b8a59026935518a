//! `hlstore volume ...`: create, list, attach and delete replicated volumes.

use clap::Subcommand;
use hlstore_proto::volume as vpb;
use hlstore_proto::volume::volumes_client::VolumesClient;
use tonic::transport::Channel;

use super::size::{format_size, parse_size};

/// `hlstore volume` subcommands. They talk to any node agent (`--endpoint`), which talks
/// to the rest of the cluster.
#[derive(Debug, Subcommand)]
pub enum VolumeCommand {
    /// Create a replicated volume (thin: costs nothing until written).
    ///
    /// Example: hlstore volume create pgdata --size 20GiB --replicas 3
    Create {
        name: String,
        /// Size, e.g. 10GiB (KiB, MiB, GiB, TiB; a multiple of 4 KiB).
        #[arg(long, value_parser = parse_size)]
        size: u64,
        /// Number of replicas, each on its own node (1-5).
        #[arg(long, default_value_t = 3)]
        replicas: u32,
        /// Nodes to place the replicas on (default: the least used nodes).
        #[arg(long, value_delimiter = ',')]
        nodes: Vec<String>,
        /// Write quorum (default: a majority of the replicas).
        #[arg(long)]
        write_quorum: Option<u32>,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// List volumes with their replicas and where they are attached.
    List {
        #[arg(long)]
        json: bool,
    },
    /// List the cluster's nodes: reachable or not, replicas held, and room for new
    /// replicas (free bytes less what thin replicas may still claim), which is what
    /// placement decides by.
    Nodes {
        #[arg(long)]
        json: bool,
    },
    /// Show one volume.
    Show {
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Start the volume's engine on a node and export it over NBD; prints the NBD URI.
    ///
    /// Attaching bumps the volume's epoch, which fences any engine still running elsewhere.
    Attach {
        name: String,
        /// Node to run the engine on.
        #[arg(long)]
        node: String,
        /// NBD listen address for this volume: HOST:PORT or unix:/path (default: the
        /// node's NBD listener).
        #[arg(long)]
        nbd_listen: Option<String>,
        /// Take the volume over from an engine whose node cannot be reached (dead or
        /// partitioned away). Without it such an attach is refused: an unreachable node may
        /// still be serving the volume. The old engine is fenced (its writes fail) and the
        /// new one waits out its read lease (`--lease-ms` of the agents, 4 s by default)
        /// before serving, so no client ever reads data older than what was acknowledged.
        #[arg(long)]
        force: bool,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Flush and stop the volume's engine.
    Detach {
        name: String,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Move a replica to another node, e.g. off a dead node.
    ///
    /// The volume is detached briefly, the replica set is rewritten under a new epoch, and
    /// the volume is re-attached where it was; the engine then copies the volume into the
    /// new replica (only allocated blocks) while I/O continues. Watch it with
    /// `hlstore volume show NAME` (the new replica is `resyncing`, then `healthy`).
    ///
    /// Example: hlstore volume replace-replica pgdata --from n3 --to n4
    ReplaceReplica {
        name: String,
        /// Node whose replica is replaced.
        #[arg(long)]
        from: String,
        /// Node that gets the new replica.
        #[arg(long)]
        to: String,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Delete a volume and all its replicas (it must be detached).
    Delete {
        name: String,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Create a new, independent volume with the content of SOURCE (a snapshot of it).
    ///
    /// Only the blocks the snapshot holds are copied. Without --snapshot, a snapshot of
    /// the current content is taken for the copy and deleted afterwards.
    ///
    /// Example: hlstore volume clone pgdata pgdata-test --snapshot nightly
    Clone {
        source: String,
        name: String,
        /// Snapshot of SOURCE to clone (default: its current content).
        #[arg(long)]
        snapshot: Option<String>,
        /// Number of replicas of the clone.
        #[arg(long, default_value_t = 3)]
        replicas: u32,
        /// Size of the clone (default: the snapshot's size; larger grows it).
        #[arg(long, value_parser = parse_size)]
        size: Option<u64>,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Grow a volume (online when attached: NBD clients see the new size on reconnect).
    ///
    /// Example: hlstore volume expand pgdata --size 40GiB
    Expand {
        name: String,
        /// New size (at least the current one; KiB, MiB, GiB, TiB).
        #[arg(long, value_parser = parse_size)]
        size: u64,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Run one scrub pass now: read every block from every in-sync replica, compare, and
    /// rewrite blocks that fail their checksum from a good copy. Unthrottled (the
    /// background scrub of `hlstore node --scrub-mibps` is paced); the volume stays online.
    /// Exits 1 when it found divergent or unrecoverable blocks.
    ///
    /// Example: hlstore volume scrub pgdata --json
    Scrub {
        name: String,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
}

/// The volume API of the agent at `endpoint`, over mutual TLS (see `tls.rs`).
pub async fn connect(endpoint: &str) -> anyhow::Result<VolumesClient<Channel>> {
    Ok(VolumesClient::new(super::tls::channel(endpoint).await?))
}

pub fn status_err(s: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{}", super::tls::status_message(&s))
}

/// The JSON shape of a volume (shared with `hlstore dev status`).
pub fn volume_json(v: &vpb::Volume) -> serde_json::Value {
    serde_json::json!({
        "name": v.name,
        "size": v.size,
        "nbd_uri": if v.nbd_uri.is_empty() { serde_json::Value::Null } else { v.nbd_uri.clone().into() },
        "attached_node": if v.attached_node.is_empty() { serde_json::Value::Null } else { v.attached_node.clone().into() },
        "epoch": v.epoch,
        "write_quorum": v.write_quorum,
        "replica_set": v.replica_set,
        "replicas": v.replicas.iter().map(|r| serde_json::json!({
            "node": r.node, "state": r.state, "last_seq": r.last_seq, "durable_seq": r.durable_seq,
            "allocated_bytes": r.allocated_bytes, "resync_chunks": r.resync_chunks,
            "resync_resumed_from": r.resync_resumed_from,
        })).collect::<Vec<_>>(),
        "labels": v.labels.iter().collect::<std::collections::BTreeMap<_, _>>(),
    })
}

fn print_json(v: &serde_json::Value) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

fn print_table(vols: &[vpb::Volume]) {
    println!("{:<24} {:>10} {:<10} {:<40} REPLICAS", "NAME", "SIZE", "ATTACHED", "NBD URI");
    for v in vols {
        let reps: Vec<String> = v.replicas.iter().map(|r| format!("{}:{}", r.node, r.state)).collect();
        println!(
            "{:<24} {:>10} {:<10} {:<40} {}",
            v.name,
            format_size(v.size),
            if v.attached_node.is_empty() { "-" } else { &v.attached_node },
            if v.nbd_uri.is_empty() { "-" } else { &v.nbd_uri },
            reps.join(" ")
        );
    }
}

pub async fn run(endpoint: &str, cmd: VolumeCommand) -> anyhow::Result<()> {
    let mut c = connect(endpoint).await?;
    match cmd {
        VolumeCommand::Create { name, size, replicas, nodes, write_quorum, json } => {
            let req = vpb::CreateVolumeRequest {
                name: name.clone(),
                size,
                replicas,
                nodes,
                write_quorum: write_quorum.unwrap_or(0),
                labels: Default::default(),
            };
            let v = c.create_volume(req).await.map_err(status_err)?.into_inner();
            if json {
                print_json(&volume_json(&v))?;
            } else {
                println!("volume {name} ({}) on {}", format_size(v.size), v.replica_set.join(", "));
            }
        }
        VolumeCommand::List { json } => {
            let vols = c.list_volumes(vpb::ListVolumesRequest {}).await.map_err(status_err)?.into_inner().volumes;
            if json {
                println!("{}", serde_json::to_string_pretty(&vols.iter().map(volume_json).collect::<Vec<_>>())?);
            } else {
                print_table(&vols);
            }
        }
        VolumeCommand::Nodes { json } => {
            let nodes = c.list_nodes(vpb::ListNodesRequest {}).await.map_err(status_err)?.into_inner().nodes;
            let room = |n: &vpb::Node| {
                (n.reachable && n.capacity_bytes > 0).then(|| n.available_bytes.saturating_sub(n.promised_bytes))
            };
            if json {
                let list: Vec<_> = nodes
                    .iter()
                    .map(|n| {
                        serde_json::json!({
                            "id": n.id, "endpoint": n.endpoint, "reachable": n.reachable, "replicas": n.replicas,
                            "capacity_bytes": n.capacity_bytes, "available_bytes": n.available_bytes,
                            "promised_bytes": n.promised_bytes, "room_bytes": room(n),
                        })
                    })
                    .collect();
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                let gib = |b: u64| format!("{:.1} GiB", b as f64 / (1u64 << 30) as f64);
                println!(
                    "{:<12} {:<10} {:>8} {:>12} {:>12} {:>12}",
                    "NODE", "STATE", "REPLICAS", "AVAILABLE", "PROMISED", "ROOM"
                );
                for n in &nodes {
                    let state = if n.reachable { "up" } else { "unreachable" };
                    let (avail, promised, r) = match room(n) {
                        Some(r) => (gib(n.available_bytes), gib(n.promised_bytes), gib(r)),
                        None => ("-".into(), "-".into(), "-".into()),
                    };
                    println!("{:<12} {:<10} {:>8} {:>12} {:>12} {:>12}", n.id, state, n.replicas, avail, promised, r);
                }
            }
        }
        VolumeCommand::Show { name, json } => {
            let v = c.get_volume(vpb::GetVolumeRequest { name }).await.map_err(status_err)?.into_inner();
            if json {
                println!("{}", serde_json::to_string_pretty(&volume_json(&v))?);
            } else {
                println!("name:      {}", v.name);
                println!("size:      {}", format_size(v.size));
                println!("epoch:     {}", v.epoch);
                println!("attached:  {}", if v.attached_node.is_empty() { "-" } else { &v.attached_node });
                println!("nbd uri:   {}", if v.nbd_uri.is_empty() { "-" } else { &v.nbd_uri });
                println!("replicas:");
                for r in &v.replicas {
                    println!(
                        "  {:<12} {:<10} seq {:>8}  allocated {}",
                        r.node,
                        r.state,
                        r.last_seq,
                        format_size(r.allocated_bytes)
                    );
                }
            }
        }
        VolumeCommand::Attach { name, node, nbd_listen, force, json } => {
            let req = vpb::AttachVolumeRequest { name, node, nbd_listen: nbd_listen.unwrap_or_default(), force };
            let v = c.attach_volume(req).await.map_err(status_err)?.into_inner();
            if json {
                print_json(&volume_json(&v))?;
            } else {
                println!("{}", v.nbd_uri);
            }
        }
        VolumeCommand::Detach { name, json } => {
            c.detach_volume(vpb::DetachVolumeRequest { name: name.clone() }).await.map_err(status_err)?;
            if json {
                print_json(&serde_json::json!({ "volume": name, "detached": true }))?;
            } else {
                println!("volume {name} detached");
            }
        }
        VolumeCommand::ReplaceReplica { name, from, to, json } => {
            let req = vpb::ReplaceReplicaRequest { name: name.clone(), from_node: from.clone(), to_node: to.clone() };
            let v = c.replace_replica(req).await.map_err(status_err)?.into_inner();
            if json {
                print_json(&volume_json(&v))?;
            } else {
                println!("volume {name}: replica moved from {from} to {to}; replicas now {}", v.replica_set.join(", "));
            }
        }
        VolumeCommand::Clone { source, name, snapshot, replicas, size, json } => {
            let req = vpb::CloneVolumeRequest {
                source: source.clone(),
                name: name.clone(),
                snapshot: snapshot.unwrap_or_default(),
                replicas,
                nodes: Vec::new(),
                labels: Default::default(),
                size: size.unwrap_or(0),
            };
            let v = c.clone_volume(req).await.map_err(status_err)?.into_inner();
            if json {
                print_json(&volume_json(&v))?;
            } else {
                println!(
                    "volume {name} ({}) cloned from {source} on {}",
                    format_size(v.size),
                    v.replica_set.join(", ")
                );
            }
        }
        VolumeCommand::Expand { name, size, json } => {
            let req = vpb::ExpandVolumeRequest { name: name.clone(), size };
            let v = c.expand_volume(req).await.map_err(status_err)?.into_inner();
            if json {
                print_json(&volume_json(&v))?;
            } else {
                println!("volume {name} is now {}", format_size(v.size));
            }
        }
        VolumeCommand::Scrub { name, json } => {
            let r = c.scrub_volume(vpb::ScrubVolumeRequest { name }).await.map_err(status_err)?.into_inner();
            if json {
                let v = serde_json::json!({
                    "volume": r.name, "replicas": r.replicas, "blocks": r.blocks, "corrupt": r.corrupt,
                    "repaired": r.repaired, "divergent": r.divergent, "unrecoverable": r.unrecoverable,
                });
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!("volume {}: {} blocks compared across {} replicas", r.name, r.blocks, r.replicas);
                println!("  corrupt copies: {} ({} rewritten from a good copy)", r.corrupt, r.repaired);
                println!("  divergent:      {}", r.divergent);
                println!("  unrecoverable:  {}", r.unrecoverable);
            }
            if r.divergent > 0 || r.unrecoverable > 0 {
                anyhow::bail!("volume {}: the scrub found blocks it could not repair (see the node's log)", r.name);
            }
        }
        VolumeCommand::Delete { name, json } => {
            let r = c.delete_volume(vpb::DeleteVolumeRequest { name: name.clone() }).await.map_err(status_err)?;
            let existed = r.into_inner().existed;
            if json {
                print_json(&serde_json::json!({ "volume": name, "existed": existed }))?;
            } else if existed {
                println!("volume {name} deleted");
            } else {
                println!("volume {name} did not exist");
            }
        }
    }
    Ok(())
}

//! `hlstore replica ...`: low-level access to the replicas on one node agent.
//!
//! These commands talk to a single node's replica service, bypassing replication. They are
//! for inspection and for trying a node out; volumes are managed with `hlstore volume`.

use std::io::{Read, Write};
use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use hlstore_proto::replica as pb;
use hlstore_proto::replica::replica_client::ReplicaClient;
use tonic::transport::Channel;

use super::size::{format_size, parse_size};

/// Where the node agent is.
#[derive(Debug, Args)]
pub struct Endpoint {
    /// Node agent gRPC endpoint.
    #[arg(long, env = "HLSTORE_ENDPOINT", default_value = "127.0.0.1:7400", global = true)]
    pub endpoint: String,
}

/// `hlstore replica` subcommands.
#[derive(Debug, Subcommand)]
pub enum ReplicaCommand {
    /// List the replicas on the node.
    List {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Create a replica (thin provisioned: costs nothing until written).
    Create {
        name: String,
        /// Size, e.g. 10GiB (a multiple of 4 KiB).
        #[arg(long, value_parser = parse_size)]
        size: u64,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Delete a replica and free its space.
    Delete {
        name: String,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show a replica's state (epoch, sequence numbers, allocation).
    State {
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Write a file's bytes (padded with zeroes to 4 KiB) at OFFSET, then flush.
    Write {
        name: String,
        /// Byte offset, a multiple of 4 KiB.
        #[arg(long, value_parser = parse_size, default_value = "0")]
        offset: u64,
        /// File to write ('-' for stdin).
        #[arg(long)]
        input: PathBuf,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Read LENGTH bytes at OFFSET to a file ('-' for stdout).
    Read {
        name: String,
        #[arg(long, value_parser = parse_size, default_value = "0")]
        offset: u64,
        #[arg(long, value_parser = parse_size)]
        length: u64,
        #[arg(long, default_value = "-")]
        output: PathBuf,
        /// Read this snapshot of the replica instead of its live data.
        #[arg(long)]
        snapshot: Option<String>,
    },
}

/// Connects to a node agent, with an error that says what to check.
pub async fn connect(endpoint: &str) -> anyhow::Result<ReplicaClient<Channel>> {
    let ch = super::tls::channel(endpoint).await?;
    Ok(ReplicaClient::new(ch)
        .max_decoding_message_size(hlstore_node::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(hlstore_node::MAX_MESSAGE_BYTES))
}

fn status_err(s: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{}", super::tls::status_message(&s))
}

pub async fn run(ep: Endpoint, cmd: ReplicaCommand) -> anyhow::Result<()> {
    let mut c = connect(&ep.endpoint).await?;
    match cmd {
        ReplicaCommand::List { json } => {
            let list = c.list_replicas(pb::ListReplicasRequest {}).await.map_err(status_err)?.into_inner();
            if json {
                let items: Vec<serde_json::Value> = list
                    .replicas
                    .iter()
                    .map(|r| {
                        let rec = r.record.clone().unwrap_or_default();
                        serde_json::json!({
                            "volume_id": rec.volume_id, "size": rec.size, "epoch": rec.epoch,
                            "allocated_bytes": r.allocated_bytes, "last_seq": r.last_seq,
                            "durable_seq": r.durable_seq,
                        })
                    })
                    .collect();
                println!("{}", serde_json::to_string_pretty(&items)?);
            } else {
                println!("{:<32} {:>12} {:>12} {:>8} {:>10}", "VOLUME", "SIZE", "ALLOCATED", "EPOCH", "DURABLE");
                for r in &list.replicas {
                    let rec = r.record.clone().unwrap_or_default();
                    println!(
                        "{:<32} {:>12} {:>12} {:>8} {:>10}",
                        rec.volume_id,
                        format_size(rec.size),
                        format_size(r.allocated_bytes),
                        rec.epoch,
                        r.durable_seq
                    );
                }
            }
        }
        ReplicaCommand::Create { name, size, json } => {
            let record = pb::VolumeRecord { volume_id: name.clone(), size, block_size: 4096, ..Default::default() };
            let info = c.create_replica(pb::CreateReplicaRequest { record: Some(record) }).await.map_err(status_err)?;
            let info = info.into_inner();
            if json {
                let rec = info.record.unwrap_or_default();
                let v = serde_json::json!({ "replica": name, "size": rec.size, "epoch": rec.epoch,
                    "replica_set": rec.replica_set });
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!("created replica {name} ({})", format_size(size));
            }
        }
        ReplicaCommand::Delete { name, json } => {
            let r = c
                .delete_replica(pb::DeleteReplicaRequest { volume_id: name.clone(), epoch: 0 })
                .await
                .map_err(status_err)?
                .into_inner();
            if json {
                let v = serde_json::json!({ "replica": name, "existed": r.existed });
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!(
                    "{}",
                    if r.existed { format!("deleted replica {name}") } else { format!("no replica {name}") }
                );
            }
        }
        ReplicaCommand::State { name, json } => {
            let s = c.state(pb::StateRequest { volume_id: name }).await.map_err(status_err)?.into_inner();
            if json {
                println!(
                    "{}",
                    serde_json::json!({"volume_id": s.volume_id, "epoch": s.epoch, "last_seq": s.last_seq,
                        "durable_seq": s.durable_seq, "size": s.size, "allocated_bytes": s.allocated_bytes,
                        "resync_from": s.resync_from})
                );
            } else {
                println!(
                    "{}: epoch {} last_seq {} durable_seq {} size {} allocated {}",
                    s.volume_id,
                    s.epoch,
                    s.last_seq,
                    s.durable_seq,
                    format_size(s.size),
                    format_size(s.allocated_bytes)
                );
            }
        }
        ReplicaCommand::Write { name, offset, input, json } => {
            let mut data = Vec::new();
            if input.as_os_str() == "-" {
                std::io::stdin().read_to_end(&mut data)?;
            } else {
                data = std::fs::read(&input).with_context(|| format!("reading {}", input.display()))?;
            }
            if data.is_empty() {
                bail!("{} is empty: nothing to write", input.display());
            }
            let len = data.len();
            data.resize(len.div_ceil(4096) * 4096, 0);
            let st = c.state(pb::StateRequest { volume_id: name.clone() }).await.map_err(status_err)?.into_inner();
            let req = pb::WriteRequest {
                volume_id: name.clone(),
                epoch: st.epoch,
                seq: st.last_seq + 1,
                offset,
                data: data.into(),
                fua: true,
            };
            let mut acks = c.write(tokio_stream::iter([req])).await.map_err(status_err)?.into_inner();
            let ack = acks.message().await.map_err(status_err)?.context("the node closed the write stream")?;
            if json {
                let v = serde_json::json!({ "replica": name, "offset": offset, "bytes": len,
                    "seq": ack.seq, "durable_seq": ack.durable_seq });
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!(
                    "wrote {len} bytes to {name} at offset {offset} (seq {}, durable {})",
                    ack.seq, ack.durable_seq
                );
            }
        }
        ReplicaCommand::Read { name, offset, length, output, snapshot } => {
            let r = match snapshot {
                Some(snap) => {
                    let req = pb::ReadSnapshotRequest { volume_id: name, name: snap, offset, length };
                    c.read_snapshot(req).await.map_err(status_err)?.into_inner()
                }
                None => {
                    let st = c.state(pb::StateRequest { volume_id: name.clone() }).await.map_err(status_err)?;
                    let req = pb::ReadRequest { volume_id: name, epoch: st.into_inner().epoch, offset, length };
                    c.read(req).await.map_err(status_err)?.into_inner()
                }
            };
            if output.as_os_str() == "-" {
                std::io::stdout().write_all(&r.data)?;
            } else {
                std::fs::write(&output, &r.data).with_context(|| format!("writing {}", output.display()))?;
            }
        }
    }
    Ok(())
}

//! `hlstore dev ...`: a local cluster of node agents as separate OS processes on loopback.
//!
//! Layout under DIR: `cluster.json` (node ids and ports, fixed at the first `up`, written
//! atomically and durably), and per node `DIR/<id>/` with `data/`, `node.pid` and
//! `node.log`. `up` starts every node that is not running (keeping its data), `down` stops
//! them all. Mutual TLS by default: `up` makes a CA and certificates under `DIR/tls/`
//! (`ca.crt`, `ca.key`; a TLS directory per node, `admin/` for the CLI, `backup/` for
//! backups) and every agent serves and dials with its node's; `hlstore --insecure dev up`
//! makes a plaintext cluster instead (recorded in `cluster.json`). A `DIR/<id>/data` that already exists is used as it is (a test can mount a
//! file system there first). A damaged `cluster.json` (an older version's file after a
//! power cut) is rebuilt by `up` from the node directories, with new ports.

use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Subcommand;
use hlstore_proto::volume as vpb;
use serde::{Deserialize, Serialize};

use super::size::parse_size;
use super::volume::{status_err, volume_json};

/// `hlstore dev` subcommands.
#[derive(Debug, Subcommand)]
pub enum DevCommand {
    /// Start a local cluster (and optionally a volume), print the volume's NBD URI.
    ///
    /// Example: hlstore dev up --dir /tmp/hl --nodes 3 --volume demo --size 1GiB
    Up {
        /// Directory holding the cluster's state and every node's data.
        #[arg(long)]
        dir: PathBuf,
        /// Number of node agents (used when the cluster is first created).
        #[arg(long, default_value_t = 3)]
        nodes: usize,
        /// Create (if needed) and attach this volume on the first node.
        #[arg(long, requires = "size")]
        volume: Option<String>,
        /// Size of --volume, e.g. 1GiB.
        #[arg(long, value_parser = parse_size)]
        size: Option<u64>,
        /// Replicas of --volume (default: min(3, nodes)).
        #[arg(long)]
        replicas: Option<u32>,
        /// Print the cluster (nodes, endpoint, the volume and its NBD URI) as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show nodes and volumes.
    Status {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Stop every node agent of the cluster (data is kept).
    Down {
        #[arg(long)]
        dir: PathBuf,
        /// Print the stopped nodes as JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct DevNode {
    id: String,
    grpc: String,
    metrics: String,
    nbd: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct DevCluster {
    nodes: Vec<DevNode>,
    /// Plaintext gRPC (made with `--insecure`); TLS under `DIR/tls/` otherwise.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    insecure: bool,
}

fn tls_root(dir: &Path) -> PathBuf {
    dir.join("tls")
}

fn scheme(c: &DevCluster) -> &'static str {
    if c.insecure {
        "http"
    } else {
        "https"
    }
}

/// How `dev` itself reaches the cluster: with its admin certificate (whatever
/// HLSTORE_TLS_DIR says), or in plaintext for an insecure cluster.
fn dev_client(dir: &Path, c: &DevCluster) -> anyhow::Result<hlstore_tls::client::ClientTls> {
    if c.insecure {
        return Ok(hlstore_tls::client::ClientTls::Insecure);
    }
    Ok(hlstore_tls::client::ClientTls::Tls(hlstore_tls::TlsState::load(&tls_root(dir).join("admin"))?))
}

async fn dev_connect(
    tls: &hlstore_tls::client::ClientTls,
    grpc: &str,
) -> anyhow::Result<vpb::volumes_client::VolumesClient<tonic::transport::Channel>> {
    let ep = hlstore_tls::client::endpoint(grpc)?.connect_timeout(Duration::from_secs(5));
    let ch = hlstore_tls::client::connect(ep, tls, hlstore_tls::Expect::AnyNode).await.map_err(anyhow::Error::msg)?;
    Ok(vpb::volumes_client::VolumesClient::new(ch))
}

/// A free loopback port. The listener goes into `held` so that the next call cannot get
/// the same port back (the kernel reuses a just-closed port); drop `held` when done.
fn free_port(held: &mut Vec<TcpListener>) -> anyhow::Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    let port = l.local_addr()?.port();
    held.push(l);
    Ok(port)
}

fn cluster_path(dir: &Path) -> PathBuf {
    dir.join("cluster.json")
}

fn load(dir: &Path) -> anyhow::Result<Option<DevCluster>> {
    match std::fs::read(cluster_path(dir)) {
        Ok(b) => {
            Ok(Some(serde_json::from_slice(&b).with_context(|| format!("{} is damaged", cluster_path(dir).display()))?))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// `cluster.json` written atomically and durably.
fn save(dir: &Path, c: &DevCluster) -> anyhow::Result<()> {
    hlstore_core::durable_file::write_atomic(&cluster_path(dir), &serde_json::to_vec_pretty(c)?)?;
    Ok(())
}

/// Node ids with a data directory under `dir` (`n<number>/data`), in number order.
fn node_dirs(dir: &Path) -> Vec<String> {
    let mut ids: Vec<(u32, String)> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let n: u32 = name.strip_prefix('n')?.parse().ok()?;
            e.path().join("data").is_dir().then_some((n, name))
        })
        .collect();
    ids.sort();
    ids.into_iter().map(|(_, id)| id).collect()
}

/// `cluster.json` as `up` needs it. A damaged one (an older version's file after a power
/// cut: empty or cut short) is rebuilt from the node directories found under `dir`, with
/// new ports, once no node of the cluster runs (ports and peers change together, so the
/// nodes agree again; their data is kept).
fn load_for_up(dir: &Path, n: usize) -> anyhow::Result<DevCluster> {
    let damaged = match load(dir) {
        Ok(_) => return load_or_create(dir, n),
        Err(e) => e,
    };
    let ids = node_dirs(dir);
    if ids.is_empty() {
        return Err(damaged.context("and no node directory (DIR/n<N>/data) was found to rebuild it from"));
    }
    for id in &ids {
        let pid = std::fs::read_to_string(pid_path(dir, id)).ok().and_then(|s| s.trim().parse::<i32>().ok());
        let cmdline = pid.and_then(|p| std::fs::read(format!("/proc/{p}/cmdline")).ok()).unwrap_or_default();
        let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
        if args.windows(2).any(|w| w[0] == b"--id" && w[1] == id.as_bytes()) {
            bail!(
                "{damaged:#}; node {id} still runs (pid {}): stop it before `up` rebuilds the file",
                pid.unwrap_or(0)
            );
        }
    }
    eprintln!("{damaged:#}: rebuilding it for nodes {} with new ports", ids.join(", "));
    let c = new_cluster(&ids)?;
    save(dir, &c)?;
    Ok(c)
}

fn new_cluster(ids: &[String]) -> anyhow::Result<DevCluster> {
    let mut nodes = Vec::new();
    let mut held = Vec::new();
    for id in ids {
        nodes.push(DevNode {
            id: id.clone(),
            grpc: format!("127.0.0.1:{}", free_port(&mut held)?),
            metrics: format!("127.0.0.1:{}", free_port(&mut held)?),
            nbd: format!("127.0.0.1:{}", free_port(&mut held)?),
        });
    }
    Ok(DevCluster { nodes, insecure: super::tls::insecure() })
}

fn load_or_create(dir: &Path, n: usize) -> anyhow::Result<DevCluster> {
    if let Some(c) = load(dir)? {
        return Ok(c);
    }
    if !(1..=16).contains(&n) {
        bail!("--nodes must be between 1 and 16");
    }
    hlstore_core::durable_file::create_dir_all(dir)?;
    let ids: Vec<String> = (1..=n).map(|i| format!("n{i}")).collect();
    let c = new_cluster(&ids)?;
    save(dir, &c)?;
    Ok(c)
}

fn pid_path(dir: &Path, id: &str) -> PathBuf {
    dir.join(id).join("node.pid")
}

/// The pid of the node if it is running (checked against /proc, not just the pid file).
fn running_pid(dir: &Path, node: &DevNode) -> Option<i32> {
    let pid: i32 = std::fs::read_to_string(pid_path(dir, &node.id)).ok()?.trim().parse().ok()?;
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
    let is_ours =
        args.windows(2).any(|w| w[0] == b"--id" && w[1] == node.id.as_bytes()) && args.contains(&node.grpc.as_bytes());
    // A zombie (exited, not yet reaped) is not running.
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let zombie = stat.rsplit(')').next().is_some_and(|s| s.trim_start().starts_with('Z'));
    (is_ours && !zombie).then_some(pid)
}

fn start_node(dir: &Path, c: &DevCluster, node: &DevNode) -> anyhow::Result<i32> {
    let ndir = dir.join(&node.id);
    hlstore_core::durable_file::create_dir_all(&ndir)?;
    let log = std::fs::OpenOptions::new().create(true).append(true).open(ndir.join("node.log"))?;
    let peers: Vec<String> = c.nodes.iter().map(|n| format!("{}={}", n.id, n.grpc)).collect();
    let exe = std::env::current_exe().context("finding the hlstore executable")?;
    let mut cmd = Command::new(exe);
    if c.insecure {
        cmd.arg("--insecure");
    } else {
        cmd.arg("--tls-dir").arg(tls_root(dir).join(&node.id));
    }
    let child = cmd
        .args(["node", "--id", &node.id, "--listen", &node.grpc, "--metrics-listen", &node.metrics])
        .args(["--nbd-listen", &node.nbd, "--peers", &peers.join(",")])
        .arg("--data-dir")
        .arg(ndir.join("data"))
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .process_group(0)
        .spawn()
        .with_context(|| format!("starting node {}", node.id))?;
    let pid = child.id() as i32;
    std::fs::write(pid_path(dir, &node.id), pid.to_string())?;
    Ok(pid)
}

/// Whether the process in the node's pid file is alive (not exited, not a zombie). Unlike
/// [`running_pid`] it does not look at the command line: right after the spawn the child
/// still shows `dev up`'s until its exec completes.
fn still_starting(dir: &Path, node: &DevNode) -> bool {
    let Some(pid) = std::fs::read_to_string(pid_path(dir, &node.id)).ok().and_then(|p| p.trim().parse::<i32>().ok())
    else {
        return false;
    };
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|stat| !stat.rsplit(')').next().is_some_and(|s| s.trim_start().starts_with('Z')))
}

async fn wait_ready(node: &DevNode, dir: &Path, tls: &hlstore_tls::client::ClientTls) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(mut c) = dev_connect(tls, &node.grpc).await {
            if c.list_nodes(vpb::ListNodesRequest {}).await.is_ok() {
                return Ok(());
            }
        }
        if !still_starting(dir, node) {
            bail!("node {} exited during start; see {}", node.id, dir.join(&node.id).join("node.log").display());
        }
        if Instant::now() > deadline {
            bail!(
                "node {} did not become ready in 60s; see {}",
                node.id,
                dir.join(&node.id).join("node.log").display()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Whether a node's log says one of its listeners could not bind (the port was taken).
fn port_taken(dir: &Path, c: &DevCluster) -> bool {
    c.nodes.iter().any(|n| {
        std::fs::read_to_string(dir.join(&n.id).join("node.log"))
            .is_ok_and(|log| log.contains("Address already in use") || log.contains("os error 98"))
    })
}

/// Stops every running node of `c` (SIGKILL: a node of a cluster still starting holds
/// nothing worth a clean stop) and waits until they are gone.
async fn stop_all(dir: &Path, c: &DevCluster) {
    for n in &c.nodes {
        if let Some(pid) = running_pid(dir, n) {
            // SAFETY: kill(2) with a pid verified to be one of our node agents.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
    let deadline = Instant::now() + Duration::from_secs(15);
    while c.nodes.iter().any(|n| running_pid(dir, n).is_some()) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Where the dev cluster's certificates are (`null` for an insecure cluster).
fn tls_json(dir: &Path, c: &DevCluster) -> serde_json::Value {
    if c.insecure {
        return serde_json::Value::Null;
    }
    let root = tls_root(dir);
    serde_json::json!({
        "ca": root.join(hlstore_tls::CA_FILE),
        "admin": root.join("admin"),
        "backup": root.join("backup"),
        "nodes": c.nodes.iter().map(|n| (n.id.clone(), serde_json::json!(root.join(&n.id)))).collect::<serde_json::Map<_, _>>(),
    })
}

fn first_running(dir: &Path, c: &DevCluster) -> Option<DevNode> {
    c.nodes.iter().find(|n| running_pid(dir, n).is_some()).cloned()
}

pub async fn run(cmd: DevCommand) -> anyhow::Result<()> {
    match cmd {
        DevCommand::Up { dir, nodes, volume, size, replicas, json } => {
            let fresh = matches!(load(&dir), Ok(None));
            let mut c = load_for_up(&dir, nodes)?;
            if !c.insecure {
                let ids: Vec<String> = c.nodes.iter().map(|n| n.id.clone()).collect();
                super::tls::dev_certificates(&tls_root(&dir), &ids).context("making the dev cluster's certificates")?;
            }
            let tls = dev_client(&dir, &c)?;
            // The ports were free when picked; another program may bind one before the
            // node does. A new cluster then starts again on new ports (twice at most).
            for attempt in 0.. {
                for node in &c.nodes {
                    match running_pid(&dir, node) {
                        Some(pid) => eprintln!("node {} already running (pid {pid})", node.id),
                        None => {
                            let pid = start_node(&dir, &c, node)?;
                            eprintln!("node {} started (pid {pid}, gRPC {}, NBD {})", node.id, node.grpc, node.nbd);
                        }
                    }
                }
                let mut res = Ok(());
                for node in &c.nodes {
                    res = wait_ready(node, &dir, &tls).await;
                    if res.is_err() {
                        break;
                    }
                }
                match res {
                    Ok(()) => break,
                    Err(e) if fresh && attempt < 2 && port_taken(&dir, &c) => {
                        eprintln!("{e:#}: a port was taken meanwhile; starting the new cluster again on new ports");
                        stop_all(&dir, &c).await;
                        // The next attempt's logs start empty (so `port_taken` judges only
                        // it); this attempt's are kept beside them.
                        for n in &c.nodes {
                            let log = dir.join(&n.id).join("node.log");
                            let _ = std::fs::rename(&log, log.with_extension(format!("log.attempt-{attempt}")));
                        }
                        let ids: Vec<String> = c.nodes.iter().map(|n| n.id.clone()).collect();
                        c = new_cluster(&ids)?;
                        save(&dir, &c)?;
                    }
                    Err(e) => return Err(e),
                }
            }
            let mut attached = None;
            if let (Some(name), Some(size)) = (volume, size) {
                let first = &c.nodes[0];
                let mut client = dev_connect(&tls, &first.grpc).await?;
                let replicas = replicas.unwrap_or(c.nodes.len().min(3) as u32);
                let req = vpb::CreateVolumeRequest { name: name.clone(), size, replicas, ..Default::default() };
                client.create_volume(req).await.map_err(status_err)?;
                let req =
                    vpb::AttachVolumeRequest { name, node: first.id.clone(), nbd_listen: String::new(), force: false };
                let v = client.attach_volume(req).await.map_err(status_err)?.into_inner();
                if !json {
                    println!("{}", v.nbd_uri);
                }
                attached = Some(v);
            }
            if json {
                let nodes: Vec<serde_json::Value> = c
                    .nodes
                    .iter()
                    .map(|n| {
                        serde_json::json!({
                            "id": n.id, "pid": running_pid(&dir, n),
                            "endpoint": format!("{}://{}", scheme(&c), n.grpc), "metrics": format!("http://{}/metrics", n.metrics),
                            "nbd": n.nbd,
                            "tls_dir": (!c.insecure).then(|| tls_root(&dir).join(&n.id)),
                        })
                    })
                    .collect();
                let out = serde_json::json!({
                    "dir": dir,
                    "endpoint": format!("{}://{}", scheme(&c), c.nodes[0].grpc),
                    "tls": tls_json(&dir, &c),
                    "nodes": nodes,
                    "volume": attached.as_ref().map(volume_json),
                });
                println!("{}", serde_json::to_string_pretty(&out)?);
            }
            let tls_env = if c.insecure {
                "HLSTORE_INSECURE=1".to_string()
            } else {
                format!("HLSTORE_TLS_DIR={}", tls_root(&dir).join("admin").display())
            };
            eprintln!(
                "cluster of {} node(s) up; `hlstore dev status --dir {}`; for `hlstore volume ...`: export HLSTORE_ENDPOINT={} {tls_env}",
                c.nodes.len(),
                dir.display(),
                c.nodes[0].grpc
            );
        }
        DevCommand::Status { dir, json } => {
            let Some(c) = load(&dir)? else {
                bail!("no cluster in {}; start one with `hlstore dev up --dir {}`", dir.display(), dir.display())
            };
            let nodes: Vec<serde_json::Value> = c
                .nodes
                .iter()
                .map(|n| {
                    let pid = running_pid(&dir, n);
                    serde_json::json!({
                        "id": n.id, "pid": pid, "running": pid.is_some(),
                        "endpoint": format!("{}://{}", scheme(&c), n.grpc), "metrics": format!("http://{}/metrics", n.metrics),
                        "nbd": n.nbd,
                        "tls_dir": (!c.insecure).then(|| tls_root(&dir).join(&n.id)),
                    })
                })
                .collect();
            let mut volumes = Vec::new();
            if let (Some(n), Ok(tls)) = (first_running(&dir, &c), dev_client(&dir, &c)) {
                if let Ok(mut client) = dev_connect(&tls, &n.grpc).await {
                    if let Ok(r) = client.list_volumes(vpb::ListVolumesRequest {}).await {
                        volumes = r.into_inner().volumes;
                    }
                }
            }
            if json {
                let out = serde_json::json!({ "tls": tls_json(&dir, &c), "nodes": nodes, "volumes": volumes.iter().map(volume_json).collect::<Vec<_>>() });
                println!("{}", serde_json::to_string_pretty(&out)?);
            } else {
                for n in &nodes {
                    println!(
                        "node {:<6} {:<8} pid {:<8} {}",
                        n["id"].as_str().unwrap_or(""),
                        if n["running"].as_bool().unwrap_or(false) { "running" } else { "stopped" },
                        n["pid"],
                        n["endpoint"].as_str().unwrap_or("")
                    );
                }
                for v in &volumes {
                    let reps: Vec<String> = v.replicas.iter().map(|r| format!("{}:{}", r.node, r.state)).collect();
                    println!(
                        "volume {:<16} {} attached {} {}",
                        v.name,
                        if v.nbd_uri.is_empty() { "-" } else { &v.nbd_uri },
                        if v.attached_node.is_empty() { "-" } else { &v.attached_node },
                        reps.join(" ")
                    );
                }
            }
        }
        DevCommand::Down { dir, json } => {
            let Some(c) = load(&dir)? else { bail!("no cluster in {}", dir.display()) };
            let pids: Vec<(String, i32)> =
                c.nodes.iter().filter_map(|n| running_pid(&dir, n).map(|p| (n.id.clone(), p))).collect();
            for (_, pid) in &pids {
                // SAFETY: kill(2) with a pid verified to be one of our node agents.
                unsafe { libc::kill(*pid, libc::SIGTERM) };
            }
            let deadline = Instant::now() + Duration::from_secs(15);
            for (id, pid) in &pids {
                let node = c.nodes.iter().find(|n| &n.id == id).cloned();
                while node.as_ref().is_some_and(|n| running_pid(&dir, n).is_some()) && Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                if node.as_ref().is_some_and(|n| running_pid(&dir, n).is_some()) {
                    // SAFETY: as above.
                    unsafe { libc::kill(*pid, libc::SIGKILL) };
                }
                eprintln!("node {id} stopped");
            }
            if json {
                let stopped: Vec<&str> = pids.iter().map(|(id, _)| id.as_str()).collect();
                println!("{}", serde_json::to_string_pretty(&serde_json::json!({ "stopped": stopped }))?);
            }
        }
    }
    Ok(())
}

//! `VolumeManager`: the cluster-wide volume operations of a node agent, and the engines
//! (replicated volumes exported over NBD) that run on this node.
//!
//! Invariants:
//! - A volume is described only by its replicas (`VolumeRecord` on each); nothing else
//!   holds cluster state. Listing asks every node.
//! - One engine per volume per node. Attaching elsewhere first asks the current holder to
//!   detach (best effort); the epoch bump of the new engine fences the old one anyway.
//! - Attachments survive an agent restart (`attachments.json`): the agent retries them
//!   while its peers come up, but never takes back a volume that another node has attached
//!   meanwhile. The file is replaced atomically and durably (`durable_file`); one that is
//!   unreadable anyway (an older version's file after a power cut) is ignored with a
//!   warning: the node starts with no attachments and the volumes are attached again by
//!   hand (they lose nothing, their data is on the replicas).
//! - Attach and detach on one node are serialised (`attach_lock`): one engine per volume.

mod snapshots;
pub mod upkeep;

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::FileTypeExt;
use std::path::PathBuf;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;

use super::cluster::Cluster;
use crate::model::{NewVolume, NodeInfo, Volume, VolumeReplica};
use crate::placement::{self, NodeRoom};
use hlstore_core::error::{Error, Result};
use hlstore_nbd::{NbdServer, ShutdownHandle};
use hlstore_replication::rpc::ServiceStats;
use hlstore_replication::{
    AnyReplica, GrpcReplica, LocalReplica, MachineConfig, ReplicaSpec, ReplicatedVolume, VolumeConfig,
};
use hlstore_store::{DiskStore, ReplicaInfo, VolumeRecord};

/// How often a volume attached before a restart is retried while its peers come up.
const REATTACH_RETRY: std::time::Duration = std::time::Duration::from_secs(2);
/// How long after a restart such a volume is retried.
const REATTACH_FOR: std::time::Duration = std::time::Duration::from_secs(600);

/// Timeouts handed to every engine this node starts.
#[derive(Debug, Clone, Copy)]
pub struct EngineTimeouts {
    pub ack_ms: u64,
    pub failure_ms: u64,
    pub io_ms: u64,
    pub retry_ms: u64,
    /// Resync copy rate limit per replica, bytes per second (0: unlimited).
    pub resync_rate: u64,
    /// Read lease period (see `MachineConfig::lease_ms`).
    pub lease_ms: u64,
    /// Background scrub rate per attached volume, bytes per second (0: off).
    pub scrub_rate: u64,
    /// Blocks a resync copies between checkpoints (see
    /// `VolumeConfig::resync_checkpoint_blocks`).
    pub resync_checkpoint_blocks: u64,
}

impl Default for EngineTimeouts {
    fn default() -> Self {
        let d = MachineConfig::new(1);
        Self {
            ack_ms: d.ack_timeout_ms,
            failure_ms: d.failure_timeout_ms,
            io_ms: d.io_timeout_ms,
            retry_ms: d.retry_interval_ms,
            resync_rate: 0,
            lease_ms: d.lease_ms,
            scrub_rate: 0,
            resync_checkpoint_blocks: VolumeConfig::new("", 0, d).resync_checkpoint_blocks,
        }
    }
}

struct Attached {
    engine: Arc<ReplicatedVolume>,
    record: VolumeRecord,
    nbd_uri: String,
    nbd_listen: String,
    listener: Option<ShutdownHandle>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct SavedAttachment {
    name: String,
    nbd_listen: String,
}

pub struct VolumeManager {
    pub cluster: Arc<Cluster>,
    nbd: NbdServer<ReplicatedVolume>,
    /// URI prefix of the default NBD listener, e.g. `nbd://127.0.0.1:10809`.
    default_nbd: String,
    attached: Mutex<BTreeMap<String, Attached>>,
    /// Serialises attach and detach on this node, so two requests for one volume (e.g. the
    /// startup re-attach and a `volume attach`) never start two engines.
    attach_lock: Mutex<()>,
    /// Instance ids of the engines this agent process started (a holder of this node not
    /// among them belongs to a previous process, so it is dead).
    engine_ids: std::sync::Mutex<BTreeSet<u64>>,
    /// Recently found holders of snapshots being read (see `snapshots::read_snapshot`).
    snapshot_holders: snapshots::Holders,
    /// Volumes whose attach on this node is under way (reported as attached here).
    attaching: Arc<std::sync::Mutex<BTreeSet<String>>>,
    /// Clones whose copy runs in this agent (a second CloneVolume of one of them waits).
    cloning: Arc<std::sync::Mutex<BTreeSet<String>>>,
    state_path: PathBuf,
    timeouts: EngineTimeouts,
    /// Whether a dedicated NBD listener may bind a non-loopback address (only when the
    /// node's own NBD listener was configured on one).
    remote_nbd: bool,
    /// This node's store and replica counters: engines reach their replica on this node
    /// in process (`LocalReplica`) instead of over gRPC.
    local: Option<(Arc<DiskStore>, Arc<ServiceStats>)>,
    /// Readiness, automatic replacement and stale-replica state (see `upkeep`).
    pub upkeep: upkeep::Upkeep,
}

/// How an engine reaches one of its replicas.
type Transport = AnyReplica<LocalReplica<DiskStore>, GrpcReplica>;

/// Which previous holder of a volume a new engine may take over (its read lease is then
/// waited out before the new engine serves).
#[derive(Debug, Clone, Default)]
pub(crate) struct Takeover {
    /// Any holder (`--force`: its node is gone or partitioned away).
    pub any: bool,
    /// These engine instances (known to have stopped serving, or on this node).
    pub owners: Vec<u64>,
    /// Engines of this node's previous agent process: dead, so no lease to wait out.
    pub dead: Vec<u64>,
}

/// Marks a volume as being attached on this node while alive.
struct Attaching {
    set: Arc<std::sync::Mutex<BTreeSet<String>>>,
    name: String,
}

impl Attaching {
    fn enter(set: &Arc<std::sync::Mutex<BTreeSet<String>>>, name: &str) -> Self {
        set.lock().unwrap_or_else(|e| e.into_inner()).insert(name.to_string());
        Self { set: set.clone(), name: name.to_string() }
    }

    /// [`Self::enter`] unless `name` is in the set already (`None` then).
    fn try_enter(set: &Arc<std::sync::Mutex<BTreeSet<String>>>, name: &str) -> Option<Self> {
        set.lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name.to_string())
            .then(|| Self { set: set.clone(), name: name.to_string() })
    }
}

impl Drop for Attaching {
    fn drop(&mut self) {
        self.set.lock().unwrap_or_else(|e| e.into_inner()).remove(&self.name);
    }
}

/// A fresh engine instance id (never 0).
fn new_owner_id() -> u64 {
    let mut b = [0u8; 8];
    let random = std::fs::File::open("/dev/urandom").and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b));
    let mut id = u64::from_le_bytes(b);
    if random.is_err() || id == 0 {
        let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        id = (t.as_nanos() as u64) ^ (u64::from(std::process::id()) << 32) | 1;
    }
    id
}

/// What every node reported about one volume.
struct Gathered {
    record: VolumeRecord,
    /// node → replica info.
    replicas: BTreeMap<String, ReplicaInfo>,
}

/// How often a replace checks whether its new replica is in sync.
const REPLACE_POLL: std::time::Duration = std::time::Duration::from_secs(2);
/// How long a replace keeps waiting for that before leaving the old replica to the operator.
const REPLACE_FILL_WAIT: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

/// Deletes the replica of `name` on `from` once the attached engine reports the one on `to`
/// healthy (its full copy done and flushed). Gives up, keeping the old replica, if the
/// volume is gone, or after [`REPLACE_FILL_WAIT`].
async fn delete_replaced_when_filled(cluster: Arc<Cluster>, name: String, from: String, to: String, epoch: u64) {
    let deadline = tokio::time::Instant::now() + REPLACE_FILL_WAIT;
    let me = cluster.self_id.clone();
    loop {
        if tokio::time::Instant::now() >= deadline {
            tracing::warn!(volume.id = %name, node = %from, "the new replica never came in sync; the old one is kept (delete it by hand)");
            return;
        }
        tokio::time::sleep(REPLACE_POLL).await;
        match cluster.get_volume(&me, &name).await {
            Ok(v) => {
                if !v.replica_set.contains(&to) {
                    return; // replaced again meanwhile
                }
                let filled =
                    !v.attached_node.is_empty() && v.replicas.iter().any(|r| r.node == to && r.state == "healthy");
                if filled {
                    break;
                }
            }
            Err(e) if e.kind() == hlstore_core::ErrorKind::NotFound => return,
            Err(_) => {}
        }
    }
    if let Err(e) = cluster.endpoint(&from) {
        tracing::warn!(volume.id = %name, node = %from, error = %e, "old replica not deleted");
        return;
    }
    match cluster.delete_replica(&from, &name, epoch).await {
        Ok(_) => tracing::info!(volume.id = %name, node = %from, "replaced replica deleted"),
        Err(e) => {
            tracing::warn!(volume.id = %name, node = %from, error = %e, "old replica not deleted (node down?); delete it by hand when it is back")
        }
    }
}

/// A validated dedicated NBD listen address.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum NbdListen {
    Unix(PathBuf),
    Tcp(std::net::SocketAddr),
}

/// Validates an attach request's `nbd_listen`: a unix socket directly in `socket_dir`
/// (a plain file name, so the agent never creates or removes anything elsewhere), or
/// `IP:PORT` on loopback (any address only with `remote`).
pub(crate) fn check_nbd_listen(listen: &str, socket_dir: &std::path::Path, remote: bool) -> Result<NbdListen> {
    if let Some(path) = listen.strip_prefix("unix:") {
        let p = std::path::Path::new(path);
        let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
        let name_ok = !name.is_empty()
            && name.len() <= 100
            && !name.starts_with('.')
            && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
        let dir_ok = match p.parent() {
            Some(d) if d.as_os_str().is_empty() => true,
            Some(d) => d == socket_dir,
            None => false,
        };
        if !name_ok || !dir_ok {
            return Err(Error::InvalidArgument(format!(
                "nbd_listen {listen:?}: a unix socket must be a plain file name (1-100 characters of \
                 [A-Za-z0-9._-]) in the agent's socket directory {}, e.g. unix:{}/myvol.sock",
                socket_dir.display(),
                socket_dir.display()
            )));
        }
        return Ok(NbdListen::Unix(socket_dir.join(name)));
    }
    let addr: std::net::SocketAddr = listen.parse().map_err(|_| {
        Error::InvalidArgument(format!("nbd_listen {listen:?}: expected IP:PORT (e.g. 127.0.0.1:10900) or unix:PATH"))
    })?;
    if !addr.ip().is_loopback() && !remote {
        return Err(Error::InvalidArgument(format!(
            "nbd_listen {listen:?}: NBD exports listen on loopback or a unix socket only (this agent's own NBD \
             listener is on loopback)"
        )));
    }
    Ok(NbdListen::Tcp(addr))
}

fn nbd_uri_for(listen: &str, name: &str) -> String {
    match listen.strip_prefix("unix:") {
        Some(path) => format!("nbd+unix:///{name}?socket={path}"),
        None => format!("nbd://{listen}/{name}"),
    }
}

impl VolumeManager {
    pub fn new(
        cluster: Arc<Cluster>,
        nbd: NbdServer<ReplicatedVolume>,
        default_nbd_addr: String,
        state_path: PathBuf,
        timeouts: EngineTimeouts,
    ) -> Self {
        Self {
            cluster,
            nbd,
            default_nbd: default_nbd_addr,
            attached: Mutex::new(BTreeMap::new()),
            attach_lock: Mutex::new(()),
            attaching: Arc::new(std::sync::Mutex::new(BTreeSet::new())),
            cloning: Arc::new(std::sync::Mutex::new(BTreeSet::new())),
            engine_ids: std::sync::Mutex::new(BTreeSet::new()),
            snapshot_holders: snapshots::Holders::default(),
            state_path,
            timeouts,
            remote_nbd: false,
            local: None,
            upkeep: upkeep::Upkeep::new(None),
        }
    }

    /// Replace a replica whose node has not answered for `after` (`None`: never).
    pub fn replace_after(mut self, after: Option<std::time::Duration>) -> Self {
        self.upkeep = upkeep::Upkeep::new(after);
        self
    }

    /// Engines on this node reach the replica in `store` in process (counted in `stats`,
    /// the replica service's counters) instead of over gRPC.
    pub fn with_local_store(mut self, store: Arc<DiskStore>, stats: Arc<ServiceStats>) -> Self {
        self.local = Some((store, stats));
        self
    }

    /// Lets `attach` bind dedicated NBD listeners on non-loopback addresses (the node's own
    /// NBD listener is on one, so the operator chose to export over the network).
    pub fn allow_remote_nbd(mut self, allow: bool) -> Self {
        self.remote_nbd = allow;
        self
    }

    /// Where dedicated unix NBD sockets may live: `nbd/` in the agent's data directory.
    pub fn nbd_socket_dir(&self) -> PathBuf {
        self.state_path.parent().unwrap_or(std::path::Path::new(".")).join("nbd")
    }

    pub fn nbd_stats(&self) -> Arc<hlstore_nbd::NbdStats> {
        self.nbd.stats()
    }

    /// Read repair and scrub counters of the engines on this node.
    pub async fn heal_stats(&self) -> Vec<(String, Arc<hlstore_replication::HealStats>)> {
        let attached = self.attached.lock().await;
        attached.iter().map(|(name, a)| (name.clone(), a.engine.heal_stats())).collect()
    }

    /// I/O counters of every export on this node's NBD server, by export (volume) name.
    pub fn export_io(&self) -> Vec<(String, Arc<hlstore_nbd::ExportIo>)> {
        let reg = self.nbd.registry();
        reg.names().into_iter().filter_map(|n| reg.get(&n).map(|e| (n, e.io.clone()))).collect()
    }

    // ----- cluster-wide queries -----

    /// Every replica on every reachable node, grouped by volume.
    async fn gather(&self) -> BTreeMap<String, Gathered> {
        self.survey().await.0
    }

    /// [`Self::gather`], plus the room of every reachable node (for placement).
    async fn survey(&self) -> (BTreeMap<String, Gathered>, Vec<NodeRoom>) {
        let mut out: BTreeMap<String, Gathered> = BTreeMap::new();
        let mut rooms = Vec::new();
        let calls = self.cluster.nodes().into_iter().map(|n| async move {
            let res = self.cluster.list_replicas(&n).await;
            (n, res)
        });
        for (node, res) in futures::future::join_all(calls).await {
            let Ok((list, space)) = res else { continue };
            let promised = list.iter().map(|i| i.record.size.saturating_sub(i.state.allocated_bytes)).sum();
            rooms.push(NodeRoom { id: node.clone(), space, promised, replicas: list.len() });
            for info in list {
                let record = info.record.clone();
                let g = out
                    .entry(record.volume_id.clone())
                    .or_insert_with(|| Gathered { record: record.clone(), replicas: BTreeMap::new() });
                if record.epoch > g.record.epoch {
                    g.record = record;
                }
                g.replicas.insert(node.clone(), info);
            }
        }
        (out, rooms)
    }

    /// Attachments reported by every reachable node: volume → (node, volume view).
    async fn attachments(&self) -> BTreeMap<String, (String, Volume)> {
        let mut out = BTreeMap::new();
        let calls = self.cluster.nodes().into_iter().map(|n| async move {
            if n == self.cluster.self_id {
                return (n, Ok(self.local_attachments().await));
            }
            let res = self.cluster.list_attachments(&n).await;
            (n, res)
        });
        for (node, res) in futures::future::join_all(calls).await {
            for v in res.unwrap_or_default() {
                out.insert(v.name.clone(), (node.clone(), v));
            }
        }
        out
    }

    /// The engines on this node, and the volumes being attached here (with no NBD URI yet),
    /// so that no other node attaches them meanwhile.
    pub async fn local_attachments(&self) -> Vec<Volume> {
        let att = self.attached.lock().await;
        let mut out: Vec<Volume> = att.iter().map(|(name, a)| self.attached_view(name, a)).collect();
        let attaching = self.attaching.lock().unwrap_or_else(|e| e.into_inner()).clone();
        for name in attaching.into_iter().filter(|n| !att.contains_key(n)) {
            out.push(Volume { name, attached_node: self.cluster.self_id.clone(), ..Default::default() });
        }
        out
    }

    fn attached_view(&self, name: &str, a: &Attached) -> Volume {
        Volume {
            name: name.to_string(),
            size: a.record.size,
            replica_set: a.record.replica_set.clone(),
            write_quorum: a.record.write_quorum,
            epoch: a.engine.epoch(),
            attached_node: self.cluster.self_id.clone(),
            nbd_uri: a.nbd_uri.clone(),
            replicas: a
                .engine
                .replicas()
                .into_iter()
                .map(|h| VolumeReplica {
                    node: h.name,
                    state: h.status.as_cli_str().to_string(),
                    last_seq: h.acked_seq,
                    durable_seq: h.durable_seq,
                    allocated_bytes: 0,
                    resync_chunks: h.resync_chunks,
                    resync_resumed_from: h.resync_resumed_from,
                })
                .collect(),
            labels: a.record.labels.clone(),
        }
    }

    fn detached_view(g: &Gathered) -> Volume {
        let newest = g.replicas.values().map(|i| i.state.last_seq).max().unwrap_or(0);
        Volume {
            name: g.record.volume_id.clone(),
            size: g.record.size,
            replica_set: g.record.replica_set.clone(),
            write_quorum: g.record.write_quorum,
            epoch: g.record.epoch,
            attached_node: String::new(),
            nbd_uri: String::new(),
            replicas: g
                .record
                .replica_set
                .iter()
                .map(|node| match g.replicas.get(node) {
                    Some(i) => VolumeReplica {
                        node: node.clone(),
                        // A replica behind the newest, or marked incomplete by an
                        // unfinished resync (or a power cut), is not healthy.
                        state: if i.state.last_seq >= newest && i.state.resync_from.is_none() {
                            "healthy"
                        } else {
                            "resyncing"
                        }
                        .to_string(),
                        last_seq: i.state.last_seq,
                        durable_seq: i.state.durable_seq,
                        allocated_bytes: i.state.allocated_bytes,
                        resync_chunks: 0,
                        resync_resumed_from: 0,
                    },
                    None => VolumeReplica { node: node.clone(), state: "failed".into(), ..Default::default() },
                })
                .collect(),
            labels: g.record.labels.clone(),
        }
    }

    pub async fn list(&self) -> Vec<Volume> {
        let gathered = self.gather().await;
        let mut att = self.attachments().await;
        gathered
            .values()
            .map(|g| {
                let mut v = match att.remove(&g.record.volume_id) {
                    // Being attached: the replicas' view, with the node.
                    Some((node, v)) if v.nbd_uri.is_empty() => Volume { attached_node: node, ..Self::detached_view(g) },
                    Some((_, v)) => v,
                    None => Self::detached_view(g),
                };
                // Labels and allocation come from the replicas themselves (an engine's copy
                // of the record does not see labels set since it started).
                v.labels = g.record.labels.clone();
                for r in &mut v.replicas {
                    if let Some(i) = g.replicas.get(&r.node) {
                        r.allocated_bytes = i.state.allocated_bytes;
                    }
                }
                v
            })
            .collect()
    }

    pub async fn get(&self, name: &str) -> Result<Volume> {
        self.list().await.into_iter().find(|v| v.name == name).ok_or_else(|| not_found(name))
    }

    /// Every member, whether it answered, and its room for replicas.
    pub async fn nodes_view(&self) -> Vec<NodeInfo> {
        let (_, rooms) = self.survey().await;
        self.cluster
            .nodes()
            .into_iter()
            .map(|n| {
                let room = rooms.iter().find(|r| r.id == n);
                NodeInfo {
                    endpoint: self.cluster.endpoint(&n).unwrap_or_default().to_string(),
                    reachable: room.is_some(),
                    space: room.and_then(|r| r.space),
                    promised_bytes: room.map_or(0, |r| r.promised),
                    replicas: room.map_or(0, |r| r.replicas as u32),
                    id: n,
                }
            })
            .collect()
    }

    // ----- create / delete -----

    pub async fn create(&self, req: NewVolume) -> Result<Volume> {
        let (gathered, rooms) = self.survey().await;
        if let Some(g) = gathered.get(&req.name) {
            if g.record.size == req.size {
                return Ok(Self::detached_view(g));
            }
            return Err(Error::AlreadyExists(format!(
                "volume {} exists with size {} (asked for {}); pick another name or delete it first",
                req.name, g.record.size, req.size
            )));
        }
        let n = if req.replicas == 0 { 3.min(self.cluster.nodes().len()) } else { req.replicas as usize };
        let what = format!("volume {} ({} replicas of {})", req.name, n, placement::fmt_bytes(req.size));
        let nodes = if req.nodes.is_empty() {
            // The nodes with the most room (see `placement`).
            placement::pick(&rooms, req.size, n, &[], &what)?
        } else {
            placement::check_room(&rooms, req.size, &req.nodes, &what)?;
            req.nodes.clone()
        };
        if nodes.len() != n {
            return Err(Error::InvalidArgument(format!(
                "volume {} needs {n} replicas on distinct nodes but {} node(s) are available ({}); use --replicas {} or start more nodes",
                req.name,
                nodes.len(),
                nodes.join(", "),
                nodes.len()
            )));
        }
        let mut distinct = nodes.clone();
        distinct.sort();
        distinct.dedup();
        if distinct.len() != nodes.len() {
            return Err(Error::InvalidArgument(format!("--nodes {} names a node twice", nodes.join(","))));
        }
        for node in &nodes {
            self.cluster.endpoint(node)?;
        }
        let mut record = VolumeRecord::new(req.name.clone(), req.size);
        record.replica_set = nodes.clone();
        record.write_quorum = req.write_quorum;
        record.labels = req.labels.clone();
        MachineConfig {
            replicas: specs(&record.replica_set, ""),
            write_quorum: quorum(&record),
            ..MachineConfig::new(n)
        }
        .quorum()?;
        let mut created = Vec::new();
        for node in &nodes {
            self.cluster.endpoint(node)?;
            match self.cluster.create_replica(node, &record).await {
                Ok(_) => created.push(node.clone()),
                Err(e) => {
                    for done in &created {
                        let _ = self.cluster.delete_replica(done, &req.name, 0).await;
                    }
                    return Err(Error::Unavailable(format!(
                        "creating the replica of {} on node {node} failed ({e}); nothing was created",
                        req.name
                    )));
                }
            }
        }
        self.get(&req.name).await
    }

    pub async fn delete(&self, name: &str) -> Result<bool> {
        if let Some((node, _)) = self.attachments().await.remove(name) {
            return Err(Error::InvalidArgument(format!(
                "volume {name} is attached on node {node}; detach it first (hlstore volume detach {name})"
            )));
        }
        let gathered = self.gather().await;
        let Some(g) = gathered.get(name) else { return Ok(false) };
        let mut failed = Vec::new();
        for node in g.replicas.keys() {
            if let Err(e) = self.cluster.delete_replica(node, name, g.record.epoch).await {
                failed.push(format!("{node}: {e}"));
            }
        }
        if !failed.is_empty() {
            return Err(Error::Unavailable(format!(
                "volume {name}: some replicas could not be deleted ({}); run the delete again when those nodes are up",
                failed.join("; ")
            )));
        }
        Ok(true)
    }

    /// Sets labels of `name` (an empty value removes one; the others stay) on every replica
    /// of its set. **Invariant:** fails unless every one of them recorded the change: a
    /// volume's labels are read from whichever replica answers, and a label that says a
    /// volume is complete must not depend on which one that is. Labels fence nothing and
    /// need no engine, so this works on attached and detached volumes alike.
    pub async fn set_labels(&self, name: &str, labels: BTreeMap<String, String>) -> Result<Volume> {
        let gathered = self.gather().await;
        let g = gathered.get(name).ok_or_else(|| not_found(name))?;
        let calls = g.record.replica_set.iter().map(|node| {
            let labels = labels.clone();
            async move { (node.clone(), self.cluster.set_labels(node, name, labels).await) }
        });
        let failed: Vec<String> = futures::future::join_all(calls)
            .await
            .into_iter()
            .filter_map(|(node, r)| r.err().map(|e| format!("{node}: {e}")))
            .collect();
        if !failed.is_empty() {
            return Err(Error::Unavailable(format!(
                "volume {name}: labels not recorded on every replica ({}); set them again when those nodes are up",
                failed.join("; ")
            )));
        }
        self.get(name).await
    }

    // ----- attach / detach -----

    /// Attaches `name` on this node (see the module docs). The replicas record which engine
    /// holds the volume; another node's engine is taken over only when that node says it
    /// let go, or with `force` (its node is gone): an unreachable node is "unknown", never
    /// "not attached".
    pub async fn attach_local(&self, name: &str, nbd_listen: &str, force: bool) -> Result<Volume> {
        let _serial = self.attach_lock.lock().await;
        // The node's own default listener is not a dedicated one.
        let nbd_listen = if nbd_listen == self.default_nbd { "" } else { nbd_listen };
        // Validated before anything starts; stored in its canonical form.
        let canonical = match nbd_listen {
            "" => String::new(),
            l => match check_nbd_listen(l, &self.nbd_socket_dir(), self.remote_nbd)? {
                NbdListen::Unix(p) => format!("unix:{}", p.display()),
                NbdListen::Tcp(a) => a.to_string(),
            },
        };
        let nbd_listen = canonical.as_str();
        {
            let att = self.attached.lock().await;
            if let Some(a) = att.get(name) {
                return Ok(self.attached_view(name, a));
            }
        }
        let _attaching = Attaching::enter(&self.attaching, name);
        // Attached (or being attached) on another node that answers: that engine serves a
        // client; moving it is an explicit detach, never a side effect.
        let reports = self.attachment_reports().await;
        let elsewhere = reports
            .iter()
            .find(|(n, r)| **n != self.cluster.self_id && matches!(r, Ok(l) if l.iter().any(|v| v == name)));
        if let Some((node, _)) = elsewhere {
            return Err(Error::Conflict(format!(
                "volume {name} is attached on node {node}; detach it first (hlstore volume detach {name})"
            )));
        }
        let gathered = self.gather().await;
        let g = gathered.get(name).ok_or_else(|| not_found(name))?;
        let record = g.record.clone();
        let takeover = self.takeover_policy(name, g, force).await?;
        let engine = Arc::new(self.start_engine(&record, takeover).await?);
        let epoch = engine.epoch();
        let listen = if nbd_listen.is_empty() { self.default_nbd.clone() } else { nbd_listen.to_string() };
        let mut listener = None;
        let mut att = self.attached.lock().await;
        self.nbd.registry().insert(name, engine.clone());
        if !nbd_listen.is_empty() {
            match self.listen_dedicated(nbd_listen).await {
                Ok(h) => listener = Some(h),
                Err(e) => {
                    self.nbd.registry().remove(name);
                    drop(att);
                    if let Ok(engine) = Arc::try_unwrap(engine) {
                        engine.close().await;
                    }
                    return Err(e);
                }
            }
        }
        let nbd_uri = nbd_uri_for(&listen, name);
        let a = Attached { engine, record, nbd_uri, nbd_listen: nbd_listen.to_string(), listener };
        let view = self.attached_view(name, &a);
        att.insert(name.to_string(), a);
        self.save(&att)?;
        tracing::info!(volume.id = name, epoch, uri = %view.nbd_uri, "volume attached");
        Ok(view)
    }

    /// Which holders recorded on the replicas a new engine here may take over: engines of
    /// this node (a restarted agent, or an engine still draining NBD connections after a
    /// detach), engines of nodes that answer and run none for the volume, and with `force`
    /// any. Refuses when a holder's node cannot be asked (unknown is not "detached").
    async fn takeover_policy(&self, name: &str, g: &Gathered, force: bool) -> Result<Takeover> {
        let mut policy = Takeover { any: force, owners: Vec::new(), dead: Vec::new() };
        let holders: BTreeMap<u64, String> = g
            .replicas
            .values()
            .map(|i| &i.record)
            .filter(|r| r.owner != 0)
            .map(|r| (r.owner, r.owner_node.clone()))
            .collect();
        if holders.is_empty() {
            return Ok(policy);
        }
        let reports = self.attachment_reports().await;
        for (owner, node) in holders {
            let mine = node == self.cluster.self_id;
            let gone = mine || matches!(reports.get(&node), Some(Ok(list)) if !list.iter().any(|v| v == name));
            if mine && !self.engine_ids.lock().unwrap_or_else(|e| e.into_inner()).contains(&owner) {
                policy.dead.push(owner);
            } else if gone {
                policy.owners.push(owner);
            } else if let Some(Ok(_)) = reports.get(&node) {
                return Err(Error::Conflict(format!(
                    "volume {name} is attached on node {node}; detach it first (hlstore volume detach {name})"
                )));
            } else if !force {
                let why = match reports.get(&node) {
                    Some(Err(e)) => format!("node {node} cannot be reached ({e})"),
                    _ => format!("node {node} is not a member of this cluster"),
                };
                return Err(Error::Conflict(format!(
                    "volume {name} is held by the engine on node {node} and {why}; detach it there, or if that node is gone for good attach with --force (the old engine is fenced and its read lease waited out)"
                )));
            }
        }
        Ok(policy)
    }

    /// The volumes each node runs an engine for; an unreachable node reports its error.
    async fn attachment_reports(&self) -> BTreeMap<String, Result<Vec<String>>> {
        let calls = self.cluster.nodes().into_iter().map(|n| async move {
            if n == self.cluster.self_id {
                let names = self.attached.lock().await.keys().cloned().collect();
                return (n, Ok(names));
            }
            let res = self.cluster.list_attachments(&n).await.map(|l| l.into_iter().map(|v| v.name).collect());
            (n, res)
        });
        futures::future::join_all(calls).await.into_iter().collect()
    }

    async fn start_engine(&self, record: &VolumeRecord, takeover: Takeover) -> Result<ReplicatedVolume> {
        let n = record.replica_set.len();
        let owner = new_owner_id();
        self.engine_ids.lock().unwrap_or_else(|e| e.into_inner()).insert(owner);
        let t = self.timeouts;
        let machine = MachineConfig {
            replicas: specs(&record.replica_set, &self.cluster.self_id),
            write_quorum: quorum(record),
            ack_timeout_ms: t.ack_ms,
            failure_timeout_ms: t.failure_ms,
            io_timeout_ms: t.io_ms,
            retry_interval_ms: t.retry_ms,
            lease_ms: t.lease_ms,
            owner,
            takeover: takeover.any,
            takeover_owners: takeover.owners,
            dead_owners: takeover.dead,
            ..MachineConfig::new(n)
        };
        let transports =
            record
                .replica_set
                .iter()
                .map(|node| -> Result<Transport> {
                    match &self.local {
                        Some((store, stats)) if *node == self.cluster.self_id => Ok(AnyReplica::Local(
                            LocalReplica::new(node.clone(), record.volume_id.clone(), store.clone(), stats.clone()),
                        )),
                        _ => Ok(AnyReplica::Remote(GrpcReplica::with_channel(
                            node.clone(),
                            record.volume_id.clone(),
                            self.cluster.new_channel(node)?,
                        ))),
                    }
                })
                .collect::<Result<Vec<_>>>()?;
        let mut cfg = VolumeConfig::new(record.volume_id.clone(), record.size, machine);
        cfg.resync_rate = t.resync_rate;
        cfg.resync_checkpoint_blocks = t.resync_checkpoint_blocks;
        cfg.scrub_rate = t.scrub_rate;
        cfg.owner_node = self.cluster.self_id.clone();
        ReplicatedVolume::attach(cfg, transports).await
    }

    async fn listen_dedicated(&self, listen: &str) -> Result<ShutdownHandle> {
        let server = NbdServer::new(self.nbd.registry().clone());
        let handle = server.shutdown_handle();
        match check_nbd_listen(listen, &self.nbd_socket_dir(), self.remote_nbd)? {
            NbdListen::Unix(path) => {
                std::fs::create_dir_all(self.nbd_socket_dir())
                    .map_err(|e| Error::io(format!("creating {}", self.nbd_socket_dir().display()), e))?;
                // A stale socket of an earlier attach may be replaced; nothing else is removed.
                if std::fs::symlink_metadata(&path).is_ok_and(|m| m.file_type().is_socket()) {
                    let _ = std::fs::remove_file(&path);
                }
                let l = tokio::net::UnixListener::bind(&path)
                    .map_err(|e| Error::io(format!("binding NBD socket {}", path.display()), e))?;
                tokio::spawn(async move { server.serve_unix(l).await });
            }
            NbdListen::Tcp(addr) => {
                let l = tokio::net::TcpListener::bind(addr)
                    .await
                    .map_err(|e| Error::io(format!("binding NBD listener {listen}"), e))?;
                tokio::spawn(async move { server.serve_tcp(l).await });
            }
        }
        Ok(handle)
    }

    /// The engine of `name` if it is attached on this node.
    async fn local_engine(&self, name: &str) -> Result<Arc<ReplicatedVolume>> {
        if let Some(a) = self.attached.lock().await.get(name) {
            return Ok(a.engine.clone());
        }
        Err(Error::Conflict(format!(
            "volume {name:?} is not attached on node {}: attach it here first (writes go through the engine \
             of the node they are sent to)",
            self.cluster.self_id
        )))
    }

    /// Writes `data` at `offset` of `name`, attached on this node, through its engine and
    /// its NBD export's range locks (any offset and length: partial blocks are
    /// read-modify-written, serialised against NBD clients writing the same blocks).
    pub async fn write_local(&self, name: &str, offset: u64, data: Vec<u8>, fua: bool) -> Result<()> {
        use hlstore_core::BlockDevice;
        let engine = self.local_engine(name).await?;
        let length = data.len() as u64;
        if offset.checked_add(length).is_none_or(|end| end > engine.size()) {
            return Err(Error::OutOfRange { volume: name.to_string(), offset, length, size: engine.size() });
        }
        let export = self.nbd.registry().get(name).ok_or_else(|| {
            Error::Conflict(format!("volume {name:?} is being detached from node {}", self.cluster.self_id))
        })?;
        hlstore_nbd::block_io::write(&export, offset, data, fua).await.map(|_| ())
    }

    /// Flushes `name`, attached on this node.
    pub async fn flush_local(&self, name: &str) -> Result<()> {
        use hlstore_core::BlockDevice;
        self.local_engine(name).await?.flush().await
    }

    /// Detaches `name` from this node: stops exporting it, flushes and stops the engine.
    pub async fn detach_local(&self, name: &str) -> Result<Option<Volume>> {
        let _serial = self.attach_lock.lock().await;
        let mut att = self.attached.lock().await;
        let Some(a) = att.remove(name) else { return Ok(None) };
        let view = self.attached_view(name, &a);
        self.nbd.registry().remove(name);
        if let Some(h) = &a.listener {
            h.shutdown();
        }
        self.save(&att)?;
        drop(att);
        if let Err(e) = hlstore_core::device::BlockDevice::flush(&*a.engine).await {
            tracing::warn!(volume.id = name, error = %e, "flush at detach failed");
        }
        match Arc::try_unwrap(a.engine) {
            Ok(engine) => engine.close().await,
            Err(engine) => drop(engine), // open NBD connections hold it; it stops when they close
        }
        tracing::info!(volume.id = name, "volume detached");
        Ok(Some(view))
    }

    /// Attach on `node`, forwarding when it is another agent.
    pub async fn attach(&self, name: &str, node: &str, nbd_listen: &str, force: bool) -> Result<Volume> {
        let node = if node.is_empty() { self.cluster.self_id.as_str() } else { node };
        if node == self.cluster.self_id {
            return self.attach_local(name, nbd_listen, force).await;
        }
        self.cluster.attach_volume(node, name, nbd_listen, force).await
    }

    /// Detach wherever the volume is attached.
    pub async fn detach(&self, name: &str) -> Result<Volume> {
        if let Some(v) = self.detach_local(name).await? {
            return Ok(v);
        }
        match self.attachments().await.remove(name) {
            Some((node, _)) => self.cluster.detach_volume(&node, name).await,
            None => self.get(name).await,
        }
    }

    /// Moves the replica of `name` on `from` to `to` (see `ReplaceReplica` in
    /// proto/volume.proto). The volume is detached for the change and re-attached where it
    /// was; the new replica is then filled by the engine's resync from a healthy replica.
    pub async fn replace(&self, name: &str, from: &str, to: &str) -> Result<Volume> {
        self.cluster.endpoint(to)?;
        let (gathered, rooms) = self.survey().await;
        let g = gathered.get(name).ok_or_else(|| not_found(name))?;
        if !rooms.iter().any(|r| r.id == to) {
            return Err(Error::Unavailable(format!("node {to} does not answer; replace onto a node that is up")));
        }
        let what = format!("the new replica of {name} ({})", placement::fmt_bytes(g.record.size));
        placement::check_room(&rooms, g.record.size, &[to.to_string()], &what)?;
        let old_set = g.record.replica_set.clone();
        if !old_set.iter().any(|n| n == from) {
            return Err(Error::InvalidArgument(format!(
                "volume {name} has no replica on node {from} (replicas: {})",
                old_set.join(", ")
            )));
        }
        if old_set.iter().any(|n| n == to) {
            return Err(Error::InvalidArgument(format!("volume {name} already has a replica on node {to}")));
        }
        // Every other replica must hold the whole volume. The new set keeps them and adds an
        // empty replica that counts for nothing until its copy is done, so acknowledged
        // writes then live only on them: one that is behind (resyncing, failed) would leave
        // some acknowledged write on fewer replicas than an attach majority can find.
        let view = self.get(name).await?;
        let mut behind: Vec<String> = view
            .replicas
            .iter()
            .filter(|r| r.node != from && r.state != "healthy")
            .map(|r| format!("{} is {}", r.node, r.state))
            .collect();
        for node in old_set.iter().filter(|n| *n != from) {
            match self.cluster.replica_state(node, name).await {
                Ok(st) if st.resync_from.is_some() => behind.push(format!("{node} has an unfinished resync")),
                Ok(_) => {}
                Err(_) => behind.push(format!("{node} did not answer")),
            }
        }
        if !behind.is_empty() {
            behind.dedup();
            return Err(Error::Unavailable(format!(
                "volume {name}: cannot replace the replica on {from} while another replica is behind ({}); \
                 wait until `hlstore volume show {name}` reports them healthy",
                behind.join(", ")
            )));
        }
        let attached = self.attachments().await.remove(name).map(|(node, v)| (node, v.nbd_uri));
        if attached.is_some() {
            self.detach(name).await?;
        }
        let epoch = match self.swap_replica(name, &g.record, from, to).await {
            Ok(swapped) => swapped,
            Err(e) => {
                // The volume goes back where it was (with whichever set its replicas now
                // record: the error says whether to run the replace again).
                if let Some((node, uri)) = &attached {
                    let listen = self.dedicated_listen_of(uri);
                    if let Err(a) = self.attach(name, node, &listen, false).await {
                        return Err(Error::Unavailable(format!(
                            "{e}; and the volume, detached for the replace, could not be attached again on {node}: {a}"
                        )));
                    }
                }
                return Err(e);
            }
        };
        // The old replica (fenced by the new epoch, outside the new set) is deleted only once
        // the new one is in sync: until then it is the only other full copy.
        tokio::spawn(delete_replaced_when_filled(
            self.cluster.clone(),
            name.to_string(),
            from.to_string(),
            to.to_string(),
            epoch,
        ));
        tracing::info!(
            volume.id = name,
            from,
            to,
            epoch,
            "replica replaced; the old one is deleted once the new one is in sync"
        );
        match attached {
            Some((node, uri)) => {
                // Re-attach with the same NBD address when it had a dedicated one.
                let listen = self.dedicated_listen_of(&uri);
                self.attach(name, &node, &listen, false).await
            }
            None => self.get(name).await,
        }
    }

    /// The part of [`Self::replace`] done while the volume is detached: the new replica on
    /// `to` at a new epoch, then the new set recorded on the other members. A replica of
    /// `name` already on `to` is outside the set, so stale (one an earlier replace moved
    /// away and has not deleted yet, or a stray): it is deleted first, so the new replica
    /// starts empty and is filled by a full resync. Returns the new epoch.
    async fn swap_replica(&self, name: &str, record: &VolumeRecord, from: &str, to: &str) -> Result<u64> {
        let epoch = self.gather().await.get(name).map_or(record.epoch, |g| g.record.epoch) + 1;
        let old_set = &record.replica_set;
        let new_set: Vec<String> = old_set.iter().map(|n| if n == from { to.to_string() } else { n.clone() }).collect();
        if self.cluster.delete_replica(to, name, epoch).await? {
            tracing::info!(
                volume.id = name,
                node = to,
                "deleted a stale replica of the volume on the new replica's node"
            );
        }
        let mut record = record.clone();
        record.replica_set = new_set.clone();
        record.epoch = epoch;
        self.cluster.create_replica(to, &record).await?;
        for node in new_set.iter().filter(|n| *n != to) {
            self.cluster.endpoint(node)?;
            self.cluster.set_replica_set(node, name, epoch, new_set.clone()).await.map_err(|e| {
                Error::Unavailable(format!(
                    "volume {name}: could not record the new replica set on node {node} ({e}); run the replace again once it is up"
                ))
            })?;
        }
        Ok(epoch)
    }

    /// The listen address encoded in an NBD URI (the attaching node treats its own default
    /// address as "no dedicated listener").
    fn dedicated_listen_of(&self, uri: &str) -> String {
        if let Some(rest) = uri.strip_prefix("nbd+unix:///") {
            return rest.split_once("?socket=").map(|(_, p)| format!("unix:{p}")).unwrap_or_default();
        }
        uri.strip_prefix("nbd://").and_then(|r| r.split_once('/')).map(|(a, _)| a.to_string()).unwrap_or_default()
    }

    /// Re-attaches what this node had attached before a restart (see the module docs).
    /// Peers may start after this node, so each volume is retried (every
    /// [`REATTACH_RETRY`], for up to [`REATTACH_FOR`]) until it attaches or is found
    /// attached on another node.
    pub async fn restore_attachments(&self) {
        let saved: Vec<SavedAttachment> = match std::fs::read(&self.state_path) {
            Ok(b) => serde_json::from_slice(&b).unwrap_or_else(|e| {
                tracing::warn!(error = %e, "ignoring unreadable attachments.json");
                Vec::new()
            }),
            Err(_) => return,
        };
        let deadline = tokio::time::Instant::now() + REATTACH_FOR;
        let mut pending = saved;
        while !pending.is_empty() {
            let mut still = Vec::new();
            for s in pending {
                // Attached on another node meanwhile (by an operator or a failover): let it be.
                // (Our own failed attempts also bump the epoch, so the epoch alone can't tell.)
                let elsewhere = self.attachments().await.remove(&s.name).filter(|(n, _)| *n != self.cluster.self_id);
                if let Some((node, _)) = elsewhere {
                    tracing::info!(volume.id = %s.name, node = %node, "volume is attached elsewhere now; not re-attaching");
                    self.forget(&s.name).await;
                    continue;
                }
                let gathered = self.gather().await;
                let Some(g) = gathered.get(&s.name) else {
                    // Not found may mean the peers are not up yet: retry until the deadline.
                    still.push(s);
                    continue;
                };
                // The replicas name an engine on another node: it took the volume over.
                let holder = g
                    .replicas
                    .values()
                    .map(|i| &i.record)
                    .find(|r| r.owner != 0 && r.owner_node != self.cluster.self_id)
                    .map(|r| r.owner_node.clone());
                if let Some(node) = holder {
                    tracing::info!(volume.id = %s.name, node = %node, "volume is held by another node now; not re-attaching");
                    self.forget(&s.name).await;
                    continue;
                }
                if let Err(e) = self.attach_local(&s.name, &s.nbd_listen, false).await {
                    tracing::warn!(volume.id = %s.name, error = %e, "re-attach after restart failed; will retry");
                    still.push(s);
                }
            }
            pending = still;
            if pending.is_empty() || tokio::time::Instant::now() > deadline {
                break;
            }
            tokio::time::sleep(REATTACH_RETRY).await;
        }
        for s in pending {
            tracing::error!(volume.id = %s.name, "gave up re-attaching after restart; attach it again with `hlstore volume attach`");
        }
    }

    /// Drops a saved attachment that is not running.
    async fn forget(&self, name: &str) {
        let att = self.attached.lock().await;
        if let Ok(b) = std::fs::read(&self.state_path) {
            if let Ok(mut list) = serde_json::from_slice::<Vec<SavedAttachment>>(&b) {
                list.retain(|s| s.name != name || att.contains_key(name));
                if let Ok(body) = serde_json::to_vec_pretty(&list) {
                    if let Err(e) = hlstore_core::durable_file::write_atomic(&self.state_path, &body) {
                        tracing::warn!(error = %e, "could not update attachments.json");
                    }
                }
            }
        }
    }

    fn save(&self, att: &BTreeMap<String, Attached>) -> Result<()> {
        let list: Vec<SavedAttachment> = att
            .iter()
            .map(|(name, a)| SavedAttachment { name: name.clone(), nbd_listen: a.nbd_listen.clone() })
            .collect();
        let body = serde_json::to_vec_pretty(&list).map_err(|e| Error::Internal(e.to_string()))?;
        hlstore_core::durable_file::write_atomic(&self.state_path, &body)
    }
}

fn specs(nodes: &[String], local: &str) -> Vec<ReplicaSpec> {
    nodes.iter().map(|n| ReplicaSpec { name: n.clone(), local: n == local }).collect()
}

fn quorum(record: &VolumeRecord) -> Option<usize> {
    (record.write_quorum > 0).then_some(record.write_quorum as usize)
}

fn not_found(name: &str) -> Error {
    Error::NotFound(format!("volume {name} does not exist on any reachable node (see: hlstore volume list)"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use hlstore_store::ReplicaState;

    fn info(record: &VolumeRecord, last_seq: u64, resync_from: Option<u64>) -> ReplicaInfo {
        ReplicaInfo { record: record.clone(), state: ReplicaState { last_seq, resync_from, ..Default::default() } }
    }

    /// While detached, a replica whose resync was cut short holds the newest seq (new
    /// writes reached it during the resync) but not every block: it is not healthy.
    #[test]
    fn a_detached_replica_with_a_resync_mark_is_not_healthy() {
        let mut record = VolumeRecord::new("v", 1 << 20);
        record.replica_set = vec!["n1".into(), "n2".into(), "n3".into()];
        let g = Gathered {
            record: record.clone(),
            replicas: [
                ("n1".to_string(), info(&record, 9, None)),
                ("n2".to_string(), info(&record, 9, Some(4))),
                ("n3".to_string(), info(&record, 7, None)),
            ]
            .into_iter()
            .collect(),
        };
        let v = VolumeManager::detached_view(&g);
        let states: Vec<(&str, &str)> = v.replicas.iter().map(|r| (r.node.as_str(), r.state.as_str())).collect();
        assert_eq!(states, vec![("n1", "healthy"), ("n2", "resyncing"), ("n3", "resyncing")]);
    }
}

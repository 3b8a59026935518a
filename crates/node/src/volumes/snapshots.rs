//! Snapshot, revert, clone, expand and changed-block calls of [`VolumeManager`].
//!
//! Routing: an operation that needs the engine (create/delete a snapshot, revert, clone,
//! expand) runs on the engine of an attached volume — here, or forwarded to the node that
//! has it attached. A detached volume gets a short-lived engine on this node for the
//! call (under the attach lock, so no attach runs meanwhile), which bumps its epoch like
//! any attach. Reads (list, read, changed blocks) go to the replicas directly.
//!
//! Revert and clone copy data through an engine, so every replica gets it the normal way
//! (quorum writes, resync for the absent): revert writes back only the blocks changed
//! since the snapshot; a clone copies only the blocks the snapshot holds.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{not_found, Takeover, VolumeManager};
use crate::model::{ChangedBlocks, CloneSpec, Extent, NewVolume, Snapshot, Volume, VolumeScrub};
use hlstore_core::device::BlockDevice;
use hlstore_core::error::{Error, Result};
use hlstore_replication::{ReplicaStatus, ReplicatedVolume};
use hlstore_store::SnapshotInfo;

/// Largest piece copied in one read.
const COPY_PIECE: u64 = 1 << 20;
/// Label a clone carries: the volume it was cloned from.
pub const CLONE_OF: &str = "hlstore.io/clone-of";
/// Label a clone carries: [`CLONE_DONE`] once its copy is complete, `copying:<token>` until
/// then (set when the volume is created).
pub const CLONE_STATE: &str = "hlstore.io/clone-state";
/// [`CLONE_STATE`] of a complete clone.
pub const CLONE_DONE: &str = "done";
/// [`CLONE_STATE`] of a clone being copied (followed by `:<token>` of the attempt).
const CLONE_COPYING: &str = "copying";
/// Name prefix of the snapshot a clone of a volume's current content takes (then deletes).
pub const TEMP_CLONE_SNAPSHOT_PREFIX: &str = "clone-";
/// Label of snapshots the agent takes for its own use and deletes afterwards (value: what
/// for); CSI ListSnapshots leaves them out.
pub const TEMPORARY: &str = "hlstore.io/temporary";

/// How long a snapshot's holder is remembered for reads of it.
const HOLDER_TTL: Duration = Duration::from_secs(10);

/// (volume, snapshot) → a node that held it complete, and when that was found.
#[derive(Default)]
pub(crate) struct Holders(std::sync::Mutex<std::collections::HashMap<(String, String), (String, Instant)>>);

impl Holders {
    fn map(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<(String, String), (String, Instant)>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn get(&self, key: &(String, String)) -> Option<String> {
        self.map().get(key).filter(|(_, at)| at.elapsed() < HOLDER_TTL).map(|(n, _)| n.clone())
    }

    fn remember(&self, key: (String, String), node: String) {
        let mut m = self.map();
        m.retain(|_, (_, at)| at.elapsed() < HOLDER_TTL);
        m.insert(key, (node, Instant::now()));
    }

    fn forget(&self, key: &(String, String)) {
        self.map().remove(key);
    }
}

/// Where a volume's engine runs.
enum Route {
    Local(Arc<ReplicatedVolume>),
    Remote(String),
    Detached,
}

fn unix_now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64)
}

/// The volume API's view of a replica's snapshot.
fn snapshot_view(volume: &str, s: SnapshotInfo, ready: bool) -> Snapshot {
    Snapshot {
        volume: volume.to_string(),
        name: s.name,
        seq: s.seq,
        size: s.size,
        created: s.created,
        ready,
        labels: s.labels,
    }
}

impl VolumeManager {
    async fn route(&self, name: &str) -> Route {
        if let Some(a) = self.attached.lock().await.get(name) {
            return Route::Local(a.engine.clone());
        }
        match self.attachments().await.remove(name) {
            Some((node, _)) if node != self.cluster.self_id => Route::Remote(node),
            _ => Route::Detached,
        }
    }

    /// Runs `f` on a short-lived engine of the detached volume `name`.
    async fn with_temp_engine<T>(&self, name: &str, f: impl AsyncFnOnce(&ReplicatedVolume) -> Result<T>) -> Result<T> {
        let _serial = self.attach_lock.lock().await;
        if self.attached.lock().await.contains_key(name) {
            return Err(Error::Unavailable(format!("volume {name} was attached meanwhile; retry")));
        }
        let gathered = self.gather().await;
        let record = gathered.get(name).ok_or_else(|| not_found(name))?.record.clone();
        // Never a takeover: a volume held by an engine elsewhere (even one that cannot be
        // reached) is refused, not fenced.
        let engine = self.start_engine(&record, Takeover::default()).await?;
        self.settle(&engine).await;
        let res = f(&engine).await;
        engine.close().await;
        res
    }

    /// Waits until every replica of a just-attached short-lived engine has settled: in
    /// sync, or failed (unreachable). The engine serves once a majority answered, but what
    /// a short-lived engine does is meant for every replica: a snapshot taken before the
    /// last replica joined would never be on it (never ready), a snapshot deletion would
    /// leave it there (still listed), and an expansion needs every replica in sync.
    /// Bounded by the failure timeout; a replica still resyncing then is left to the next
    /// engine.
    async fn settle(&self, engine: &ReplicatedVolume) {
        let deadline = tokio::time::Instant::now() + Duration::from_millis(self.timeouts.failure_ms.max(100));
        loop {
            let pending: Vec<String> = engine
                .replicas()
                .into_iter()
                .filter(|r| matches!(r.status, ReplicaStatus::Unknown | ReplicaStatus::Resyncing))
                .map(|r| r.name)
                .collect();
            if pending.is_empty() {
                return;
            }
            if tokio::time::Instant::now() >= deadline {
                tracing::info!(volume.id = %engine.name(), replicas = ?pending, "short-lived engine goes on without replicas still joining");
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Replica-set nodes of `name`, with the snapshots each holds.
    async fn snapshots_by_node(&self, name: &str) -> Result<(Vec<String>, BTreeMap<String, Vec<SnapshotInfo>>)> {
        let gathered = self.gather().await;
        let set = gathered.get(name).ok_or_else(|| not_found(name))?.record.replica_set.clone();
        let calls =
            set.iter().map(|node| async move { (node.clone(), self.cluster.replica_snapshots(node, name).await) });
        let mut out = BTreeMap::new();
        for (node, res) in futures::future::join_all(calls).await {
            if let Ok(list) = res {
                out.insert(node, list);
            }
        }
        Ok((set, out))
    }

    /// A node holding snapshot `snap` of `name` (this node first), with the snapshot.
    pub(crate) async fn holder(&self, name: &str, snap: &str) -> Result<(String, SnapshotInfo)> {
        let (_, by_node) = self.snapshots_by_node(name).await?;
        let mut found: Vec<(String, SnapshotInfo)> = by_node
            .into_iter()
            .filter_map(|(node, list)| list.into_iter().find(|s| s.name == snap && !s.partial).map(|s| (node, s)))
            .collect();
        found.sort_by_key(|(node, _)| *node != self.cluster.self_id);
        found.into_iter().next().ok_or_else(|| {
            Error::NotFound(format!("volume {name} has no snapshot {snap:?} (see: hlstore snapshot list {name})"))
        })
    }

    /// Snapshot `snap` of `volume` (idempotent), taken by the engine serving the volume.
    pub async fn create_snapshot(
        &self,
        volume: &str,
        snap: &str,
        labels: BTreeMap<String, String>,
    ) -> Result<Snapshot> {
        let name = volume.to_string();
        let snap_info = SnapshotInfo {
            name: snap.to_string(),
            seq: 0,
            size: 0,
            created: unix_now(),
            labels: labels.clone(),
            partial: false,
        };
        let got = match self.route(&name).await {
            Route::Local(engine) => engine.snapshot(snap_info).await?,
            Route::Remote(node) => return self.cluster.create_snapshot(&node, volume, snap, labels).await,
            Route::Detached => self.with_temp_engine(&name, async |e| e.snapshot(snap_info).await).await?,
        };
        let (set, by_node) = self.snapshots_by_node(&name).await?;
        let held = by_node.values().filter(|l| l.iter().any(|s| s.name == got.name && !s.partial)).count();
        Ok(snapshot_view(&name, got, held == set.len()))
    }

    /// Deletes snapshot `snap` of `volume`; whether it existed.
    pub async fn delete_snapshot(&self, volume: &str, snap: &str) -> Result<bool> {
        match self.route(volume).await {
            Route::Local(engine) => engine.delete_snapshot(snap).await,
            Route::Remote(node) => self.cluster.delete_snapshot(&node, volume, snap).await,
            Route::Detached => self.with_temp_engine(volume, async |e| e.delete_snapshot(snap).await).await,
        }
    }

    /// Snapshots of `volume` (every volume when empty), oldest first; `ready` when every
    /// replica holds it.
    pub async fn list_snapshots(&self, volume: &str) -> Result<Vec<Snapshot>> {
        let names: Vec<String> =
            if volume.is_empty() { self.gather().await.into_keys().collect() } else { vec![volume.to_string()] };
        let mut out = Vec::new();
        for name in names {
            let (set, by_node) = self.snapshots_by_node(&name).await?;
            let mut seen: BTreeMap<(u64, String), (SnapshotInfo, usize)> = BTreeMap::new();
            for s in by_node.into_values().flatten() {
                let complete = usize::from(!s.partial);
                seen.entry((s.seq, s.name.clone())).or_insert((SnapshotInfo { partial: false, ..s }, 0)).1 += complete;
            }
            out.extend(seen.into_values().map(|(s, n)| snapshot_view(&name, s, n == set.len())));
        }
        Ok(out)
    }

    /// Runs of blocks that may differ between two snapshots (or a snapshot and the live
    /// volume), from a replica holding them (the engine's node first for the live view).
    pub async fn changed_blocks(&self, volume: &str, from: &str, to: &str) -> Result<ChangedBlocks> {
        let probe = if from.is_empty() { to } else { from };
        let node = if probe.is_empty() {
            return Err(Error::InvalidArgument("name a snapshot in `from` or `to`".into()));
        } else {
            self.holder(volume, probe).await?.0
        };
        let (runs, bs) = self.cluster.replica_changed_blocks(&node, volume, from, to).await?;
        Ok(ChangedBlocks {
            extents: runs.into_iter().map(|(start, count)| Extent { offset: start * bs, length: count * bs }).collect(),
            block_size: bs,
        })
    }

    /// Reads `len` bytes at `offset` of snapshot `snap` from a node holding it. A backup
    /// reads one snapshot in hundreds of requests and finding a holder asks every node
    /// (twice), so the holder is remembered for [`HOLDER_TTL`]. A remembered holder is only
    /// a hint: a replica refuses to read a snapshot it does not hold complete (deleted, or
    /// still being copied to it), and then the holder is forgotten and looked up again.
    pub(crate) async fn read_snapshot(&self, volume: &str, snap: &str, offset: u64, len: u64) -> Result<Vec<u8>> {
        let key = (volume.to_string(), snap.to_string());
        if let Some(node) = self.snapshot_holders.get(&key) {
            match self.read_snapshot_from(&node, volume, snap, offset, len).await {
                Ok(data) => return Ok(data),
                Err(e) => {
                    tracing::debug!(volume, snapshot = snap, node, error = %e, "remembered snapshot holder failed; looking again");
                    self.snapshot_holders.forget(&key);
                }
            }
        }
        let (node, _) = self.holder(volume, snap).await?;
        let data = self.read_snapshot_from(&node, volume, snap, offset, len).await?;
        self.snapshot_holders.remember(key, node);
        Ok(data)
    }

    pub(crate) async fn read_snapshot_from(
        &self,
        node: &str,
        volume: &str,
        snap: &str,
        offset: u64,
        len: u64,
    ) -> Result<Vec<u8>> {
        // This node's replica is read in process, like the engines reach it (same checks
        // and checksums as the replica service, without a TLS round trip to itself).
        if let Some((store, stats)) = self.local.as_ref().filter(|_| node == self.cluster.self_id) {
            let local = hlstore_replication::LocalReplica::new(node, volume, store.clone(), stats.clone());
            return hlstore_replication::ReplicaTransport::read_snapshot(
                &local,
                snap,
                hlstore_core::Offset(offset),
                len,
            )
            .await;
        }
        self.cluster.read_replica_snapshot(node, volume, snap, offset, len).await
    }

    /// Writes the runs of snapshot `snap` (held by `node`) into `engine`; blocks the
    /// snapshot does not hold (past its size) and all-zero pieces become trims.
    async fn copy_runs(
        &self,
        node: &str,
        volume: &str,
        snap: &SnapshotInfo,
        runs: Vec<Extent>,
        engine: &ReplicatedVolume,
    ) -> Result<u64> {
        let mut copied = 0;
        for run in runs {
            let mut at = run.offset;
            let end = run.offset + run.length;
            while at < end {
                let n = COPY_PIECE.min(end - at);
                let data = if at + n <= snap.size {
                    self.read_snapshot_from(node, volume, &snap.name, at, n).await?
                } else {
                    vec![0; n as usize]
                };
                if data.iter().all(|&b| b == 0) {
                    engine.trim(at, n).await?;
                } else {
                    engine.write(at, data, false).await?;
                    copied += n;
                }
                at += n;
            }
        }
        engine.flush().await?;
        Ok(copied)
    }

    /// Rolls `volume` back to `snap`. The volume must be detached.
    pub async fn revert_snapshot(&self, volume: &str, snap: &str) -> Result<Volume> {
        let attached_on = match self.route(volume).await {
            Route::Detached => None,
            Route::Local(_) => Some(self.cluster.self_id.clone()),
            Route::Remote(node) => Some(node),
        };
        if let Some(node) = attached_on {
            return Err(Error::InvalidArgument(format!(
                "volume {volume} is attached on node {node}; detach it first (hlstore volume detach {volume})"
            )));
        }
        let (node, info) = self.holder(volume, snap).await?;
        let runs = self.changed_blocks(volume, snap, "").await?.extents;
        let copied =
            self.with_temp_engine(volume, async |e| self.copy_runs(&node, volume, &info, runs, e).await).await?;
        tracing::info!(volume.id = volume, snapshot = snap, bytes = copied, "volume reverted");
        self.get(volume).await
    }

    /// A new volume with the content of a snapshot of `source` (a fresh one when none is
    /// named, deleted afterwards).
    ///
    /// **Invariant:** a clone is returned only once its copy is complete. The volume is
    /// created labelled [`CLONE_STATE`]` = copying:<token>` (atomically with its creation)
    /// and relabelled `done` only after the copy was flushed on every replica, so a copy
    /// cut short (a killed client or agent) leaves a volume that says so: the next call for
    /// it deletes it and copies again, and a failed copy deletes its own volume (the token
    /// keeps it from deleting a later attempt's). Clones made before the label existed
    /// cannot tell; they are refused (`AlreadyExists`) rather than passed for complete.
    pub async fn clone_volume(&self, req: CloneSpec) -> Result<Volume> {
        let Some(_copying) = super::Attaching::try_enter(&self.cloning, &req.name) else {
            return Err(Error::Conflict(format!(
                "volume {} is being copied by this agent; retry when it is done",
                req.name
            )));
        };
        let gathered = self.gather().await;
        if let Some(g) = gathered.get(&req.name) {
            let labels = &g.record.labels;
            if labels.get(CLONE_OF) != Some(&req.source) {
                return Err(Error::AlreadyExists(format!(
                    "volume {} exists and is not a clone of {}",
                    req.name, req.source
                )));
            }
            match labels.get(CLONE_STATE).map(String::as_str) {
                Some(CLONE_DONE) => return self.get(&req.name).await,
                Some(state) => {
                    tracing::info!(volume.id = %req.name, source = %req.source, state, "deleting an unfinished clone to copy it again");
                    self.delete(&req.name).await?;
                }
                None => {
                    return Err(Error::AlreadyExists(format!(
                        "volume {} is a clone of {} made before clones recorded whether their copy completed, so it \
                         may be incomplete; check it, or delete it (hlstore volume delete {}) and clone again",
                        req.name, req.source, req.name
                    )))
                }
            }
        }
        if !gathered.contains_key(&req.source) {
            return Err(not_found(&req.source));
        }
        let temp = req.snapshot.is_empty();
        let snap = if temp { format!("{TEMP_CLONE_SNAPSHOT_PREFIX}{}", req.name) } else { req.snapshot.clone() };
        if temp {
            // One left by an interrupted clone holds older content: the clone gets today's.
            if self.list_snapshots(&req.source).await?.iter().any(|s| s.name == snap) {
                self.delete_snapshot(&req.source, &snap).await?;
            }
            let labels = BTreeMap::from([(TEMPORARY.to_string(), format!("clone {}", req.name))]);
            self.create_snapshot(&req.source, &snap, labels).await?;
        }
        let res = self.clone_from(&req, &snap).await;
        if temp {
            if let Err(e) = self.delete_snapshot(&req.source, &snap).await {
                tracing::warn!(volume.id = %req.source, error = %e, "could not delete the snapshot made for a clone");
            }
        }
        let copied = res?;
        tracing::info!(volume.id = %req.name, source = %req.source, snapshot = %snap, bytes = copied, "volume cloned");
        self.get(&req.name).await
    }

    /// Creates the clone `req.name` of `source`'s snapshot `snap`, copies, and labels it
    /// done; on failure deletes the clone it made. Returns the bytes copied.
    async fn clone_from(&self, req: &CloneSpec, snap: &str) -> Result<u64> {
        let (node, info) = self.holder(&req.source, snap).await?;
        let copying = format!("{CLONE_COPYING}:{:016x}", super::new_owner_id());
        let mut labels = req.labels.clone();
        labels.insert(CLONE_OF.into(), req.source.clone());
        labels.insert(CLONE_STATE.into(), copying.clone());
        let create = NewVolume {
            name: req.name.clone(),
            size: info.size.max(req.size),
            replicas: req.replicas,
            nodes: req.nodes.clone(),
            write_quorum: 0,
            labels,
        };
        self.create(create).await?;
        let copy = async {
            let runs = self.changed_blocks(&req.source, "", snap).await?.extents;
            let copied = self
                .with_temp_engine(&req.name, async |e| self.copy_runs(&node, &req.source, &info, runs, e).await)
                .await?;
            self.set_labels(&req.name, BTreeMap::from([(CLONE_STATE.to_string(), CLONE_DONE.to_string())])).await?;
            Ok(copied)
        };
        match copy.await {
            Ok(n) => Ok(n),
            Err(e) => {
                // Only this attempt's volume (a later call may have replaced it).
                let ours = self
                    .gather()
                    .await
                    .get(&req.name)
                    .is_some_and(|g| g.record.labels.get(CLONE_STATE) == Some(&copying));
                if ours {
                    if let Err(d) = self.delete(&req.name).await {
                        tracing::warn!(volume.id = %req.name, error = %d, "could not delete an unfinished clone");
                    }
                }
                Err(e)
            }
        }
    }

    /// One scrub pass now on the engine serving `volume` (see `replication/heal.rs`).
    pub async fn scrub(&self, volume: &str) -> Result<VolumeScrub> {
        let report = match self.route(volume).await {
            Route::Local(engine) => engine.scrub_now().await?,
            Route::Remote(node) => return self.cluster.scrub_volume(&node, volume).await,
            Route::Detached => self.with_temp_engine(volume, async |e| e.scrub_now().await).await?,
        };
        Ok(VolumeScrub { name: volume.into(), report })
    }

    /// Grows a volume, online when it is attached.
    pub async fn expand(&self, volume: &str, size: u64) -> Result<Volume> {
        match self.route(volume).await {
            Route::Local(engine) => engine.expand(size).await?,
            Route::Remote(node) => return self.cluster.expand_volume(&node, volume, size).await,
            Route::Detached => self.with_temp_engine(volume, async |e| e.expand(size).await).await?,
        }
        let mut att = self.attached.lock().await;
        if let Some(a) = att.get_mut(volume) {
            a.record.size = a.record.size.max(size);
        }
        drop(att);
        self.get(volume).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hlstore_store::BLOCK_SIZE;

    #[test]
    fn snapshot_view_carries_every_field() {
        let mut labels = BTreeMap::new();
        labels.insert("k".to_string(), "v".to_string());
        let s = SnapshotInfo { name: "s".into(), seq: 7, size: 8 * BLOCK_SIZE, created: 5, labels, partial: false };
        let v = snapshot_view("vol", s, true);
        assert_eq!(
            (v.volume.as_str(), v.name.as_str(), v.seq, v.size, v.created, v.ready),
            ("vol", "s", 7, 32768, 5, true)
        );
        assert_eq!(v.labels.get("k").map(String::as_str), Some("v"));
    }
}

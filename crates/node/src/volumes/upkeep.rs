//! Upkeep: what every node agent does on its own, every [`UPKEEP_INTERVAL`]:
//!
//! - **Readiness** (`GET /ready` on the metrics port): not ready while the volumes attached
//!   here before a restart are being re-attached, or while any volume with a replica on
//!   this node is degraded (a replica behind, resyncing or unreachable). With a
//!   PodDisruptionBudget of one unavailable agent, a drain (or a rolling upgrade) of a
//!   second node waits until the first node's replicas have caught up: no volume is taken
//!   below quorum by two planned disruptions.
//! - **Automatic replica replacement**: a replica whose node has not answered for longer
//!   than `--replica-replace-after` is replaced on the reachable node with the most room
//!   that holds no replica of the volume, through [`VolumeManager::replace`] (the new
//!   replica is filled by resync before the old one is dropped). One node decides per
//!   volume: the node whose engine runs it, or, detached, the first reachable member of its
//!   replica set (by id); a failed replacement is retried after [`RETRY_REPLACE`].
//! - **Stale replicas**: a replica on this node whose volume has a newer replica set
//!   without this node (it was replaced while this node was away) is deleted once that set
//!   is healthy: never resurrected, never the last other copy.
//!
//! Counted in `/metrics`: `hlstore_node_replica_replacements_total`,
//! `hlstore_node_replica_replacement_failures_total`, `hlstore_node_stale_replicas_deleted_total`,
//! `hlstore_node_ready`.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use super::{Gathered, VolumeManager};
use crate::placement;

/// How often upkeep runs.
pub const UPKEEP_INTERVAL: Duration = Duration::from_secs(3);
/// Pause before a failed automatic replacement of a volume is tried again.
const RETRY_REPLACE: Duration = Duration::from_secs(60);

/// Upkeep state and counters of one agent.
#[derive(Debug)]
pub struct Upkeep {
    replace_after: Option<Duration>,
    started: Instant,
    /// When each member last answered.
    last_seen: Mutex<BTreeMap<String, Instant>>,
    /// Volume → when its automatic replacement was last tried.
    last_try: Mutex<BTreeMap<String, Instant>>,
    restored: AtomicBool,
    /// `Ok` when ready, else why not.
    ready: Mutex<Result<(), String>>,
    pub replacements: AtomicU64,
    pub replacement_failures: AtomicU64,
    pub stale_deleted: AtomicU64,
}

impl Upkeep {
    pub fn new(replace_after: Option<Duration>) -> Self {
        Upkeep {
            replace_after,
            started: Instant::now(),
            last_seen: Mutex::new(BTreeMap::new()),
            last_try: Mutex::new(BTreeMap::new()),
            restored: AtomicBool::new(false),
            ready: Mutex::new(Err("starting: re-attaching the volumes attached here before the restart".into())),
            replacements: AtomicU64::new(0),
            replacement_failures: AtomicU64::new(0),
            stale_deleted: AtomicU64::new(0),
        }
    }

    /// The re-attach after a restart has finished (or given up).
    pub fn restored(&self) {
        self.restored.store(true, Ordering::Release);
    }

    /// `Ok` when this agent is ready, else why not (the `/ready` answer).
    pub fn ready(&self) -> Result<(), String> {
        self.ready.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn set_ready(&self, r: Result<(), String>) {
        let mut cur = self.ready.lock().unwrap_or_else(|e| e.into_inner());
        if *cur != r {
            match &r {
                Ok(()) => tracing::info!("node agent ready"),
                Err(why) => tracing::info!(reason = %why, "node agent not ready"),
            }
        }
        *cur = r;
    }

    /// How long `node` has not answered (zero if it answers).
    fn silent_for(&self, node: &str, now: Instant) -> Duration {
        let seen = self.last_seen.lock().unwrap_or_else(|e| e.into_inner());
        now.saturating_duration_since(*seen.get(node).unwrap_or(&self.started))
    }
}

impl VolumeManager {
    /// Runs upkeep forever (see the module docs).
    pub async fn run_upkeep(self: std::sync::Arc<Self>) {
        let mut tick = tokio::time::interval(UPKEEP_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            self.upkeep_once().await;
        }
    }

    /// One upkeep round.
    pub async fn upkeep_once(&self) {
        let me = self.cluster.self_id.clone();
        let (gathered, rooms) = self.survey().await;
        let now = Instant::now();
        {
            let mut seen = self.upkeep.last_seen.lock().unwrap_or_else(|e| e.into_inner());
            for r in &rooms {
                seen.insert(r.id.clone(), now);
            }
        }
        let views: BTreeMap<String, crate::model::Volume> =
            self.list().await.into_iter().map(|v| (v.name.clone(), v)).collect();

        // Readiness.
        let mut why = Vec::new();
        if !self.upkeep.restored.load(Ordering::Acquire) {
            why.push("re-attaching the volumes attached here before the restart".to_string());
        }
        for (name, g) in &gathered {
            if !g.record.replica_set.contains(&me) {
                continue;
            }
            if let Some(v) = views.get(name) {
                let behind: Vec<String> = v
                    .replicas
                    .iter()
                    .filter(|r| r.state != "healthy")
                    .map(|r| format!("{} {}", r.node, r.state))
                    .collect();
                if !behind.is_empty() {
                    why.push(format!("volume {name} is degraded ({})", behind.join(", ")));
                }
            }
        }
        self.upkeep.set_ready(if why.is_empty() { Ok(()) } else { Err(why.join("; ")) });

        // Stale replicas of this node.
        for (name, g) in &gathered {
            self.drop_if_stale(name, g, views.get(name)).await;
        }

        // Automatic replacement.
        let Some(after) = self.upkeep.replace_after else { return };
        let attached = self.attachments().await;
        for (name, g) in &gathered {
            let lost: Vec<&String> = g
                .record
                .replica_set
                .iter()
                .filter(|n| !rooms.iter().any(|r| &r.id == *n) && self.upkeep.silent_for(n, now) >= after)
                .collect();
            let Some(from) = lost.first() else { continue };
            // One decider per volume.
            let decider = match attached.get(name) {
                Some((node, _)) => node.clone(),
                None => match g.record.replica_set.iter().filter(|n| rooms.iter().any(|r| &r.id == *n)).min() {
                    Some(n) => n.clone(),
                    None => continue,
                },
            };
            if decider != me {
                continue;
            }
            {
                let mut tries = self.upkeep.last_try.lock().unwrap_or_else(|e| e.into_inner());
                if tries.get(name).is_some_and(|t| now.saturating_duration_since(*t) < RETRY_REPLACE) {
                    continue;
                }
                tries.insert(name.clone(), now);
            }
            let what = format!("the replacement of {name}'s replica on {from}");
            let to = match placement::pick(&rooms, g.record.size, 1, &g.record.replica_set, &what) {
                Ok(mut v) => v.remove(0),
                Err(e) => {
                    self.upkeep.replacement_failures.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(volume.id = %name, node = %from, error = %e, "replica lost, but no node can take its replacement");
                    continue;
                }
            };
            tracing::warn!(
                volume.id = %name, from = %from, to = %to, silent_secs = self.upkeep.silent_for(from, now).as_secs(),
                "node has not answered for longer than --replica-replace-after: replacing its replica"
            );
            match self.replace(name, from, &to).await {
                Ok(_) => {
                    self.upkeep.replacements.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(volume.id = %name, from = %from, to = %to, "replica replacement started");
                }
                Err(e) => {
                    self.upkeep.replacement_failures.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(volume.id = %name, from = %from, to = %to, error = %e, "automatic replica replacement failed; retrying later");
                }
            }
        }
    }

    /// Deletes this node's replica of `name` if a newer replica set leaves this node out and
    /// every member of that set is healthy.
    async fn drop_if_stale(&self, name: &str, g: &Gathered, view: Option<&crate::model::Volume>) {
        let me = &self.cluster.self_id;
        let Some(mine) = g.replicas.get(me) else { return };
        if g.record.replica_set.contains(me) || mine.record.epoch >= g.record.epoch {
            return;
        }
        let healthy = view
            .is_some_and(|v| v.replica_set == g.record.replica_set && v.replicas.iter().all(|r| r.state == "healthy"));
        if !healthy {
            return; // until the new set is whole, this copy may still be needed
        }
        match self.cluster.delete_replica(me, name, g.record.epoch).await {
            Ok(_) => {
                self.upkeep.stale_deleted.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    volume.id = name, epoch = mine.record.epoch, current_epoch = g.record.epoch,
                    replicas = %g.record.replica_set.join(","),
                    "deleted this node's stale replica: the volume was moved to other nodes while this one was away"
                );
            }
            Err(e) => tracing::warn!(volume.id = name, error = %e, "could not delete this node's stale replica"),
        }
    }
}

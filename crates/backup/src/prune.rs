//! Retention (`forget` by keep policy) and garbage collection without an exclusive lock.
//!
//! Two-phase deletion: a prune run first *condemns* packs no snapshot references by
//! writing a marker `trash/<id>` (time + pack ids). Backups that start later do not dedup
//! against condemned packs. A later phase deletes a marker's packs only when (a) the grace
//! period has passed since the marker was written, (b) no live writer lease started before
//! the marker (+ clock-skew margin) — such a writer may still reference them — and (c) the
//! pack is still unreferenced by every snapshot, re-read after checking leases (a writer
//! that finished saved its snapshot before dropping its lease). Packs that became referenced
//! again are rescued. Nothing here makes a concurrent backup fail.
//!
//! Limitation: only whole unreferenced packs are removed; packs that are partly referenced
//! are reported (`partial_reclaimable_bytes`) but not rewritten.

use std::collections::{HashMap, HashSet};

use serde::{Deserialize, Serialize};

use crate::backend::Backend;
use crate::chunk::ChunkId;
use crate::error::{Error, Result};
use crate::pack::pack_key;
use crate::repo::{Lease, Repository};
use crate::snapshot::{now_secs, SnapshotMeta};

/// Default time between condemning a pack and deleting it.
pub const DEFAULT_GRACE_SECS: u64 = 3600;
/// Allowed clock difference between machines writing leases and markers.
pub const CLOCK_SKEW_SECS: u64 = 300;

/// A condemnation marker.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Marker {
    pub created: u64,
    pub packs: Vec<String>,
}

/// Reads every marker (unreadable ones are skipped with a warning: they only delay GC).
pub fn read_markers(backend: &dyn Backend) -> Result<Vec<(String, Marker)>> {
    let mut out = Vec::new();
    for o in backend.list("trash/")? {
        let b = match backend.get(&o.key) {
            Ok(b) => b,
            Err(Error::NotFound(_)) => continue,
            Err(e) => return Err(e),
        };
        match serde_json::from_slice::<Marker>(&b) {
            Ok(m) => out.push((o.key, m)),
            Err(e) => tracing::warn!(marker = %o.key, error = %e, "unreadable prune marker"),
        }
    }
    Ok(out)
}

/// How many snapshots to keep per time bucket.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct KeepPolicy {
    pub last: u32,
    pub hourly: u32,
    pub daily: u32,
    pub weekly: u32,
    pub monthly: u32,
    pub yearly: u32,
}

impl KeepPolicy {
    /// True when no rule keeps anything.
    pub fn is_empty(&self) -> bool {
        *self == KeepPolicy::default()
    }
}

/// Civil (year, month, day) of a day number since the Unix epoch, UTC (H. Hinnant's
/// algorithm). Shared by the retention buckets and the CLI's timestamps.
pub fn civil_date(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

fn year_month(days: i64) -> (i64, u32) {
    let (y, m, _) = civil_date(days);
    (y, m)
}

/// Splits snapshots into (keep, forget) ids. Policies apply per source, newest first;
/// a rule keeps the newest snapshot of each of its last N distinct time buckets (UTC).
pub fn apply_policy(snaps: &[SnapshotMeta], p: &KeepPolicy) -> (Vec<String>, Vec<String>) {
    let mut groups: HashMap<&str, Vec<&SnapshotMeta>> = HashMap::new();
    for s in snaps {
        groups.entry(&s.source).or_default().push(s);
    }
    type Bucket = fn(u64) -> i64;
    let buckets: [(u32, Bucket); 6] = [
        (p.last, |_| 0), // replaced below: every snapshot is its own bucket
        (p.hourly, |t| (t / 3600) as i64),
        (p.daily, |t| (t / 86_400) as i64),
        (p.weekly, |t| ((t / 86_400) as i64 + 3).div_euclid(7)),
        (p.monthly, |t| {
            let (y, m) = year_month((t / 86_400) as i64);
            y * 12 + m as i64
        }),
        (p.yearly, |t| year_month((t / 86_400) as i64).0),
    ];
    let (mut keep, mut forget) = (Vec::new(), Vec::new());
    for (_, mut list) in groups {
        list.sort_by(|a, b| (b.time, b.nanos, &b.id).cmp(&(a.time, a.nanos, &a.id)));
        let mut kept = vec![false; list.len()];
        for (r, (n, f)) in buckets.iter().enumerate() {
            let mut last: Option<i64> = None;
            let mut count = 0;
            for (i, s) in list.iter().enumerate() {
                if count >= *n {
                    break;
                }
                let b = if r == 0 { i as i64 } else { f(s.time) };
                if last != Some(b) {
                    kept[i] = true;
                    last = Some(b);
                    count += 1;
                }
            }
        }
        for (i, s) in list.iter().enumerate() {
            if kept[i] { &mut keep } else { &mut forget }.push(s.id.clone());
        }
    }
    (keep, forget)
}

/// Options of a prune run.
#[derive(Debug, Clone, Copy)]
pub struct PruneOptions {
    pub policy: KeepPolicy,
    pub grace_secs: u64,
    pub dry_run: bool,
}

/// What prune did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PruneReport {
    pub kept: Vec<String>,
    pub forgotten: Vec<String>,
    /// Packs newly condemned by this run.
    pub condemned_packs: u64,
    pub deleted_packs: u64,
    pub deleted_bytes: u64,
    /// Condemned packs whose deletion waits for the grace period or a writer lease.
    pub postponed_packs: u64,
    /// Condemned packs referenced again, kept.
    pub rescued_packs: u64,
    /// Unreferenced bytes inside packs that are still partly used.
    pub partial_reclaimable_bytes: u64,
}

/// Applies the keep policy, then collects garbage.
pub fn prune(repo: &Repository, opts: PruneOptions) -> Result<PruneReport> {
    if opts.policy.is_empty() {
        return Err(Error::Invalid("no --keep-* rule given; refusing to forget every backup".into()));
    }
    let metas = repo.list_snapshots()?;
    let (kept, forgotten) = apply_policy(&metas, &opts.policy);
    let mut report = PruneReport { kept, forgotten, ..Default::default() };
    if opts.dry_run {
        return Ok(report);
    }
    for id in &report.forgotten {
        repo.forget(id)?;
    }
    gc(repo, opts.grace_secs, &mut report)?;
    Ok(report)
}

/// Garbage collection only (two phases, see the module header).
pub fn gc(repo: &Repository, grace_secs: u64, report: &mut PruneReport) -> Result<()> {
    let backend = repo.backend().as_ref();
    let load = repo.load_index()?;
    let index = &load.index;
    // Leases before snapshots: see the module header for why the order matters.
    let leases = Lease::live(backend)?;
    let mut referenced: HashSet<ChunkId> = HashSet::new();
    for id in repo.snapshot_ids()? {
        match repo.load_snapshot(&id) {
            Ok(s) => referenced.extend(s.chunks.iter().map(|c| c.id)),
            Err(Error::UnknownSnapshot(_)) => {}
            Err(e) => return Err(Error::Invalid(format!("cannot read backup {id} ({e}); not deleting anything"))),
        }
    }
    let mut used = vec![false; index.packs.len()];
    let mut unused_bytes = vec![0u64; index.packs.len()];
    for (cid, loc) in index.iter() {
        if referenced.contains(cid) {
            used[loc.pack as usize] = true;
        } else {
            unused_bytes[loc.pack as usize] += loc.length as u64;
        }
    }
    report.partial_reclaimable_bytes = (0..used.len()).filter(|&i| used[i]).map(|i| unused_bytes[i]).sum();
    let is_used: HashMap<&str, bool> =
        index.packs.iter().enumerate().map(|(i, (id, _))| (id.as_str(), used[i])).collect();

    // Phase 1: condemn.
    let markers = read_markers(backend)?;
    let already: HashSet<&String> = markers.iter().flat_map(|m| m.1.packs.iter()).collect();
    let fresh: Vec<String> = index
        .packs
        .iter()
        .enumerate()
        .filter(|(i, (id, _))| !used[*i] && !already.contains(id))
        .map(|(_, (id, _))| id.clone())
        .collect();
    let mut markers = markers;
    if !fresh.is_empty() {
        let m = Marker { created: now_secs(), packs: fresh };
        let key = format!("trash/{}", hex::encode(rand::random::<[u8; 8]>()));
        backend.put(&key, &serde_json::to_vec(&m).unwrap_or_default())?;
        report.condemned_packs += m.packs.len() as u64;
        markers.push((key, m));
    }

    // Phase 2: delete what is safe to delete.
    let now = now_secs();
    let mut deleted: HashSet<String> = HashSet::new();
    for (key, m) in &markers {
        let blocked = now < m.created + grace_secs
            || leases.iter().any(|l| l.purpose == "backup" && l.started < m.created + CLOCK_SKEW_SECS);
        if blocked {
            report.postponed_packs += m.packs.len() as u64;
            continue;
        }
        for p in &m.packs {
            if is_used.get(p.as_str()).copied().unwrap_or(false) {
                report.rescued_packs += 1;
                continue;
            }
            backend.delete(&pack_key(p))?;
            report.deleted_bytes += load.pack_sizes.get(p).copied().unwrap_or(0);
            report.deleted_packs += 1;
            deleted.insert(p.clone());
        }
        backend.delete(key)?;
    }

    // Rewrite the index without the deleted packs, then drop the files it replaces.
    if !deleted.is_empty() || !load.unindexed.is_empty() {
        let remaining = index.without_packs(&deleted);
        let packs = remaining.to_indexed_packs();
        if !packs.is_empty() {
            repo.write_index(&packs)?;
        }
        for f in &load.index_files {
            backend.delete(f)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chunk::ChunkerConfig;

    fn meta(id: &str, time: u64) -> SnapshotMeta {
        SnapshotMeta {
            id: id.into(),
            time,
            nanos: 0,
            source: "/dev/x".into(),
            size: 0,
            host: "h".into(),
            labels: Default::default(),
            parent: None,
            chunker: ChunkerConfig::default(),
            stats: Default::default(),
        }
    }

    #[test]
    fn civil_dates() {
        assert_eq!(year_month(0), (1970, 1));
        assert_eq!(year_month(19_782), (2024, 2)); // 2024-02-29
        assert_eq!(year_month(19_783), (2024, 3));
        assert_eq!(civil_date(19_782), (2024, 2, 29));
        assert_eq!(civil_date(-1), (1969, 12, 31));
    }

    #[test]
    fn keep_last_and_daily() {
        let day = 86_400;
        // Two snapshots per day for 5 days.
        let snaps: Vec<_> = (0..10)
            .map(|i| meta(&format!("s{i}"), 1_700_000_000 / day * day + (i / 2) * day + (i % 2) * 100))
            .collect();
        let p = KeepPolicy { last: 1, ..Default::default() };
        let (k, f) = apply_policy(&snaps, &p);
        assert_eq!(k, vec!["s9".to_string()]);
        assert_eq!(f.len(), 9);
        let p = KeepPolicy { daily: 3, ..Default::default() };
        let (mut k, _) = apply_policy(&snaps, &p);
        k.sort();
        assert_eq!(k, vec!["s5", "s7", "s9"]);
        let p = KeepPolicy { last: 2, daily: 2, ..Default::default() };
        let (mut k, _) = apply_policy(&snaps, &p);
        k.sort();
        assert_eq!(k, vec!["s7", "s8", "s9"]);
    }
}

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
//! Repack: packs whose unreferenced share reaches a threshold have their live chunks copied
//! into new packs (stored and indexed first), then are condemned like unreferenced packs.
//! A condemned pack is deleted only when every chunk any snapshot references in it has a
//! copy in a pack that is not condemned — so a backup that started before the repack and
//! deduplicated against a chunk the repack did not copy keeps the old pack alive (it is
//! "rescued") until a later prune copies that chunk too.
//!
//! Concurrency: prunes take a `prune` lease ([`prune_lease`]); a second prune backs off.

use std::collections::{HashMap, HashSet};

use serde::{Deserialize, Serialize};

use crate::backend::Backend;
use crate::chunk::ChunkId;
use crate::error::{Error, Result};
use crate::index::{IndexedPack, Location, MasterIndex};
use crate::pack::{decode_blob, pack_key, PackWriter};
use crate::progress::Progress;
use crate::repo::{Lease, LeaseInfo, Repository};
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
#[derive(Debug, Clone)]
pub struct PruneOptions {
    pub policy: KeepPolicy,
    pub grace_secs: u64,
    pub dry_run: bool,
    /// Repack packs whose unreferenced share is at least this percentage of their size
    /// (copy the live chunks into new packs, condemn the old ones); `None`: never repack.
    pub repack_unused_pct: Option<u8>,
    /// How long to wait for another prune to finish before failing with [`Error::Busy`]
    /// (zero: a few short retries only).
    pub wait: std::time::Duration,
    /// Advanced by the bytes of packs the repack reads.
    pub progress: Progress,
}

impl PruneOptions {
    /// A policy with the default grace period and repacking.
    pub fn new(policy: KeepPolicy) -> Self {
        PruneOptions {
            policy,
            grace_secs: DEFAULT_GRACE_SECS,
            dry_run: false,
            repack_unused_pct: Some(DEFAULT_REPACK_UNUSED_PCT),
            wait: std::time::Duration::ZERO,
            progress: Progress::hidden(),
        }
    }
}

/// Default repack threshold: packs at least this % unreferenced are rewritten.
pub const DEFAULT_REPACK_UNUSED_PCT: u8 = 10;
/// Attempts at taking the prune lease while another prune holds one.
pub const PRUNE_LEASE_ATTEMPTS: u32 = 5;

/// What prune did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PruneReport {
    pub kept: Vec<String>,
    pub forgotten: Vec<String>,
    /// Packs newly condemned by this run (unreferenced, or repacked).
    pub condemned_packs: u64,
    pub deleted_packs: u64,
    pub deleted_bytes: u64,
    /// Condemned packs whose deletion waits for the grace period or a writer lease.
    pub postponed_packs: u64,
    /// Condemned packs referenced again, kept.
    pub rescued_packs: u64,
    /// Partly used packs whose live chunks were copied into new packs.
    pub repacked_packs: u64,
    /// Live bytes copied by the repack.
    pub repacked_bytes: u64,
    /// New packs written by the repack.
    pub new_packs: u64,
    /// Unreferenced bytes left inside partly used packs (below the repack threshold).
    pub partial_reclaimable_bytes: u64,
}

/// Applies the keep policy, then collects garbage. Only one prune runs at a time per
/// repository: a prune that finds another's live lease retries for `opts.wait` (or
/// briefly), then fails with [`Error::Busy`] without changing anything.
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
    opts.progress.set_message("prune: waiting for another prune");
    let _lease = prune_lease_within(repo, opts.wait)?;
    // The policy again under the lease: a prune that ran while this one waited may have
    // forgotten some already (they are skipped), and backups made meanwhile count.
    let metas = repo.list_snapshots()?;
    let (kept, forgotten) = apply_policy(&metas, &opts.policy);
    report.kept = kept;
    report.forgotten = forgotten;
    for id in &report.forgotten {
        repo.forget(id)?;
    }
    opts.progress.set_message("prune: reading backups and indexes");
    let r = gc_with(repo, opts.grace_secs, opts.repack_unused_pct, &mut report, &opts.progress);
    opts.progress.set_message("prune");
    opts.progress.finish();
    r.map(|()| report)
}

/// Takes the repository's prune lease: write ours, then list; any other live prune lease
/// means another prune may be running, so ours is withdrawn. Because each prune lists only
/// after writing, two prunes can never both see themselves alone (at worst both withdraw
/// and retry after a random pause).
pub fn prune_lease(repo: &Repository) -> Result<Lease> {
    prune_lease_within(repo, std::time::Duration::ZERO)
}

/// [`prune_lease`], retrying for up to `wait` while another prune holds the lease (at
/// least [`PRUNE_LEASE_ATTEMPTS`] attempts).
pub fn prune_lease_within(repo: &Repository, wait: std::time::Duration) -> Result<Lease> {
    let backend = repo.backend();
    let deadline = std::time::Instant::now() + wait;
    let mut attempt = 0u32;
    loop {
        attempt += 1;
        let lease = Lease::acquire(backend.clone(), "prune")?;
        let others: Vec<LeaseInfo> = Lease::live_keyed(backend.as_ref())?
            .into_iter()
            .filter(|(k, l)| l.purpose == "prune" && k != lease.key())
            .map(|(_, l)| l)
            .collect();
        let Some(other) = others.first() else {
            return Ok(lease);
        };
        drop(lease);
        if attempt >= PRUNE_LEASE_ATTEMPTS && std::time::Instant::now() >= deadline {
            return Err(Error::Busy(format!(
                "another prune is running (host {}, pid {}, started {}); try again when it is done, or wait for it (--wait)",
                other.host, other.pid, other.started
            )));
        }
        if attempt == PRUNE_LEASE_ATTEMPTS {
            tracing::info!(host = %other.host, pid = other.pid, "another prune is running; waiting for it");
        }
        // Short random pauses first (two prunes that both stepped back retry apart), then
        // about once a second.
        let base = if attempt < PRUNE_LEASE_ATTEMPTS { 100 } else { 700 };
        let pause = base + rand::random::<u64>() % 400;
        std::thread::sleep(std::time::Duration::from_millis(pause));
    }
}

/// Chunks referenced by every snapshot in the repository now.
fn referenced_chunks(repo: &Repository) -> Result<HashSet<ChunkId>> {
    let mut referenced: HashSet<ChunkId> = HashSet::new();
    for id in repo.snapshot_ids()? {
        match repo.load_snapshot(&id) {
            Ok(s) => referenced.extend(s.chunks.iter().map(|c| c.id)),
            Err(Error::UnknownSnapshot(_)) => {}
            Err(e) => return Err(Error::Invalid(format!("cannot read backup {id} ({e}); not deleting anything"))),
        }
    }
    Ok(referenced)
}

/// Garbage collection only, without repacking (two phases, see the module header).
pub fn gc(repo: &Repository, grace_secs: u64, report: &mut PruneReport) -> Result<()> {
    gc_with(repo, grace_secs, None, report, &Progress::hidden())
}

/// Garbage collection: condemn unreferenced packs (and repack partly used ones when
/// `repack_unused_pct` is set), then delete what is safe to delete. `progress` counts the
/// bytes of packs the repack reads.
pub fn gc_with(
    repo: &Repository,
    grace_secs: u64,
    repack_unused_pct: Option<u8>,
    report: &mut PruneReport,
    progress: &Progress,
) -> Result<()> {
    let backend = repo.backend().as_ref();
    let load = repo.load_index()?;
    let mut index = load.index.clone();
    let referenced = referenced_chunks(repo)?;
    let markers = read_markers(backend)?;
    let already: HashSet<String> = markers.iter().flat_map(|m| m.1.packs.iter().cloned()).collect();

    // Live and dead bytes per pack (every copy of a chunk counts where it is).
    let n = index.packs.len();
    let mut live = vec![0u64; n];
    let mut dead = vec![0u64; n];
    for (cid, loc) in index.iter_all() {
        if referenced.contains(cid) {
            live[loc.pack as usize] += loc.length as u64;
        } else {
            dead[loc.pack as usize] += loc.length as u64;
        }
    }
    let mut fresh: Vec<String> = Vec::new();
    let mut to_repack: Vec<u32> = Vec::new();
    for (i, (id, len)) in index.packs.iter().enumerate() {
        if already.contains(id) {
            continue;
        }
        if live[i] == 0 {
            fresh.push(id.clone());
        } else if dead[i] > 0 {
            match repack_unused_pct {
                Some(pct) if dead[i] * 100 >= *len * pct as u64 => to_repack.push(i as u32),
                _ => report.partial_reclaimable_bytes += dead[i],
            }
        }
    }

    // Phase 1a: copy the live chunks of partly used packs into new packs (stored and
    // indexed before the old packs are condemned).
    if !to_repack.is_empty() {
        progress.set_message("prune: repacking");
        progress.inc_length(to_repack.iter().map(|&i| index.packs[i as usize].1).sum());
        let new = repack(repo, &index, &to_repack, &referenced, &already, report, progress)?;
        for p in &new {
            index.add_pack(p);
        }
        for &i in &to_repack {
            fresh.push(index.packs[i as usize].0.clone());
        }
    }

    // Phase 1b: condemn.
    let mut markers = markers;
    if !fresh.is_empty() {
        let m = Marker { created: now_secs(), packs: fresh };
        let key = format!("trash/{}", hex::encode(rand::random::<[u8; 8]>()));
        backend.put(&key, &serde_json::to_vec(&m).unwrap_or_default())?;
        report.condemned_packs += m.packs.len() as u64;
        markers.push((key, m));
    }

    progress.set_message("prune: deleting");
    // Phase 2: delete what is safe to delete. Leases first, then the snapshots again: a
    // backup that finished since the first read saved its snapshot before dropping its
    // lease, so whatever it references is seen here.
    let leases = Lease::live(backend)?;
    let referenced = referenced_chunks(repo)?;
    let condemned: HashSet<&str> = markers.iter().flat_map(|m| m.1.packs.iter().map(String::as_str)).collect();
    let mut chunks_of: HashMap<u32, Vec<ChunkId>> = HashMap::new();
    for (cid, loc) in index.iter_all() {
        if referenced.contains(cid) {
            chunks_of.entry(loc.pack).or_default().push(*cid);
        }
    }
    // A condemned pack may go when every referenced chunk in it has a copy in a pack
    // that is not condemned.
    let safe = |pack: &str| -> bool {
        let Some(pos) = index.pack_index(pack) else { return true };
        chunks_of
            .get(&pos)
            .is_none_or(|cs| cs.iter().all(|c| index.locations(c).any(|l| !condemned.contains(index.pack_id(l)))))
    };
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
            if !safe(p) {
                report.rescued_packs += 1;
                continue;
            }
            match backend.delete(&pack_key(p)) {
                Ok(()) | Err(Error::NotFound(_)) => {}
                Err(e) => return Err(e),
            }
            report.deleted_bytes += load.pack_sizes.get(p).copied().unwrap_or(0);
            report.deleted_packs += 1;
            deleted.insert(p.clone());
        }
        match backend.delete(key) {
            Ok(()) | Err(Error::NotFound(_)) => {}
            Err(e) => return Err(e),
        }
    }

    // Rewrite the index without the deleted packs, then drop the files it replaces.
    if !deleted.is_empty() || !load.unindexed.is_empty() {
        let remaining = index.without_packs(&deleted);
        let packs = remaining.to_indexed_packs();
        if !packs.is_empty() {
            repo.write_index(&packs)?;
        }
        for f in &load.index_files {
            match backend.delete(f) {
                Ok(()) | Err(Error::NotFound(_)) => {}
                Err(e) => return Err(e),
            }
        }
    }
    Ok(())
}

/// Copies the referenced chunks of packs `which` that have no copy outside them into new
/// packs; stores the packs and one index file naming them. Blobs are copied sealed, after
/// checking each one opens and hashes to its id (damage is reported, never copied).
fn repack(
    repo: &Repository,
    index: &MasterIndex,
    which: &[u32],
    referenced: &HashSet<ChunkId>,
    condemned: &HashSet<String>,
    report: &mut PruneReport,
    progress: &Progress,
) -> Result<Vec<IndexedPack>> {
    let old: HashSet<u32> = which.iter().copied().collect();
    let mut wanted: HashMap<u32, Vec<(ChunkId, Location)>> = HashMap::new();
    for (cid, loc) in index.iter_all() {
        if old.contains(&loc.pack) && referenced.contains(cid) {
            wanted.entry(loc.pack).or_default().push((*cid, *loc));
        }
    }
    let pack_size = repo.config().pack_size as usize;
    let key = repo.key();
    let mut copied: HashSet<ChunkId> = HashSet::new();
    let mut out: Vec<IndexedPack> = Vec::new();
    let mut w = PackWriter::new();
    let flush = |w: PackWriter, out: &mut Vec<IndexedPack>| -> Result<()> {
        let p = w.finish(key);
        repo.backend().put(&pack_key(&p.id), &p.bytes)?;
        out.push(IndexedPack { id: p.id, len: p.bytes.len() as u64, entries: p.entries });
        Ok(())
    };
    for &i in which {
        let (pid, plen) = index.packs[i as usize].clone();
        let Some(mut chunks) = wanted.remove(&i) else {
            progress.inc(plen);
            continue;
        };
        chunks.sort_by_key(|c| c.1.offset);
        let bytes = repo.backend().get(&pack_key(&pid))?;
        for (cid, loc) in chunks {
            // Already elsewhere in a pack that stays, or copied from another old pack.
            let elsewhere =
                index.locations(&cid).any(|l| !old.contains(&l.pack) && !condemned.contains(index.pack_id(l)));
            if elsewhere || !copied.insert(cid) {
                continue;
            }
            let e = loc.entry(cid);
            let blob = bytes
                .get(e.offset as usize..e.end() as usize)
                .ok_or_else(|| Error::corrupt(format!("pack {pid}"), "shorter than its index says"))?;
            decode_blob(key, &e, blob, &pid)?;
            w.add(cid, blob, e.raw_len, e.flags);
            report.repacked_bytes += blob.len() as u64;
            if w.len() >= pack_size {
                flush(std::mem::take(&mut w), &mut out)?;
            }
        }
        report.repacked_packs += 1;
        progress.inc(plen);
    }
    if !w.is_empty() {
        flush(w, &mut out)?;
    }
    if !out.is_empty() {
        repo.write_index(&out)?;
    }
    report.new_packs += out.len() as u64;
    Ok(out)
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

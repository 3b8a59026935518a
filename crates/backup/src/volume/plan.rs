//! Pure decisions of a volume backup: names, labels, the base of an incremental backup and
//! which snapshots retention deletes. No I/O here, so every rule has a unit test.

use std::collections::{BTreeMap, HashSet};
use std::ops::Range;

use super::agent::VolumeSnapshot;
use crate::chunk::ChunkerConfig;
use crate::error::{Error, Result};
use crate::snapshot::SnapshotMeta;

/// Prefix of the hlstore snapshots a backup makes.
pub const SNAPSHOT_PREFIX: &str = "backup-";
/// Backup label: the volume's name.
pub const LABEL_VOLUME: &str = "volume";
/// Backup label: the volume's size in bytes when backed up.
pub const LABEL_VOLUME_SIZE: &str = "volume_size";
/// Backup label: the hlstore snapshot the backup was read from.
pub const LABEL_VOLUME_SNAPSHOT: &str = "volume_snapshot";
/// hlstore snapshot label: id of the repository whose backup made the snapshot.
pub const SNAPSHOT_LABEL_REPO: &str = "hlstore-backup-repo";
/// Volume sizes are multiples of this.
pub const VOLUME_ALIGN: u64 = 4096;

/// Name of a new backup snapshot: `backup-<unix secs>-<8 hex>` (sorts by time).
pub fn snapshot_name(now_secs: u64, salt: u32) -> String {
    format!("{SNAPSHOT_PREFIX}{now_secs}-{salt:08x}")
}

/// Labels of a volume backup: the user's, then the three volume labels (which win).
pub fn backup_labels(
    user: &BTreeMap<String, String>,
    volume: &str,
    size: u64,
    snapshot: &str,
) -> BTreeMap<String, String> {
    let mut l = user.clone();
    l.insert(LABEL_VOLUME.into(), volume.into());
    l.insert(LABEL_VOLUME_SIZE.into(), size.to_string());
    l.insert(LABEL_VOLUME_SNAPSHOT.into(), snapshot.into());
    l
}

/// The base of an incremental backup of `volume`: the newest backup of it (`backups` are
/// oldest first) whose hlstore snapshot still exists and which used the same chunker.
pub fn choose_base<'a>(
    backups: &'a [SnapshotMeta],
    volume: &str,
    existing: &[VolumeSnapshot],
    chunker: ChunkerConfig,
) -> Option<&'a SnapshotMeta> {
    let names: HashSet<&str> = existing.iter().filter(|s| s.volume == volume).map(|s| s.name.as_str()).collect();
    backups.iter().rev().find(|m| {
        m.labels.get(LABEL_VOLUME).map(String::as_str) == Some(volume)
            && m.chunker == chunker
            && m.labels.get(LABEL_VOLUME_SNAPSHOT).is_some_and(|s| names.contains(s.as_str()))
    })
}

/// Snapshots retention deletes once `keep` is backed up: this repository's backup
/// snapshots of the same volume that are not newer than `keep`.
pub fn snapshots_to_delete(existing: &[VolumeSnapshot], repo_id: &str, keep: &VolumeSnapshot) -> Vec<String> {
    existing
        .iter()
        .filter(|s| {
            s.volume == keep.volume
                && s.name != keep.name
                && s.name.starts_with(SNAPSHOT_PREFIX)
                && s.labels.get(SNAPSHOT_LABEL_REPO).map(String::as_str) == Some(repo_id)
                && (s.seq, s.created) <= (keep.seq, keep.created)
        })
        .map(|s| s.name.clone())
        .collect()
}

/// Size of the volume a backup restores into: its `volume_size` label, else its size
/// rounded up to whole 4 KiB blocks (a file backup).
pub fn restore_size(meta: &SnapshotMeta) -> Result<u64> {
    let size = match meta.labels.get(LABEL_VOLUME_SIZE) {
        Some(s) => s
            .parse::<u64>()
            .map_err(|_| Error::Invalid(format!("backup {} has a bad {LABEL_VOLUME_SIZE} label {s:?}", meta.id)))?,
        None => meta.size.div_ceil(VOLUME_ALIGN) * VOLUME_ALIGN,
    };
    if size < meta.size || size == 0 || !size.is_multiple_of(VOLUME_ALIGN) {
        return Err(Error::Invalid(format!(
            "backup {} of {} bytes cannot be restored into a volume of {size} bytes",
            meta.id, meta.size
        )));
    }
    Ok(size)
}

/// Sorts and merges ranges, joining those less than `gap` apart, clipped to `size`.
pub fn merge_ranges(ranges: &[Range<u64>], gap: u64, size: u64) -> Vec<Range<u64>> {
    let mut v: Vec<Range<u64>> =
        ranges.iter().map(|r| r.start.min(size)..r.end.min(size)).filter(|r| r.start < r.end).collect();
    v.sort_by_key(|r| r.start);
    let mut out: Vec<Range<u64>> = Vec::new();
    for r in v {
        match out.last_mut() {
            Some(l) if r.start <= l.end.saturating_add(gap) => l.end = l.end.max(r.end),
            _ => out.push(r),
        }
    }
    out
}

/// Total bytes of (merged) ranges.
pub fn total(ranges: &[Range<u64>]) -> u64 {
    ranges.iter().map(|r| r.end - r.start).sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::BackupStats;

    fn meta(id: &str, time: u64, labels: &[(&str, &str)], chunker: ChunkerConfig) -> SnapshotMeta {
        SnapshotMeta {
            id: id.into(),
            time,
            nanos: 0,
            source: "volume:v".into(),
            size: 1 << 20,
            host: "h".into(),
            labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            parent: None,
            chunker,
            stats: BackupStats::default(),
        }
    }

    fn snap(volume: &str, name: &str, seq: u64, repo: Option<&str>) -> VolumeSnapshot {
        VolumeSnapshot {
            volume: volume.into(),
            name: name.into(),
            seq,
            size: 1 << 20,
            created: seq as i64,
            ready: true,
            labels: repo.map(|r| (SNAPSHOT_LABEL_REPO.to_string(), r.to_string())).into_iter().collect(),
        }
    }

    const FIXED: ChunkerConfig = ChunkerConfig::Fixed { size: 65536 };

    #[test]
    fn base_is_the_newest_backup_of_the_volume_whose_snapshot_exists() {
        let backups = vec![
            meta("a", 1, &[("volume", "v"), ("volume_snapshot", "backup-1")], FIXED),
            meta("b", 2, &[("volume", "v"), ("volume_snapshot", "backup-2")], FIXED),
            meta("c", 3, &[("volume", "w"), ("volume_snapshot", "backup-3")], FIXED),
            meta("d", 4, &[("volume", "v"), ("volume_snapshot", "backup-4")], FIXED),
            meta("e", 5, &[], FIXED),
        ];
        let existing =
            vec![snap("v", "backup-1", 1, None), snap("v", "backup-2", 2, None), snap("w", "backup-3", 3, None)];
        // backup-4 is gone: the newest usable base is b.
        assert_eq!(choose_base(&backups, "v", &existing, FIXED).map(|m| m.id.as_str()), Some("b"));
        assert_eq!(choose_base(&backups, "w", &existing, FIXED).map(|m| m.id.as_str()), Some("c"));
        // A snapshot of the same name on another volume does not count.
        let other = vec![snap("w", "backup-2", 2, None)];
        assert_eq!(choose_base(&backups, "v", &other, FIXED), None);
        // Another chunker cannot share chunk boundaries.
        let cdc = ChunkerConfig::Cdc { min: 16384, avg: 65536, max: 262144 };
        assert_eq!(choose_base(&backups, "v", &existing, cdc), None);
        assert_eq!(choose_base(&backups, "x", &existing, FIXED), None);
    }

    #[test]
    fn retention_deletes_only_this_repositorys_older_backup_snapshots() {
        let keep = snap("v", "backup-5", 5, Some("r1"));
        let existing = vec![
            snap("v", "backup-1", 1, Some("r1")),
            snap("v", "backup-2", 2, Some("r2")), // another repository's base
            snap("v", "manual", 3, Some("r1")),   // not made by a backup
            snap("v", "backup-4", 4, None),       // no repository label
            keep.clone(),
            snap("v", "backup-6", 6, Some("r1")), // a newer, concurrent backup
            snap("w", "backup-0", 0, Some("r1")), // another volume
        ];
        assert_eq!(snapshots_to_delete(&existing, "r1", &keep), vec!["backup-1".to_string()]);
        assert!(snapshots_to_delete(std::slice::from_ref(&keep), "r1", &keep).is_empty());
    }

    #[test]
    fn labels_names_and_sizes() {
        let user: BTreeMap<String, String> =
            [("volume".to_string(), "spoof".to_string()), ("app".into(), "pg".into())].into_iter().collect();
        let l = backup_labels(&user, "pgdata", 1 << 30, "backup-7-0000abcd");
        assert_eq!(l["volume"], "pgdata");
        assert_eq!(l["volume_size"], "1073741824");
        assert_eq!(l["volume_snapshot"], "backup-7-0000abcd");
        assert_eq!(l["app"], "pg");
        assert_eq!(snapshot_name(7, 0xabcd), "backup-7-0000abcd");

        let m = meta("a", 1, &[("volume_size", "2097152")], FIXED);
        assert_eq!(restore_size(&m).unwrap(), 2 << 20);
        let mut m = meta("a", 1, &[], FIXED);
        m.size = 5000;
        assert_eq!(restore_size(&m).unwrap(), 8192);
        for bad in ["x", "1000", "4096", "0"] {
            let m = meta("a", 1, &[("volume_size", bad)], FIXED);
            assert!(restore_size(&m).is_err(), "{bad}");
        }
    }

    #[test]
    fn ranges_merge_with_gaps_and_clip() {
        let r = merge_ranges(&[100..200, 0..50, 60..70, 300..400, 990..2000], 5, 1000);
        assert_eq!(r, vec![0..50, 60..70, 100..200, 300..400, 990..1000]);
        let r = merge_ranges(&[100..200, 0..50, 60..70, 300..400], 100, 1000);
        assert_eq!(r, vec![0..400]);
        assert_eq!(total(&r), 400);
        assert!(merge_ranges(&[5..5, 2000..3000], 0, 1000).is_empty());
    }
}

//! Volume backups against an in-memory node agent: full then incremental (changed-block)
//! backups, what they read, their labels, snapshot retention, failures, and restores into
//! new volumes that are byte-identical to the snapshot backed up.

#[path = "fake/agent.rs"]
mod fake;
mod support;

use std::sync::atomic::Ordering;
use std::sync::Arc;

use fake::FakeAgent;
use hlstore_backup::backend::Backend;
use hlstore_backup::volume::VolumeAgent;
use hlstore_backup::volume::{
    backup_volume, backup_volume_opening, restore_to_volume, VolumeBackupOptions, VolumeBackupReport,
    VolumeRestoreOptions,
};
use hlstore_backup::{ChunkerConfig, FsBackend, RepoConfig, Repository};
use support::*;

const MIB: u64 = 1 << 20;
const CHUNK: u64 = 64 * 1024;

fn repo(dir: &std::path::Path) -> Repository {
    let b: Arc<dyn Backend> = Arc::new(FsBackend::new(dir));
    let cfg = RepoConfig {
        chunker: ChunkerConfig::Fixed { size: CHUNK as u32 },
        pack_size: MIB as u32,
        ..RepoConfig::default()
    };
    init_repo(b, cfg)
}

/// A 16 MiB volume with 6 MiB of mixed data written at its start, the rest never written.
fn agent_with_volume() -> (FakeAgent, Vec<u8>) {
    let a = FakeAgent::new();
    let data = mixed_image(6 * MIB as usize, 11);
    a.volume_with("pg", 16 * MIB, &data);
    (a, data)
}

/// 1 % of the 16 MiB volume in 64 KiB chunk-aligned runs, plus one unaligned 4 KiB write.
fn change_one_percent(a: &FakeAgent, seed: u64) -> u64 {
    let runs = [1u64, 7, 30, 55, 90, 130, 200, 250];
    let mut changed = 0;
    for (i, r) in runs.iter().enumerate() {
        a.write("pg", r * CHUNK, &random_image(CHUNK as usize, seed + i as u64));
        changed += CHUNK;
    }
    a.write("pg", 40 * CHUNK + 8192, &random_image(4096, seed + 99));
    changed + 4096
}

fn brief(r: &VolumeBackupReport) -> String {
    format!(
        "incremental {} base {:?} read {} changed {} deleted {:?} stats {:?}",
        r.incremental, r.base, r.bytes_read, r.bytes_changed, r.deleted_snapshots, r.backup.meta.stats
    )
}

/// Restores `r`'s backup into a new volume "copy" and checks it holds the volume snapshot
/// the backup was read from.
#[track_caller]
fn assert_restores_to_its_snapshot(repo: &Repository, a: &FakeAgent, r: &VolumeBackupReport) {
    let want = a.snapshot_contents(&r.volume, &r.volume_snapshot);
    restore_to_volume(repo, a, &r.backup.meta.id, "copy", VolumeRestoreOptions::default()).unwrap();
    assert_eq!(blake(&a.contents("copy")), blake(&want), "restore of {}", r.backup.meta.id);
}

#[test]
fn incremental_backup_reads_only_changed_chunks_and_restores_byte_identical() {
    let t = tempfile::tempdir().unwrap();
    let repo = repo(&t.path().join("repo"));
    let (a, data) = agent_with_volume();

    let r1 = backup_volume(&repo, &a, "pg", VolumeBackupOptions::default()).unwrap();
    assert!(!r1.incremental && r1.base.is_none());
    // A full backup reads the allocated 6 MiB only, not the 16 MiB volume.
    assert_eq!(r1.bytes_changed, 6 * MIB);
    assert_eq!(r1.bytes_read, 6 * MIB, "{}", brief(&r1));
    assert_eq!(a.bytes_read.load(Ordering::Relaxed), 6 * MIB);
    let m = &r1.backup.meta;
    assert_eq!(m.labels["volume"], "pg");
    assert_eq!(m.labels["volume_size"], (16 * MIB).to_string());
    assert_eq!(m.labels["volume_snapshot"], r1.volume_snapshot);
    assert_eq!(m.size, 16 * MIB);
    assert_eq!(m.source, "volume:pg");
    let snap1 = a.snapshot_contents("pg", &r1.volume_snapshot);
    assert_eq!(&snap1[..data.len()], &data[..]);

    let changed = change_one_percent(&a, 500);
    a.bytes_read.store(0, Ordering::Relaxed);
    let r2 = backup_volume(&repo, &a, "pg", VolumeBackupOptions::default()).unwrap();
    assert!(r2.incremental, "{}", brief(&r2));
    assert_eq!(r2.base.as_deref(), Some(r1.backup.meta.id.as_str()));
    assert_eq!(r2.backup.meta.parent.as_deref(), Some(r1.backup.meta.id.as_str()));
    assert_eq!(r2.bytes_changed, changed);
    // Only the changed blocks are read: the aligned runs and the unaligned 4 KiB write.
    assert_eq!(r2.bytes_read, changed, "{}", brief(&r2));
    assert_eq!(a.bytes_read.load(Ordering::Relaxed), r2.bytes_read);
    assert!(r2.backup.meta.stats.bytes_skipped > 0);
    // Retention: the first backup's snapshot is gone, the new one is the next base.
    assert_eq!(r2.deleted_snapshots, vec![r1.volume_snapshot.clone()]);
    assert_eq!(a.snapshot_names("pg"), vec![r2.volume_snapshot.clone()]);
    let snap2 = a.snapshot_contents("pg", &r2.volume_snapshot);
    assert_ne!(snap1, snap2);

    // Writes after the snapshot are not in the backup.
    a.write("pg", 0, &random_image(MIB as usize, 77));

    let ropts = VolumeRestoreOptions { replicas: 2, ..Default::default() };
    let rep = restore_to_volume(&repo, &a, &r2.backup.meta.id[..10], "pg-copy", ropts.clone()).unwrap();
    assert_eq!(rep.volume_size, 16 * MIB);
    assert_eq!(a.replicas("pg-copy"), 2);
    assert!(!a.is_attached("pg-copy"), "detached after the restore");
    assert!(a.syncs.load(Ordering::Relaxed) >= 1, "flushed");
    assert_eq!(blake(&a.contents("pg-copy")), blake(&snap2), "restore equals the snapshot it came from");
    // Thin: only the non-zero 4 KiB blocks of the backup's pieces were written, each once.
    let nonzero = snap2.chunks(4096).filter(|c| c.iter().any(|&b| b != 0)).count() as u64 * 4096;
    assert_eq!(a.bytes_written.load(Ordering::Relaxed), nonzero);
    assert_eq!(rep.stats.bytes_written, nonzero);

    // The full backup restores to its own snapshot's content too.
    restore_to_volume(&repo, &a, &r1.backup.meta.id, "pg-old", ropts).unwrap();
    assert_eq!(blake(&a.contents("pg-old")), blake(&snap1));
}

#[test]
fn incrementals_read_only_changed_blocks_when_changes_straddle_chunks() {
    let t = tempfile::tempdir().unwrap();
    let repo = repo(&t.path().join("repo"));
    let (a, _) = agent_with_volume();
    backup_volume(&repo, &a, "pg", VolumeBackupOptions::default()).unwrap();
    // Two rounds of 64 KiB runs at 4 KiB-aligned (not chunk-aligned) offsets, so every run
    // straddles two chunks; the second round lands on the first round's partial chunks.
    let mut backups = Vec::new();
    for round in 0..2u64 {
        let mut changed = 0;
        for i in 0..12u64 {
            let off = (i * 21 + round * 5 + 3) * 4096 + i * 19 * CHUNK;
            a.write("pg", off, &random_image(CHUNK as usize, 600 + round * 100 + i));
            changed += CHUNK;
        }
        let r = backup_volume(&repo, &a, "pg", VolumeBackupOptions::default()).unwrap();
        assert!(r.incremental, "{}", brief(&r));
        assert!(r.bytes_read * 10 <= changed * 11, "read {} for {changed} changed: {}", r.bytes_read, brief(&r));
        assert!(r.backup.chunks.iter().any(|c| c.skip > 0), "unchanged parts kept as partial references");
        backups.push((r.backup.meta.id.clone(), a.snapshot_contents("pg", &r.volume_snapshot)));
    }
    for (i, (id, want)) in backups.iter().enumerate() {
        let name = format!("pg-r{i}");
        restore_to_volume(&repo, &a, id, &name, VolumeRestoreOptions { replicas: 1, ..Default::default() }).unwrap();
        assert_eq!(blake(&a.contents(&name)), blake(want), "backup {i}");
    }
    let file = t.path().join("out");
    let target = hlstore_backup::RestoreTarget::File(file.clone());
    hlstore_backup::restore(&repo, &backups[1].0, &target, Default::default()).unwrap();
    assert_eq!(blake(&std::fs::read(&file).unwrap()), blake(&backups[1].1));
    assert!(hlstore_backup::verify(&repo, true, Default::default()).unwrap().ok);
}

#[test]
fn a_backup_without_its_base_snapshot_reads_everything_again() {
    let t = tempfile::tempdir().unwrap();
    let repo = repo(&t.path().join("repo"));
    let (a, _) = agent_with_volume();
    let r1 = backup_volume(&repo, &a, "pg", VolumeBackupOptions::default()).unwrap();
    a.delete_snapshot_for_test(&r1.volume_snapshot);
    change_one_percent(&a, 1);
    let r2 = backup_volume(&repo, &a, "pg", VolumeBackupOptions::default()).unwrap();
    assert!(!r2.incremental && r2.base.is_none(), "{}", brief(&r2));
    assert!(r2.bytes_read >= 6 * MIB, "{}", brief(&r2));
    // Another volume's backups are never a base.
    a.volume_with("other", 16 * MIB, &mixed_image(MIB as usize, 3));
    let r3 = backup_volume(&repo, &a, "other", VolumeBackupOptions::default()).unwrap();
    assert!(!r3.incremental);
    // And retention of one volume leaves the other's base alone.
    assert_eq!(a.snapshot_names("pg"), vec![r2.volume_snapshot.clone()]);
    assert_eq!(a.snapshot_names("other"), vec![r3.volume_snapshot]);
}

#[test]
fn snapshots_of_other_repositories_and_by_hand_are_kept() {
    let t = tempfile::tempdir().unwrap();
    let repo1 = repo(&t.path().join("repo1"));
    let repo2 = repo(&t.path().join("repo2"));
    let (a, _) = agent_with_volume();
    let mine = backup_volume(&repo1, &a, "pg", VolumeBackupOptions::default()).unwrap();
    let theirs = backup_volume(&repo2, &a, "pg", VolumeBackupOptions::default()).unwrap();
    a.create_snapshot("pg", "before-upgrade", &Default::default()).unwrap();
    change_one_percent(&a, 9);
    let again = backup_volume(&repo1, &a, "pg", VolumeBackupOptions::default()).unwrap();
    assert!(again.incremental, "repo1's own base is still there: {}", brief(&again));
    assert_eq!(again.deleted_snapshots, vec![mine.volume_snapshot]);
    let mut left = a.snapshot_names("pg");
    left.sort();
    let mut want = vec![theirs.volume_snapshot, "before-upgrade".to_string(), again.volume_snapshot];
    want.sort();
    assert_eq!(left, want);
}

#[test]
fn a_failed_backup_removes_its_snapshot_and_keeps_the_base() {
    let t = tempfile::tempdir().unwrap();
    let repo = repo(&t.path().join("repo"));
    let (a, _) = agent_with_volume();
    let r1 = backup_volume(&repo, &a, "pg", VolumeBackupOptions::default()).unwrap();
    change_one_percent(&a, 2);
    a.fail_reads.store(true, Ordering::Relaxed);
    let err = backup_volume(&repo, &a, "pg", VolumeBackupOptions::default()).unwrap_err();
    assert!(err.to_string().contains("replica unavailable"), "{err}");
    assert_eq!(a.snapshot_names("pg"), vec![r1.volume_snapshot.clone()]);
    assert_eq!(repo.list_snapshots().unwrap().len(), 1, "no backup recorded");
    a.fail_reads.store(false, Ordering::Relaxed);
    let r2 = backup_volume(&repo, &a, "pg", VolumeBackupOptions::default()).unwrap();
    assert!(r2.incremental);
    assert_eq!(r2.base.as_deref(), Some(r1.backup.meta.id.as_str()));
    assert_restores_to_its_snapshot(&repo, &a, &r2);
}

/// The key is derived while the volume is snapshotted and its changes read ahead; a
/// repository that does not open (a wrong password) leaves no snapshot behind, and the
/// next backup is still incremental from the old base.
#[test]
fn a_backup_whose_repository_does_not_open_leaves_no_snapshot() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("repo");
    let repo = repo(&dir);
    let (a, _) = agent_with_volume();
    let r1 = backup_volume(&repo, &a, "pg", VolumeBackupOptions::default()).unwrap();
    change_one_percent(&a, 3);
    let b: Arc<dyn Backend> = Arc::new(FsBackend::new(&dir));
    let config = Repository::read_config(b.as_ref()).unwrap();
    let open = || Repository::open(b.clone(), b"not the password");
    let err = backup_volume_opening(open, &config, &a, "pg", VolumeBackupOptions::default()).unwrap_err();
    assert!(matches!(err, hlstore_backup::Error::WrongPassword), "{err}");
    assert_eq!(a.snapshot_names("pg"), vec![r1.volume_snapshot.clone()]);
    assert_eq!(repo.list_snapshots().unwrap().len(), 1);
    let open = || Repository::open(b.clone(), PASSWORD);
    let r2 = backup_volume_opening(open, &config, &a, "pg", VolumeBackupOptions::default()).unwrap();
    assert!(r2.incremental, "{}", brief(&r2));
    assert_eq!(r2.base.as_deref(), Some(r1.backup.meta.id.as_str()));
    assert_restores_to_its_snapshot(&repo, &a, &r2);
}

/// The changes read ahead are those since this repository's newest snapshot of the volume;
/// when the repository has no backup of that snapshot (forgotten here), the backup is a
/// full one and the bytes read ahead are not used (counted as read all the same).
#[test]
fn changes_read_ahead_from_a_snapshot_that_is_not_the_base_are_not_used() {
    let t = tempfile::tempdir().unwrap();
    let repo = repo(&t.path().join("repo"));
    let (a, _) = agent_with_volume();
    let r1 = backup_volume(&repo, &a, "pg", VolumeBackupOptions::default()).unwrap();
    let changed = change_one_percent(&a, 4);
    repo.forget(&r1.backup.meta.id).unwrap();
    a.bytes_read.store(0, Ordering::Relaxed);
    let r2 = backup_volume(&repo, &a, "pg", VolumeBackupOptions::default()).unwrap();
    assert!(!r2.incremental && r2.base.is_none(), "{}", brief(&r2));
    // Allocated now: the 6 MiB written first and the changes beyond it.
    assert!(r2.bytes_changed > 6 * MIB, "{}", brief(&r2));
    assert_eq!(r2.bytes_read, changed + r2.bytes_changed, "read ahead, then every allocated byte: {}", brief(&r2));
    assert_eq!(a.bytes_read.load(Ordering::Relaxed), r2.bytes_read);
    assert_restores_to_its_snapshot(&repo, &a, &r2);
}

#[test]
fn restore_never_writes_into_an_existing_volume() {
    let t = tempfile::tempdir().unwrap();
    let repo = repo(&t.path().join("repo"));
    let (a, _) = agent_with_volume();
    let r1 = backup_volume(&repo, &a, "pg", VolumeBackupOptions::default()).unwrap();
    let other = mixed_image(MIB as usize, 5);
    a.volume_with("busy", 4 * MIB, &other);
    let before = a.contents("busy");
    let err = restore_to_volume(&repo, &a, &r1.backup.meta.id, "busy", VolumeRestoreOptions::default()).unwrap_err();
    assert!(err.to_string().contains("already exists"), "{err}");
    assert_eq!(a.contents("busy"), before);
    assert_eq!(a.bytes_written.load(Ordering::Relaxed), 0);
    let err = restore_to_volume(&repo, &a, "ffffffff", "new", VolumeRestoreOptions::default()).unwrap_err();
    assert!(err.to_string().contains("no backup matches"), "{err}");
    assert_eq!(a.volume_size("new").unwrap(), None, "nothing created for an unknown backup");
    let err = backup_volume(&repo, &a, "missing", VolumeBackupOptions::default()).unwrap_err();
    assert!(err.to_string().contains("missing"), "{err}");
}

#[test]
fn an_interrupted_restore_to_a_volume_resumes_byte_identical() {
    let t = tempfile::tempdir().unwrap();
    let repo = repo(&t.path().join("repo"));
    // Incompressible data: six 1 MiB packs.
    let a = FakeAgent::new();
    a.volume_with("pg", 16 * MIB, &random_image(6 * MIB as usize, 12));
    let r = backup_volume(&repo, &a, "pg", VolumeBackupOptions::default()).unwrap();
    let want = a.snapshot_contents("pg", &r.volume_snapshot);
    let state = t.path().join("restore.state");
    let opts = VolumeRestoreOptions { replicas: 1, workers: 1, state_file: Some(state.clone()), ..Default::default() };

    // The connection drops after 2.5 MiB: the volume and the state stay.
    a.fail_writes_after.store(5 * MIB / 2, Ordering::Relaxed);
    let e = restore_to_volume(&repo, &a, &r.backup.meta.id, "pg-new", opts.clone()).unwrap_err();
    assert!(e.to_string().contains("run the same restore again"), "{e}");
    assert!(a.volume_size("pg-new").unwrap().is_some(), "volume kept");
    assert!(state.exists());
    let first = a.bytes_written.load(Ordering::Relaxed);

    // Another backup's restore cannot take the kept volume over.
    let other = VolumeRestoreOptions { state_file: Some(t.path().join("other.state")), ..opts.clone() };
    assert!(restore_to_volume(&repo, &a, &r.backup.meta.id, "pg-new", other).is_err());

    a.fail_writes_after.store(0, Ordering::Relaxed);
    let rep = restore_to_volume(&repo, &a, &r.backup.meta.id, "pg-new", opts).unwrap();
    assert!(rep.stats.packs_resumed > 0, "{:?}", rep.stats);
    assert!(a.bytes_written.load(Ordering::Relaxed) - first < 6 * MIB, "resumed, not restarted");
    assert_eq!(blake(&a.contents("pg-new")), blake(&want));
    assert!(!state.exists(), "state removed on success");
    assert!(!a.is_attached("pg-new"));
}

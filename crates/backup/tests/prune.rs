//! Retention and garbage collection: forgotten data is freed, kept backups stay intact,
//! writer leases and the grace period postpone deletion, and backups running concurrently
//! with prune never fail or lose data.

mod support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use hlstore_backup::repo::Lease;
use hlstore_backup::{
    backup, prune, restore, verify, BackupOptions, FileSource, KeepPolicy, PruneOptions, Repository, RestoreOptions,
    RestoreTarget,
};
use support::*;

fn keep_last(n: u32, grace: u64) -> PruneOptions {
    PruneOptions { policy: KeepPolicy { last: n, ..Default::default() }, grace_secs: grace, dry_run: false }
}

#[test]
fn prune_frees_forgotten_data_and_keeps_the_rest_restorable() {
    let t = tempfile::tempdir().unwrap();
    let (b, repo) = fs_repo(&t.path().join("repo"));
    let src = t.path().join("img");
    let mut last = Vec::new();
    for seed in 20..23u64 {
        last = mixed_image(3 << 20, seed);
        write(&src, &last);
        backup(&repo, &FileSource::open(&src).unwrap(), BackupOptions::default()).unwrap();
    }
    let before: u64 = b.list("data/").unwrap().iter().map(|o| o.size).sum();
    // Nothing without a policy.
    let none = PruneOptions { policy: KeepPolicy::default(), grace_secs: 0, dry_run: false };
    assert!(prune(&repo, none).is_err());
    let dry = prune(&repo, PruneOptions { dry_run: true, ..keep_last(1, 0) }).unwrap();
    assert_eq!(dry.forgotten.len(), 2);
    assert_eq!(repo.snapshot_ids().unwrap().len(), 3, "dry run changes nothing");

    let rep = prune(&repo, keep_last(1, 0)).unwrap();
    assert_eq!(rep.forgotten.len(), 2);
    assert!(rep.deleted_packs > 0 && rep.postponed_packs == 0, "{rep:?}");
    let after: u64 = b.list("data/").unwrap().iter().map(|o| o.size).sum();
    assert!(after < before, "{after} < {before}");
    assert!(b.list("trash/").unwrap().is_empty());
    let v = verify(&repo, true, Default::default()).unwrap();
    assert!(v.ok && v.problems.is_empty(), "{v:?}");
    let ids = repo.snapshot_ids().unwrap();
    assert_eq!(ids, rep.kept);
    let out = t.path().join("out");
    let target = RestoreTarget::File(out.clone());
    restore(&repo, &ids[0], &target, RestoreOptions::default()).unwrap();
    assert_eq!(blake(&std::fs::read(&out).unwrap()), blake(&last));
}

#[test]
fn leases_and_grace_period_postpone_deletion() {
    let t = tempfile::tempdir().unwrap();
    let (b, repo) = fs_repo(&t.path().join("repo"));
    let src = t.path().join("img");
    for seed in 30..32u64 {
        write(&src, &mixed_image(2 << 20, seed));
        backup(&repo, &FileSource::open(&src).unwrap(), BackupOptions::default()).unwrap();
    }
    let packs = b.list("data/").unwrap().len();
    // Grace period not over: condemned, not deleted.
    let rep = prune(&repo, keep_last(1, 3600)).unwrap();
    assert!(rep.condemned_packs > 0 && rep.deleted_packs == 0, "{rep:?}");
    assert_eq!(b.list("data/").unwrap().len(), packs);
    assert_eq!(b.list("trash/").unwrap().len(), 1);

    // A running writer that started before the condemnation blocks deletion.
    let lease = Lease::acquire(b.clone(), "backup").unwrap();
    let rep = prune(&repo, keep_last(1, 0)).unwrap();
    assert!(rep.postponed_packs > 0 && rep.deleted_packs == 0, "{rep:?}");
    assert_eq!(b.list("data/").unwrap().len(), packs);
    drop(lease);
    assert!(b.list("locks/").unwrap().is_empty(), "lease removed on drop");

    let rep = prune(&repo, keep_last(1, 0)).unwrap();
    assert!(rep.deleted_packs > 0, "{rep:?}");
    assert!(b.list("data/").unwrap().len() < packs);
}

#[test]
fn condemned_data_referenced_again_is_not_reused_and_later_freed() {
    let t = tempfile::tempdir().unwrap();
    let (_b, repo) = fs_repo(&t.path().join("repo"));
    let src = t.path().join("img");
    let img = mixed_image(2 << 20, 40);
    write(&src, &img);
    let s = backup(&repo, &FileSource::open(&src).unwrap(), BackupOptions::default()).unwrap();
    repo.forget(&s.meta.id).unwrap();
    let rep = prune(&repo, keep_last(1, 3600)).unwrap();
    assert!(rep.condemned_packs > 0);
    // A new backup of the same data does not reuse condemned packs...
    let s2 = backup(&repo, &FileSource::open(&src).unwrap(), BackupOptions::default()).unwrap();
    assert!(s2.meta.stats.new_chunks > 0);
    // ...so deleting them later is safe and the new backup restores.
    let rep = prune(&repo, keep_last(1, 0)).unwrap();
    assert!(rep.deleted_packs > 0, "{rep:?}");
    let out = t.path().join("out");
    let target = RestoreTarget::File(out.clone());
    restore(&repo, &s2.meta.id, &target, RestoreOptions::default()).unwrap();
    assert_eq!(blake(&std::fs::read(&out).unwrap()), blake(&img));
    assert!(verify(&repo, true, Default::default()).unwrap().ok);
}

#[test]
fn concurrent_backups_survive_prune() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("repo");
    let (b, repo) = fs_repo(&dir);
    drop(repo);
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (dir, stop, tdir) = (dir.clone(), stop.clone(), t.path().to_path_buf());
        std::thread::spawn(move || {
            let backend = Arc::new(hlstore_backup::FsBackend::new(&dir));
            let repo = Repository::open(backend, PASSWORD).unwrap();
            let mut done = Vec::new();
            let mut seed = 100u64;
            while !stop.load(Ordering::Relaxed) || done.len() < 4 {
                // Half new data, half the previous image's data (dedup against old packs).
                let mut img = mixed_image(1 << 20, seed);
                img.extend_from_slice(&mixed_image(1 << 20, seed - 1));
                let src = tdir.join("src");
                write(&src, &img);
                let s = backup(&repo, &FileSource::open(&src).unwrap(), BackupOptions::default())
                    .expect("a backup running concurrently with prune must not fail");
                done.push((s.meta.id, blake(&img)));
                seed += 1;
            }
            done
        })
    };
    let repo = Repository::open(b.clone(), PASSWORD).unwrap();
    for _ in 0..6 {
        prune(&repo, keep_last(2, 0)).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    stop.store(true, Ordering::Relaxed);
    let done = writer.join().unwrap();
    // Every backup that survived retention restores byte-identically.
    let ids = repo.snapshot_ids().unwrap();
    let mut checked = 0;
    for (id, sum) in done {
        if ids.contains(&id) {
            let out = t.path().join(format!("out-{id}"));
            let target = RestoreTarget::File(out.clone());
            restore(&repo, &id, &target, RestoreOptions::default()).unwrap();
            assert_eq!(blake(&std::fs::read(&out).unwrap()), sum);
            checked += 1;
        }
    }
    assert!(checked >= 1);
    let v = verify(&repo, true, Default::default()).unwrap();
    assert!(v.ok, "{v:?}");
}

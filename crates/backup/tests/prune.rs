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
    PruneOptions { grace_secs: grace, ..PruneOptions::new(KeepPolicy { last: n, ..Default::default() }) }
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
    let none = PruneOptions { grace_secs: 0, ..PruneOptions::new(KeepPolicy::default()) };
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

/// A source whose reads wait until the test lets them go, so a test can run things while
/// a backup is in the middle of reading (it has taken its lease and loaded the index).
struct GatedSource {
    inner: FileSource,
    reading: Arc<AtomicBool>,
    go: Arc<AtomicBool>,
}

impl hlstore_backup::Source for GatedSource {
    fn name(&self) -> String {
        self.inner.name()
    }
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> hlstore_backup::Result<()> {
        self.reading.store(true, Ordering::SeqCst);
        while !self.go.load(Ordering::SeqCst) {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        self.inner.read_at(offset, buf)
    }
}

fn data_bytes(b: &dyn hlstore_backup::Backend) -> u64 {
    b.list("data/").unwrap().iter().map(|o| o.size).sum()
}

fn restores_to(repo: &Repository, dir: &std::path::Path, id: &str, want: &[u8]) {
    let out = dir.join(format!("out-{id}"));
    restore(repo, id, &RestoreTarget::File(out.clone()), RestoreOptions::default()).unwrap();
    assert_eq!(blake(&std::fs::read(&out).unwrap()), blake(want), "backup {id}");
}

#[test]
fn repack_reclaims_partly_used_packs_without_breaking_a_running_backup() {
    let t = tempfile::tempdir().unwrap();
    let (b, repo) = fs_repo(&t.path().join("repo"));
    // X fills 4 packs; Y keeps every other 64 KiB of X, so once X is forgotten every pack
    // of X is half dead.
    let x = random_image(4 << 20, 60);
    let mut y = x.clone();
    let fresh = random_image(4 << 20, 61);
    for k in (0..y.len()).step_by(128 * 1024) {
        y[k..k + 64 * 1024].copy_from_slice(&fresh[k..k + 64 * 1024]);
    }
    let (xp, yp, zp) = (t.path().join("x"), t.path().join("y"), t.path().join("z"));
    write(&xp, &x);
    write(&yp, &y);
    let sx = backup(&repo, &FileSource::open(&xp).unwrap(), BackupOptions::default()).unwrap();
    let sy = backup(&repo, &FileSource::open(&yp).unwrap(), BackupOptions::default()).unwrap();
    repo.forget(&sx.meta.id).unwrap();
    let before = data_bytes(b.as_ref());

    // Z, backed up slowly while prune repacks, reuses X's first half: chunks the repack
    // considers dead and does not copy.
    let mut z = x[..2 << 20].to_vec();
    z.extend_from_slice(&random_image(1 << 20, 62));
    write(&zp, &z);
    let (reading, go) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicBool::new(false)));
    let writer = {
        let (dir, zp, reading, go) = (t.path().join("repo"), zp.clone(), reading.clone(), go.clone());
        std::thread::spawn(move || {
            let repo = Repository::open(Arc::new(hlstore_backup::FsBackend::new(&dir)), PASSWORD).unwrap();
            let src = GatedSource { inner: FileSource::open(&zp).unwrap(), reading, go };
            backup(&repo, &src, BackupOptions::default()).expect("a backup running during a repack must not fail")
        })
    };
    while !reading.load(Ordering::SeqCst) {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let rep = prune(&repo, keep_last(5, 0)).unwrap();
    go.store(true, Ordering::SeqCst);
    assert!(rep.repacked_packs >= 4 && rep.new_packs > 0, "{rep:?}");
    assert!(rep.postponed_packs >= 4 && rep.deleted_packs == 0, "the running backup blocks deletion: {rep:?}");
    let sz = writer.join().unwrap();
    assert!(sz.meta.stats.new_chunks > 0 && sz.meta.stats.new_bytes < z.len() as u64, "Z reused X's chunks");

    // The old packs that hold Z's chunks are rescued, the others go.
    let rep = prune(&repo, keep_last(5, 0)).unwrap();
    assert!(rep.deleted_packs > 0 && rep.rescued_packs > 0, "{rep:?}");
    // Nothing was lost.
    restores_to(&repo, t.path(), &sy.meta.id, &y);
    restores_to(&repo, t.path(), &sz.meta.id, &z);
    let v = verify(&repo, true, Default::default()).unwrap();
    assert!(v.ok && v.problems.is_empty(), "{v:?}");
    // Without Z, the space comes back: what is left is Y's 4 MiB (X's other half is gone).
    repo.forget(&sz.meta.id).unwrap();
    prune(&repo, keep_last(5, 0)).unwrap();
    let rep = prune(&repo, keep_last(5, 0)).unwrap();
    assert_eq!(rep.postponed_packs, 0, "{rep:?}");
    let after = data_bytes(b.as_ref());
    assert!(after > 4 << 20 && after < (4 << 20) * 102 / 100, "reclaimed: {after} of {before}");
    restores_to(&repo, t.path(), &sy.meta.id, &y);
    assert!(verify(&repo, true, Default::default()).unwrap().ok);
}

#[test]
fn two_prunes_at_once_take_turns() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("repo");
    let (b, repo) = fs_repo(&dir);
    let src = t.path().join("img");
    let mut last = Vec::new();
    for seed in 70..74u64 {
        last = mixed_image(2 << 20, seed);
        write(&src, &last);
        backup(&repo, &FileSource::open(&src).unwrap(), BackupOptions::default()).unwrap();
    }
    // A prune holding the lease keeps another away, which changes nothing.
    let held = Lease::acquire(b.clone(), "prune").unwrap();
    let started = std::time::Instant::now();
    let e = prune(&repo, keep_last(1, 0)).unwrap_err();
    assert!(matches!(e, hlstore_backup::Error::Busy(_)), "{e}");
    assert!(started.elapsed() < std::time::Duration::from_secs(5));
    assert_eq!(repo.snapshot_ids().unwrap().len(), 4);
    // With a wait, the second prune runs once the first is done.
    let release = std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_millis(2500));
        drop(held);
    });
    let started = std::time::Instant::now();
    let opts = PruneOptions { wait: std::time::Duration::from_secs(30), ..keep_last(3, 0) };
    let rep = prune(&repo, opts).unwrap();
    assert!(started.elapsed() >= std::time::Duration::from_millis(2400), "waited for the holder");
    assert_eq!(rep.forgotten.len(), 1);
    release.join().unwrap();
    assert_eq!(repo.snapshot_ids().unwrap().len(), 3);

    // Two at once: each finishes or steps back; never a damaged repository.
    let barrier = Arc::new(std::sync::Barrier::new(2));
    let runs: Vec<_> = (0..2)
        .map(|_| {
            let (dir, barrier) = (dir.clone(), barrier.clone());
            std::thread::spawn(move || {
                let repo = Repository::open(Arc::new(hlstore_backup::FsBackend::new(&dir)), PASSWORD).unwrap();
                barrier.wait();
                prune(&repo, keep_last(1, 0))
            })
        })
        .collect();
    let results: Vec<_> = runs.into_iter().map(|h| h.join().unwrap()).collect();
    let ok = results.iter().filter(|r| r.is_ok()).count();
    for r in &results {
        if let Err(e) = r {
            assert!(matches!(e, hlstore_backup::Error::Busy(_)), "{e}");
        }
    }
    assert!(ok >= 1, "{results:?}");
    assert!(b.list("locks/").unwrap().is_empty(), "leases released");
    let ids = repo.snapshot_ids().unwrap();
    assert_eq!(ids.len(), 1);
    restores_to(&repo, t.path(), &ids[0], &last);
    let v = verify(&repo, true, Default::default()).unwrap();
    assert!(v.ok && v.problems.is_empty(), "{v:?}");
}

#[test]
fn a_damaged_pack_stops_the_repack_with_a_clear_error_and_loses_nothing() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("repo");
    let (b, repo) = fs_repo(&dir);
    let x = random_image(2 << 20, 95);
    let mut y = x.clone();
    let fresh = random_image(2 << 20, 96);
    for k in (0..y.len()).step_by(128 * 1024) {
        y[k..k + 64 * 1024].copy_from_slice(&fresh[k..k + 64 * 1024]);
    }
    let (xp, yp) = (t.path().join("x"), t.path().join("y"));
    write(&xp, &x);
    write(&yp, &y);
    let sx = backup(&repo, &FileSource::open(&xp).unwrap(), BackupOptions::default()).unwrap();
    let sy = backup(&repo, &FileSource::open(&yp).unwrap(), BackupOptions::default()).unwrap();
    // Damage a live blob (one Y shares with X) inside one of X's packs, which are half
    // dead (Y kept every other 64 KiB), so the repack has to read it.
    let idx = repo.load_index().unwrap().index;
    let shared = sy.chunks.iter().find(|c| c.offset == 64 * 1024).unwrap();
    let loc = idx.get(&shared.id).unwrap();
    let damaged = idx.pack_id(loc).to_string();
    let path = dir.join("data").join(&damaged[..2]).join(&damaged);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[(loc.offset + loc.length / 2) as usize] ^= 0x40;
    std::fs::write(&path, bytes).unwrap();
    let x_packs: Vec<String> = {
        let mut v: Vec<String> = sx.chunks.iter().map(|c| idx.pack_id(idx.get(&c.id).unwrap()).to_string()).collect();
        v.sort();
        v.dedup();
        v
    };
    assert!(x_packs.contains(&damaged));
    repo.forget(&sx.meta.id).unwrap();
    let e = prune(&repo, keep_last(5, 0)).unwrap_err();
    assert!(e.to_string().contains(&format!("corrupt object pack {damaged}")), "{e}");
    // Nothing was condemned or deleted; the lease is gone.
    assert!(b.list("trash/").unwrap().is_empty());
    assert!(b.list("locks/").unwrap().is_empty());
    for p in &x_packs {
        assert!(dir.join("data").join(&p[..2]).join(p).exists());
    }
    assert_eq!(repo.snapshot_ids().unwrap(), vec![sy.meta.id.clone()]);
    // Without repacking, prune still does its other work.
    let opts = PruneOptions { repack_unused_pct: None, ..keep_last(5, 0) };
    prune(&repo, opts).unwrap();
}

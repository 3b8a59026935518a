//! A backup that runs longer than the writer lease's TTL keeps its lease alive (it is
//! refreshed), so a prune running meanwhile postpones deleting what the backup reuses.
//! Alone in its test binary: it shortens the TTL through the environment.

mod support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hlstore_backup::backend::{Backend, ObjectInfo};

use hlstore_backup::repo::{Lease, LEASE_TTL_ENV};
use hlstore_backup::{
    backup, prune, restore, verify, BackupOptions, FileSource, KeepPolicy, PruneOptions, Repository, RestoreOptions,
    RestoreTarget,
};
use support::*;

struct SlowSource(FileSource);

impl hlstore_backup::Source for SlowSource {
    fn name(&self) -> String {
        self.0.name()
    }
    fn size(&self) -> u64 {
        self.0.size()
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> hlstore_backup::Result<()> {
        std::thread::sleep(Duration::from_millis(1500));
        self.0.read_at(offset, buf)
    }
}

#[test]
fn a_backup_outliving_the_lease_ttl_keeps_its_lease_and_its_data() {
    std::env::set_var(LEASE_TTL_ENV, "2");
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("repo");
    let (b, repo) = fs_repo(&dir);
    let src = t.path().join("img");
    let img = random_image(12 << 20, 80); // three 4 MiB reads, 1.5 s each
    write(&src, &img);
    let first = backup(&repo, &FileSource::open(&src).unwrap(), BackupOptions::default()).unwrap();
    // Forgotten: its packs are unreferenced, but the slow backup below reuses them.
    repo.forget(&first.meta.id).unwrap();
    let writer = {
        let (dir, src) = (dir.clone(), src.clone());
        std::thread::spawn(move || {
            let repo = Repository::open(Arc::new(hlstore_backup::FsBackend::new(&dir)), PASSWORD).unwrap();
            backup(&repo, &SlowSource(FileSource::open(&src).unwrap()), BackupOptions::default()).unwrap()
        })
    };
    while b.list("locks/").unwrap().is_empty() {
        std::thread::sleep(Duration::from_millis(20));
    }
    let started = Instant::now();
    let mut pruned = None;
    while !writer.is_finished() {
        let live = Lease::live(b.as_ref()).unwrap();
        assert!(
            writer.is_finished() || live.iter().any(|l| l.purpose == "backup"),
            "lease expired after {:?}",
            started.elapsed()
        );
        if pruned.is_none() && started.elapsed() > Duration::from_secs(3) {
            let opts =
                PruneOptions { grace_secs: 0, ..PruneOptions::new(KeepPolicy { last: 1, ..Default::default() }) };
            pruned = Some(prune(&repo, opts).unwrap());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(started.elapsed() > Duration::from_secs(3), "the backup outlived the 2 s TTL");
    let rep = pruned.expect("prune ran during the backup");
    assert!(rep.condemned_packs > 0 && rep.deleted_packs == 0 && rep.postponed_packs > 0, "{rep:?}");
    let snap = writer.join().unwrap();
    assert_eq!(snap.meta.stats.new_chunks, 0, "it reused the forgotten backup's packs");
    let out = t.path().join("out");
    restore(&repo, &snap.meta.id, &RestoreTarget::File(out.clone()), RestoreOptions::default()).unwrap();
    assert_eq!(blake(&std::fs::read(&out).unwrap()), blake(&img));
    assert!(verify(&repo, true, Default::default()).unwrap().ok);
}

/// A filesystem backend whose lease refreshes fail while `fail_refresh` is set (a backend
/// outage that spares the data path, or a writer suspended past its TTL).
struct FlakyLocks {
    inner: hlstore_backup::FsBackend,
    fail_refresh: AtomicBool,
}

impl Backend for FlakyLocks {
    fn location(&self) -> String {
        self.inner.location()
    }
    fn put(&self, key: &str, data: &[u8]) -> hlstore_backup::Result<()> {
        let refresh = key.starts_with("locks/") && self.inner.get(key).is_ok();
        if refresh && self.fail_refresh.load(Ordering::Relaxed) {
            return Err(hlstore_backup::Error::Backend { op: "put", object: key.into(), detail: "injected".into() });
        }
        self.inner.put(key, data)
    }
    fn get(&self, key: &str) -> hlstore_backup::Result<Vec<u8>> {
        self.inner.get(key)
    }
    fn get_range(&self, key: &str, offset: u64, len: u64) -> hlstore_backup::Result<Vec<u8>> {
        self.inner.get_range(key, offset, len)
    }
    fn list(&self, prefix: &str) -> hlstore_backup::Result<Vec<ObjectInfo>> {
        self.inner.list(prefix)
    }
    fn delete(&self, key: &str) -> hlstore_backup::Result<()> {
        self.inner.delete(key)
    }
}

#[test]
fn a_backup_whose_lease_lapsed_saves_nothing_and_the_next_run_succeeds() {
    std::env::set_var(LEASE_TTL_ENV, "2");
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("repo");
    let (_b, repo) = fs_repo(&dir);
    drop(repo);
    let flaky =
        Arc::new(FlakyLocks { inner: hlstore_backup::FsBackend::new(&dir), fail_refresh: AtomicBool::new(true) });
    let repo = Repository::open(flaky.clone(), PASSWORD).unwrap();
    let src = t.path().join("img");
    let img = random_image(8 << 20, 81);
    write(&src, &img);
    // Two 4 MiB reads, 1.5 s each: the backup outlives its 2 s lease, whose refreshes fail.
    let e = backup(&repo, &SlowSource(FileSource::open(&src).unwrap()), BackupOptions::default()).unwrap_err();
    assert!(matches!(e, hlstore_backup::Error::LeaseLapsed(_)), "{e}");
    assert!(e.to_string().contains("run the backup again"), "{e}");
    assert!(repo.snapshot_ids().unwrap().is_empty(), "no snapshot claims possibly deleted data");
    assert!(flaky.list("locks/").unwrap().is_empty(), "lease removed");

    // Refreshes work again: the rerun reuses the uploaded packs and succeeds.
    flaky.fail_refresh.store(false, Ordering::Relaxed);
    let s = backup(&repo, &SlowSource(FileSource::open(&src).unwrap()), BackupOptions::default()).unwrap();
    assert_eq!(s.meta.stats.new_chunks, 0, "{:?}", s.meta.stats);
    let out = t.path().join("out");
    restore(&repo, &s.meta.id, &RestoreTarget::File(out.clone()), RestoreOptions::default()).unwrap();
    assert_eq!(blake(&std::fs::read(&out).unwrap()), blake(&img));
}

//! A backup that runs longer than the writer lease's TTL keeps its lease alive (it is
//! refreshed), so a prune running meanwhile postpones deleting what the backup reuses.
//! Alone in its test binary: it shortens the TTL through the environment.

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

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

//! The whole engine against a real S3 server (SeaweedFS on loopback): round trip with
//! multipart packs, dedup, damage reporting and prune.

mod support;

use std::sync::Arc;

use hlstore_backup::backend::Backend;
use hlstore_backup::pack::pack_key;
use hlstore_backup::{
    backup, prune, restore, verify, BackupOptions, ChunkerConfig, FileSource, KeepPolicy, PruneOptions, RepoConfig,
    RestoreOptions, RestoreTarget,
};
use support::weed::{weed, BUCKETS};
use support::*;

#[test]
fn s3_round_trip_dedup_damage_and_prune() {
    let Some(w) = weed() else { return };
    let b: Arc<dyn Backend> = Arc::new(w.backend(BUCKETS[2]));
    // Packs above the multipart threshold.
    let cfg = RepoConfig {
        chunker: ChunkerConfig::Fixed { size: 64 * 1024 },
        file_chunker: None,
        pack_size: 18 << 20,
        ..RepoConfig::default()
    };
    let repo = init_repo(b.clone(), cfg);
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("img");
    let mut img = random_image(30 << 20, 50);
    img.extend_from_slice(&mixed_image(10 << 20, 50));
    write(&src, &img);
    let s1 = backup(&repo, &FileSource::open(&src).unwrap(), BackupOptions::default()).unwrap();
    assert!(b.list("data/").unwrap().iter().any(|o| o.size > 17 << 20), "multipart pack");
    let s2 = backup(&repo, &FileSource::open(&src).unwrap(), BackupOptions::default()).unwrap();
    assert_eq!(s2.meta.stats.new_chunks, 0);

    let out = t.path().join("out");
    let target = RestoreTarget::File(out.clone());
    restore(&repo, &s1.meta.id, &target, RestoreOptions::default()).unwrap();
    assert_eq!(blake(&std::fs::read(&out).unwrap()), blake(&img));
    let v = verify(&repo, true, Default::default()).unwrap();
    assert!(v.ok && v.problems.is_empty(), "{v:?}");

    // A second, independent image; then lose one of the first image's packs.
    let other = mixed_image(3 << 20, 51);
    let src2 = t.path().join("img2");
    write(&src2, &other);
    let s3 = backup(&repo, &FileSource::open(&src2).unwrap(), BackupOptions::default()).unwrap();
    let idx = repo.load_index().unwrap().index;
    let victim = idx.pack_id(idx.get(&s1.chunks[0].id).unwrap()).to_string();
    b.delete(&pack_key(&victim)).unwrap();
    let v = verify(&repo, false, Default::default()).unwrap();
    assert!(!v.ok);
    assert_eq!(v.problems.len(), 1, "{v:?}");
    assert_eq!(v.problems[0].kind, "missing_pack");
    assert_eq!(v.problems[0].object, pack_key(&victim));
    let mut aff: Vec<_> = v.affected.iter().map(|a| a.snapshot.clone()).collect();
    aff.sort();
    let mut want = vec![s1.meta.id.clone(), s2.meta.id.clone()];
    want.sort();
    assert_eq!(aff, want);
    let out2 = t.path().join("out2");
    let target = RestoreTarget::File(out2.clone());
    restore(&repo, &s3.meta.id, &target, RestoreOptions::default()).unwrap();
    assert_eq!(blake(&std::fs::read(&out2).unwrap()), blake(&other));

    // Forget the damaged backups; prune frees their packs.
    repo.forget(&s1.meta.id).unwrap();
    repo.forget(&s2.meta.id).unwrap();
    let policy = KeepPolicy { last: 1, ..Default::default() };
    let rep = prune(&repo, PruneOptions { grace_secs: 0, ..PruneOptions::new(policy) }).unwrap();
    assert!(rep.forgotten.is_empty());
    assert!(rep.deleted_packs > 0, "{rep:?}");
    let v = verify(&repo, true, Default::default()).unwrap();
    assert!(v.ok, "{v:?}");
}

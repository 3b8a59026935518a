//! Damaged repositories: a flipped byte in a pack, a truncated pack, a missing pack, a
//! missing or garbled index, a garbled snapshot. `verify` must name the damaged object and
//! exactly the affected backups; unaffected backups must still restore.

mod support;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use hlstore_backup::backend::Backend;
use hlstore_backup::pack::pack_key;
use hlstore_backup::verify::Severity;
use hlstore_backup::{
    backup, restore, verify, BackupOptions, FileSource, Repository, RestoreOptions, RestoreTarget, Snapshot,
};
use support::*;

struct Fixture {
    _t: tempfile::TempDir,
    dir: PathBuf,
    b: Arc<dyn Backend>,
    repo: Repository,
    a: (Snapshot, Vec<u8>),
    c: (Snapshot, Vec<u8>),
}

fn fixture() -> Fixture {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("repo");
    let (b, repo) = fs_repo(&dir);
    let mut snaps = Vec::new();
    for seed in [11u64, 12] {
        let img = mixed_image(4 << 20, seed);
        let p = t.path().join(format!("img{seed}"));
        write(&p, &img);
        let s = backup(&repo, &FileSource::open(&p).unwrap(), BackupOptions::default()).unwrap();
        snaps.push((s, img));
    }
    let c = snaps.pop().unwrap();
    let a = snaps.pop().unwrap();
    Fixture { dir, _t: t, b, repo, a, c }
}

/// A pack holding chunks of `only` and none of `other`, with one of its chunk offsets.
fn pack_of(repo: &Repository, only: &Snapshot, other: &Snapshot) -> (String, u32) {
    let idx = repo.load_index().unwrap().index;
    let theirs: HashSet<_> = other.chunks.iter().map(|c| c.id).collect();
    let mut shared = HashSet::new();
    for c in &other.chunks {
        shared.insert(idx.pack_id(idx.get(&c.id).unwrap()).to_string());
    }
    for c in &only.chunks {
        let loc = idx.get(&c.id).unwrap();
        let pid = idx.pack_id(loc).to_string();
        if !theirs.contains(&c.id) && !shared.contains(&pid) {
            return (pid, loc.offset);
        }
    }
    panic!("no pack exclusive to one backup");
}

fn fs_path(dir: &Path, pack: &str) -> PathBuf {
    dir.join(pack_key(pack))
}

fn restores_ok(f: &Fixture, s: &(Snapshot, Vec<u8>)) {
    let out = f.dir.parent().unwrap().join(format!("out-{}", &s.0.meta.id[..8]));
    let target = RestoreTarget::File(out.clone());
    restore(&f.repo, &s.0.meta.id, &target, RestoreOptions::default()).unwrap();
    assert_eq!(blake(&std::fs::read(&out).unwrap()), blake(&s.1));
}

fn restore_fails(f: &Fixture, s: &Snapshot) -> hlstore_backup::Error {
    let out = f.dir.parent().unwrap().join("out-bad");
    let target = RestoreTarget::File(out);
    restore(&f.repo, &s.meta.id, &target, RestoreOptions::default()).unwrap_err()
}

#[test]
fn healthy_repository_verifies_clean() {
    let f = fixture();
    let r = verify(&f.repo, true, Default::default()).unwrap();
    assert!(r.ok && r.problems.is_empty() && r.affected.is_empty(), "{r:?}");
    assert_eq!(r.snapshots, 2);
    assert_eq!(r.packs_read, r.packs);
}

#[test]
fn flipped_byte_in_pack_is_found_by_read_data() {
    let f = fixture();
    let (pack, off) = pack_of(&f.repo, &f.a.0, &f.c.0);
    let p = fs_path(&f.dir, &pack);
    let mut bytes = std::fs::read(&p).unwrap();
    bytes[off as usize + 40] ^= 0x01;
    std::fs::write(&p, &bytes).unwrap();

    let r = verify(&f.repo, true, Default::default()).unwrap();
    assert!(!r.ok);
    let errs: Vec<_> = r.problems.iter().filter(|p| p.severity == Severity::Error).collect();
    assert_eq!(errs.len(), 1, "{r:?}");
    assert_eq!(errs[0].kind, "damaged_pack");
    assert_eq!(errs[0].object, pack_key(&pack));
    assert_eq!(r.affected.len(), 1);
    assert_eq!(r.affected[0].snapshot, f.a.0.meta.id);
    assert_eq!(r.affected[0].objects, vec![pack_key(&pack)]);
    assert!(r.affected[0].bad_chunks >= 1);

    restores_ok(&f, &f.c);
    let e = restore_fails(&f, &f.a.0);
    assert!(e.to_string().contains(&pack), "{e}");
}

#[test]
fn truncated_pack_is_found_without_reading_data() {
    let f = fixture();
    let (pack, _) = pack_of(&f.repo, &f.c.0, &f.a.0);
    let p = fs_path(&f.dir, &pack);
    let len = std::fs::metadata(&p).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(&p).unwrap().set_len(len / 2).unwrap();

    let r = verify(&f.repo, false, Default::default()).unwrap();
    assert!(!r.ok);
    let kinds: Vec<_> = r.problems.iter().map(|p| (p.kind.as_str(), p.object.clone())).collect();
    assert_eq!(kinds, vec![("truncated_pack", pack_key(&pack))]);
    assert_eq!(r.affected.len(), 1);
    assert_eq!(r.affected[0].snapshot, f.c.0.meta.id);
    restores_ok(&f, &f.a);
    restore_fails(&f, &f.c.0);
}

#[test]
fn missing_pack_is_reported_with_affected_backups() {
    let f = fixture();
    let (pack, _) = pack_of(&f.repo, &f.a.0, &f.c.0);
    std::fs::remove_file(fs_path(&f.dir, &pack)).unwrap();
    let r = verify(&f.repo, false, Default::default()).unwrap();
    assert!(!r.ok);
    assert_eq!(r.problems.len(), 1, "{r:?}");
    assert_eq!(r.problems[0].kind, "missing_pack");
    assert_eq!(r.problems[0].object, pack_key(&pack));
    let affected: Vec<_> = r.affected.iter().map(|a| a.snapshot.clone()).collect();
    assert_eq!(affected, vec![f.a.0.meta.id.clone()]);
    restores_ok(&f, &f.c);
    restore_fails(&f, &f.a.0);
}

#[test]
fn missing_index_is_reported_and_rebuilt_from_pack_trailers() {
    let f = fixture();
    let files = f.b.list("index/").unwrap();
    assert!(!files.is_empty());
    let packs = f.b.list("data/").unwrap().len();
    for o in &files {
        f.b.delete(&o.key).unwrap();
    }
    let r = verify(&f.repo, true, Default::default()).unwrap();
    assert!(r.ok, "no data is lost: {r:?}");
    assert!(r.affected.is_empty());
    let unindexed: Vec<_> = r.problems.iter().filter(|p| p.kind == "unindexed_pack").collect();
    assert_eq!(unindexed.len(), packs);
    assert!(unindexed.iter().all(|p| p.severity == Severity::Warning));
    restores_ok(&f, &f.a);
    restores_ok(&f, &f.c);
}

#[test]
fn garbled_index_and_snapshot_are_errors_naming_the_object() {
    let f = fixture();
    let idx = f.b.list("index/").unwrap()[0].key.clone();
    f.b.put(&idx, b"HLIX garbage garbage garbage").unwrap();
    let snap_key = format!("snapshots/{}", f.c.0.meta.id);
    let mut s = f.b.get(&snap_key).unwrap();
    let n = s.len();
    s[n - 3] ^= 0xff;
    f.b.put(&snap_key, &s).unwrap();
    let r = verify(&f.repo, false, Default::default()).unwrap();
    assert!(!r.ok);
    let objs: HashSet<_> = r
        .problems
        .iter()
        .filter(|p| p.severity == Severity::Error)
        .map(|p| (p.kind.clone(), p.object.clone()))
        .collect();
    assert!(objs.contains(&("bad_index".to_string(), idx)), "{r:?}");
    assert!(objs.contains(&("bad_snapshot".to_string(), snap_key)), "{r:?}");
    // The packs that index described are recovered from their trailers: A still restores.
    restores_ok(&f, &f.a);
}

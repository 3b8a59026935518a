//! Backup/restore round trips on the filesystem backend: byte-identical restores, sparse
//! output, dedup of unchanged and slightly changed sources, CDC, wrong passwords, and
//! resuming interrupted backups and restores.

mod support;

use std::os::unix::fs::MetadataExt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use hlstore_backup::backend::{Backend, FsBackend, ObjectInfo};
use hlstore_backup::{
    backup, restore, BackupOptions, ChunkerConfig, Error, FileSource, RepoConfig, Repository, RestoreOptions,
    RestoreTarget,
};
use support::*;

fn repo_bytes(b: &dyn Backend, prefix: &str) -> u64 {
    b.list(prefix).unwrap().iter().map(|o| o.size).sum()
}

fn opts() -> BackupOptions {
    BackupOptions::default()
}

#[test]
fn mixed_image_round_trips_byte_identical_and_sparse() {
    let t = tempfile::tempdir().unwrap();
    let (_b, repo) = fs_repo(&t.path().join("repo"));
    let img = mixed_image(6 << 20, 1);
    let src = t.path().join("img");
    write(&src, &img);
    let snap = backup(&repo, &FileSource::open(&src).unwrap(), opts()).unwrap();
    assert_eq!(snap.meta.size, img.len() as u64);
    assert!(snap.meta.stats.zero_chunks > 0, "zero runs are detected");
    assert!(snap.meta.stats.new_chunks < snap.meta.stats.chunks, "repeats dedup");

    let out = t.path().join("out");
    let target = RestoreTarget::File(out.clone());
    let st = restore(&repo, &snap.meta.id[..8], &target, RestoreOptions::default()).unwrap();
    let back = std::fs::read(&out).unwrap();
    assert_eq!(back.len(), img.len());
    assert_eq!(blake(&back), blake(&img));
    assert!(st.packs_fetched > 1);
    let allocated = std::fs::metadata(&out).unwrap().blocks() * 512;
    assert!(allocated < img.len() as u64 * 9 / 10, "zeros stay holes: {allocated}");
    assert!(!t.path().join("out.hlstore-restore").exists(), "state file removed");
}

#[test]
fn unchanged_source_stores_nothing_and_small_changes_store_little() {
    let t = tempfile::tempdir().unwrap();
    let (b, repo) = fs_repo(&t.path().join("repo"));
    let mut img = mixed_image(8 << 20, 2);
    let src = t.path().join("img");
    write(&src, &img);
    let s1 = backup(&repo, &FileSource::open(&src).unwrap(), opts()).unwrap();
    let data1 = repo_bytes(b.as_ref(), "data/");

    let s2 = backup(&repo, &FileSource::open(&src).unwrap(), opts()).unwrap();
    assert_eq!(s2.meta.stats.new_chunks, 0);
    assert_eq!(s2.meta.parent.as_deref(), Some(s1.meta.id.as_str()));
    assert_eq!(repo_bytes(b.as_ref(), "data/"), data1, "no new pack");

    // Scattered 64 KiB runs of random (incompressible) data.
    let runs = 2;
    scatter_changes(&mut img, runs, 64 * 1024, 3);
    write(&src, &img);
    let s3 = backup(&repo, &FileSource::open(&src).unwrap(), opts()).unwrap();
    let grown = repo_bytes(b.as_ref(), "data/") - data1;
    let changed = (runs * 64 * 1024) as u64;
    assert!(s3.meta.stats.new_chunks > 0);
    assert!(grown <= 3 * changed, "grew {grown} for {changed} changed");
    let out = t.path().join("out");
    let target = RestoreTarget::File(out.clone());
    restore(&repo, &s3.meta.id, &target, RestoreOptions::default()).unwrap();
    assert_eq!(blake(&std::fs::read(&out).unwrap()), blake(&img));
    // The first backup still restores to the old content.
    let out1 = t.path().join("out1");
    let target = RestoreTarget::File(out1.clone());
    restore(&repo, &s1.meta.id, &target, RestoreOptions::default()).unwrap();
    assert_ne!(blake(&std::fs::read(&out1).unwrap()), blake(&img));
}

#[test]
fn dedup_spans_sources() {
    let t = tempfile::tempdir().unwrap();
    let (_b, repo) = fs_repo(&t.path().join("repo"));
    let img = mixed_image(3 << 20, 4);
    let (a, c) = (t.path().join("a"), t.path().join("c"));
    write(&a, &img);
    write(&c, &img);
    backup(&repo, &FileSource::open(&a).unwrap(), opts()).unwrap();
    let s = backup(&repo, &FileSource::open(&c).unwrap(), opts()).unwrap();
    assert!(s.meta.parent.is_none(), "different source, no parent");
    assert_eq!(s.meta.stats.new_chunks, 0);
}

#[test]
fn content_defined_chunking_round_trips_and_survives_insertions() {
    let t = tempfile::tempdir().unwrap();
    let b: Arc<dyn Backend> = Arc::new(FsBackend::new(t.path().join("repo")));
    let cfg = RepoConfig {
        chunker: ChunkerConfig::Cdc { min: 4096, avg: 16384, max: 65536 },
        file_chunker: None,
        pack_size: 1 << 20,
        ..RepoConfig::default()
    };
    let repo = init_repo(b, cfg);
    let img = mixed_image(4 << 20, 5);
    let src = t.path().join("img");
    write(&src, &img);
    let s1 = backup(&repo, &FileSource::open(&src).unwrap(), opts()).unwrap();
    let mut shifted = img[..1000].to_vec();
    shifted.extend_from_slice(b"inserted bytes shift everything after them");
    shifted.extend_from_slice(&img[1000..]);
    write(&src, &shifted);
    let s2 = backup(&repo, &FileSource::open(&src).unwrap(), opts()).unwrap();
    assert!(
        s2.meta.stats.new_bytes * 10 < s1.meta.stats.new_bytes,
        "insertion re-stored {} of {}",
        s2.meta.stats.new_bytes,
        s1.meta.stats.new_bytes
    );
    let out = t.path().join("out");
    let target = RestoreTarget::File(out.clone());
    restore(&repo, &s2.meta.id, &target, RestoreOptions::default()).unwrap();
    assert_eq!(blake(&std::fs::read(&out).unwrap()), blake(&shifted));
}

#[test]
fn wrong_password_is_a_clear_error() {
    let t = tempfile::tempdir().unwrap();
    let (b, _repo) = fs_repo(t.path());
    let e = Repository::open(b.clone(), b"not the password").unwrap_err();
    assert!(matches!(e, Error::WrongPassword), "{e:?}");
    assert!(e.to_string().contains("wrong repository password"));
    let empty: Arc<dyn Backend> = Arc::new(FsBackend::new(t.path().join("empty")));
    assert!(matches!(Repository::open(empty, PASSWORD), Err(Error::NoRepository(_))));
    assert!(matches!(Repository::init(b, PASSWORD, test_config(), test_kdf()), Err(Error::RepositoryExists(_))));
}

/// Fails writes and ranged reads of keys with `prefix` after `allow` successes.
struct Flaky {
    inner: FsBackend,
    prefix: &'static str,
    allow: usize,
    count: AtomicUsize,
}

impl Flaky {
    fn backend(dir: &std::path::Path, allow: usize) -> Arc<dyn Backend> {
        Arc::new(Flaky { inner: FsBackend::new(dir), prefix: "data/", allow, count: AtomicUsize::new(0) })
    }

    fn hit(&self, key: &str) -> hlstore_backup::Result<()> {
        if key.starts_with(self.prefix) && self.count.fetch_add(1, Ordering::SeqCst) >= self.allow {
            return Err(Error::Backend { op: "test", object: key.into(), detail: "injected failure".into() });
        }
        Ok(())
    }
}

impl Backend for Flaky {
    fn location(&self) -> String {
        self.inner.location()
    }
    fn put(&self, key: &str, data: &[u8]) -> hlstore_backup::Result<()> {
        self.hit(key)?;
        self.inner.put(key, data)
    }
    fn get(&self, key: &str) -> hlstore_backup::Result<Vec<u8>> {
        self.inner.get(key)
    }
    fn get_range(&self, key: &str, o: u64, l: u64) -> hlstore_backup::Result<Vec<u8>> {
        self.hit(key)?;
        self.inner.get_range(key, o, l)
    }
    fn list(&self, prefix: &str) -> hlstore_backup::Result<Vec<ObjectInfo>> {
        self.inner.list(prefix)
    }
    fn delete(&self, key: &str) -> hlstore_backup::Result<()> {
        self.inner.delete(key)
    }
}

fn half_random_image(seed: u64) -> Vec<u8> {
    let mut img = mixed_image(2 << 20, seed);
    img.extend_from_slice(&random_image(8 << 20, seed));
    img
}

#[test]
fn interrupted_backup_leaves_valid_repo_and_next_run_reuses_uploads() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("repo");
    let (b, _) = fs_repo(&dir);
    let img = half_random_image(6);
    let src = t.path().join("img");
    write(&src, &img);
    let repo = Repository::open(Flaky::backend(&dir, 3), PASSWORD).unwrap();
    let one = BackupOptions { uploaders: 1, ..Default::default() };
    assert!(backup(&repo, &FileSource::open(&src).unwrap(), one).is_err());
    assert!(b.list("snapshots/").unwrap().is_empty());
    assert!(repo_bytes(b.as_ref(), "data/") > 0);

    let repo = Repository::open(b.clone(), PASSWORD).unwrap();
    let rep = hlstore_backup::verify(&repo, true, Default::default()).unwrap();
    assert!(rep.ok, "{rep:?}");
    let s = backup(&repo, &FileSource::open(&src).unwrap(), opts()).unwrap();
    let resumed = s.meta.stats.new_bytes;
    let all_new: u64 = {
        let t2 = tempfile::tempdir().unwrap();
        let (_b2, r2) = fs_repo(t2.path());
        let s = backup(&r2, &FileSource::open(&src).unwrap(), opts()).unwrap();
        s.meta.stats.new_bytes
    };
    assert!(resumed < all_new, "second run stored {resumed} of {all_new}");
    let out = t.path().join("out");
    let target = RestoreTarget::File(out.clone());
    restore(&repo, &s.meta.id, &target, RestoreOptions::default()).unwrap();
    assert_eq!(blake(&std::fs::read(&out).unwrap()), blake(&img));
}

#[test]
fn interrupted_restore_resumes() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("repo");
    let (b, repo) = fs_repo(&dir);
    let img = half_random_image(7);
    let src = t.path().join("img");
    write(&src, &img);
    let s = backup(&repo, &FileSource::open(&src).unwrap(), opts()).unwrap();
    drop(repo);
    let frepo = Repository::open(Flaky::backend(&dir, 3), PASSWORD).unwrap();
    let out = t.path().join("out");
    let target = RestoreTarget::File(out.clone());
    let one = RestoreOptions { workers: 1, ..Default::default() };
    assert!(restore(&frepo, &s.meta.id, &target, one.clone()).is_err());
    assert!(t.path().join("out.hlstore-restore").exists());
    let repo = Repository::open(b, PASSWORD).unwrap();
    let st = restore(&repo, &s.meta.id, &target, one).unwrap();
    assert!(st.packs_resumed >= 1, "{st:?}");
    assert_eq!(blake(&std::fs::read(&out).unwrap()), blake(&img));
}

#[test]
fn restore_to_device_overwrites_old_contents_including_zero_regions() {
    let t = tempfile::tempdir().unwrap();
    let (_b, repo) = fs_repo(&t.path().join("repo"));
    let img = mixed_image(3 << 20, 8);
    let src = t.path().join("img");
    write(&src, &img);
    let s = backup(&repo, &FileSource::open(&src).unwrap(), opts()).unwrap();
    let dev = t.path().join("dev");
    write(&dev, &vec![0xAAu8; 4 << 20]);
    let target = RestoreTarget::Device(dev.clone());
    restore(&repo, &s.meta.id, &target, RestoreOptions::default()).unwrap();
    let back = std::fs::read(&dev).unwrap();
    assert_eq!(blake(&back[..img.len()]), blake(&img));
    // Too small a device is refused before anything is written.
    let small = t.path().join("small");
    write(&small, &[1u8; 1000]);
    let target = RestoreTarget::Device(small.clone());
    let e = restore(&repo, &s.meta.id, &target, RestoreOptions::default()).unwrap_err();
    assert!(e.to_string().contains("needs"), "{e}");
    assert_eq!(std::fs::read(&small).unwrap(), vec![1u8; 1000]);
}

/// A sparse file is read only where it holds data (its big holes are zeros and are not
/// read), with either chunker; a region that held data in the parent backup and is a hole
/// now restores as zeros (a skipped hole is never taken over from the parent).
#[test]
fn sparse_files_are_read_only_where_they_hold_data() {
    use std::os::unix::fs::FileExt;
    const MIB: u64 = 1 << 20;
    let cdc = RepoConfig {
        chunker: ChunkerConfig::Cdc { min: 4096, avg: 16384, max: 65536 },
        file_chunker: None,
        pack_size: 1 << 20,
        ..RepoConfig::default()
    };
    for (name, cfg) in [("fixed", test_config()), ("cdc", cdc)] {
        let t = tempfile::tempdir().unwrap();
        let repo = init_repo(Arc::new(FsBackend::new(t.path().join("repo"))), cfg);
        let src = t.path().join("img");
        let data = mixed_image(2 << 20, 9);
        let f = std::fs::File::create(&src).unwrap();
        f.set_len(32 * MIB).unwrap();
        f.write_all_at(&data, 0).unwrap();
        f.write_all_at(&data, 20 * MIB).unwrap();
        drop(f);
        let s1 = backup(&repo, &FileSource::open(&src).unwrap(), opts()).unwrap();
        if s1.meta.stats.bytes_read == 32 * MIB {
            eprintln!("{name}: this filesystem reports no holes; nothing to check");
            return;
        }
        assert!(s1.meta.stats.bytes_read <= 6 * MIB, "{name}: read {} of a sparse 32 MiB", s1.meta.stats.bytes_read);
        let out = t.path().join("out");
        restore(&repo, &s1.meta.id, &RestoreTarget::File(out.clone()), RestoreOptions::default()).unwrap();
        assert_eq!(blake(&std::fs::read(&out).unwrap()), blake(&std::fs::read(&src).unwrap()), "{name}: first");

        // The second copy becomes a hole again; a new copy lands elsewhere.
        let f = std::fs::OpenOptions::new().write(true).open(&src).unwrap();
        // SAFETY: fallocate on a file this test owns.
        let r = unsafe {
            libc::fallocate(
                std::os::fd::AsRawFd::as_raw_fd(&f),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                20 * MIB as libc::off_t,
                data.len() as libc::off_t,
            )
        };
        assert_eq!(r, 0, "punch a hole");
        f.write_all_at(&data[..MIB as usize], 10 * MIB).unwrap();
        drop(f);
        let s2 = backup(&repo, &FileSource::open(&src).unwrap(), opts()).unwrap();
        assert_eq!(s2.meta.parent.as_deref(), Some(s1.meta.id.as_str()));
        std::fs::remove_file(&out).unwrap();
        restore(&repo, &s2.meta.id, &RestoreTarget::File(out.clone()), RestoreOptions::default()).unwrap();
        let back = std::fs::read(&out).unwrap();
        assert!(back[20 * MIB as usize..22 * MIB as usize].iter().all(|&b| b == 0), "{name}: the punched region");
        assert_eq!(blake(&back), blake(&std::fs::read(&src).unwrap()), "{name}: second");
    }
}

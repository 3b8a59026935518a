//! Chunking per source kind: files (no changed-block information) are cut by content, so
//! insertions shift nothing; sources with changed-block tracking keep fixed chunks.
//! Repositories of format version 1 still open and back up.

mod support;

use std::sync::Arc;

use hlstore_backup::backend::Backend;
use hlstore_backup::repo::DEFAULT_FILE_CHUNKER;
use hlstore_backup::{
    backup, restore, BackupOptions, ChunkerConfig, FileSource, FsBackend, RepoConfig, Repository, RestoreOptions,
    RestoreTarget, Source,
};
use support::*;

/// New bytes stored by backing up `b` after `a`, under `cfg`.
fn second_backup_new_bytes(dir: &std::path::Path, cfg: RepoConfig, a: &[u8], b: &[u8]) -> (u64, u64) {
    let backend: Arc<dyn Backend> = Arc::new(FsBackend::new(dir.join("repo")));
    let repo = init_repo(backend, cfg);
    let src = dir.join("img");
    write(&src, a);
    let s1 = backup(&repo, &FileSource::open(&src).unwrap(), BackupOptions::default()).unwrap();
    write(&src, b);
    let s2 = backup(&repo, &FileSource::open(&src).unwrap(), BackupOptions::default()).unwrap();
    let out = dir.join("out");
    restore(&repo, &s2.meta.id, &RestoreTarget::File(out.clone()), RestoreOptions::default()).unwrap();
    assert_eq!(blake(&std::fs::read(&out).unwrap()), blake(b));
    (s1.meta.stats.new_bytes, s2.meta.stats.new_bytes)
}

#[test]
fn insertions_cost_little_with_the_default_chunker_and_everything_with_fixed_chunks() {
    let a = random_image(8 << 20, 1);
    // Three small insertions: with fixed chunks, everything after the first one shifts.
    let mut b = Vec::with_capacity(a.len() + 300);
    let mut prev = 0;
    for at in [2 << 20, 4 << 20, 6 << 20] {
        b.extend_from_slice(&a[prev..at]);
        b.extend_from_slice(&[7u8; 100]);
        prev = at;
    }
    b.extend_from_slice(&a[prev..]);

    let t = tempfile::tempdir().unwrap();
    let cdc_dir = t.path().join("cdc");
    let fixed_dir = t.path().join("fixed");
    std::fs::create_dir_all(&cdc_dir).unwrap();
    std::fs::create_dir_all(&fixed_dir).unwrap();
    // Random data does not compress: level 1 keeps the test quick, and changes nothing here.
    let cdc = RepoConfig { pack_size: 4 << 20, zstd_level: 1, ..RepoConfig::default() };
    let fixed = RepoConfig { file_chunker: None, ..cdc.clone() };
    let (c1, c2) = second_backup_new_bytes(&cdc_dir, cdc, &a, &b);
    let (f1, f2) = second_backup_new_bytes(&fixed_dir, fixed, &a, &b);
    assert_eq!(c1, a.len() as u64);
    assert_eq!(f1, a.len() as u64);
    // Fixed: ~6 MiB re-stored. CDC: a chunk or two around each insertion.
    let (cdc_ratio, fixed_ratio) = (c2 as f64 / a.len() as f64, f2 as f64 / a.len() as f64);
    assert!(fixed_ratio > 0.7, "fixed re-stored {f2}");
    assert!(cdc_ratio < 0.5 && cdc_ratio * 3.0 < fixed_ratio, "cdc re-stored {c2}, fixed {f2}");
}

/// A source that reports changed blocks (like a volume) must keep fixed chunks.
struct BlockSource(Vec<u8>);

impl Source for BlockSource {
    fn name(&self) -> String {
        "volume:test".into()
    }
    fn size(&self) -> u64 {
        self.0.len() as u64
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> hlstore_backup::Result<()> {
        buf.copy_from_slice(&self.0[offset as usize..offset as usize + buf.len()]);
        Ok(())
    }
    fn changed_block_tracking(&self) -> bool {
        true
    }
}

#[test]
fn volumes_keep_fixed_chunks_and_version_1_repositories_still_work() {
    let t = tempfile::tempdir().unwrap();
    let b: Arc<dyn Backend> = Arc::new(FsBackend::new(t.path().join("repo")));
    let repo = init_repo(b.clone(), RepoConfig::default());
    let s = backup(&repo, &BlockSource(mixed_image(1 << 20, 3)), BackupOptions::default()).unwrap();
    assert_eq!(s.meta.chunker, ChunkerConfig::default());
    let src = t.path().join("img");
    write(&src, &mixed_image(1 << 20, 4));
    let s = backup(&repo, &FileSource::open(&src).unwrap(), BackupOptions::default()).unwrap();
    assert_eq!(s.meta.chunker, DEFAULT_FILE_CHUNKER);

    // A version 1 repository (one chunker, no `file_chunker`) opens, backs up, restores.
    let b1: Arc<dyn Backend> = Arc::new(FsBackend::new(t.path().join("repo1")));
    let v1 = RepoConfig { version: 1, file_chunker: None, zstd_level: 1, ..RepoConfig::default() };
    drop(init_repo(b1.clone(), v1));
    let raw = String::from_utf8(b1.get("config").unwrap()).unwrap();
    assert!(raw.contains("\"version\": 1") && !raw.contains("file_chunker"), "{raw}");
    let repo1 = Repository::open(b1.clone(), PASSWORD).unwrap();
    let s = backup(&repo1, &FileSource::open(&src).unwrap(), BackupOptions::default()).unwrap();
    assert_eq!(s.meta.chunker, ChunkerConfig::default());
    // A newer format is refused with a clear error, not misread.
    b1.put("config", raw.replace("\"version\": 1", "\"version\": 7").as_bytes()).unwrap();
    let e = Repository::open(b1, PASSWORD).unwrap_err();
    assert!(e.to_string().contains("unsupported repository format version 7"), "{e}");
}

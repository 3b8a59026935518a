//! Random-access reads of backup images (what `hlstore backup mount` serves): any offset
//! and length reads the bytes a restore writes — content-defined chunks, holes, partial
//! chunk references of incremental volume backups — and reads keep working after a prune
//! repacked and deleted the packs they were using; damage is an error, never wrong bytes.
//! The FUSE mount itself is tested through the binary (`tests/backup_mount.rs`).

#[path = "fake/agent.rs"]
mod fake;
mod support;

use std::sync::Arc;

use fake::FakeAgent;
use hlstore_backup::mount::{ChunkSource, ImageReader};
use hlstore_backup::volume::{backup_volume, VolumeBackupOptions};
use hlstore_backup::{
    backup, prune, BackupOptions, ChunkerConfig, FileSource, FsBackend, KeepPolicy, PruneOptions, RepoConfig,
    Repository,
};
use rand::{Rng, SeedableRng};
use support::*;

fn reader(repo: &Arc<Repository>, id: &str, cache: usize) -> ImageReader {
    let snap = Arc::new(repo.load_snapshot(id).unwrap());
    ImageReader::new(snap, Arc::new(ChunkSource::new(repo.clone(), cache).unwrap()))
}

/// Random reads, then the whole image in 128 KiB reads (as the kernel sends them).
fn reads_match(r: &ImageReader, want: &[u8], seed: u64) {
    assert_eq!(r.size(), want.len() as u64);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    for _ in 0..60 {
        let off = rng.gen_range(0..want.len() + 100);
        let len = rng.gen_range(0..1 << 20);
        let got = r.read(off as u64, len).unwrap();
        let from = off.min(want.len());
        let to = off.saturating_add(len).min(want.len());
        assert!(got == want[from..to], "read of {len} at {off}");
    }
    let mut all = Vec::with_capacity(want.len());
    while all.len() < want.len() {
        all.extend(r.read(all.len() as u64, 128 << 10).unwrap());
    }
    assert_eq!(blake(&all), blake(want));
}

#[test]
fn images_read_at_any_offset_match_the_source() {
    let t = tempfile::tempdir().unwrap();
    let b: Arc<dyn hlstore_backup::Backend> = Arc::new(FsBackend::new(t.path().join("repo")));
    // The defaults: content-defined chunks for files.
    let repo = Arc::new(init_repo(b, RepoConfig { pack_size: 1 << 20, ..RepoConfig::default() }));
    // Mixed content with all-zero runs (holes in the backup).
    let img = mixed_image(6 << 20, 3);
    let src = t.path().join("img");
    write(&src, &img);
    let s = backup(&repo, &FileSource::open(&src).unwrap(), BackupOptions::default()).unwrap();
    assert!(matches!(s.meta.chunker, ChunkerConfig::Cdc { .. }));
    // A cache smaller than one chunk: every read decodes again.
    reads_match(&reader(&repo, &s.meta.id, 1), &img, 1);
    reads_match(&reader(&repo, &s.meta.id, 64 << 20), &img, 2);
}

#[test]
fn incremental_volume_backups_with_partial_chunks_read_back() {
    let t = tempfile::tempdir().unwrap();
    let b: Arc<dyn hlstore_backup::Backend> = Arc::new(FsBackend::new(t.path().join("repo")));
    let cfg = RepoConfig { chunker: ChunkerConfig::Fixed { size: 64 << 10 }, pack_size: 1 << 20, ..test_config() };
    let repo = Arc::new(init_repo(b, cfg));
    let a = FakeAgent::new();
    a.volume_with("pg", 8 << 20, &mixed_image(6 << 20, 4));
    backup_volume(&repo, &a, "pg", VolumeBackupOptions::default()).unwrap();
    // 4 KiB changes inside 64 KiB chunks: the rest of each chunk stays a trimmed reference.
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    for _ in 0..40 {
        let block = rng.gen_range(0..(8 << 20) / 4096) as u64;
        a.write("pg", block * 4096, &[rng.gen(); 4096]);
    }
    let r = backup_volume(&repo, &a, "pg", VolumeBackupOptions::default()).unwrap();
    assert!(r.base.is_some());
    let snap = repo.load_snapshot(&r.backup.meta.id).unwrap();
    assert!(snap.chunks.iter().any(|c| c.skip > 0), "partial references present");
    let want = a.snapshot_contents("pg", &r.volume_snapshot);
    reads_match(&reader(&repo, &r.backup.meta.id, 8 << 20), &want, 6);
}

#[test]
fn reads_survive_a_prune_that_repacked_and_deleted_their_packs() {
    let t = tempfile::tempdir().unwrap();
    let (_b, repo) = fs_repo(&t.path().join("repo"));
    let repo = Arc::new(repo);
    // Y keeps every other 64 KiB of X: once X is forgotten, every pack of X is half dead.
    let x = random_image(4 << 20, 7);
    let mut y = x.clone();
    let fresh = random_image(4 << 20, 8);
    for k in (0..y.len()).step_by(128 << 10) {
        y[k..k + (64 << 10)].copy_from_slice(&fresh[k..k + (64 << 10)]);
    }
    let (xp, yp) = (t.path().join("x"), t.path().join("y"));
    write(&xp, &x);
    write(&yp, &y);
    let sx = backup(&repo, &FileSource::open(&xp).unwrap(), BackupOptions::default()).unwrap();
    let sy = backup(&repo, &FileSource::open(&yp).unwrap(), BackupOptions::default()).unwrap();
    let r = reader(&repo, &sy.meta.id, 1); // no cache: every read goes to the packs
    reads_match(&r, &y, 9);

    // X goes: prune copies Y's chunks out of X's packs and deletes them (no grace period,
    // no backup running).
    repo.forget(&sx.meta.id).unwrap();
    let opts = PruneOptions { grace_secs: 0, ..PruneOptions::new(KeepPolicy { last: 5, ..Default::default() }) };
    let rep = prune(&repo, opts).unwrap();
    assert!(rep.repacked_packs > 0 && rep.deleted_packs >= rep.repacked_packs, "{rep:?}");
    std::thread::sleep(std::time::Duration::from_millis(1100)); // the reload interval
    reads_match(&r, &y, 10);
}

#[test]
fn a_damaged_blob_is_an_error_naming_the_pack() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("repo");
    let (_b, repo) = fs_repo(&dir);
    let repo = Arc::new(repo);
    let img = random_image(2 << 20, 11);
    let src = t.path().join("img");
    write(&src, &img);
    let s = backup(&repo, &FileSource::open(&src).unwrap(), BackupOptions::default()).unwrap();
    let idx = repo.load_index().unwrap().index;
    let c = s.chunks[1];
    let loc = *idx.get(&c.id).unwrap();
    let pack = idx.pack_id(&loc).to_string();
    let path = dir.join("data").join(&pack[..2]).join(&pack);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[(loc.offset + loc.length / 2) as usize] ^= 1;
    std::fs::write(&path, bytes).unwrap();
    let r = reader(&repo, &s.meta.id, 64 << 20);
    assert_eq!(r.read(0, 100).unwrap(), img[..100], "other chunks still read");
    let e = r.read(c.offset, 10).unwrap_err();
    assert!(e.to_string().contains(&format!("corrupt object pack {pack}")), "{e}");
}

//! Times the engine alone on one file: a full backup into a fresh filesystem repository,
//! then a restore, with MiB/s overall and per core. For profiling (`perf record`) without
//! the CLI, the node agent or S3.
//!
//! Usage: cargo run --release -p hlstore-backup --no-default-features --example backup_speed -- FILE WORKDIR [ZSTD_LEVEL]

use std::sync::Arc;
use std::time::Instant;

use hlstore_backup::{
    backup, restore, BackupOptions, FileSource, FsBackend, KdfParams, RepoConfig, Repository, RestoreOptions,
    RestoreTarget,
};

fn main() {
    let mut args = std::env::args().skip(1);
    let (Some(file), Some(work)) = (args.next(), args.next()) else {
        eprintln!("usage: backup_speed FILE WORKDIR [ZSTD_LEVEL]");
        std::process::exit(2);
    };
    let level = args.next().map(|l| l.parse::<i32>().expect("zstd level"));
    let work = std::path::PathBuf::from(work);
    let _ = std::fs::remove_dir_all(work.join("repo"));
    let backend = Arc::new(FsBackend::new(work.join("repo")));
    let mut config = RepoConfig::default();
    if let Some(l) = level {
        config.zstd_level = l;
    }
    let kdf = KdfParams { m_cost_kib: 64, t_cost: 1, p_cost: 1 };
    let repo = Repository::init(backend, b"speed", config, kdf).expect("init");
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    let src = FileSource::open(std::path::Path::new(&file)).expect("open source");
    let size = hlstore_backup::Source::size(&src) as f64 / 1048576.0;

    let t = Instant::now();
    let s = backup(&repo, &src, BackupOptions::default()).expect("backup");
    let b = t.elapsed().as_secs_f64();
    let stored = s.meta.stats.stored_bytes as f64 / 1048576.0;
    println!(
        "backup: {size:.0} MiB in {b:.2} s, {:.0} MiB/s ({:.0} per core), {stored:.1} MiB stored",
        size / b,
        size / b / cores
    );
    let out = work.join("restored.img");
    let _ = std::fs::remove_file(&out);
    let t = Instant::now();
    restore(&repo, &s.meta.id, &RestoreTarget::File(out.clone()), RestoreOptions::default()).expect("restore");
    let r = t.elapsed().as_secs_f64();
    println!("restore: {size:.0} MiB in {r:.2} s, {:.0} MiB/s ({:.0} per core)", size / r, size / r / cores);
    let _ = std::fs::remove_file(&out);
}

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

/// User + system CPU seconds of this process so far (all threads).
fn cpu() -> f64 {
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage fills the struct it is given.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) };
    let t = |v: libc::timeval| v.tv_sec as f64 + v.tv_usec as f64 / 1e6;
    t(u.ru_utime) + t(u.ru_stime)
}

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

    let (t, c) = (Instant::now(), cpu());
    let s = backup(&repo, &src, BackupOptions::default()).expect("backup");
    let (b, bc) = (t.elapsed().as_secs_f64(), cpu() - c);
    let stored = s.meta.stats.stored_bytes as f64 / 1048576.0;
    println!(
        "backup: {size:.0} MiB in {b:.2} s, {:.0} MiB/s ({:.0} per core), {stored:.1} MiB stored; CPU {bc:.2} s ({:.0} MiB per CPU second)",
        size / b,
        size / b / cores,
        size / bc
    );
    let out = work.join("restored.img");
    let _ = std::fs::remove_file(&out);
    let (t, c) = (Instant::now(), cpu());
    restore(&repo, &s.meta.id, &RestoreTarget::File(out.clone()), RestoreOptions::default()).expect("restore");
    let (r, rc) = (t.elapsed().as_secs_f64(), cpu() - c);
    println!(
        "restore: {size:.0} MiB in {r:.2} s, {:.0} MiB/s ({:.0} per core); CPU {rc:.2} s ({:.0} MiB per CPU second)",
        size / r,
        size / r / cores,
        size / rc
    );
    let _ = std::fs::remove_file(&out);
}

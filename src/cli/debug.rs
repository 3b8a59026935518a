//! `hlstore debug ...`: hidden tools for crash tests and diagnostics.

use std::io::Write;
use std::path::PathBuf;

use clap::Subcommand;
use hlstore_core::{Epoch, Offset, Seq};
use hlstore_store::{DiskStore, ReplicaStore, VolumeRecord, BLOCK_SIZE};

/// Hidden diagnostic subcommands.
#[derive(Debug, Subcommand)]
pub enum DebugCommand {
    /// Write self-describing blocks into a store forever, flushing every N writes and
    /// printing `flushed SEQ` after each flush (used by the kill -9 test).
    StoreWriteLoop {
        #[arg(long)]
        data_dir: PathBuf,
        #[arg(long, default_value = "crash")]
        volume: String,
        /// Volume size in 4 KiB blocks.
        #[arg(long, default_value_t = 1024)]
        blocks: u64,
        #[arg(long, default_value_t = 16)]
        flush_every: u64,
        /// Blocks per write (1 = 4 KiB writes).
        #[arg(long, default_value_t = 1)]
        write_blocks: u64,
    },
    /// Times creating and then deleting COUNT snapshots of VOLUME through a node agent
    /// (one gRPC connection), writing one block between snapshots when --nbd is given.
    /// Prints one JSON line.
    SnapshotBench {
        #[arg(long, env = "HLSTORE_ENDPOINT", default_value = "http://127.0.0.1:7400")]
        endpoint: String,
        #[arg(long)]
        volume: String,
        #[arg(long, default_value_t = 1000)]
        count: u32,
    },
    /// Mount a power-loss filesystem on DIR and serve it in the foreground until it is
    /// unmounted (`umount DIR`) or this process gets SIGTERM/SIGINT.
    ///
    /// Kept in memory: every file and directory has live and durable state. fsync/fdatasync
    /// make a file's content durable, fsync of a directory its entries. A power cut (sent
    /// on the control socket, after every process writing there was killed) throws away
    /// everything not durable. Control commands, one per line, answered with one JSON line:
    /// `cut drop` (all unsynced state gone), `cut torn SEED` (a seeded random prefix of each
    /// file's and directory's unsynced ops survives, the last write maybe torn at a 512-byte
    /// sector), `stats`.
    ///
    /// Example: hlstore debug faultfs --mount /tmp/disk --control /tmp/disk.sock &
    ///          echo "cut drop" | nc -U /tmp/disk.sock
    Faultfs {
        /// Mount point (an existing, empty directory).
        #[arg(long)]
        mount: PathBuf,
        /// Unix socket for control commands (replaced if it exists).
        #[arg(long)]
        control: PathBuf,
        /// Capacity reported by statfs, e.g. 64GiB.
        #[arg(long, value_parser = super::size::parse_size, default_value = "64GiB")]
        capacity: u64,
    },
}

/// The block written by write `seq` in the crash pattern.
pub fn pattern_block(seq: u64, blocks: u64) -> u64 {
    seq.wrapping_mul(7919) % blocks
}

/// The content of a block written at `seq` (16-byte records of seq and block).
pub fn pattern_data(seq: u64, block: u64) -> Vec<u8> {
    let mut d = Vec::with_capacity(BLOCK_SIZE as usize);
    while d.len() < BLOCK_SIZE as usize {
        d.extend_from_slice(&seq.to_le_bytes());
        d.extend_from_slice(&block.to_le_bytes());
    }
    d
}

async fn snapshot_bench(endpoint: &str, volume: &str, count: u32) -> anyhow::Result<()> {
    use hlstore_proto::volume as vpb;
    let mut c = super::volume::connect(endpoint).await?;
    let start = std::time::Instant::now();
    let mut worst = std::time::Duration::ZERO;
    for i in 0..count {
        let t = std::time::Instant::now();
        let req = vpb::CreateSnapshotRequest {
            volume: volume.into(),
            name: format!("bench-{i}"),
            labels: Default::default(),
        };
        c.create_snapshot(req).await.map_err(super::volume::status_err)?;
        worst = worst.max(t.elapsed());
    }
    let create = start.elapsed();
    let listed = c.list_snapshots(vpb::ListSnapshotsRequest { volume: volume.into() }).await?.into_inner().snapshots;
    let start = std::time::Instant::now();
    for i in 0..count {
        let req = vpb::DeleteSnapshotRequest { volume: volume.into(), name: format!("bench-{i}") };
        c.delete_snapshot(req).await.map_err(super::volume::status_err)?;
    }
    let delete = start.elapsed();
    println!(
        "{}",
        serde_json::json!({
            "count": count, "listed": listed.len(),
            "create_s": create.as_secs_f64(), "create_worst_ms": worst.as_secs_f64() * 1e3,
            "delete_s": delete.as_secs_f64(),
        })
    );
    Ok(())
}

/// Serves a faultfs until it is unmounted from outside or a stop signal arrives.
fn faultfs(mount: &std::path::Path, control: &std::path::Path, capacity: u64) -> anyhow::Result<()> {
    use anyhow::Context;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = stop.clone();
    tokio::runtime::Handle::current().spawn(async move {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(e) => return tracing::warn!(error = %e, "no SIGTERM handler"),
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        flag.store(true, std::sync::atomic::Ordering::SeqCst);
    });
    let mounted = hlstore_faultfs::mount(mount, Some(control), capacity)
        .with_context(|| format!("mounting faultfs on {}", mount.display()))?;
    // Readiness line for harnesses.
    println!("mounted {} control {}", mount.display(), control.display());
    std::io::stdout().flush()?;
    while !mounted.is_finished() && !stop.load(std::sync::atomic::Ordering::SeqCst) {
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let _ = std::fs::remove_file(control);
    if mounted.is_finished() {
        return Ok(());
    }
    mounted.unmount().with_context(|| format!("unmounting {}", mount.display()))
}

pub fn run(cmd: DebugCommand) -> anyhow::Result<()> {
    match cmd {
        DebugCommand::Faultfs { mount, control, capacity } => faultfs(&mount, &control, capacity),
        DebugCommand::SnapshotBench { endpoint, volume, count } => {
            // Runs on the blocking pool: drive the async client on the main runtime.
            tokio::runtime::Handle::current().block_on(snapshot_bench(&endpoint, &volume, count))
        }
        DebugCommand::StoreWriteLoop { data_dir, volume, blocks, flush_every, write_blocks } => {
            let store = DiskStore::open(&data_dir)?;
            let mut rec = VolumeRecord::new(volume.clone(), blocks * BLOCK_SIZE);
            rec.epoch = 1;
            store.create(rec)?;
            let mut seq = store.state(&volume)?.last_seq;
            let mut out = std::io::stdout().lock();
            writeln!(out, "ready {seq}")?;
            loop {
                seq += 1;
                let first = pattern_block(seq, blocks);
                let n = write_blocks.min(blocks - first);
                let mut data = Vec::with_capacity((n * BLOCK_SIZE) as usize);
                for b in first..first + n {
                    data.extend_from_slice(&pattern_data(seq, b));
                }
                store.write(&volume, Epoch(1), Seq(seq), Offset(first * BLOCK_SIZE), &data, false)?;
                if seq % flush_every == 0 {
                    let durable = store.flush(&volume, Epoch(1))?;
                    writeln!(out, "flushed {durable}")?;
                    out.flush()?;
                }
            }
        }
    }
}

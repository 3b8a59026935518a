//! `hlstore backup ...` and `hlstore restore ...`: argument parsing and output only; the
//! engine lives in `hlstore_backup`. The engine is synchronous (its S3 backend blocks on
//! its own runtime), so every command runs it in `spawn_blocking`. Volume backups and
//! restores are in `volume_backup.rs`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context};
use clap::{ArgGroup, Args, Subcommand};
use hlstore_backup::{
    self as hb, ChunkerConfig, KdfParams, KeepPolicy, Progress, PruneOptions, RepoConfig, Repository, RestoreTarget,
};

use super::size::{format_size, parse_size};
use super::volume_backup;

/// Where the repository is and how to open it.
#[derive(Debug, Clone, Args)]
pub struct RepoArgs {
    /// Repository URL: file:///path, a plain path, or s3://bucket/prefix.
    #[arg(long, env = "HLSTORE_REPO")]
    pub repo: String,
    /// File holding the repository password (default: $HLSTORE_REPO_PASSWORD).
    #[arg(long)]
    pub password_file: Option<PathBuf>,
    /// S3 endpoint URL (default: $AWS_ENDPOINT_URL, else AWS).
    #[arg(long)]
    pub s3_endpoint: Option<String>,
    /// S3 region (default: $AWS_REGION, else us-east-1).
    #[arg(long)]
    pub s3_region: Option<String>,
}

impl RepoArgs {
    fn backend(&self) -> anyhow::Result<Arc<dyn hb::Backend>> {
        let opts =
            hb::S3Options { endpoint: self.s3_endpoint.clone(), region: self.s3_region.clone(), credentials: None };
        let b: Arc<dyn hb::Backend> = Arc::from(hb::open_url(&self.repo, &opts)?);
        Ok(b)
    }

    fn password(&self) -> anyhow::Result<Vec<u8>> {
        if let Some(p) = &self.password_file {
            let mut s = std::fs::read(p).with_context(|| format!("reading password file {}", p.display()))?;
            while s.last().is_some_and(|c| *c == b'\n' || *c == b'\r') {
                s.pop();
            }
            return Ok(s);
        }
        match std::env::var_os("HLSTORE_REPO_PASSWORD") {
            Some(p) => Ok(p.into_encoded_bytes()),
            None => Err(hb::Error::NoPassword.into()),
        }
    }

    pub(crate) fn open(&self) -> anyhow::Result<Repository> {
        let pw = self.password()?;
        Ok(Repository::open(self.backend()?, &pw)?)
    }
}

/// `hlstore backup` subcommands.
#[derive(Debug, Subcommand)]
pub enum BackupCommand {
    /// Create a new, empty repository.
    ///
    /// Volumes are cut into fixed chunks (--chunk-size) so incremental backups read only
    /// the blocks that changed; files and devices, which have no changed-block record, are
    /// cut by content (average --file-chunk-size) so an insertion does not shift every
    /// later chunk. The defaults store less than restic on a real filesystem image (see
    /// benches/README.md).
    ///
    /// Example: HLSTORE_REPO_PASSWORD=... hlstore backup init --repo s3://backups/hl
    Init {
        #[command(flatten)]
        repo: RepoArgs,
        /// Fixed chunk size for volumes (e.g. 64K, 1M).
        #[arg(long, default_value = "64K", value_parser = parse_size)]
        chunk_size: u64,
        /// Average content-defined chunk size for files and devices (min 1/4, max 4x);
        /// 0 cuts them into fixed --chunk-size chunks too.
        #[arg(long, default_value = "512K", value_parser = parse_size)]
        file_chunk_size: u64,
        /// Cut every source, volumes too, by content (average = --chunk-size); volume
        /// backups then read the whole volume each time.
        #[arg(long)]
        cdc: bool,
        /// Target pack size (e.g. 32M).
        #[arg(long, default_value = "32M", value_parser = parse_size)]
        pack_size: u64,
        /// zstd level for chunk compression (1 is faster, 3 stores ~7 % less).
        #[arg(long, default_value_t = hb::repo::DEFAULT_ZSTD_LEVEL)]
        zstd_level: i32,
        #[arg(long)]
        json: bool,
    },
    /// Back up a file, a block device or a live volume.
    ///
    /// With --volume, a snapshot of the volume is taken and backed up; when an earlier
    /// backup of the volume in this repository still has its snapshot, only the blocks
    /// changed since are read. The newest backup snapshot is kept for that, older ones
    /// made by this repository's backups are deleted.
    ///
    /// Example: hlstore backup create --repo s3://backups/hl --volume pgdata
    #[command(group(ArgGroup::new("what").required(true).args(["source", "volume"])))]
    Create {
        #[command(flatten)]
        repo: RepoArgs,
        /// File or block device to back up.
        #[arg(long)]
        source: Option<PathBuf>,
        /// Volume to back up (through the node agent at --endpoint).
        #[arg(long)]
        volume: Option<String>,
        /// Node agent gRPC endpoint for --volume (any node of the cluster).
        #[arg(long, env = "HLSTORE_ENDPOINT", default_value = DEFAULT_ENDPOINT)]
        endpoint: String,
        /// Label to attach (repeatable).
        #[arg(long = "label", value_parser = parse_label)]
        labels: Vec<(String, String)>,
        /// Parent backup, an id or a `latest:KEY=VALUE` selector (default: the newest
        /// backup of the same source). A volume backup chooses its own: the newest one
        /// whose snapshot still exists.
        #[arg(long, conflicts_with = "volume")]
        parent: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
        /// After a successful backup, write its Prometheus metrics (bytes read, uploaded,
        /// deduplicated, duration, last success time) to this file, replaced atomically.
        #[arg(long, value_name = "PATH")]
        metrics_textfile: Option<PathBuf>,
        /// With --volume: back up only if the volume is due by its schedule (its label
        /// hlstore.io/backup-schedule, from the StorageClass parameter backupSchedule:
        /// hourly, daily, weekly, never, or 30m/6h/2d/1w) against its newest backup in this
        /// repository; otherwise print why not and exit 0. A volume without a schedule is
        /// always due, unless --default-schedule gives one.
        #[arg(long, requires = "volume")]
        if_due: bool,
        /// The schedule of volumes that carry none (with --if-due), e.g. daily.
        #[arg(long, requires = "if_due", value_name = "SCHEDULE", value_parser = parse_schedule)]
        default_schedule: Option<String>,
    },
    /// List backups, oldest first; --volume, --label and --latest narrow the list.
    ///
    /// Example: hlstore backup list --repo s3://backups/hl --volume pgdata --latest --json
    List {
        #[command(flatten)]
        repo: RepoArgs,
        /// Only backups of this volume (label volume=NAME, which volume backups carry).
        #[arg(long, value_name = "NAME")]
        volume: Option<String>,
        /// Only backups with this label (repeatable: all must match), e.g. pvc=apps/db.
        #[arg(long = "label", value_name = "KEY=VALUE", value_parser = parse_label)]
        labels: Vec<(String, String)>,
        /// Only the newest of the backups listed (none if nothing matches).
        #[arg(long)]
        latest: bool,
        #[arg(long)]
        json: bool,
    },
    /// Show one backup.
    Show {
        /// Backup id (a unique prefix is enough), or `latest` / `latest:KEY=VALUE[,...]`: the
        /// newest backup (with those labels, e.g. latest:volume=pgdata).
        id: String,
        #[command(flatten)]
        repo: RepoArgs,
        #[arg(long)]
        json: bool,
    },
    /// Check the repository; with --read-data also every pack's content.
    Verify {
        #[command(flatten)]
        repo: RepoArgs,
        #[arg(long)]
        read_data: bool,
        #[arg(long)]
        json: bool,
    },
    /// Remove backups (their data is freed by prune).
    Forget {
        /// Backup ids (unique prefixes), or `latest` / `latest:KEY=VALUE[,...]` selectors.
        #[arg(required = true)]
        ids: Vec<String>,
        #[command(flatten)]
        repo: RepoArgs,
        #[arg(long)]
        json: bool,
    },
    /// Mount the repository read-only (FUSE): every backup as a directory holding its
    /// image and its metadata, for restoring single files.
    ///
    /// Layout: by-time/<time>/, by-label/<key>=<value>/<time>/ and by-id/<id>/, each with
    /// `image` (the backed-up file, device or volume, byte for byte) and `backup.json`.
    /// Backups taken in the same second get `_<id prefix>` after the time. A filesystem
    /// image opens with a read-only loop mount. The view is the repository at mount time.
    /// Prints the mount point (or JSON with --json) once mounted, then runs until SIGTERM
    /// or Ctrl-C and unmounts (a loop mount of an image must be unmounted first).
    ///
    /// Example (as root):
    ///   hlstore backup mount --repo s3://backups/hl /mnt/backups &
    ///   mount -o loop,ro /mnt/backups/by-label/volume=pgdata/2026-12-06T02:30:00Z/image /mnt/pg
    ///   cp /mnt/pg/some/file . && umount /mnt/pg && kill %1
    #[command(verbatim_doc_comment)]
    Mount {
        /// Directory to mount on (created if missing).
        mountpoint: PathBuf,
        #[command(flatten)]
        repo: RepoArgs,
        /// Memory for decoded chunks (e.g. 256M).
        #[arg(long, default_value = "128M", value_parser = parse_size)]
        cache_size: u64,
        /// Let other users read the mount (needs root, or user_allow_other in
        /// /etc/fuse.conf).
        #[arg(long)]
        allow_other: bool,
        #[arg(long)]
        json: bool,
    },
    /// Manage the repository's passwords: several may open it, each in its own key file
    /// sealing the same master key (nothing is re-encrypted when they change).
    #[command(subcommand)]
    Key(KeyCommand),
    /// Apply a retention policy and free unreferenced data.
    ///
    /// Forgets the backups no --keep-* rule keeps, copies the live chunks out of packs
    /// that are at least --max-unused unreferenced, and condemns the packs nothing needs;
    /// a later prune deletes them once --grace-secs have passed and no backup that was
    /// running when they were condemned still runs. One prune at a time per repository:
    /// another one fails at once, changing nothing, or waits (--wait).
    ///
    /// When stderr is not a terminal (CronJob logs), a progress line is printed every
    /// 10 s ($HLSTORE_PROGRESS_INTERVAL_SECS; 0 turns them off), as for backups and
    /// restores.
    ///
    /// Example: hlstore backup prune --repo s3://backups/hl --keep-daily 7 --keep-weekly 4
    Prune {
        #[command(flatten)]
        repo: RepoArgs,
        #[arg(long, default_value_t = 0)]
        keep_last: u32,
        #[arg(long, default_value_t = 0)]
        keep_hourly: u32,
        #[arg(long, default_value_t = 0)]
        keep_daily: u32,
        #[arg(long, default_value_t = 0)]
        keep_weekly: u32,
        #[arg(long, default_value_t = 0)]
        keep_monthly: u32,
        #[arg(long, default_value_t = 0)]
        keep_yearly: u32,
        /// Seconds between condemning unreferenced data and deleting it.
        #[arg(long, default_value_t = hb::prune::DEFAULT_GRACE_SECS)]
        grace_secs: u64,
        /// Repack packs with at least this percentage of unreferenced bytes: their live
        /// chunks are copied into new packs and the old packs are condemned.
        #[arg(long, default_value_t = hb::prune::DEFAULT_REPACK_UNUSED_PCT, value_parser = clap::value_parser!(u8).range(1..=100))]
        max_unused: u8,
        /// Only delete wholly unreferenced packs; never repack.
        #[arg(long)]
        no_repack: bool,
        /// Seconds to wait for another prune of the repository to finish (only one runs
        /// at a time); without it, a prune that finds another running fails at once,
        /// changing nothing.
        #[arg(long, value_name = "SECS", default_value_t = 0)]
        wait: u64,
        /// Show what would be forgotten, change nothing.
        #[arg(long)]
        dry_run: bool,
        #[arg(long)]
        json: bool,
    },
}

/// `hlstore backup key` subcommands.
#[derive(Debug, Subcommand)]
pub enum KeyCommand {
    /// List the passwords (key files); `current` marks the one that opened the repository.
    List {
        #[command(flatten)]
        repo: RepoArgs,
        #[arg(long)]
        json: bool,
    },
    /// Add a password. The new password comes from --new-password-file or
    /// $HLSTORE_NEW_PASSWORD.
    ///
    /// Example: HLSTORE_NEW_PASSWORD=... hlstore backup key add --repo s3://backups/hl
    Add {
        #[command(flatten)]
        repo: RepoArgs,
        #[command(flatten)]
        new: NewPassword,
        #[arg(long)]
        json: bool,
    },
    /// Remove a password by key id (see `key list`). Not the one in use (use `passwd`),
    /// never the last one.
    Remove {
        /// Key id (a unique prefix is enough).
        id: String,
        #[command(flatten)]
        repo: RepoArgs,
        #[arg(long)]
        json: bool,
    },
    /// Change the password in use: a key file for the new password is stored, then the old
    /// one is deleted, so the old password no longer opens the repository.
    Passwd {
        #[command(flatten)]
        repo: RepoArgs,
        #[command(flatten)]
        new: NewPassword,
        #[arg(long)]
        json: bool,
    },
}

/// Where a new password comes from.
#[derive(Debug, Clone, Args)]
pub struct NewPassword {
    /// File holding the new password (default: $HLSTORE_NEW_PASSWORD).
    #[arg(long)]
    pub new_password_file: Option<PathBuf>,
}

impl NewPassword {
    fn read(&self) -> anyhow::Result<Vec<u8>> {
        let pw = match &self.new_password_file {
            Some(p) => {
                let mut s = std::fs::read(p).with_context(|| format!("reading password file {}", p.display()))?;
                while s.last().is_some_and(|c| *c == b'\n' || *c == b'\r') {
                    s.pop();
                }
                s
            }
            None => match std::env::var_os("HLSTORE_NEW_PASSWORD") {
                Some(p) => p.into_encoded_bytes(),
                None => bail!("no new password: pass --new-password-file or set HLSTORE_NEW_PASSWORD"),
            },
        };
        if pw.is_empty() {
            bail!("the new password is empty");
        }
        Ok(pw)
    }
}

/// Default node agent endpoint (as for `hlstore volume`).
const DEFAULT_ENDPOINT: &str = "http://127.0.0.1:7400";

/// `hlstore restore` arguments.
#[derive(Debug, Args)]
#[command(group(ArgGroup::new("target").required(true).args(["to_file", "to_device", "to_volume"])))]
pub struct RestoreArgs {
    /// Backup id (a unique prefix is enough), or `latest` / `latest:KEY=VALUE[,...]`: the
    /// newest backup (with those labels, e.g. latest:volume=pgdata).
    pub id: String,
    #[command(flatten)]
    pub repo: RepoArgs,
    /// Restore into this file (created sparse).
    #[arg(long)]
    pub to_file: Option<PathBuf>,
    /// Restore onto this block device.
    #[arg(long)]
    pub to_device: Option<PathBuf>,
    /// Restore into this new volume (created with the backup's volume size; the data is
    /// written once through the volume's engine, which replicates it).
    #[arg(long)]
    pub to_volume: Option<String>,
    /// Replicas of the volume created by --to-volume.
    #[arg(long, default_value_t = 3, requires = "to_volume")]
    pub replicas: u32,
    /// Node agent gRPC endpoint for --to-volume; the volume is attached on its node while
    /// it is written.
    #[arg(long, env = "HLSTORE_ENDPOINT", default_value = DEFAULT_ENDPOINT)]
    pub endpoint: String,
    /// Resume-state file: records the packs written, so running the same restore again
    /// after a crash or a lost connection continues where it stopped (default:
    /// <file>.hlstore-restore for --to-file, $TMPDIR/hlstore-restore-<volume>.state for
    /// --to-volume; in a Kubernetes Job, point it at a volume that survives restarts).
    #[arg(long)]
    pub state_file: Option<PathBuf>,
    /// Parallel pack downloads.
    #[arg(long, default_value_t = 4)]
    pub parallel: usize,
    #[arg(long)]
    pub json: bool,
}

fn parse_schedule(s: &str) -> Result<String, String> {
    hlstore_core::schedule::Schedule::parse(s).map(|_| s.to_string())
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("label {s:?} is not key=value")),
    }
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> anyhow::Result<T> + Send + 'static) -> anyhow::Result<T> {
    tokio::task::spawn_blocking(f).await.context("engine thread")?
}

fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

fn fmt_time(t: u64) -> String {
    let secs = t % 86_400;
    let (y, m, d) = hb::prune::civil_date((t / 86_400) as i64);
    format!("{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}Z", secs / 3600, secs / 60 % 60, secs % 60)
}

pub async fn run_backup(cmd: BackupCommand) -> anyhow::Result<()> {
    match cmd {
        BackupCommand::Mount { mountpoint, repo, cache_size, allow_other, json } => {
            mount(mountpoint, repo, cache_size, allow_other, json).await
        }
        cmd => blocking(move || run_backup_sync(cmd)).await,
    }
}

/// `hlstore backup mount`: mounts, prints the ready line, waits for SIGTERM or Ctrl-C.
async fn mount(
    mountpoint: PathBuf,
    repo: RepoArgs,
    cache_size: u64,
    allow_other: bool,
    json: bool,
) -> anyhow::Result<()> {
    use std::io::Write;
    use tokio::signal::unix::{signal, SignalKind};

    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let opts = hb::mount::MountOptions {
        cache_bytes: usize::try_from(cache_size).context("--cache-size too large")?,
        allow_other,
    };
    let (m, repo_id) = blocking(move || {
        let r = repo.open()?;
        let id = r.config().id.clone();
        std::fs::create_dir_all(&mountpoint)
            .with_context(|| format!("creating mount point {}", mountpoint.display()))?;
        Ok((hb::mount::RepoMount::mount(Arc::new(r), &mountpoint, opts)?, id))
    })
    .await?;
    {
        // The line on stdout is the "ready" signal scripts wait for.
        let mut out = std::io::stdout().lock();
        if json {
            let v = serde_json::json!({"mountpoint": m.mountpoint(), "backups": m.backups(), "repository": repo_id});
            writeln!(out, "{v}")?;
        } else {
            writeln!(out, "{}", m.mountpoint().display())?;
        }
        out.flush()?;
    }
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: unmounting"),
        r = tokio::signal::ctrl_c() => {
            r.context("waiting for Ctrl-C")?;
            tracing::info!("interrupted: unmounting");
        }
    }
    blocking(move || Ok(m.unmount()?)).await
}

fn run_backup_sync(cmd: BackupCommand) -> anyhow::Result<()> {
    match cmd {
        BackupCommand::Init { repo, chunk_size, file_chunk_size, cdc, pack_size, zstd_level, json } => {
            let pw = repo.password()?;
            let cs = u32::try_from(chunk_size).context("--chunk-size too large")?;
            if cs == 0 || cs % 4096 != 0 {
                // Volume backups read changed 4 KiB blocks: chunks must hold whole blocks.
                bail!("--chunk-size must be a positive multiple of 4 KiB, got {chunk_size} bytes (KB is decimal: use KiB, e.g. 64KiB)");
            }
            let fcs = u32::try_from(file_chunk_size).context("--file-chunk-size too large")?;
            let (chunker, file_chunker) = if cdc {
                (ChunkerConfig::Cdc { min: cs / 4, avg: cs, max: cs * 4 }, None)
            } else if fcs == 0 {
                (ChunkerConfig::Fixed { size: cs }, None)
            } else {
                (ChunkerConfig::Fixed { size: cs }, Some(ChunkerConfig::Cdc { min: fcs / 4, avg: fcs, max: fcs * 4 }))
            };
            if !(1..=19).contains(&zstd_level) {
                bail!("--zstd-level must be between 1 and 19");
            }
            let config = RepoConfig {
                chunker,
                file_chunker,
                pack_size: u32::try_from(pack_size).context("--pack-size too large")?,
                zstd_level,
                ..RepoConfig::default()
            };
            let backend = repo.backend()?;
            let r = Repository::init(backend, &pw, config, KdfParams::from_env()?)?;
            if json {
                println!("{}", serde_json::json!({"id": r.config().id, "repo": repo.repo, "config": r.config()}));
            } else {
                println!("created repository {} at {}", r.config().id, repo.repo);
            }
        }
        BackupCommand::Create {
            repo,
            volume: Some(volume),
            endpoint,
            labels,
            json,
            metrics_textfile,
            if_due,
            default_schedule,
            ..
        } => {
            let started = std::time::Instant::now();
            let labels = labels.into_iter().collect();
            let meta = if if_due {
                let r = repo.open()?;
                if !volume_backup::due(&r, &endpoint, &volume, default_schedule.as_deref(), json)? {
                    return Ok(());
                }
                volume_backup::backup(|| Ok(&r), r.config(), &endpoint, &volume, labels, json)?
            } else {
                // The key is derived (Argon2id, ~0.1 s) while the agent is reached, the
                // volume snapshotted and its changes read ahead.
                let (backend, pw) = (repo.backend()?, repo.password()?);
                let config = Repository::read_config(backend.as_ref())?;
                let opening = std::thread::spawn(move || Repository::open(backend, &pw));
                let open = move || {
                    opening.join().unwrap_or_else(|_| Err(hb::Error::Invalid("opening the repository panicked".into())))
                };
                volume_backup::backup(open, &config, &endpoint, &volume, labels, json)?
            };
            if let Some(path) = &metrics_textfile {
                let page = super::backup_metrics::render(
                    &meta.source,
                    &meta.stats,
                    started.elapsed(),
                    meta.time.max(unix_now()),
                );
                super::backup_metrics::write_atomic(path, &page)?;
            }
        }
        BackupCommand::Create { repo, source, labels, parent, json, metrics_textfile, .. } => {
            let Some(source) = source else { bail!("give --source or --volume") };
            let started = std::time::Instant::now();
            let r = repo.open()?;
            let src = hb::FileSource::open(&source)?;
            let opts = hb::BackupOptions {
                labels: labels.into_iter().collect::<BTreeMap<_, _>>(),
                parent,
                progress: Progress::auto("backup", hb::Source::size(&src)),
                ..Default::default()
            };
            let snap = hb::backup(&r, &src, opts)?;
            let rate = Rate::of(snap.meta.stats.bytes_read, started.elapsed());
            if let Some(path) = &metrics_textfile {
                let page = super::backup_metrics::render(
                    &snap.meta.source,
                    &snap.meta.stats,
                    started.elapsed(),
                    snap.meta.time.max(unix_now()),
                );
                super::backup_metrics::write_atomic(path, &page)?;
            }
            if json {
                println!(
                    "{}",
                    serde_json::json!({"id": snap.meta.id, "size": snap.meta.size,
                        "parent": snap.meta.parent, "chunker": snap.meta.chunker, "stats": snap.meta.stats,
                        "seconds": rate.secs, "mib_per_sec": rate.mib_s, "mib_per_sec_per_core": rate.per_core})
                );
            } else {
                let st = &snap.meta.stats;
                println!(
                    "backup {} of {} ({}): {} new in {} chunks, {} stored, {} zero chunks; {}",
                    snap.meta.id,
                    snap.meta.source,
                    format_size(snap.meta.size),
                    format_size(st.new_bytes),
                    st.new_chunks,
                    format_size(st.stored_bytes),
                    st.zero_chunks,
                    rate
                );
            }
        }
        BackupCommand::List { repo, volume, labels, latest, json } => {
            let r = repo.open()?;
            let filter = hb::select::Filter::new(volume.as_deref(), &labels);
            let mut metas = filter.apply(r.list_snapshots()?);
            if latest {
                metas = filter.newest(&metas).cloned().into_iter().collect();
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&metas)?);
            } else {
                println!("{:<32}  {:<20}  {:>10}  source", "id", "time", "size");
                for m in metas {
                    println!("{:<32}  {:<20}  {:>10}  {}", m.id, fmt_time(m.time), format_size(m.size), m.source);
                }
            }
        }
        BackupCommand::Show { id, repo, json } => {
            let r = repo.open()?;
            let s = r.load_snapshot(&r.resolve_snapshot(&id)?)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&s.meta)?);
            } else {
                let m = &s.meta;
                println!("id:      {}", m.id);
                println!("time:    {}", fmt_time(m.time));
                println!("source:  {} on {}", m.source, m.host);
                println!("size:    {} ({} bytes)", format_size(m.size), m.size);
                println!("parent:  {}", m.parent.as_deref().unwrap_or("-"));
                println!("chunks:  {} ({} all-zero)", m.stats.chunks, m.stats.zero_chunks);
                println!(
                    "added:   {} new chunks, {} ({} stored)",
                    m.stats.new_chunks,
                    format_size(m.stats.new_bytes),
                    format_size(m.stats.stored_bytes)
                );
                for (k, v) in &m.labels {
                    println!("label:   {k}={v}");
                }
            }
        }
        BackupCommand::Verify { repo, read_data, json } => {
            let r = repo.open()?;
            let rep = hb::verify(&r, read_data, Progress::hidden())?;
            if json {
                println!("{}", serde_json::to_string_pretty(&rep)?);
            } else {
                println!("checked {} backups, {} packs ({} read)", rep.snapshots, rep.packs, rep.packs_read);
                for p in &rep.problems {
                    let sev = match p.severity {
                        hb::verify::Severity::Error => "error",
                        hb::verify::Severity::Warning => "warning",
                    };
                    println!("{sev}: {} {}: {}", p.kind, p.object, p.detail);
                }
                for a in &rep.affected {
                    println!(
                        "affected backup {} ({}): {} chunks / {} unreadable, in {}",
                        a.snapshot,
                        a.source,
                        a.bad_chunks,
                        format_size(a.bad_bytes),
                        a.objects.join(", ")
                    );
                }
                if rep.ok {
                    println!("no errors found");
                }
            }
            if !rep.ok {
                bail!("repository damaged: see the report above");
            }
        }
        BackupCommand::Forget { ids, repo, json } => {
            let r = repo.open()?;
            // Resolve every id before forgetting any, so a typo forgets nothing.
            let full: Vec<String> = ids.iter().map(|id| r.resolve_snapshot(id)).collect::<Result<_, _>>()?;
            for id in &full {
                r.forget(id)?;
                if !json {
                    println!("forgot backup {id}");
                }
            }
            if json {
                println!("{}", serde_json::json!({ "forgotten": full }));
            }
        }
        BackupCommand::Key(cmd) => run_key(cmd)?,
        BackupCommand::Mount { .. } => bail!("mount runs on the async path"),
        BackupCommand::Prune {
            repo,
            keep_last,
            keep_hourly,
            keep_daily,
            keep_weekly,
            keep_monthly,
            keep_yearly,
            grace_secs,
            max_unused,
            no_repack,
            wait,
            dry_run,
            json,
        } => {
            let r = repo.open()?;
            let policy = KeepPolicy {
                last: keep_last,
                hourly: keep_hourly,
                daily: keep_daily,
                weekly: keep_weekly,
                monthly: keep_monthly,
                yearly: keep_yearly,
            };
            let repack_unused_pct = (!no_repack).then_some(max_unused);
            let opts = PruneOptions {
                policy,
                grace_secs,
                dry_run,
                repack_unused_pct,
                wait: std::time::Duration::from_secs(wait),
                progress: if dry_run { Progress::hidden() } else { Progress::auto("prune", 0) },
            };
            let rep = hb::prune(&r, opts)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&rep)?);
            } else {
                println!(
                    "kept {} backups, forgot {}{}",
                    rep.kept.len(),
                    rep.forgotten.len(),
                    if dry_run { " (dry run)" } else { "" }
                );
                println!(
                    "packs: {} condemned, {} deleted ({}), {} waiting for grace period or running backups, {} rescued",
                    rep.condemned_packs,
                    rep.deleted_packs,
                    format_size(rep.deleted_bytes),
                    rep.postponed_packs,
                    rep.rescued_packs
                );
                if rep.repacked_packs > 0 || rep.partial_reclaimable_bytes > 0 {
                    println!(
                        "repacked {} partly used packs ({} live copied into {} new packs); {} unreferenced left in packs below --max-unused",
                        rep.repacked_packs,
                        format_size(rep.repacked_bytes),
                        rep.new_packs,
                        format_size(rep.partial_reclaimable_bytes)
                    );
                }
            }
        }
    }
    Ok(())
}

fn run_key(cmd: KeyCommand) -> anyhow::Result<()> {
    match cmd {
        KeyCommand::List { repo, json } => {
            let r = repo.open()?;
            let keys = r.list_keys()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&keys)?);
            } else {
                println!("{:<16}  {:<20}  {:<7}  kdf", "id", "created", "current");
                for k in keys {
                    println!(
                        "{:<16}  {:<20}  {:<7}  {} m={}KiB t={} p={}",
                        k.id,
                        fmt_time(k.created),
                        if k.current { "yes" } else { "" },
                        k.kdf,
                        k.params.m_cost_kib,
                        k.params.t_cost,
                        k.params.p_cost
                    );
                }
            }
        }
        KeyCommand::Add { repo, new, json } => {
            let r = repo.open()?;
            let id = r.add_key(&new.read()?, KdfParams::from_env()?)?;
            if json {
                println!("{}", serde_json::json!({ "added": id }));
            } else {
                println!("added key {id}");
            }
        }
        KeyCommand::Remove { id, repo, json } => {
            let r = repo.open()?;
            let removed = r.remove_key(&id)?;
            if json {
                println!("{}", serde_json::json!({ "removed": removed }));
            } else {
                println!("removed key {removed}");
            }
        }
        KeyCommand::Passwd { repo, new, json } => {
            let mut r = repo.open()?;
            let old = r.key_id().to_string();
            let id = r.change_password(&new.read()?, KdfParams::from_env()?)?;
            if json {
                println!("{}", serde_json::json!({ "added": id, "removed": old }));
            } else {
                println!("password changed: key {old} replaced by {id}");
            }
        }
    }
    Ok(())
}

/// Throughput of a run, overall and per core.
struct Rate {
    secs: f64,
    mib_s: f64,
    per_core: f64,
}

impl Rate {
    fn of(bytes: u64, took: std::time::Duration) -> Rate {
        let secs = took.as_secs_f64().max(1e-6);
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        let mib_s = bytes as f64 / 1048576.0 / secs;
        let round = |v: f64| (v * 100.0).round() / 100.0;
        Rate { secs: round(secs), mib_s: round(mib_s), per_core: round(mib_s / cores) }
    }
}

impl std::fmt::Display for Rate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:.2} s, {:.1} MiB/s ({:.1} MiB/s per core)", self.secs, self.mib_s, self.per_core)
    }
}

pub async fn run_restore(args: RestoreArgs) -> anyhow::Result<()> {
    blocking(move || {
        let r = args.repo.open()?;
        if let Some(volume) = &args.to_volume {
            return volume_backup::restore(&r, &args, volume);
        }
        let target = match (&args.to_file, &args.to_device) {
            (Some(f), None) => RestoreTarget::File(f.clone()),
            (None, Some(d)) => RestoreTarget::Device(d.clone()),
            _ => bail!("give exactly one of --to-file, --to-device or --to-volume"),
        };
        let id = r.resolve_snapshot(&args.id)?;
        let size = r.load_snapshot(&id)?.meta.size;
        let opts = hb::RestoreOptions {
            progress: Progress::auto("restore", size),
            workers: args.parallel.max(1),
            state_file: args.state_file.clone(),
        };
        let started = std::time::Instant::now();
        let st = hb::restore(&r, &id, &target, opts)?;
        let rate = Rate::of(st.size, started.elapsed());
        if args.json {
            let mut v = serde_json::to_value(&st)?;
            v["seconds"] = rate.secs.into();
            v["mib_per_sec"] = rate.mib_s.into();
            v["mib_per_sec_per_core"] = rate.per_core.into();
            println!("{}", serde_json::to_string_pretty(&v)?);
        } else {
            println!(
                "restored backup {} ({}): {} written, {} packs fetched, {} resumed; {}",
                st.snapshot,
                format_size(st.size),
                format_size(st.bytes_written),
                st.packs_fetched,
                st.packs_resumed,
                rate
            );
        }
        Ok(())
    })
    .await
}

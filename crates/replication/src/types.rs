//! Domain types shared by the replication state machine and its runtime.

use std::fmt;
use std::time::Duration;

use hlstore_core::error::{Error, ErrorKind, Result};
pub use hlstore_store::History;

/// Index of a replica in the volume's replica set (`0..N`).
pub type ReplicaId = usize;
/// A write sequence number (see the seq rules in [`crate`]).
pub type Seq = u64;
/// Milliseconds on a monotonic clock chosen by the runtime. The machine never reads a clock.
pub type Millis = u64;
/// A client operation id chosen by the runtime, echoed in `AckClient`/`FailClient`.
pub type OpId = u64;

/// The largest replica set the machine accepts.
pub const MAX_REPLICAS: usize = 5;

/// Sequence numbers carry the epoch that issued them in their high bits: the first seq of
/// epoch `e` is at least `e << SEQ_EPOCH_SHIFT`. A newer engine's writes therefore always
/// sort after anything an older engine issued (even writes it never saw), and the epoch that
/// wrote a replica's last block can be read back from its `last_seq`. 2^40 writes per
/// attach is ~127 days at 100k IOPS; a longer attach keeps working, only the epoch read
/// back from a seq is then an overestimate, which makes resync conservative (longer), not
/// wrong.
pub const SEQ_EPOCH_SHIFT: u32 = 40;

/// The epoch encoded in a sequence number.
pub fn epoch_of_seq(seq: Seq) -> u64 {
    seq >> SEQ_EPOCH_SHIFT
}

/// What a replica reports about itself (reply to `State` / `Open`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ReplicaSeqs {
    pub epoch: u64,
    /// The engine instance holding the replica at `epoch` (0: none).
    pub owner: u64,
    /// Highest sequence number applied.
    pub last_seq: Seq,
    /// Every write with seq <= durable_seq this replica applied is on stable storage.
    pub durable_seq: Seq,
    /// Set while a resync into this replica is unfinished: the replica is only complete up
    /// to this seq, whatever `last_seq` says.
    pub resync_from: Option<Seq>,
    /// The activations the replica's data descends from (empty: unknown; see
    /// [`History`] and the "Epoch history" section of [`crate`]).
    pub history: History,
}

impl From<hlstore_store::ReplicaState> for ReplicaSeqs {
    fn from(s: hlstore_store::ReplicaState) -> Self {
        Self {
            epoch: s.epoch,
            owner: s.owner,
            last_seq: s.last_seq,
            durable_seq: s.durable_seq,
            resync_from: s.resync_from,
            history: s.history,
        }
    }
}

/// Runs of consecutive block indices as `(first block, count)` (`blocks` ascending).
pub fn block_runs(blocks: impl IntoIterator<Item = u64>) -> Vec<(u64, u64)> {
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for b in blocks {
        match runs.last_mut() {
            Some((start, count)) if *start + *count == b => *count += 1,
            _ => runs.push((b, 1)),
        }
    }
    runs
}

/// Why a request to a replica failed, as far as the machine cares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplicaError {
    /// The replica has a newer epoch: another engine owns the volume.
    StaleEpoch { current: u64 },
    /// A compare-and-set claim lost: another engine claimed the replica meanwhile.
    Conflict,
    /// Anything else: unreachable, I/O error, stream broken.
    Failed(String),
}

impl ReplicaError {
    /// Classifies an engine error coming back from a transport.
    /// Fencing is recognised by kind; a current epoch that is not known is reported as 0
    /// (the machine then records at least its own epoch + 1).
    pub fn from_error(err: &Error) -> Self {
        match err {
            Error::StaleEpoch { current, .. } => ReplicaError::StaleEpoch { current: *current },
            e if e.kind() == ErrorKind::StaleEpoch => ReplicaError::StaleEpoch { current: 0 },
            e if e.kind() == ErrorKind::Conflict => ReplicaError::Conflict,
            other => ReplicaError::Failed(other.to_string()),
        }
    }
}

/// Replica status. `Healthy` and `Lagging` replicas are *in sync*: they received every
/// write of this engine in order, so their data is a prefix of the volume's history and
/// their acks count towards the write quorum. `Resyncing` replicas receive new writes but
/// miss older blocks; their acks do not count and they serve no reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ReplicaStatus {
    /// Not heard from yet (before attach, or an Open is outstanding).
    Unknown,
    Healthy,
    /// In sync but a request is older than the ack timeout. Still counts for quorum.
    Lagging,
    Resyncing,
    Failed,
}

impl ReplicaStatus {
    /// Whether this replica's acks count towards the write quorum.
    pub fn in_sync(self) -> bool {
        matches!(self, ReplicaStatus::Healthy | ReplicaStatus::Lagging)
    }

    /// The status shown to operators: `healthy`, `resyncing` or `failed`.
    pub fn as_cli_str(self) -> &'static str {
        match self {
            ReplicaStatus::Healthy | ReplicaStatus::Lagging => "healthy",
            ReplicaStatus::Resyncing => "resyncing",
            ReplicaStatus::Unknown | ReplicaStatus::Failed => "failed",
        }
    }
}

impl fmt::Display for ReplicaStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            ReplicaStatus::Unknown => "unknown",
            ReplicaStatus::Healthy => "healthy",
            ReplicaStatus::Lagging => "lagging",
            ReplicaStatus::Resyncing => "resyncing",
            ReplicaStatus::Failed => "failed",
        };
        f.write_str(s)
    }
}

/// Why a client operation failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailReason {
    /// Fewer than W replicas are in sync and the deadline passed.
    NoQuorum,
    /// W replicas are in sync but did not answer before the deadline.
    Timeout,
    /// A replica reported a newer epoch: this engine was fenced.
    Fenced { current: u64 },
    /// The volume is not attached (attach pending or failed).
    NotAttached,
    /// No in-sync replica holds every acknowledged write (reads only).
    NoReplica,
    /// The replicas name another engine as the volume's holder (attach only; see
    /// [`MachineConfig::takeover`]).
    Owned { owner: u64 },
    /// Another engine claimed the replicas at the same moment and this one lost.
    Conflict,
    /// The read lease expired (no write quorum confirmed this engine's epoch recently) and
    /// could not be renewed before the deadline (reads only).
    NoLease,
    /// Every replica the read could go to failed its checksum (reads only).
    Corrupt,
}

impl FailReason {
    /// The engine error for this failure on `volume` (attached at `epoch`).
    pub fn to_error(self, volume: &str, epoch: u64) -> Error {
        match self {
            FailReason::Fenced { current } => Error::StaleEpoch { volume: volume.to_string(), got: epoch, current },
            FailReason::NoQuorum => {
                Error::Unavailable(format!("volume {volume}: fewer than the write quorum of replicas are in sync"))
            }
            FailReason::Timeout => {
                Error::Unavailable(format!("volume {volume}: replicas did not answer before the I/O deadline"))
            }
            FailReason::NotAttached => Error::Unavailable(format!("volume {volume}: not attached")),
            FailReason::NoReplica => Error::Unavailable(format!("volume {volume}: no up-to-date replica to read from")),
            FailReason::Owned { owner } => Error::Conflict(format!(
                "volume {volume}: its replicas are held by another engine ({owner:#x}); detach it there first, or take it over with --force if that node is gone"
            )),
            FailReason::Conflict => Error::Conflict(format!(
                "volume {volume}: another engine attached it at the same moment and won; detach it there first"
            )),
            FailReason::Corrupt => Error::Io {
                context: format!("volume {volume}: every up-to-date replica failed its checksum for this read"),
                source: std::io::Error::other("checksum mismatch"),
            },
            FailReason::NoLease => Error::Unavailable(format!(
                "volume {volume}: no write quorum confirmed this engine recently (read lease expired); another engine may own the volume"
            )),
        }
    }
}

/// One member of the replica set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaSpec {
    /// The node name (for logs and the CLI).
    pub name: String,
    /// Whether the replica is on this node (preferred for reads).
    pub local: bool,
}

/// Machine configuration. Durations are in the runtime's milliseconds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MachineConfig {
    pub replicas: Vec<ReplicaSpec>,
    /// Write quorum; `None` = majority. Must satisfy `N/2 < W <= N`.
    pub write_quorum: Option<usize>,
    /// A replica with a request older than this is `Lagging`.
    pub ack_timeout_ms: Millis,
    /// A replica with a request older than this is `Failed`.
    pub failure_timeout_ms: Millis,
    /// A client write/flush not acknowledged by then fails (`NoQuorum` / `Timeout`).
    pub io_timeout_ms: Millis,
    /// Attach fails if no majority opened by then.
    pub attach_timeout_ms: Millis,
    /// How often a failed replica is re-opened.
    pub retry_interval_ms: Millis,
    /// Read lease: the engine serves reads only while a write quorum answered a request
    /// under its epoch that it sent less than this long ago. A new engine that finds the
    /// volume held by another one waits [`MachineConfig::lease_wait_ms`] before serving.
    pub lease_ms: Millis,
    /// This engine instance (0: anonymous). Recorded on the replicas it claims.
    pub owner: u64,
    /// Attach even if the replicas name another engine as the holder (that engine's node
    /// is gone or partitioned away): the attach then waits out its read lease.
    pub takeover: bool,
    /// Holders this engine may take over even without `takeover` (engines known to have
    /// stopped serving); their read lease is still waited out.
    pub takeover_owners: Vec<u64>,
    /// Holders known to be dead (engines of this node's previous agent process): taken
    /// over without waiting for a lease nobody can hold.
    pub dead_owners: Vec<u64>,
}

impl MachineConfig {
    /// Defaults for `n` replicas, the first one local: majority quorum, 1 s lag, 5 s
    /// failure, 30 s I/O deadline (below the kernel NBD request timeout), 2 s retries.
    pub fn new(n: usize) -> Self {
        Self {
            replicas: (0..n).map(|i| ReplicaSpec { name: format!("replica-{i}"), local: i == 0 }).collect(),
            write_quorum: None,
            ack_timeout_ms: 1_000,
            failure_timeout_ms: 5_000,
            io_timeout_ms: 30_000,
            attach_timeout_ms: 10_000,
            retry_interval_ms: 2_000,
            lease_ms: 4_000,
            owner: 0,
            takeover: false,
            takeover_owners: Vec::new(),
            dead_owners: Vec::new(),
        }
    }

    /// How long a new engine waits before serving when the volume was held by another
    /// engine: the lease plus a quarter for clock-rate differences between nodes.
    pub fn lease_wait_ms(&self) -> Millis {
        self.lease_ms.saturating_add(self.lease_ms / 4)
    }

    /// The effective write quorum, validated.
    ///
    /// W must be a strict majority (`W > N/2`): two write quorums then always share a
    /// replica (a partitioned minority can never ack), and every write quorum intersects
    /// every attach majority, so a new engine always sees each acknowledged write.
    pub fn quorum(&self) -> Result<usize> {
        let n = self.replicas.len();
        if n == 0 || n > MAX_REPLICAS {
            return Err(Error::InvalidArgument(format!("replica count {n} is outside 1..={MAX_REPLICAS}")));
        }
        let w = self.write_quorum.unwrap_or(n / 2 + 1);
        if w > n || w <= n / 2 {
            return Err(Error::InvalidArgument(format!(
                "write quorum {w} for {n} replicas must be a majority ({}..={n})",
                n / 2 + 1
            )));
        }
        if self.lease_ms == 0 {
            return Err(Error::InvalidArgument("the read lease must be longer than 0 ms".into()));
        }
        if self.ack_timeout_ms > self.failure_timeout_ms {
            return Err(Error::InvalidArgument("ack timeout must not exceed the failure timeout".into()));
        }
        Ok(w)
    }
}

/// Configuration of a replicated volume.
#[derive(Debug, Clone)]
pub struct VolumeConfig {
    pub name: String,
    pub size: u64,
    pub block_size: u32,
    pub machine: MachineConfig,
    /// How often deadlines are checked.
    pub tick: Duration,
    /// Client requests queued before callers wait.
    pub queue_depth: usize,
    /// Resync chunks in flight per resync.
    pub resync_window: usize,
    /// Blocks copied between resync checkpoints (0: none; an interrupted resync restarts).
    pub resync_checkpoint_blocks: u64,
    /// Resync copy rate limit in bytes per second (0: unlimited).
    pub resync_rate: u64,
    /// The node this engine runs on, recorded with its claim on the replicas.
    pub owner_node: String,
    /// Background scrub rate in bytes per second, per volume (0: off). See `heal.rs`.
    pub scrub_rate: u64,
}

impl VolumeConfig {
    pub fn new(name: impl Into<String>, size: u64, machine: MachineConfig) -> Self {
        Self {
            name: name.into(),
            size,
            block_size: 4096,
            machine,
            tick: Duration::from_millis(50),
            queue_depth: 256,
            resync_window: 4096,
            resync_checkpoint_blocks: 32768,
            resync_rate: 0,
            owner_node: String::new(),
            scrub_rate: 0,
        }
    }
}

/// One replica as operators see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaHealth {
    pub name: String,
    pub status: ReplicaStatus,
    pub acked_seq: Seq,
    pub durable_seq: Seq,
    /// Resync blocks/ranges queued to this replica since the volume attached.
    pub resync_chunks: u64,
    /// Offset the last resync into this replica resumed from (0: none resumed).
    pub resync_resumed_from: u64,
}

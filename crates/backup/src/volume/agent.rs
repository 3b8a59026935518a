//! `VolumeAgent`: the node agent operations a volume backup or restore uses.
//!
//! Blocking on purpose: the backup pipeline runs on plain threads. Errors are
//! [`Error::Agent`](crate::Error::Agent) with the operation and the agent's message.

use std::collections::BTreeMap;
use std::ops::Range;

use crate::error::Result;
use crate::restore::RestoreSink;

/// One hlstore volume snapshot (the agent's `Snapshot` message as a domain type).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeSnapshot {
    pub volume: String,
    pub name: String,
    /// Position in the volume's write stream.
    pub seq: u64,
    /// Volume size when taken.
    pub size: u64,
    /// Unix seconds.
    pub created: i64,
    /// True once every replica holds it.
    pub ready: bool,
    pub labels: BTreeMap<String, String>,
}

/// What volume backups need from a node agent.
pub trait VolumeAgent: Send + Sync {
    /// Takes a crash-consistent snapshot (idempotent for the same name).
    fn create_snapshot(&self, volume: &str, name: &str, labels: &BTreeMap<String, String>) -> Result<VolumeSnapshot>;
    /// Deletes a snapshot; `false` if it did not exist.
    fn delete_snapshot(&self, volume: &str, name: &str) -> Result<bool>;
    /// The volume's snapshots.
    fn list_snapshots(&self, volume: &str) -> Result<Vec<VolumeSnapshot>>;
    /// Byte ranges that differ between snapshot `from` and snapshot `to`; with `from`
    /// empty, every range the `to` snapshot may hold data in.
    fn changed_blocks(&self, volume: &str, from: &str, to: &str) -> Result<Vec<Range<u64>>>;
    /// Fills `buf` with the snapshot's bytes from `offset`.
    fn read_snapshot(&self, volume: &str, name: &str, offset: u64, buf: &mut [u8]) -> Result<()>;
    /// Size of the volume, or `None` if there is no such volume.
    fn volume_size(&self, volume: &str) -> Result<Option<u64>>;
    /// Creates an empty (thin) volume.
    fn create_volume(&self, volume: &str, size: u64, replicas: u32) -> Result<()>;
    /// Deletes a detached volume.
    fn delete_volume(&self, volume: &str) -> Result<()>;
    /// Starts the volume's engine on the agent's node; returns its NBD URI.
    fn attach_volume(&self, volume: &str) -> Result<String>;
    /// Flushes and stops the volume's engine.
    fn detach_volume(&self, volume: &str) -> Result<()>;
    /// A writer for an attached volume's NBD export.
    fn open_writer(&self, nbd_uri: &str) -> Result<Box<dyn RestoreSink + '_>>;
}

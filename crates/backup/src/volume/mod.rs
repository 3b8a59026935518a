//! Backups of live hlstore volumes, read through a node agent's snapshot API.
//!
//! Design — which file owns what:
//! - `agent.rs` — [`VolumeAgent`]: what a volume backup needs from a node agent (snapshots,
//!   changed blocks, snapshot reads, create/attach/detach and an NBD writer), as a blocking
//!   trait. The gRPC implementation lives in the binary; tests drive an in-memory fake.
//! - `plan.rs` — pure decisions: snapshot names, labels, the base of an incremental backup,
//!   which snapshots retention deletes.
//! - `source.rs` — [`VolumeSource`]: a volume snapshot as a backup [`crate::Source`]; reads
//!   only allocated ranges and counts every byte it fetches.
//! - `backup.rs` — [`backup_volume`]; `restore.rs` — [`restore_to_volume`].
//!
//! Invariants:
//! - A volume backup is an ordinary backup snapshot with the labels `volume`,
//!   `volume_size` and `volume_snapshot` (the hlstore snapshot it was read from). The labels
//!   are stored with the finished manifest, so a backup that names a snapshot holds exactly
//!   that snapshot's content — which is what makes changed-block tracking (CBT) sound: an
//!   incremental backup takes every chunk outside the extents that changed between the
//!   base's snapshot and the new one over from the base without reading it.
//! - The base is the newest backup of the volume whose hlstore snapshot still exists and
//!   whose chunker and size match; without one the backup reads every allocated block.
//! - The snapshot is taken, and the changes since this repository's newest snapshot of the
//!   volume read ahead (up to 64 MiB), while the repository's key is derived
//!   ([`backup_volume_opening`]); the base is still chosen from the backups, once they can
//!   be read, and the read-ahead is used only if that base names the same snapshot (then
//!   it holds exactly the bytes the backup would read); otherwise it is dropped.
//! - Snapshots made for backups carry the repository id as a label. After a successful
//!   backup this repository's older ones are deleted and the new one is kept (the next
//!   incremental's base); after a failed one the new snapshot is deleted and the old base
//!   stays. Snapshots of other repositories or made by hand are never touched.
//! - A restore never writes into an existing volume: it creates the volume, writes the
//!   backup's chunks once through the engine (which replicates them), flushes, detaches.

mod agent;
mod backup;
pub mod plan;
mod restore;
mod source;

pub use agent::{VolumeAgent, VolumeSnapshot};
pub use backup::{backup_volume, backup_volume_opening, VolumeBackupOptions, VolumeBackupReport};
pub use restore::{restore_to_volume, VolumeRestoreOptions, VolumeRestoreReport};
pub use source::VolumeSource;

//! The replica store: one per node, holding the replicas of many volumes on that node's disk.
//!
//! Owns: block data, per-block checksums, the allocation map, per-block sequence numbers,
//! trim records, epochs, and crash recovery. Everything above (gRPC, replication) reaches
//! the data only through [`ReplicaStore`].
//!
//! Invariants (checked by the conformance suite in `tests/store_*.rs`, run against both
//! implementations):
//! - **Aligned, in-range I/O only.** Every offset and length is a multiple of
//!   [`BLOCK_SIZE`] and inside the volume; anything else is `InvalidArgument` /
//!   `OutOfRange` and changes nothing.
//! - **Verified reads.** Every block read is checked against its stored crc32; a mismatch
//!   is `Corruption` naming volume and offset, never data.
//! - **Honest flush.** When `flush` (or a FUA write) returns `durable_seq = S`, every write
//!   and trim with seq <= S survives kill -9 and power loss.
//! - **Atomic blocks.** After a crash at any point, each 4 KiB block holds its old or its
//!   new content (copy-on-write slots; a slot freed by an overwrite or trim is reused only
//!   after the metadata that freed it is durable).
//! - **Fencing.** A request whose epoch is older than the replica's is `StaleEpoch`.
//! - **Incremental resync.** `changes_since(S)` lists exactly the trims and blocks whose
//!   current content was written after seq S; `apply_resync` never lets an older chunk
//!   overwrite a newer block.
//!
//! Implementations: [`DiskStore`] (block files + RocksDB; the real one) and [`MemStore`]
//! (in memory, with power-loss simulation; for tests of the layers above).

pub(crate) mod check;
mod disk;
mod history;
#[cfg(any(test, feature = "testing"))]
mod mem;
mod record;
mod store;

pub use disk::{DiskStore, FORMAT_VERSION as STORE_FORMAT_VERSION};
pub use history::{History, HistoryEntry, HISTORY_LEN};
#[cfg(any(test, feature = "testing"))]
pub use mem::{MemStore, StoredBlock};
pub use record::{
    ApplyStats, Change, ChunkData, Claim, ClaimMode, ReplicaInfo, ReplicaState, ResyncChunk, SnapshotInfo,
    VolumeRecord, BLOCK_SIZE,
};
pub use store::{BlockWrite, ReplicaStore};

/// Checks a request's epoch against a replica's (older: `StaleEpoch`; newer: invalid).
pub fn check_epoch(volume: &str, stored: u64, got: u64) -> hlstore_core::error::Result<()> {
    check::epoch(volume, stored, got)
}

/// The claim rules (`ClaimMode`): given a replica's stored epoch and owner, what a claim
/// turns them into (`None`: nothing changes), or why it is refused.
pub fn check_claim(
    volume: &str,
    stored_epoch: u64,
    stored_owner: u64,
    claim: &Claim,
) -> hlstore_core::Result<Option<(u64, u64)>> {
    check::claim(volume, stored_epoch, stored_owner, claim)
}

//! hlstore-backup: a deduplicating, encrypted, content-addressed backup repository on S3 or
//! a filesystem directory. The bytes are documented in `FORMAT.md`.
//!
//! Design — which module owns what:
//! - `backend/` — flat object stores (filesystem, S3) behind [`backend::Backend`]; the only
//!   place that does storage IO. One conformance suite covers every backend.
//! - `crypto/` — master key, password key files (argon2id), keyed-BLAKE3 chunk ids,
//!   XChaCha20-Poly1305 envelopes.
//! - `chunk/` — fixed-size (volumes, default 64 KiB) and content-defined chunking (files
//!   and devices, which have no changed-block record), zero detection.
//! - `pack/` — packs of sealed chunks with their own trailer index; `index/` — index files
//!   and the in-memory master index.
//! - `repo/` — object layout, init/open, index loading (recovering unindexed packs from
//!   their trailers), writer leases.
//! - `snapshot.rs` manifests; `backup.rs` the parallel pipeline; `restore.rs` parallel,
//!   out-of-order, resumable restore; `verify.rs` damage reports; `prune.rs` retention,
//!   repack and two-phase garbage collection; `source.rs` what can be backed up;
//!   `progress.rs` bars on a terminal, progress lines in logs.
//! - `mount/` — the read-only FUSE view of a repository (`hlstore backup mount`): backups
//!   by time, label and id, each image readable at any offset (feature `mount`).
//! - `volume/` — backups of live hlstore volumes: snapshot, changed-block (incremental)
//!   reads, snapshot retention, restore into a new volume, over a node-agent trait.
//!
//! Invariants: objects are immutable once written (packs and index files named by hash,
//! snapshots by random id); writes go pack → index → snapshot; backups, restores and
//! mounts never wait for a lock (only prunes exclude each other, through a `prune`
//! lease), and a backup saves its snapshot only while its writer lease is alive;
//! decoding repository data never panics — damage is `Error::Corrupt` naming the object. New storage kinds go in `backend/`; new source kinds (volumes with a
//! changed-block record) implement [`source::Source`].

pub mod backend;
pub mod backup;
pub mod chunk;
mod compress;
pub mod crypto;
pub mod error;
pub mod index;
#[cfg(feature = "mount")]
pub mod mount;
pub mod pack;
pub mod progress;
pub mod prune;
pub mod repo;
pub mod restore;
pub mod select;
pub mod snapshot;
pub mod source;
pub mod verify;
pub mod volume;

/// What the fuzz targets (`fuzz/`) need beyond the public API: a fixed key and the
/// associated data and framing of sealed objects, so they can feed authenticated garbage
/// to the real decoders. Not a stable API.
#[doc(hidden)]
pub mod fuzzing {
    /// Associated data of a pack's sealed trailer.
    pub const TRAILER_AAD: &[u8] = crate::pack::TRAILER_AAD;
    /// An index file's magic, version and the associated data of its sealed body.
    pub const INDEX_MAGIC: &[u8; 4] = crate::index::file::MAGIC;
    pub const INDEX_VERSION: u32 = crate::index::file::VERSION;
    pub const INDEX_AAD: &[u8] = crate::index::file::AAD;

    /// A master key from 64 fixed bytes (encryption key, then chunk-id key).
    pub fn master_key(bytes: &[u8; 64]) -> crate::crypto::MasterKey {
        crate::crypto::MasterKey::from_bytes(bytes).expect("64 bytes make a key")
    }
}

#[cfg(feature = "s3")]
pub use backend::S3Backend;
pub use backend::{open_url, Backend, FsBackend, ObjectInfo, S3Options};
pub use backup::{backup, BackupOptions};
pub use chunk::{ChunkId, ChunkerConfig};
pub use crypto::KdfParams;
pub use error::{Error, Result};
pub use progress::Progress;
pub use prune::{prune, KeepPolicy, PruneOptions, PruneReport};
pub use repo::{RepoConfig, Repository};
pub use restore::{restore, restore_into, RestoreOptions, RestoreSink, RestoreStats, RestoreTarget};
pub use snapshot::{Snapshot, SnapshotMeta};
pub use source::{FileSource, Source};
pub use verify::{verify, VerifyReport};

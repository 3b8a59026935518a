//! The repository: a backend plus the opened master key and config. Owns the object
//! layout (`config`, `keys/`, `data/`, `index/`, `snapshots/`, `locks/`, `trash/`) and
//! loading of the master index.
//!
//! Invariant: objects are written in dependency order — pack, then the index naming it,
//! then the snapshot naming its chunks — so a crash at any point leaves a valid repository
//! (at worst with unreferenced packs, which the next backup reuses and prune removes).

mod config;
mod lease;
mod open;

pub use config::{RepoConfig, DEFAULT_FILE_CHUNKER, DEFAULT_ZSTD_LEVEL, FORMAT_VERSION};
pub use lease::{lease_ttl_secs, Lease, LeaseInfo, LEASE_TTL_ENV, LEASE_TTL_SECS};
pub use open::{IndexLoad, KeyInfo, Repository};

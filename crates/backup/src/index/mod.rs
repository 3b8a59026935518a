//! Index files and the in-memory master index.
//!
//! An index file (`index/<blake3>`) maps chunk id → (pack, offset, length) for a batch of
//! packs. Index files are written only after the packs they describe are stored, so an
//! index never points at a pack that was not yet written (a missing pack means damage). The
//! master index is the union of all index files plus the trailers of packs no index mentions
//! (interrupted backups, lost index files).

pub(crate) mod file;
mod master;

pub use file::{decode_index, encode_index, IndexedPack};
pub use master::{Location, MasterIndex};

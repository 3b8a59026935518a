//! `config`: the repository's plaintext, versioned settings.

use serde::{Deserialize, Serialize};

use crate::chunk::ChunkerConfig;

/// Repository format version this build writes and reads.
pub const FORMAT_VERSION: u32 = 1;
/// Default pack size target.
pub const DEFAULT_PACK_SIZE: u32 = 32 * 1024 * 1024;
/// Default zstd level (fast; block images are often incompressible).
pub const DEFAULT_ZSTD_LEVEL: i32 = 1;

/// Contents of the `config` object.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RepoConfig {
    pub version: u32,
    /// Random repository id (hex).
    pub id: String,
    /// Chunker for block images and files.
    pub chunker: ChunkerConfig,
    /// Target pack size in bytes.
    pub pack_size: u32,
    pub zstd_level: i32,
}

impl Default for RepoConfig {
    fn default() -> Self {
        RepoConfig {
            version: FORMAT_VERSION,
            id: hex::encode(rand::random::<[u8; 16]>()),
            chunker: ChunkerConfig::default(),
            pack_size: DEFAULT_PACK_SIZE,
            zstd_level: DEFAULT_ZSTD_LEVEL,
        }
    }
}

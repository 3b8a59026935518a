//! `config`: the repository's plaintext, versioned settings.

use serde::{Deserialize, Serialize};

use crate::chunk::ChunkerConfig;

/// Repository format version this build writes. Version 2 added `file_chunker`.
pub const FORMAT_VERSION: u32 = 2;
/// Oldest repository format version this build reads.
pub const MIN_FORMAT_VERSION: u32 = 1;
/// Default pack size target.
pub const DEFAULT_PACK_SIZE: u32 = 32 * 1024 * 1024;
/// Default zstd level: 3 stores 7 % less than 1 on a real filesystem image at 0.6x the
/// compression speed (measured, `benches/README.md`); version 1 repositories used 1.
pub const DEFAULT_ZSTD_LEVEL: i32 = 3;

/// Default chunker for sources without changed-block information (chosen by measurement,
/// see `benches/README.md`).
pub const DEFAULT_FILE_CHUNKER: ChunkerConfig =
    ChunkerConfig::Cdc { min: 128 * 1024, avg: 512 * 1024, max: 2048 * 1024 };

/// Contents of the `config` object.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RepoConfig {
    pub version: u32,
    /// Random repository id (hex).
    pub id: String,
    /// Chunker for sources with changed-block information (volumes): their incremental
    /// backups need chunk boundaries that never move. In version 1 repositories, the
    /// chunker of every source.
    pub chunker: ChunkerConfig,
    /// Chunker for sources without changed-block information (files, devices), where an
    /// insertion must not shift every later chunk: content-defined. `None` (version 1):
    /// `chunker`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file_chunker: Option<ChunkerConfig>,
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
            file_chunker: Some(DEFAULT_FILE_CHUNKER),
            pack_size: DEFAULT_PACK_SIZE,
            zstd_level: DEFAULT_ZSTD_LEVEL,
        }
    }
}

impl RepoConfig {
    /// The chunker for a source: fixed boundaries when it has changed-block information,
    /// content-defined otherwise (when the repository has one).
    pub fn chunker_for(&self, changed_block_tracking: bool) -> ChunkerConfig {
        match self.file_chunker {
            Some(c) if !changed_block_tracking => c,
            _ => self.chunker,
        }
    }

    /// Checks version and chunker settings.
    pub fn validate(&self) -> crate::Result<()> {
        if !(MIN_FORMAT_VERSION..=FORMAT_VERSION).contains(&self.version) {
            return Err(crate::Error::UnsupportedVersion(self.version, FORMAT_VERSION));
        }
        self.chunker.validate()?;
        if let Some(c) = &self.file_chunker {
            c.validate()?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_1_configs_still_read_and_use_one_chunker() {
        let v1 = r#"{"version":1,"id":"00","chunker":{"kind":"fixed","size":65536},
            "pack_size":33554432,"zstd_level":1}"#;
        let c: RepoConfig = serde_json::from_str(v1).unwrap();
        c.validate().unwrap();
        assert_eq!(c.chunker_for(false), ChunkerConfig::Fixed { size: 65536 });
        let d = RepoConfig::default();
        assert_eq!(d.version, 2);
        assert_eq!(d.chunker_for(true), ChunkerConfig::default());
        assert_eq!(d.chunker_for(false), DEFAULT_FILE_CHUNKER);
        let v9 = RepoConfig { version: 9, ..RepoConfig::default() };
        assert!(matches!(v9.validate(), Err(crate::Error::UnsupportedVersion(9, 2))));
    }
}

//! Chunking: how a source is cut into chunks, and chunk identity.
//!
//! Block images use fixed-size chunks aligned to the source offset (a changed 4 KiB write
//! changes exactly one chunk); other sources may use content-defined chunking
//! ([`cdc`], FastCDC-style gear hash) so insertions do not shift every later chunk.
//! All-zero chunks are detected here and stored as holes, never as data.

pub mod cdc;
mod id;

pub use id::ChunkId;

use serde::{Deserialize, Serialize};

/// Default fixed chunk size for block images: small enough that scattered 64 KiB writes
/// store about what changed.
pub const DEFAULT_CHUNK_SIZE: u32 = 64 * 1024;
/// Smallest and largest allowed fixed chunk sizes.
pub const MIN_CHUNK_SIZE: u32 = 4 * 1024;
pub const MAX_CHUNK_SIZE: u32 = 8 * 1024 * 1024;

/// How a source is cut into chunks (stored in the repository config and in each snapshot).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum ChunkerConfig {
    /// Fixed-size chunks aligned to offset 0.
    Fixed { size: u32 },
    /// Content-defined chunks with the given minimum / average / maximum sizes.
    Cdc { min: u32, avg: u32, max: u32 },
}

impl Default for ChunkerConfig {
    fn default() -> Self {
        ChunkerConfig::Fixed { size: DEFAULT_CHUNK_SIZE }
    }
}

impl ChunkerConfig {
    /// Checks the sizes are sane.
    pub fn validate(&self) -> crate::Result<()> {
        let ok = match *self {
            ChunkerConfig::Fixed { size } => (MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&size),
            ChunkerConfig::Cdc { min, avg, max } => min >= 1024 && min < avg && avg < max && max <= MAX_CHUNK_SIZE,
        };
        if ok {
            Ok(())
        } else {
            Err(crate::Error::Invalid(format!("bad chunker settings {self:?}")))
        }
    }

    /// Largest chunk this chunker can produce.
    pub fn max_chunk(&self) -> usize {
        match *self {
            ChunkerConfig::Fixed { size } => size as usize,
            ChunkerConfig::Cdc { max, .. } => max as usize,
        }
    }
}

/// True when every byte is zero (compared in 16-byte words, which compiles to SIMD).
pub fn is_zero(data: &[u8]) -> bool {
    let mut words = data.chunks_exact(16);
    let body = words.by_ref().all(|w| u128::from_ne_bytes(w.try_into().unwrap_or([1; 16])) == 0);
    body && words.remainder().iter().all(|&b| b == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_detection() {
        assert!(is_zero(&[0u8; 100]));
        assert!(is_zero(&[]));
        for i in 0..100 {
            let mut v = vec![0u8; 100];
            v[i] = 1;
            assert!(!is_zero(&v), "byte {i}");
        }
    }
}

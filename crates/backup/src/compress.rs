//! zstd decompression of repository data with memory bounded by what the data really holds.
//!
//! The plaintext length stored beside a compressed payload (a blob's `raw_len`, an index or
//! snapshot header's length) is only a claim: `zstd::bulk::decompress` allocates the whole
//! claimed capacity up front, so a damaged or hostile object claiming gigabytes would make
//! the reader allocate gigabytes (and abort where that fails) before zstd looks at a byte.
//! Here the output grows only as zstd produces it.

use std::io::{self, Read};

/// Output buffer reserved up front: every chunk (at most `MAX_CHUNK_SIZE`) fits in it.
const INITIAL_CAPACITY: usize = crate::chunk::MAX_CHUNK_SIZE as usize;

/// Decompresses the zstd frames in `z`, failing once the output exceeds `max` bytes: the
/// same results as `zstd::bulk::decompress(z, max)`, with memory proportional to the output.
pub(crate) fn decompress_at_most(z: &[u8], max: usize) -> io::Result<Vec<u8>> {
    let mut out = Vec::with_capacity(max.min(INITIAL_CAPACITY));
    let limit = u64::try_from(max).unwrap_or(u64::MAX).saturating_add(1);
    zstd::stream::read::Decoder::with_buffer(z)?.take(limit).read_to_end(&mut out)?;
    if out.len() > max {
        return Err(io::Error::new(io::ErrorKind::InvalidData, format!("more than the expected {max} bytes")));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_bounds_the_output() {
        let plain = vec![7u8; 100_000];
        let z = zstd::bulk::compress(&plain, 3).unwrap();
        assert_eq!(decompress_at_most(&z, plain.len()).unwrap(), plain);
        assert_eq!(decompress_at_most(&z, usize::MAX).unwrap(), plain);
        assert!(decompress_at_most(&z, plain.len() - 1).is_err());
        assert!(decompress_at_most(b"not zstd", 10).is_err());
        assert_eq!(decompress_at_most(&zstd::bulk::compress(b"", 3).unwrap(), 0).unwrap(), b"");
    }

    #[test]
    fn a_huge_claimed_length_costs_nothing_up_front() {
        // A tiny frame with a claimed length of 4 GiB: fails or succeeds on what the frame
        // holds, without reserving the claimed length.
        let z = zstd::bulk::compress(b"hello", 3).unwrap();
        assert_eq!(decompress_at_most(&z, u32::MAX as usize).unwrap(), b"hello");
        assert!(decompress_at_most(&[0xf0, 0xf0, 0xf0, 0xf0, 0x75], 1 << 34).is_err());
    }
}

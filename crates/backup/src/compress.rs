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

/// Decompresses one chunk's blob, whose plaintext is `raw_len` bytes at most
/// [`MAX_CHUNK_SIZE`](crate::chunk::MAX_CHUNK_SIZE) (a larger claim fails before anything is
/// allocated): in one pass into a buffer of that size, with the thread's reused zstd
/// context (the streaming decoder of [`decompress_at_most`] copies through its own window
/// and builds a context per call: a tenth of a restore's CPU time). Fails when the frame
/// holds more than `raw_len` bytes.
pub(crate) fn decompress_chunk(z: &[u8], raw_len: usize) -> io::Result<Vec<u8>> {
    thread_local! {
        static DCTX: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> = const { std::cell::RefCell::new(None) };
    }
    if raw_len > INITIAL_CAPACITY {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("a chunk of {raw_len} bytes is over the limit"),
        ));
    }
    let mut out = Vec::with_capacity(raw_len);
    DCTX.with(|cell| {
        let mut cell = cell.borrow_mut();
        let dctx = match cell.as_mut() {
            Some(d) => d,
            None => cell.insert(zstd::bulk::Decompressor::new()?),
        };
        dctx.decompress_to_buffer(z, &mut out)
    })
    .map_err(|e| {
        io::Error::new(io::ErrorKind::InvalidData, format!("more than the expected {raw_len} bytes or damaged: {e}"))
    })?;
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
    fn chunks_decompress_in_one_pass_within_their_bound() {
        let plain: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let z = zstd::bulk::compress(&plain, 3).unwrap();
        for _ in 0..3 {
            assert_eq!(decompress_chunk(&z, plain.len()).unwrap(), plain);
        }
        // A shorter output comes back as it is (the caller checks the length).
        assert_eq!(decompress_chunk(&z, plain.len() + 10).unwrap(), plain);
        assert!(decompress_chunk(&z, plain.len() - 1).is_err());
        assert!(decompress_chunk(b"not zstd", 10).is_err());
        assert!(decompress_chunk(&z, crate::chunk::MAX_CHUNK_SIZE as usize + 1).is_err());
        assert_eq!(decompress_chunk(&zstd::bulk::compress(b"", 3).unwrap(), 0).unwrap(), b"");
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

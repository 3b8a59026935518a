//! `BlockDevice`: what a frontend (the NBD server, later the FUSE file) serves.
//!
//! Boundary: frontends speak only this trait. The replicated volume engine implements it
//! for real volumes; `MemDevice` implements it for frontend tests.
//!
//! Contract:
//! - Offsets and lengths passed here are multiples of [`BlockDevice::block_size`] and inside
//!   [`BlockDevice::size`]; frontends turn unaligned client requests into read-modify-write
//!   and must serialise overlapping read-modify-writes themselves (across connections).
//! - A `write` returns once the write is acknowledged (for a replicated volume: by a write
//!   quorum). With `fua`, it returns once the write is durable.
//! - `flush` returns once every write acknowledged before the call is durable.
//! - `trim` deallocates (reads return zeroes afterwards); `write_zeroes` with `may_trim`
//!   may deallocate, without it must leave the range allocated and zeroed.

use std::future::Future;

use crate::error::Result;

/// A block device a frontend can serve. See the module docs for the contract.
pub trait BlockDevice: Send + Sync + 'static {
    /// Size in bytes (a multiple of `block_size`).
    fn size(&self) -> u64;
    /// The device's block size: the alignment of every request passed to it.
    fn block_size(&self) -> u32 {
        4096
    }
    /// Whether several connections may use the device at once with consistent results
    /// (a flush on one connection covers writes acknowledged on every connection).
    fn multi_conn(&self) -> bool {
        true
    }
    /// A short identifier for logs and errors (the volume name).
    fn name(&self) -> &str;
    fn read(&self, offset: u64, len: u64) -> impl Future<Output = Result<Vec<u8>>> + Send;
    fn write(&self, offset: u64, data: Vec<u8>, fua: bool) -> impl Future<Output = Result<()>> + Send;
    fn flush(&self) -> impl Future<Output = Result<()>> + Send;
    fn trim(&self, offset: u64, len: u64) -> impl Future<Output = Result<()>> + Send;
    fn write_zeroes(&self, offset: u64, len: u64, may_trim: bool) -> impl Future<Output = Result<()>> + Send;
}

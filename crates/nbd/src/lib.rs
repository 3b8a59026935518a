//! NBD protocol server (newstyle fixed handshake, transmission phase) serving a
//! [`hlstore_core::BlockDevice`].
//!
//! Module map:
//! - [`proto`]: wire constants; [`request`] and [`option`]: pure parsers and validation
//!   (fuzzed); [`errno`]: engine error → reply errno, in one place.
//! - [`handshake`]: the typestate `Negotiating → Transmission`; [`connection`]: the
//!   transmission phase (pipelined requests, one writer per socket).
//! - [`block_io`]: unaligned requests → aligned device calls (read-modify-write) under the
//!   export's [`range_lock`]; [`registry`]: name → export; [`server`]: listeners and shutdown;
//!   [`stats`]: counters; [`export_io`]: per-export counters and latency histograms; [`mem`]: `MemDevice`, an in-memory device for tests and demos.
//!
//! Invariants:
//! - A reply is sent only after the device finished the request (never before FUA/flush
//!   completed), so `CAN_MULTI_CONN` is advertised exactly when the device says
//!   `multi_conn()`.
//! - Overlapping mutating requests of one device are serialised across all its connections
//!   (`RangeLock`), so read-modify-write never loses a concurrent write.
//! - A malformed request gets an error reply and the connection goes on; only a request the
//!   server cannot stay in sync after (bad magic, undrainable payload) closes it, after the
//!   requests already in flight are answered.
//!
//! Choices (and why):
//! - Simple replies only: structured replies, metadata contexts and TLS are refused with
//!   `NBD_REP_ERR_UNSUP`, which every client handles; reads are whole or failed.
//! - Block sizes advertised as 1 / device block size / [`request::MAX_PAYLOAD`]: clients may
//!   send any alignment, the server does the read-modify-write (qemu, libnbd and the kernel
//!   all send unaligned requests when allowed to).
//! - TRIM discards only the whole blocks inside its range (TRIM is advisory; partial edge
//!   blocks keep their data). WRITE_ZEROES zeroes exactly its range.
//! - A fenced engine (`StaleEpoch`) answers `ESHUTDOWN`, then the server closes the
//!   connection (in-flight requests still get their replies): the client reconnects and
//!   reaches the engine that holds the volume now.
//! - Read-only exports (`ExportRegistry::insert_read_only`, e.g. snapshots) advertise
//!   `NBD_FLAG_READ_ONLY` and answer writes, trims and zeroings with `EPERM`.

pub mod block_io;
pub mod connection;
pub mod errno;
pub mod export_io;
pub mod handshake;
#[cfg(any(test, feature = "testing"))]
pub mod mem;
pub mod option;
pub mod proto;
pub mod range_lock;
pub mod registry;
pub mod request;
pub mod server;
pub mod stats;

pub use export_io::ExportIo;
pub use handshake::{Negotiating, Transmission};
#[cfg(any(test, feature = "testing"))]
pub use mem::MemDevice;
pub use registry::{Export, ExportRegistry};
pub use server::{NbdServer, ShutdownHandle};
pub use stats::NbdStats;

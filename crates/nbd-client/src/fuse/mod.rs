//! FUSE "block file": one NBD export exposed as a single regular file, so that a loop device
//! (and a real filesystem on it) can run on a volume where the kernel has no NBD client.
//!
//! ```text
//! Reconnecting (NbdClient) ──► BlockFileFs (FUSE, DIR/disk) ──► losetup /dev/loopN ──► mkfs.ext4, mount
//! ```
//!
//! Module map: [`fs`]: `BlockFileFs`, the operations and how each maps to NBD;
//! [`mount`]: `FuseMount`, mounting and (guaranteed) unmounting.
//!
//! Caching choice — the file is opened with `FOPEN_DIRECT_IO`, so it has no page cache:
//! - The loop device and the filesystem above it already cache in their own page cache (the
//!   loop block device's). A second cache of the FUSE file would hold every block twice
//!   and, worse, make `fsync` ordering depend on writeback of a cache the loop driver does
//!   not know about. With direct I/O every write the loop driver issues is a WRITE on the
//!   export when it returns, and the loop driver's flush (`vfs_fsync` on the file) becomes
//!   an NBD FLUSH that covers it.
//! - Reads always come from the export, so another reader of the export (a snapshot, a
//!   backup) and this file never disagree about acknowledged data.
//! - Use `losetup --direct-io=off` (the loop driver then uses buffered calls on the file,
//!   which direct I/O on the FUSE side turns into requests at once); `--direct-io=on` would
//!   add nothing, the FUSE file has no cache to bypass.
//! - Writes are not serialised by the kernel (`FOPEN_PARALLEL_DIRECT_WRITES`); requests run
//!   as tokio tasks and are pipelined on the one NBD connection.
//!
//! Failure: every request is bounded by the NBD client's request timeout. A dead connection
//! (the agent serving the export restarted, the volume was re-attached) is replaced by a new
//! one and the requests in flight are sent again ([`crate::reconnect`]); the loop device and
//! the filesystem above only see them take longer. A request that cannot be served within
//! the reconnect window returns `EIO`.

pub mod fs;
pub mod mount;

pub use fs::{errno_for, BlockFileFs};
pub use mount::{FuseMount, DEFAULT_FILE_NAME};

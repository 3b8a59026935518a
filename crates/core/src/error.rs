//! The engine's one public error type.
//!
//! Rules (kept everywhere in this crate):
//! - Every error names what it is about: the volume, and the offset/length where there is one.
//! - `kind()` is stable and is what callers match on; the message is for humans.
//! - Corruption is its own kind and is never turned into data: a read that fails its
//!   checksum returns `Corruption`, never bytes.
//! - Conversion to and from `tonic::Status` happens in one place
//!   (`hlstore_replication::rpc::status`), with an exhaustive
//!   match on `ErrorKind`.

use std::io;

/// A stable classification of engine errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// The request itself is malformed (unaligned, zero-sized volume, bad name...).
    InvalidArgument,
    /// Offset/length outside the volume.
    OutOfRange,
    /// No such volume/replica.
    NotFound,
    /// A volume/replica with this id exists with a different definition.
    AlreadyExists,
    /// The caller's epoch is older than the recorded one: it has been fenced.
    StaleEpoch,
    /// A block failed checksum verification.
    Corruption,
    /// Not enough replicas answered (quorum lost) or a deadline passed.
    Unavailable,
    /// The device or metadata store failed.
    Io,
    /// A bug or an impossible state.
    Internal,
    /// The operation is not supported by this implementation (or peer version).
    Unsupported,
    /// A compare-and-set lost: another engine changed what the caller based its request on
    /// (e.g. it attached the volume meanwhile).
    Conflict,
    /// No node has room for what was asked (a replica of this size).
    NoSpace,
}

/// The engine error: a kind, a message with context, and an optional source.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("volume {volume}: range offset={offset} length={length} is outside the volume (size {size})")]
    OutOfRange { volume: String, offset: u64, length: u64, size: u64 },
    #[error("not found: {0}")]
    NotFound(String),
    #[error("already exists: {0}")]
    AlreadyExists(String),
    #[error("volume {volume}: epoch {got} is older than the current epoch {current} (fenced)")]
    StaleEpoch { volume: String, got: u64, current: u64 },
    /// A peer reported that our epoch is stale (its message says which).
    #[error("fenced: {0}")]
    Fenced(String),
    #[error("volume {volume}: checksum mismatch in block at offset {offset} (stored crc {expected:#010x}, data crc {actual:#010x})")]
    Corruption { volume: String, offset: u64, expected: u32, actual: u32 },
    #[error("unavailable: {0}")]
    Unavailable(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    #[error("metadata store: {context}: {message}")]
    Meta { context: String, message: String },
    #[error("internal error: {0}")]
    Internal(String),
    #[error("not supported: {0}")]
    Unsupported(String),
    #[error("conflict: {0}")]
    Conflict(String),
    #[error("no space: {0}")]
    NoSpace(String),
}

impl Error {
    /// The stable kind of this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::InvalidArgument(_) => ErrorKind::InvalidArgument,
            Error::OutOfRange { .. } => ErrorKind::OutOfRange,
            Error::NotFound(_) => ErrorKind::NotFound,
            Error::AlreadyExists(_) => ErrorKind::AlreadyExists,
            Error::StaleEpoch { .. } | Error::Fenced(_) => ErrorKind::StaleEpoch,
            Error::Corruption { .. } => ErrorKind::Corruption,
            Error::Unavailable(_) => ErrorKind::Unavailable,
            Error::Io { .. } | Error::Meta { .. } => ErrorKind::Io,
            Error::Internal(_) => ErrorKind::Internal,
            Error::Unsupported(_) => ErrorKind::Unsupported,
            Error::Conflict(_) => ErrorKind::Conflict,
            Error::NoSpace(_) => ErrorKind::NoSpace,
        }
    }

    /// Wraps an I/O error with what was being done.
    pub fn io(context: impl Into<String>, source: io::Error) -> Self {
        Error::Io { context: context.into(), source }
    }
}

/// Result alias for the engine.
pub type Result<T, E = Error> = std::result::Result<T, E>;

//! Engine errors ↔ `tonic::Status`, in one place.

use tonic::{Code, Status};

use hlstore_core::error::{Error, ErrorKind};

/// Maps an engine error to a gRPC status. Exhaustive on purpose: a new kind must choose.
pub fn to_status(e: &Error) -> Status {
    let code = match e.kind() {
        ErrorKind::InvalidArgument => Code::InvalidArgument,
        ErrorKind::OutOfRange => Code::OutOfRange,
        ErrorKind::NotFound => Code::NotFound,
        ErrorKind::AlreadyExists => Code::AlreadyExists,
        ErrorKind::StaleEpoch => Code::FailedPrecondition,
        ErrorKind::Corruption => Code::DataLoss,
        ErrorKind::Unavailable => Code::Unavailable,
        ErrorKind::Io => Code::Internal,
        ErrorKind::Internal => Code::Internal,
        ErrorKind::Unsupported => Code::Unimplemented,
        ErrorKind::Conflict => Code::Aborted,
    };
    Status::new(code, e.to_string())
}

/// Maps a gRPC status from a peer back to an engine error (for clients of the service).
pub fn from_status(s: &Status) -> Error {
    let msg = s.message().to_string();
    match s.code() {
        Code::InvalidArgument => Error::InvalidArgument(msg),
        Code::NotFound => Error::NotFound(msg),
        Code::AlreadyExists => Error::AlreadyExists(msg),
        Code::FailedPrecondition => Error::Fenced(msg),
        Code::OutOfRange => Error::InvalidArgument(msg),
        Code::DataLoss => Error::Unavailable(format!("replica reported corruption: {msg}")),
        Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled => Error::Unavailable(msg),
        Code::Unimplemented => Error::Unsupported(msg),
        Code::Aborted => Error::Conflict(msg),
        _ => Error::Internal(format!("{}: {msg}", s.code())),
    }
}

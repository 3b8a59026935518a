//! Engine errors → NBD reply error values, in one place.

use super::proto::{EINVAL, EIO, ENOSPC, ESHUTDOWN};
use hlstore_core::error::{Error, ErrorKind};

/// The errno an NBD reply carries for a device error. `is_write` selects `ENOSPC` for
/// out-of-range writes, as the protocol asks.
pub fn errno_for(err: &Error, is_write: bool) -> u32 {
    match err.kind() {
        ErrorKind::InvalidArgument => EINVAL,
        ErrorKind::OutOfRange if is_write => ENOSPC,
        ErrorKind::OutOfRange => EINVAL,
        // The engine was fenced by a newer one: it will never serve this volume again, and
        // ESHUTDOWN tells the client to disconnect (and reconnect to the new engine).
        ErrorKind::StaleEpoch => ESHUTDOWN,
        ErrorKind::NotFound
        | ErrorKind::AlreadyExists
        | ErrorKind::Corruption
        | ErrorKind::Unavailable
        | ErrorKind::Io
        | ErrorKind::Conflict
        | ErrorKind::Internal => EIO,
        ErrorKind::NoSpace => ENOSPC,
        ErrorKind::Unsupported => EINVAL,
    }
}

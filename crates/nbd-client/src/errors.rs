//! NBD reply errno → engine [`Error`], in one place (the inverse of `nbd::errno`).

use std::io;

use hlstore_core::error::Error;
use hlstore_nbd::proto::{EINVAL, EIO, ENOSPC, ENOTSUP, EOVERFLOW, EPERM, ESHUTDOWN};

/// What a failed request was, for the error message.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RequestContext<'a> {
    pub export: &'a str,
    pub op: &'static str,
    pub offset: u64,
    pub length: u64,
    pub size: u64,
}

/// The engine error for an NBD reply carrying `errno`.
///
/// - `EINVAL`, `EOVERFLOW`, `ENOTSUP` → `InvalidArgument` (the request was refused as such);
/// - `ENOSPC` → `OutOfRange`;
/// - `ESHUTDOWN` → `Fenced` (the server stopped serving the volume: a newer engine owns it);
/// - `EIO`, `EPERM` and anything else → `Io`, keeping the errno as the source's OS error so
///   a frontend can pass it on unchanged.
pub(crate) fn reply_error(errno: u32, cx: RequestContext<'_>) -> Error {
    let RequestContext { export, op, offset, length, size } = cx;
    let what = format!("nbd export {export:?}: {op} offset={offset} length={length}");
    match errno {
        EINVAL | EOVERFLOW | ENOTSUP => {
            Error::InvalidArgument(format!("{what}: refused by the server (errno {errno})"))
        }
        ENOSPC => Error::OutOfRange { volume: export.to_string(), offset, length, size },
        ESHUTDOWN => Error::Fenced(format!("{what}: the server is shutting the export down")),
        EPERM => Error::io(what, io::Error::from_raw_os_error(EPERM as i32)),
        EIO => Error::io(what, io::Error::from_raw_os_error(EIO as i32)),
        other => Error::io(what, io::Error::from_raw_os_error(i32::try_from(other).unwrap_or(EIO as i32))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hlstore_core::ErrorKind;

    #[test]
    fn maps_each_errno_to_its_kind() {
        let cx = RequestContext { export: "v", op: "write", offset: 0, length: 1, size: 1 };
        assert_eq!(reply_error(EINVAL, cx).kind(), ErrorKind::InvalidArgument);
        assert_eq!(reply_error(ENOSPC, cx).kind(), ErrorKind::OutOfRange);
        assert_eq!(reply_error(ESHUTDOWN, cx).kind(), ErrorKind::StaleEpoch);
        let eio = reply_error(EIO, cx);
        assert_eq!(eio.kind(), ErrorKind::Io);
        let Error::Io { source, .. } = eio else { panic!("not Io") };
        assert_eq!(source.raw_os_error(), Some(EIO as i32));
        assert_eq!(reply_error(EPERM, cx).kind(), ErrorKind::Io);
    }
}

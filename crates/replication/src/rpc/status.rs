//! Engine errors ↔ `tonic::Status`: the one mapping, used by every server and client of
//! the hlstore gRPC services (replica and volume).
//!
//! - **Codes.** [`to_status`] chooses the code by an exhaustive match on [`ErrorKind`];
//!   [`from_status`] inverts it. These codes are the wire contract (other components and
//!   tests match on them): `FAILED_PRECONDITION` stale epoch, `ABORTED` conflict,
//!   `DATA_LOSS` corruption, `UNIMPLEMENTED` unsupported, and so on.
//! - **Structured data** travels in metadata entries, never in the message text: the
//!   volume ([`VOLUME`], binary), the caller's epoch ([`EPOCH`]) and the current epoch
//!   ([`CURRENT_EPOCH`]) of a stale epoch; the offset ([`OFFSET`]) and checksums
//!   ([`STORED_CRC`], [`DATA_CRC`]) of a corruption; offset, length and size of an
//!   out-of-range request. The message is for humans and may carry context.
//! - **Lossy on purpose.** `Io` and `Internal` share `INTERNAL` and come back as
//!   `Internal` (an I/O error of a peer is its internal failure; its source cannot cross
//!   the wire). A status without the structured entries (from an older peer or another
//!   server) still maps by its code: a stale epoch becomes `Fenced`, an out-of-range
//!   request `InvalidArgument`, a corruption `Corruption` at offset 0.
//! - **Replica calls** of the engine ([`replica_call_error`]) decode the same way and then
//!   apply the engine's rule: what is not fencing, a lost claim, a corrupt block or an
//!   unsupported call means the replica is unavailable.

use tonic::metadata::{AsciiMetadataValue, BinaryMetadataValue, MetadataMap};
use tonic::{Code, Status};

use hlstore_core::error::{Error, ErrorKind};

/// Metadata key: the volume an error is about (binary: names may be any UTF-8).
pub const VOLUME: &str = "hlstore-volume-bin";
/// Metadata key: the epoch the fenced request carried.
pub const EPOCH: &str = "hlstore-epoch";
/// Metadata key: the epoch the replica holds (newer than the request's).
pub const CURRENT_EPOCH: &str = "hlstore-current-epoch";
/// Metadata key: the offset of a corrupt block, or of an out-of-range request.
pub const OFFSET: &str = "hlstore-offset";
/// Metadata key: the length of an out-of-range request.
pub const LENGTH: &str = "hlstore-length";
/// Metadata key: the volume size an out-of-range request was checked against.
pub const SIZE: &str = "hlstore-size";
/// Metadata key: the checksum stored with a corrupt block.
pub const STORED_CRC: &str = "hlstore-stored-crc";
/// Metadata key: the checksum of the data read for a corrupt block.
pub const DATA_CRC: &str = "hlstore-data-crc";

/// The gRPC code of an error kind. Exhaustive on purpose: a new kind must choose.
pub fn code(kind: ErrorKind) -> Code {
    match kind {
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
        ErrorKind::NoSpace => Code::ResourceExhausted,
    }
}

/// Maps an engine error to a gRPC status: its kind's code, its message, and its
/// structured fields as metadata.
pub fn to_status(e: &Error) -> Status {
    let mut md = MetadataMap::new();
    match e {
        Error::StaleEpoch { volume, got, current } => {
            put_volume(&mut md, volume);
            put_u64(&mut md, EPOCH, *got);
            put_u64(&mut md, CURRENT_EPOCH, *current);
        }
        Error::Corruption { volume, offset, expected, actual } => {
            put_volume(&mut md, volume);
            put_u64(&mut md, OFFSET, *offset);
            put_u64(&mut md, STORED_CRC, u64::from(*expected));
            put_u64(&mut md, DATA_CRC, u64::from(*actual));
        }
        Error::OutOfRange { volume, offset, length, size } => {
            put_volume(&mut md, volume);
            put_u64(&mut md, OFFSET, *offset);
            put_u64(&mut md, LENGTH, *length);
            put_u64(&mut md, SIZE, *size);
        }
        _ => {}
    }
    Status::with_metadata(code(e.kind()), e.to_string(), md)
}

/// Maps a gRPC status (from a peer, or from a local service) back to an engine error.
pub fn from_status(s: &Status) -> Error {
    let msg = s.message().to_string();
    let md = s.metadata();
    match s.code() {
        Code::InvalidArgument => Error::InvalidArgument(msg),
        Code::NotFound => Error::NotFound(msg),
        Code::AlreadyExists => Error::AlreadyExists(msg),
        Code::FailedPrecondition => match get_u64(md, CURRENT_EPOCH) {
            Some(current) => {
                Error::StaleEpoch { volume: get_volume(md), got: get_u64(md, EPOCH).unwrap_or(0), current }
            }
            None => Error::Fenced(msg),
        },
        Code::OutOfRange => match (get_u64(md, OFFSET), get_u64(md, LENGTH), get_u64(md, SIZE)) {
            (Some(offset), Some(length), Some(size)) => {
                Error::OutOfRange { volume: get_volume(md), offset, length, size }
            }
            _ => Error::InvalidArgument(msg),
        },
        Code::DataLoss => Error::Corruption {
            volume: get_volume(md),
            offset: get_u64(md, OFFSET).unwrap_or(0),
            expected: get_crc(md, STORED_CRC),
            actual: get_crc(md, DATA_CRC),
        },
        Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled => Error::Unavailable(msg),
        Code::Unimplemented => Error::Unsupported(msg),
        Code::Aborted => Error::Conflict(msg),
        Code::ResourceExhausted => Error::NoSpace(msg),
        _ => Error::Internal(format!("{}: {msg}", s.code())),
    }
}

/// Maps the status of a call the engine made to a replica (`call`, under `epoch`) to the
/// engine error, adding which replica, volume and call. Fencing becomes `StaleEpoch`
/// (current epoch from the status; `epoch + 1` when an older peer did not send it), a lost
/// claim `Conflict`, a corrupt block `Corruption` (the replica is fine, the block is not:
/// the engine repairs it), an unsupported call `Unsupported` (callers decide whether they
/// can do without it); anything else `Unavailable`.
pub fn replica_call_error(replica: &str, volume: &str, call: &str, epoch: u64, s: &Status) -> Error {
    let context = || format!("replica {replica}, volume {volume}, {call}: {}", s.message());
    match from_status(s) {
        Error::StaleEpoch { current, .. } => Error::StaleEpoch { volume: volume.to_string(), got: epoch, current },
        e if e.kind() == ErrorKind::StaleEpoch => {
            Error::StaleEpoch { volume: volume.to_string(), got: epoch, current: epoch + 1 }
        }
        Error::Corruption { offset, expected, actual, .. } => {
            Error::Corruption { volume: volume.to_string(), offset, expected, actual }
        }
        e if e.kind() == ErrorKind::Conflict => Error::Conflict(context()),
        e if e.kind() == ErrorKind::Unsupported => Error::Unsupported(context()),
        _ => Error::Unavailable(format!("replica {replica}, volume {volume}, {call}: {}: {}", s.code(), s.message())),
    }
}

fn put_u64(md: &mut MetadataMap, key: &'static str, v: u64) {
    md.insert(key, AsciiMetadataValue::from(v));
}

fn put_volume(md: &mut MetadataMap, volume: &str) {
    md.insert_bin(VOLUME, BinaryMetadataValue::from_bytes(volume.as_bytes()));
}

fn get_u64(md: &MetadataMap, key: &str) -> Option<u64> {
    md.get(key)?.to_str().ok()?.parse().ok()
}

fn get_crc(md: &MetadataMap, key: &str) -> u32 {
    get_u64(md, key).and_then(|v| u32::try_from(v).ok()).unwrap_or(0)
}

fn get_volume(md: &MetadataMap) -> String {
    md.get_bin(VOLUME)
        .and_then(|v| v.to_bytes().ok())
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One error of every kind (`Fenced` and `Meta` too: they share a kind with another
    /// variant).
    fn every_kind() -> Vec<Error> {
        vec![
            Error::InvalidArgument("offset 100 is not aligned".into()),
            Error::OutOfRange { volume: "vol-é".into(), offset: 1 << 30, length: 4096, size: 1 << 20 },
            Error::NotFound("volume nope".into()),
            Error::AlreadyExists("volume v with size 4096".into()),
            Error::StaleEpoch { volume: "vol".into(), got: 3, current: 7 },
            Error::Fenced("a newer engine holds the volume".into()),
            Error::Corruption { volume: "vol".into(), offset: 8192, expected: 0xdead_beef, actual: 0x1234_5678 },
            Error::Unavailable("no quorum".into()),
            Error::io("writing block 3", std::io::Error::other("disk on fire")),
            Error::Meta { context: "opening".into(), message: "bad column family".into() },
            Error::Internal("impossible state".into()),
            Error::Unsupported("snapshots".into()),
            Error::Conflict("claimed by another engine".into()),
        ]
    }

    #[test]
    fn every_kind_has_its_code() {
        let codes: Vec<Code> = every_kind().iter().map(|e| to_status(e).code()).collect();
        use Code::*;
        assert_eq!(
            codes,
            [
                InvalidArgument,
                OutOfRange,
                NotFound,
                AlreadyExists,
                FailedPrecondition,
                FailedPrecondition,
                DataLoss,
                Unavailable,
                Internal,
                Internal,
                Internal,
                Unimplemented,
                Aborted
            ]
        );
    }

    #[test]
    fn round_trip_keeps_kind_and_structured_data() {
        for e in every_kind() {
            let s = to_status(&e);
            let back = from_status(&s);
            // Io crosses the wire as INTERNAL and comes back as Internal (see module docs).
            let want = if e.kind() == ErrorKind::Io { ErrorKind::Internal } else { e.kind() };
            assert_eq!(back.kind(), want, "{e:?} -> {s:?} -> {back:?}");
            assert!(
                back.to_string().contains(&e.to_string()) || e.to_string().contains(&back.to_string()),
                "{e} / {back}"
            );
            match (&e, &back) {
                (Error::StaleEpoch { .. }, _) | (Error::Corruption { .. }, _) | (Error::OutOfRange { .. }, _) => {
                    assert_eq!(format!("{e:?}"), format!("{back:?}"))
                }
                _ => {}
            }
        }
    }

    #[test]
    fn structured_data_is_metadata_not_text() {
        let s = to_status(&Error::StaleEpoch { volume: "v".into(), got: 3, current: 7 });
        let s = Status::with_metadata(s.code(), "fenced", s.metadata().clone());
        assert!(matches!(from_status(&s), Error::StaleEpoch { current: 7, got: 3, ref volume } if volume == "v"));
        let s = to_status(&Error::Corruption { volume: "v".into(), offset: 12288, expected: 1, actual: 2 });
        let s = Status::with_metadata(s.code(), "bad block", s.metadata().clone());
        assert!(matches!(from_status(&s), Error::Corruption { offset: 12288, expected: 1, actual: 2, .. }));
    }

    #[test]
    fn statuses_without_metadata_map_by_code() {
        let fenced = from_status(&Status::failed_precondition("the current epoch 9"));
        assert!(matches!(fenced, Error::Fenced(_)), "{fenced:?}");
        assert_eq!(fenced.kind(), ErrorKind::StaleEpoch);
        let range = from_status(&Status::out_of_range("past the end"));
        assert_eq!(range.kind(), ErrorKind::InvalidArgument);
        let corrupt = from_status(&Status::data_loss("block at offset 4096"));
        assert!(matches!(corrupt, Error::Corruption { offset: 0, .. }), "{corrupt:?}");
        assert_eq!(from_status(&Status::deadline_exceeded("slow")).kind(), ErrorKind::Unavailable);
        assert_eq!(from_status(&Status::unknown("?")).kind(), ErrorKind::Internal);
    }

    #[test]
    fn replica_calls_keep_the_engine_rules() {
        let call = |e: &Error| replica_call_error("n2", "vol", "write", 4, &to_status(e));
        let stale = call(&Error::StaleEpoch { volume: "vol".into(), got: 4, current: 9 });
        assert!(matches!(stale, Error::StaleEpoch { got: 4, current: 9, .. }), "{stale:?}");
        let old_peer = replica_call_error("n2", "vol", "write", 4, &Status::failed_precondition("fenced"));
        assert!(matches!(old_peer, Error::StaleEpoch { got: 4, current: 5, .. }), "{old_peer:?}");
        let corrupt = call(&Error::Corruption { volume: "vol".into(), offset: 8192, expected: 1, actual: 2 });
        assert!(matches!(corrupt, Error::Corruption { offset: 8192, .. }), "{corrupt:?}");
        let conflict = call(&Error::Conflict("claimed".into()));
        assert_eq!(conflict.kind(), ErrorKind::Conflict);
        assert!(conflict.to_string().contains("replica n2, volume vol, write"), "{conflict}");
        assert_eq!(call(&Error::Unsupported("snapshots".into())).kind(), ErrorKind::Unsupported);
        for e in [
            Error::NotFound("vol".into()),
            Error::InvalidArgument("x".into()),
            Error::Internal("x".into()),
            Error::OutOfRange { volume: "vol".into(), offset: 0, length: 1, size: 0 },
        ] {
            let got = call(&e);
            assert_eq!(got.kind(), ErrorKind::Unavailable, "{e:?} -> {got:?}");
            assert!(got.to_string().contains("replica n2, volume vol, write"), "{got}");
        }
    }
}

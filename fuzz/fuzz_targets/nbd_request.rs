//! NBD transmission requests: `RequestHeader::parse` on the 28 header bytes, then `plan` /
//! `plan_for_export`, the checks the connection applies before serving anything.
//!
//! Input: `mode u8 | size u64 (BE) | header bytes`. Mode bit 0 writes the request magic
//! over the header (so most inputs reach `plan`), bit 1 makes the export read-only.
//! Whatever is planned must be safe to serve; a violation is a crash.

#![no_main]

use hlstore_nbd::proto::*;
use hlstore_nbd::request::{plan, plan_for_export, Op, Plan, RequestHeader, MAX_DRAIN, MAX_PAYLOAD};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    let mut size = [0u8; 8];
    let n = rest.len().min(8);
    size[..n].copy_from_slice(&rest[..n]);
    let size = u64::from_be_bytes(size);
    let rest = &rest[n..];
    let mut buf = [0u8; REQUEST_HEADER_LEN];
    let n = rest.len().min(REQUEST_HEADER_LEN);
    buf[..n].copy_from_slice(&rest[..n]);
    if mode & 1 != 0 {
        buf[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    }
    let read_only = mode & 2 != 0;

    let header = match RequestHeader::parse(&buf) {
        Ok(h) => h,
        Err(bad) => {
            assert_ne!(bad.0, REQUEST_MAGIC);
            return;
        }
    };
    assert_eq!(header.encode(), buf, "a parsed header encodes back to its bytes");

    let planned = plan_for_export(&header, size, read_only);
    if !read_only {
        assert_eq!(planned, plan(&header, size));
    }
    let RequestHeader { flags, command, length, .. } = header;
    match planned {
        Plan::Serve(op) => {
            assert_eq!(flags & !(CMD_FLAG_FUA | CMD_FLAG_NO_HOLE), 0, "unknown flag served: {header:?}");
            let range = match op {
                Op::Read { offset, length } => {
                    assert_eq!(command, CMD_READ);
                    assert!(length <= MAX_PAYLOAD);
                    Some((offset, length))
                }
                Op::Write { offset, length, .. } => {
                    assert!(command == CMD_WRITE && !read_only);
                    assert!(length <= MAX_PAYLOAD);
                    Some((offset, length))
                }
                Op::Trim { offset, length, .. } => {
                    assert!(command == CMD_TRIM && !read_only);
                    Some((offset, length))
                }
                Op::WriteZeroes { offset, length, .. } => {
                    assert!(command == CMD_WRITE_ZEROES && !read_only);
                    Some((offset, length))
                }
                Op::Flush => {
                    assert_eq!(command, CMD_FLUSH);
                    None
                }
                Op::Disconnect => {
                    assert_eq!(command, CMD_DISC);
                    None
                }
            };
            if let Some((offset, length)) = range {
                assert_eq!((offset, length), (header.offset, header.length));
                let end = offset.checked_add(u64::from(length));
                assert!(
                    end.is_some_and(|end| end <= size),
                    "served a request outside the export: {header:?} size {size}"
                );
            }
        }
        Plan::Reject { errno, drain } => {
            assert!([EINVAL, ENOSPC, EOVERFLOW, EPERM].contains(&errno), "unexpected errno {errno}");
            assert!(drain <= MAX_DRAIN);
            assert!(drain == 0 || (command == CMD_WRITE && drain == length), "drains only a write's payload");
        }
        Plan::Close(_) => assert!(command == CMD_WRITE && length > MAX_DRAIN),
    }
});

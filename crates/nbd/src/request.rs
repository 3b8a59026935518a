//! Transmission requests: parsing the 28-byte header and deciding what to do with it.
//!
//! Both steps are pure (no IO) so they can be fuzzed: [`RequestHeader::parse`] only checks
//! the magic; [`plan`] checks command, flags, length and range against the export and
//! returns what the connection must do — serve an [`Op`], answer with an errno (after
//! draining a write payload so the stream stays in sync), or close the connection.

use super::proto::*;

/// Largest payload (READ or WRITE length) the server accepts; also advertised as the
/// maximum block size in `NBD_INFO_BLOCK_SIZE`.
pub const MAX_PAYLOAD: u32 = 32 * 1024 * 1024;
/// Largest payload of a rejected WRITE that the server still reads and discards to keep the
/// connection usable; a rejected write with a larger payload closes the connection.
pub const MAX_DRAIN: u32 = 64 * 1024 * 1024;

/// A request header as it came off the wire (magic already checked).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHeader {
    pub flags: u16,
    pub command: u16,
    pub cookie: u64,
    pub offset: u64,
    pub length: u32,
}

/// The header did not start with `NBD_REQUEST_MAGIC`: the stream cannot be trusted any more.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BadMagic(pub u32);

impl RequestHeader {
    /// Parses a header. Only the magic can make this fail; everything else is judged by
    /// [`plan`], which can answer with an error and keep the connection.
    pub fn parse(buf: &[u8; REQUEST_HEADER_LEN]) -> Result<Self, BadMagic> {
        let magic = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
        if magic != REQUEST_MAGIC {
            return Err(BadMagic(magic));
        }
        let u16_at = |i: usize| u16::from_be_bytes([buf[i], buf[i + 1]]);
        let mut cookie = [0u8; 8];
        cookie.copy_from_slice(&buf[8..16]);
        let mut offset = [0u8; 8];
        offset.copy_from_slice(&buf[16..24]);
        Ok(RequestHeader {
            flags: u16_at(4),
            command: u16_at(6),
            cookie: u64::from_be_bytes(cookie),
            offset: u64::from_be_bytes(offset),
            length: u32::from_be_bytes([buf[24], buf[25], buf[26], buf[27]]),
        })
    }

    /// Serialises the header (used by tests and clients).
    pub fn encode(&self) -> [u8; REQUEST_HEADER_LEN] {
        let mut out = [0u8; REQUEST_HEADER_LEN];
        out[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        out[4..6].copy_from_slice(&self.flags.to_be_bytes());
        out[6..8].copy_from_slice(&self.command.to_be_bytes());
        out[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        out[16..24].copy_from_slice(&self.offset.to_be_bytes());
        out[24..28].copy_from_slice(&self.length.to_be_bytes());
        out
    }
}

/// A validated operation: offset and length are inside the export, the length is within
/// [`MAX_PAYLOAD`] where a payload is involved. Offsets need not be aligned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Read {
        offset: u64,
        length: u32,
    },
    /// The `length` payload bytes follow the header on the wire.
    Write {
        offset: u64,
        length: u32,
        fua: bool,
    },
    Flush,
    Trim {
        offset: u64,
        length: u32,
        fua: bool,
    },
    WriteZeroes {
        offset: u64,
        length: u32,
        fua: bool,
        may_trim: bool,
    },
    Disconnect,
}

/// What the connection does with a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plan {
    Serve(Op),
    /// Read and discard `drain` payload bytes, then reply with `errno`.
    Reject {
        errno: u32,
        drain: u32,
    },
    /// The request cannot be answered without losing sync with the stream: close.
    Close(&'static str),
}

/// Command flags the server understands for each command (it advertises FUA, so FUA is
/// accepted — and ignored where it means nothing — on every command).
fn allowed_flags(command: u16) -> u16 {
    match command {
        CMD_WRITE_ZEROES => CMD_FLAG_FUA | CMD_FLAG_NO_HOLE,
        _ => CMD_FLAG_FUA,
    }
}

/// Decides what to do with `header` on an export of `size` bytes.
///
/// Error codes: unknown command or flag, or a read/trim outside the export → `EINVAL`;
/// a write or write-zeroes that ends past the export → `ENOSPC`; a read longer than
/// [`MAX_PAYLOAD`] → `EOVERFLOW`; a write longer than it → `EINVAL` after draining the payload
/// (or close, beyond [`MAX_DRAIN`]).
pub fn plan(header: &RequestHeader, size: u64) -> Plan {
    let RequestHeader { flags, command, offset, length, .. } = *header;
    let drain = if command == CMD_WRITE { length } else { 0 };
    let reject = |errno| {
        if drain > MAX_DRAIN {
            Plan::Close("rejected write carries a payload too large to drain")
        } else {
            Plan::Reject { errno, drain }
        }
    };
    let known = matches!(command, CMD_READ | CMD_WRITE | CMD_DISC | CMD_FLUSH | CMD_TRIM | CMD_WRITE_ZEROES);
    if !known || flags & !allowed_flags(command) != 0 {
        return reject(EINVAL);
    }
    let fua = flags & CMD_FLAG_FUA != 0;
    let in_range = offset.checked_add(u64::from(length)).is_some_and(|end| end <= size);
    match command {
        CMD_DISC => Plan::Serve(Op::Disconnect),
        CMD_FLUSH => Plan::Serve(Op::Flush),
        CMD_READ if length > MAX_PAYLOAD => reject(EOVERFLOW),
        CMD_READ if !in_range => reject(EINVAL),
        CMD_READ => Plan::Serve(Op::Read { offset, length }),
        CMD_WRITE if length > MAX_PAYLOAD => reject(EINVAL),
        CMD_WRITE if !in_range => reject(ENOSPC),
        CMD_WRITE => Plan::Serve(Op::Write { offset, length, fua }),
        CMD_TRIM if !in_range => reject(EINVAL),
        CMD_TRIM => Plan::Serve(Op::Trim { offset, length, fua }),
        CMD_WRITE_ZEROES if !in_range => reject(ENOSPC),
        CMD_WRITE_ZEROES => {
            Plan::Serve(Op::WriteZeroes { offset, length, fua, may_trim: flags & CMD_FLAG_NO_HOLE == 0 })
        }
        _ => reject(EINVAL),
    }
}

/// [`plan`] for an export that may be read-only: mutating requests on a read-only export
/// get `EPERM` (after draining a write's payload).
pub fn plan_for_export(header: &RequestHeader, size: u64, read_only: bool) -> Plan {
    match plan(header, size) {
        Plan::Serve(Op::Write { length, .. }) if read_only => Plan::Reject { errno: EPERM, drain: length },
        Plan::Serve(Op::Trim { .. } | Op::WriteZeroes { .. }) if read_only => Plan::Reject { errno: EPERM, drain: 0 },
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(command: u16, flags: u16, offset: u64, length: u32) -> RequestHeader {
        RequestHeader { flags, command, cookie: 7, offset, length }
    }

    #[test]
    fn parse_round_trips_and_checks_magic() {
        let h = header(CMD_WRITE, CMD_FLAG_FUA, 4096, 512);
        assert_eq!(RequestHeader::parse(&h.encode()), Ok(h));
        let mut bad = h.encode();
        bad[0] ^= 1;
        assert!(RequestHeader::parse(&bad).is_err());
    }

    #[test]
    fn plan_answers_the_protocol_errors() {
        let size = 1 << 20;
        assert_eq!(plan(&header(CMD_READ, 0, size - 1, 2), size), Plan::Reject { errno: EINVAL, drain: 0 });
        assert_eq!(plan(&header(CMD_WRITE, 0, size - 1, 2), size), Plan::Reject { errno: ENOSPC, drain: 2 });
        assert_eq!(plan(&header(CMD_WRITE_ZEROES, 0, size, 1), size), Plan::Reject { errno: ENOSPC, drain: 0 });
        assert_eq!(
            plan(&header(CMD_READ, 0, 0, MAX_PAYLOAD + 1), u64::MAX),
            Plan::Reject { errno: EOVERFLOW, drain: 0 }
        );
        assert_eq!(
            plan(&header(CMD_WRITE, 0, 0, MAX_PAYLOAD + 1), u64::MAX),
            Plan::Reject { errno: EINVAL, drain: MAX_PAYLOAD + 1 }
        );
        assert!(matches!(plan(&header(CMD_WRITE, 0, 0, MAX_DRAIN + 1), u64::MAX), Plan::Close(_)));
        assert_eq!(plan(&header(99, 0, 0, 0), size), Plan::Reject { errno: EINVAL, drain: 0 });
        assert_eq!(plan(&header(CMD_READ, CMD_FLAG_NO_HOLE, 0, 1), size), Plan::Reject { errno: EINVAL, drain: 0 });
        assert_eq!(plan(&header(CMD_READ, 0, u64::MAX, 1), size), Plan::Reject { errno: EINVAL, drain: 0 });
    }

    #[test]
    fn plan_serves_valid_requests() {
        let size = 1 << 20;
        assert_eq!(
            plan(&header(CMD_READ, CMD_FLAG_FUA, 1000, 3000), size),
            Plan::Serve(Op::Read { offset: 1000, length: 3000 })
        );
        assert_eq!(
            plan(&header(CMD_WRITE_ZEROES, CMD_FLAG_NO_HOLE, 0, 4096), size),
            Plan::Serve(Op::WriteZeroes { offset: 0, length: 4096, fua: false, may_trim: false })
        );
        assert_eq!(
            plan(&header(CMD_WRITE, CMD_FLAG_FUA, size - 1, 1), size),
            Plan::Serve(Op::Write { offset: size - 1, length: 1, fua: true })
        );
        assert_eq!(plan(&header(CMD_DISC, 0, 0, 0), size), Plan::Serve(Op::Disconnect));
    }
}

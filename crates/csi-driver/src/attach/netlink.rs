//! Generic netlink messages of the kernel NBD driver (`include/uapi/linux/nbd-netlink.h`),
//! encoded and decoded without I/O so they can be tested byte for byte.
//!
//! A request is `nlmsghdr` + `genlmsghdr` + attributes; each attribute is `nlattr`
//! (`len: u16, type: u16`) + payload, padded to 4 bytes. All integers are host-endian.

use crate::error::{CsiError, Result};

pub const NLMSG_HDRLEN: usize = 16;
pub const GENL_HDRLEN: usize = 4;
pub const NLM_F_REQUEST: u16 = 0x1;
pub const NLM_F_ACK: u16 = 0x4;
pub const NLMSG_ERROR: u16 = 0x2;
pub const NLMSG_DONE: u16 = 0x3;
pub const NLA_F_NESTED: u16 = 0x8000;

/// The generic netlink controller (resolves family names).
pub const GENL_ID_CTRL: u16 = 0x10;
pub const CTRL_CMD_GETFAMILY: u8 = 3;
pub const CTRL_ATTR_FAMILY_ID: u16 = 1;
pub const CTRL_ATTR_FAMILY_NAME: u16 = 2;

pub const NBD_FAMILY_NAME: &str = "nbd";
pub const NBD_GENL_VERSION: u8 = 1;
pub const NBD_CMD_CONNECT: u8 = 1;
pub const NBD_CMD_DISCONNECT: u8 = 2;
pub const NBD_CMD_RECONFIGURE: u8 = 3;

pub const NBD_ATTR_INDEX: u16 = 1;
pub const NBD_ATTR_SIZE_BYTES: u16 = 2;
pub const NBD_ATTR_BLOCK_SIZE_BYTES: u16 = 3;
pub const NBD_ATTR_TIMEOUT: u16 = 4;
pub const NBD_ATTR_SERVER_FLAGS: u16 = 5;
pub const NBD_ATTR_CLIENT_FLAGS: u16 = 6;
pub const NBD_ATTR_SOCKETS: u16 = 7;
pub const NBD_ATTR_DEAD_CONN_TIMEOUT: u16 = 8;
pub const NBD_ATTR_BACKEND_IDENTIFIER: u16 = 10;
pub const NBD_SOCK_ITEM: u16 = 1;
pub const NBD_SOCK_FD: u16 = 1;
/// Free the device when it is disconnected.
pub const NBD_CFLAG_DESTROY_ON_DISCONNECT: u64 = 1;

/// One netlink attribute.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attr {
    U16(u16, u16),
    U32(u16, u32),
    U64(u16, u64),
    /// NUL-terminated on the wire.
    Str(u16, String),
    Nested(u16, Vec<Attr>),
}

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// Appends `attrs` to `out`.
pub fn encode_attrs(attrs: &[Attr], out: &mut Vec<u8>) {
    for a in attrs {
        let start = out.len();
        out.extend_from_slice(&[0; 4]);
        let ty = match a {
            Attr::U16(t, v) => {
                out.extend_from_slice(&v.to_ne_bytes());
                *t
            }
            Attr::U32(t, v) => {
                out.extend_from_slice(&v.to_ne_bytes());
                *t
            }
            Attr::U64(t, v) => {
                out.extend_from_slice(&v.to_ne_bytes());
                *t
            }
            Attr::Str(t, s) => {
                out.extend_from_slice(s.as_bytes());
                out.push(0);
                *t
            }
            Attr::Nested(t, inner) => {
                encode_attrs(inner, out);
                *t | NLA_F_NESTED
            }
        };
        let len = (out.len() - start) as u16;
        out[start..start + 2].copy_from_slice(&len.to_ne_bytes());
        out[start + 2..start + 4].copy_from_slice(&ty.to_ne_bytes());
        out.resize(start + align4(len as usize), 0);
    }
}

/// A complete generic netlink request asking for an ACK.
pub fn request(family: u16, cmd: u8, version: u8, seq: u32, attrs: &[Attr]) -> Vec<u8> {
    let mut out = vec![0u8; NLMSG_HDRLEN];
    out.extend_from_slice(&[cmd, version, 0, 0]);
    encode_attrs(attrs, &mut out);
    let len = out.len() as u32;
    out[0..4].copy_from_slice(&len.to_ne_bytes());
    out[4..6].copy_from_slice(&family.to_ne_bytes());
    out[6..8].copy_from_slice(&(NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
    out[8..12].copy_from_slice(&seq.to_ne_bytes());
    // nlmsg_pid 0: the kernel.
    out
}

/// CTRL_CMD_GETFAMILY for `name`.
pub fn get_family(name: &str, seq: u32) -> Vec<u8> {
    request(GENL_ID_CTRL, CTRL_CMD_GETFAMILY, 1, seq, &[Attr::Str(CTRL_ATTR_FAMILY_NAME, name.to_string())])
}

/// What NBD_CMD_CONNECT configures.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectConfig {
    pub size: u64,
    pub block_size: u64,
    /// Per-request timeout, seconds.
    pub timeout_secs: u64,
    /// How long a device with dead connections waits for a reconfigure, seconds.
    pub dead_conn_timeout_secs: u64,
    /// Transmission flags from the handshake.
    pub server_flags: u64,
    /// Shown in `/sys/block/nbdX/backend`; the volume id.
    pub backend: String,
    /// Connected sockets, already past the handshake.
    pub fds: Vec<u32>,
}

fn sockets(fds: &[u32]) -> Attr {
    Attr::Nested(
        NBD_ATTR_SOCKETS,
        fds.iter().map(|fd| Attr::Nested(NBD_SOCK_ITEM, vec![Attr::U32(NBD_SOCK_FD, *fd)])).collect(),
    )
}

/// NBD_CMD_CONNECT (any free device: no index).
pub fn connect(family: u16, seq: u32, c: &ConnectConfig) -> Vec<u8> {
    let attrs = vec![
        Attr::U64(NBD_ATTR_SIZE_BYTES, c.size),
        Attr::U64(NBD_ATTR_BLOCK_SIZE_BYTES, c.block_size),
        Attr::U64(NBD_ATTR_TIMEOUT, c.timeout_secs),
        Attr::U64(NBD_ATTR_DEAD_CONN_TIMEOUT, c.dead_conn_timeout_secs),
        Attr::U64(NBD_ATTR_SERVER_FLAGS, c.server_flags),
        Attr::U64(NBD_ATTR_CLIENT_FLAGS, NBD_CFLAG_DESTROY_ON_DISCONNECT),
        Attr::Str(NBD_ATTR_BACKEND_IDENTIFIER, c.backend.clone()),
        sockets(&c.fds),
    ];
    request(family, NBD_CMD_CONNECT, NBD_GENL_VERSION, seq, &attrs)
}

/// NBD_CMD_RECONFIGURE of device `index`: the new size and the timeouts. The backend
/// identifier makes the kernel refuse (EINVAL) if the device now belongs to another
/// volume. Sockets are not sent: the kernel only uses them to replace dead connections,
/// and the live one keeps serving the grown export.
pub fn reconfigure(family: u16, seq: u32, index: u32, c: &ConnectConfig) -> Vec<u8> {
    let attrs = vec![
        Attr::U32(NBD_ATTR_INDEX, index),
        Attr::U64(NBD_ATTR_SIZE_BYTES, c.size),
        Attr::U64(NBD_ATTR_TIMEOUT, c.timeout_secs),
        Attr::U64(NBD_ATTR_DEAD_CONN_TIMEOUT, c.dead_conn_timeout_secs),
        Attr::Str(NBD_ATTR_BACKEND_IDENTIFIER, c.backend.clone()),
    ];
    request(family, NBD_CMD_RECONFIGURE, NBD_GENL_VERSION, seq, &attrs)
}

/// NBD_CMD_RECONFIGURE of device `index` with fresh sockets: the kernel replaces the dead
/// connections of a device waiting out its dead-connection timeout (the engine restarted)
/// and requeues the requests they held. The backend identifier makes the kernel refuse
/// (EINVAL) if the device now belongs to another volume.
pub fn reconnect(family: u16, seq: u32, index: u32, backend: &str, fds: &[u32]) -> Vec<u8> {
    let attrs = vec![
        Attr::U32(NBD_ATTR_INDEX, index),
        Attr::Str(NBD_ATTR_BACKEND_IDENTIFIER, backend.to_string()),
        sockets(fds),
    ];
    request(family, NBD_CMD_RECONFIGURE, NBD_GENL_VERSION, seq, &attrs)
}

/// NBD_CMD_DISCONNECT of device `index`.
pub fn disconnect(family: u16, seq: u32, index: u32) -> Vec<u8> {
    request(family, NBD_CMD_DISCONNECT, NBD_GENL_VERSION, seq, &[Attr::U32(NBD_ATTR_INDEX, index)])
}

/// Splits an attribute area into (type without flags, payload).
pub fn parse_attrs(mut buf: &[u8]) -> Result<Vec<(u16, &[u8])>> {
    let mut out = Vec::new();
    while buf.len() >= 4 {
        let len = u16::from_ne_bytes([buf[0], buf[1]]) as usize;
        let ty = u16::from_ne_bytes([buf[2], buf[3]]) & !NLA_F_NESTED & !0x4000;
        if len < 4 || len > buf.len() {
            return Err(CsiError::Internal(format!("netlink: attribute length {len} out of bounds")));
        }
        out.push((ty, &buf[4..len]));
        buf = &buf[align4(len).min(buf.len())..];
    }
    Ok(out)
}

/// One message of a netlink reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// NLMSG_ERROR with error 0.
    Ack {
        seq: u32,
    },
    /// NLMSG_ERROR with a negative errno.
    Error {
        seq: u32,
        errno: i32,
    },
    /// A generic netlink message: command and attribute bytes.
    Data {
        seq: u32,
        cmd: u8,
        attrs: Vec<u8>,
    },
    Done {
        seq: u32,
    },
}

/// Splits a datagram into messages.
pub fn parse_replies(mut buf: &[u8]) -> Result<Vec<Reply>> {
    let mut out = Vec::new();
    while buf.len() >= NLMSG_HDRLEN {
        let len = u32::from_ne_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
        let ty = u16::from_ne_bytes([buf[4], buf[5]]);
        let seq = u32::from_ne_bytes([buf[8], buf[9], buf[10], buf[11]]);
        if len < NLMSG_HDRLEN || len > buf.len() {
            return Err(CsiError::Internal(format!("netlink: message length {len} out of bounds")));
        }
        let body = &buf[NLMSG_HDRLEN..len];
        out.push(match ty {
            NLMSG_ERROR => {
                let code = body
                    .get(0..4)
                    .map(|b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
                    .ok_or_else(|| CsiError::Internal("netlink: short error message".into()))?;
                if code == 0 {
                    Reply::Ack { seq }
                } else {
                    Reply::Error { seq, errno: -code }
                }
            }
            NLMSG_DONE => Reply::Done { seq },
            _ => {
                if body.len() < GENL_HDRLEN {
                    return Err(CsiError::Internal("netlink: short generic netlink message".into()));
                }
                Reply::Data { seq, cmd: body[0], attrs: body[GENL_HDRLEN..].to_vec() }
            }
        });
        buf = &buf[align4(len).min(buf.len())..];
    }
    Ok(out)
}

/// The `u32`/`u16` value of attribute `ty` in an attribute area.
pub fn attr_u32(attrs: &[u8], ty: u16) -> Result<Option<u32>> {
    Ok(parse_attrs(attrs)?.into_iter().find(|(t, _)| *t == ty).and_then(|(_, p)| match p.len() {
        2 => Some(u32::from(u16::from_ne_bytes([p[0], p[1]]))),
        4 => Some(u32::from_ne_bytes([p[0], p[1], p[2], p[3]])),
        _ => None,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn u16s(b: &[u8], at: usize) -> u16 {
        u16::from_ne_bytes([b[at], b[at + 1]])
    }

    fn u32s(b: &[u8], at: usize) -> u32 {
        u32::from_ne_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
    }

    #[test]
    fn get_family_is_laid_out_as_the_kernel_expects() {
        let m = get_family("nbd", 7);
        // nlmsghdr(16) + genlmsghdr(4) + nlattr(4) + "nbd\0"(4) = 28
        assert_eq!(m.len(), 28);
        assert_eq!(u32s(&m, 0), 28);
        assert_eq!(u16s(&m, 4), GENL_ID_CTRL);
        assert_eq!(u16s(&m, 6), NLM_F_REQUEST | NLM_F_ACK);
        assert_eq!(u32s(&m, 8), 7);
        assert_eq!(u32s(&m, 12), 0);
        assert_eq!(&m[16..20], &[CTRL_CMD_GETFAMILY, 1, 0, 0]);
        assert_eq!(u16s(&m, 20), 8);
        assert_eq!(u16s(&m, 22), CTRL_ATTR_FAMILY_NAME);
        assert_eq!(&m[24..28], b"nbd\0");
    }

    #[test]
    fn attributes_are_padded_to_four_bytes() {
        let mut out = Vec::new();
        encode_attrs(&[Attr::Str(10, "pvc-1".into()), Attr::U64(2, 1 << 30)], &mut out);
        // "pvc-1\0" = 6 bytes: nlattr len 10, padded to 12; then 4 + 8.
        assert_eq!(out.len(), 12 + 12);
        assert_eq!(u16s(&out, 0), 10);
        assert_eq!(&out[4..10], b"pvc-1\0");
        assert_eq!(&out[10..12], &[0, 0]);
        assert_eq!(u16s(&out, 12), 12);
        assert_eq!(u16s(&out, 14), 2);
        assert_eq!(u64::from_ne_bytes(out[16..24].try_into().unwrap()), 1 << 30);
    }

    #[test]
    fn connect_carries_timeouts_backend_and_nested_sockets() {
        let c = ConnectConfig {
            size: 64 << 20,
            block_size: 4096,
            timeout_secs: 30,
            dead_conn_timeout_secs: 120,
            server_flags: 0x1ed,
            backend: "pvc-abc".into(),
            fds: vec![5, 9],
        };
        let m = connect(0x22, 3, &c);
        assert_eq!(u32s(&m, 0) as usize, m.len());
        assert_eq!(u16s(&m, 4), 0x22);
        assert_eq!(m[16], NBD_CMD_CONNECT);
        assert_eq!(m[17], NBD_GENL_VERSION);
        let attrs = parse_attrs(&m[20..]).unwrap();
        let get = |t: u16| attrs.iter().find(|(ty, _)| *ty == t).map(|(_, p)| *p).unwrap();
        let u64_of = |p: &[u8]| u64::from_ne_bytes(p.try_into().unwrap());
        assert_eq!(u64_of(get(NBD_ATTR_SIZE_BYTES)), 64 << 20);
        assert_eq!(u64_of(get(NBD_ATTR_BLOCK_SIZE_BYTES)), 4096);
        assert_eq!(u64_of(get(NBD_ATTR_TIMEOUT)), 30);
        assert_eq!(u64_of(get(NBD_ATTR_DEAD_CONN_TIMEOUT)), 120);
        assert_eq!(u64_of(get(NBD_ATTR_SERVER_FLAGS)), 0x1ed);
        assert_eq!(u64_of(get(NBD_ATTR_CLIENT_FLAGS)), NBD_CFLAG_DESTROY_ON_DISCONNECT);
        assert_eq!(get(NBD_ATTR_BACKEND_IDENTIFIER), b"pvc-abc\0");
        assert!(attrs.iter().all(|(t, _)| *t != NBD_ATTR_INDEX), "connect lets the kernel pick a device");
        // The nested flag is set on the wire.
        let pos = 20 + {
            let mut off = 0;
            let mut b = &m[20..];
            loop {
                let len = u16s(b, 0) as usize;
                if u16s(b, 2) & !NLA_F_NESTED == NBD_ATTR_SOCKETS {
                    break off;
                }
                off += align4(len);
                b = &b[align4(len)..];
            }
        };
        assert_eq!(u16s(&m, pos + 2), NBD_ATTR_SOCKETS | NLA_F_NESTED);
        let items = parse_attrs(get(NBD_ATTR_SOCKETS)).unwrap();
        let fds: Vec<u32> = items
            .iter()
            .map(|(t, p)| {
                assert_eq!(*t, NBD_SOCK_ITEM);
                let inner = parse_attrs(p).unwrap();
                assert_eq!(inner[0].0, NBD_SOCK_FD);
                u32::from_ne_bytes(inner[0].1.try_into().unwrap())
            })
            .collect();
        assert_eq!(fds, vec![5, 9]);
    }

    #[test]
    fn reconfigure_and_disconnect_name_the_device() {
        let c = ConnectConfig {
            size: 1 << 30,
            block_size: 4096,
            timeout_secs: 30,
            dead_conn_timeout_secs: 120,
            server_flags: 0,
            backend: "v".into(),
            fds: vec![4],
        };
        let m = reconfigure(0x22, 1, 3, &c);
        assert_eq!(m[16], NBD_CMD_RECONFIGURE);
        assert_eq!(attr_u32(&m[20..], NBD_ATTR_INDEX).unwrap(), Some(3));
        let attrs = parse_attrs(&m[20..]).unwrap();
        let size = attrs.iter().find(|(t, _)| *t == NBD_ATTR_SIZE_BYTES).expect("size").1;
        assert_eq!(u64::from_ne_bytes(size.try_into().unwrap()), 1 << 30);
        assert!(attrs.iter().all(|(t, _)| *t != NBD_ATTR_SOCKETS), "the live connection stays");
        let d = disconnect(0x22, 2, 5);
        assert_eq!(d[16], NBD_CMD_DISCONNECT);
        assert_eq!(d.len(), 16 + 4 + 8);
        assert_eq!(attr_u32(&d[20..], NBD_ATTR_INDEX).unwrap(), Some(5));
    }

    #[test]
    fn reconnect_carries_the_device_backend_and_fresh_sockets() {
        let m = reconnect(0x22, 7, 3, "pvc-1", &[11]);
        // nlmsghdr: length, type (the family), flags, seq.
        assert_eq!(u32s(&m, 0) as usize, m.len());
        assert_eq!(u16s(&m, 4), 0x22);
        assert_eq!(u16s(&m, 6), NLM_F_REQUEST | NLM_F_ACK);
        assert_eq!(u32s(&m, 8), 7);
        assert_eq!((m[16], m[17]), (NBD_CMD_RECONFIGURE, NBD_GENL_VERSION));
        let attrs = parse_attrs(&m[20..]).unwrap();
        let kinds: Vec<u16> = attrs.iter().map(|(t, _)| *t).collect();
        assert_eq!(kinds, vec![NBD_ATTR_INDEX, NBD_ATTR_BACKEND_IDENTIFIER, NBD_ATTR_SOCKETS]);
        assert_eq!(attr_u32(&m[20..], NBD_ATTR_INDEX).unwrap(), Some(3));
        assert_eq!(attrs[1].1, b"pvc-1\0");
        // NBD_ATTR_SOCKETS { NBD_SOCK_ITEM { NBD_SOCK_FD = 11 } }, nested all the way.
        let items = parse_attrs(attrs[2].1).unwrap();
        assert_eq!(items.len(), 1);
        assert_eq!(items[0].0 & !NLA_F_NESTED, NBD_SOCK_ITEM);
        let fd = parse_attrs(items[0].1).unwrap();
        assert_eq!(fd, vec![(NBD_SOCK_FD, &11u32.to_ne_bytes()[..])]);
        // Nothing that would change the device's size or timeouts.
        assert!(kinds.iter().all(|t| ![NBD_ATTR_SIZE_BYTES, NBD_ATTR_TIMEOUT].contains(t)));
    }

    #[test]
    fn replies_decode_acks_errors_and_data() {
        let mut buf = Vec::new();
        // An error message: -ENOENT, followed by the original header (ignored).
        let mut err = vec![0u8; 16];
        err[0..4].copy_from_slice(&36u32.to_ne_bytes());
        err[4..6].copy_from_slice(&NLMSG_ERROR.to_ne_bytes());
        err[8..12].copy_from_slice(&9u32.to_ne_bytes());
        err.extend_from_slice(&(-2i32).to_ne_bytes());
        err.extend_from_slice(&[0; 16]);
        buf.extend_from_slice(&err);
        // A family reply with CTRL_ATTR_FAMILY_ID = 0x1b.
        let mut data = request(GENL_ID_CTRL, 1, 1, 9, &[Attr::U16(CTRL_ATTR_FAMILY_ID, 0x1b)]);
        data[4..6].copy_from_slice(&GENL_ID_CTRL.to_ne_bytes());
        buf.extend_from_slice(&data);
        let replies = parse_replies(&buf).unwrap();
        assert_eq!(replies[0], Reply::Error { seq: 9, errno: 2 });
        match &replies[1] {
            Reply::Data { seq: 9, cmd: 1, attrs } => {
                assert_eq!(attr_u32(attrs, CTRL_ATTR_FAMILY_ID).unwrap(), Some(0x1b))
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(parse_replies(&[0xff; 20]).is_err(), "a length beyond the buffer is an error");
        assert!(parse_attrs(&[2, 0, 1, 0]).is_err(), "attribute shorter than its header");
    }
}

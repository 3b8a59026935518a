//! Client side of the newstyle fixed handshake: greeting, client flags, then `NBD_OPT_GO`
//! (asking for block sizes), falling back to `NBD_OPT_EXPORT_NAME` when the server does not
//! know `NBD_OPT_GO`.
//!
//! Every length the server sends is bounded before anything is allocated, so a hostile or
//! broken server gets a clear error, never an allocation of its choosing.

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use hlstore_core::error::{Error, Result};
use hlstore_nbd::proto::*;

/// Longest option reply payload accepted (real replies are a few bytes to a few KiB).
const MAX_OPTION_REPLY: u32 = 64 * 1024;
/// Longest run of option replies to one `NBD_OPT_GO` before giving up.
const MAX_REPLIES: usize = 64;
/// Maximum payload assumed when the server sends no `NBD_INFO_BLOCK_SIZE` (the protocol's
/// default upper bound for a request).
pub const DEFAULT_MAX_BLOCK: u32 = 32 * 1024 * 1024;

/// What the server told about the export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExportInfo {
    /// Size in bytes.
    pub size: u64,
    /// Transmission flags (`FLAG_*` in `nbd::proto`).
    pub flags: u16,
    /// Minimum block size (requests should be aligned to it; 1 if not advertised).
    pub min_block: u32,
    /// Preferred block size (4096 if not advertised).
    pub preferred_block: u32,
    /// Largest READ/WRITE payload the server accepts.
    pub max_block: u32,
}

impl ExportInfo {
    pub fn has(&self, flag: u16) -> bool {
        self.flags & flag != 0
    }

    pub fn read_only(&self) -> bool {
        self.has(FLAG_READ_ONLY)
    }
}

fn proto_err(export: &str, what: impl std::fmt::Display) -> Error {
    Error::Unavailable(format!("nbd export {export:?}: handshake: {what}"))
}

fn io_err(export: &str, e: std::io::Error) -> Error {
    Error::io(format!("nbd export {export:?}: handshake"), e)
}

/// Runs the handshake on a fresh connection and returns the export's description; the
/// stream is then in the transmission phase.
pub async fn negotiate<S>(stream: &mut S, export: &str) -> Result<ExportInfo>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    if export.len() > MAX_STRING_LEN {
        return Err(Error::InvalidArgument(format!("nbd export name is longer than {MAX_STRING_LEN} bytes")));
    }
    let io = |e| io_err(export, e);
    let magic = stream.read_u64().await.map_err(io)?;
    let opt_magic = stream.read_u64().await.map_err(io)?;
    if magic != NBD_MAGIC {
        return Err(proto_err(export, format!("not an NBD server (magic {magic:#018x})")));
    }
    if opt_magic != IHAVEOPT {
        return Err(proto_err(export, "server speaks only the oldstyle protocol"));
    }
    let server_flags = stream.read_u16().await.map_err(io)?;
    if server_flags & FLAG_FIXED_NEWSTYLE == 0 {
        return Err(proto_err(export, "server does not support the fixed newstyle handshake"));
    }
    let no_zeroes = server_flags & FLAG_NO_ZEROES != 0;
    let mut client_flags = FLAG_C_FIXED_NEWSTYLE;
    if no_zeroes {
        client_flags |= FLAG_C_NO_ZEROES;
    }
    stream.write_u32(client_flags).await.map_err(io)?;

    // NBD_OPT_GO: name length, name, one info request (block sizes).
    let mut payload = Vec::with_capacity(export.len() + 8);
    payload.extend_from_slice(&(export.len() as u32).to_be_bytes());
    payload.extend_from_slice(export.as_bytes());
    payload.extend_from_slice(&1u16.to_be_bytes());
    payload.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    send_option(stream, OPT_GO, &payload).await.map_err(io)?;

    let mut size_flags = None;
    let mut blocks = None;
    for _ in 0..MAX_REPLIES {
        let (option, kind, data) = read_option_reply(stream, export).await?;
        if option != OPT_GO {
            return Err(proto_err(export, format!("reply to option {option} while waiting for NBD_OPT_GO")));
        }
        match kind {
            REP_ACK => {
                let (size, flags) =
                    size_flags.ok_or_else(|| proto_err(export, "NBD_OPT_GO acked without export info"))?;
                let (min_block, preferred_block, max_block) = blocks.unwrap_or((1, 4096, DEFAULT_MAX_BLOCK));
                return Ok(ExportInfo { size, flags, min_block, preferred_block, max_block });
            }
            REP_INFO => match parse_info(&data) {
                Some(Info::Export(size, flags)) => size_flags = Some((size, flags)),
                Some(Info::BlockSize(min, pref, max)) => {
                    if min == 0 || !min.is_power_of_two() || max < min || pref < min {
                        return Err(proto_err(export, format!("bad block sizes {min}/{pref}/{max}")));
                    }
                    blocks = Some((min, pref, max));
                }
                None => {}
            },
            REP_ERR_UNSUP => return export_name_fallback(stream, export, no_zeroes).await,
            REP_ERR_UNKNOWN => return Err(Error::NotFound(format!("nbd export {export:?}: {}", message(&data)))),
            REP_ERR_SHUTDOWN => {
                return Err(Error::Unavailable(format!("nbd export {export:?}: server is shutting down")))
            }
            k if k & (1 << 31) != 0 => {
                return Err(proto_err(export, format!("NBD_OPT_GO refused (reply {k:#x}): {}", message(&data))));
            }
            k => return Err(proto_err(export, format!("unexpected option reply type {k}"))),
        }
    }
    Err(proto_err(export, "too many option replies"))
}

/// `NBD_OPT_EXPORT_NAME`: the server answers with size and flags (or just closes).
async fn export_name_fallback<S>(stream: &mut S, export: &str, no_zeroes: bool) -> Result<ExportInfo>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let io = |e| io_err(export, e);
    send_option(stream, OPT_EXPORT_NAME, export.as_bytes()).await.map_err(io)?;
    let size = stream.read_u64().await.map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            Error::NotFound(format!("nbd export {export:?}: the server closed the connection"))
        } else {
            io(e)
        }
    })?;
    let flags = stream.read_u16().await.map_err(io)?;
    if !no_zeroes {
        let mut pad = [0u8; EXPORT_NAME_PADDING];
        stream.read_exact(&mut pad).await.map_err(io)?;
    }
    Ok(ExportInfo { size, flags, min_block: 1, preferred_block: 4096, max_block: DEFAULT_MAX_BLOCK })
}

async fn send_option<S: AsyncWrite + Unpin>(stream: &mut S, option: u32, data: &[u8]) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(OPTION_HEADER_LEN + data.len());
    buf.extend_from_slice(&IHAVEOPT.to_be_bytes());
    buf.extend_from_slice(&option.to_be_bytes());
    buf.extend_from_slice(&(data.len() as u32).to_be_bytes());
    buf.extend_from_slice(data);
    stream.write_all(&buf).await?;
    stream.flush().await
}

async fn read_option_reply<S: AsyncRead + Unpin>(stream: &mut S, export: &str) -> Result<(u32, u32, Vec<u8>)> {
    let io = |e| io_err(export, e);
    let magic = stream.read_u64().await.map_err(io)?;
    if magic != OPTION_REPLY_MAGIC {
        return Err(proto_err(export, format!("bad option reply magic {magic:#018x}")));
    }
    let option = stream.read_u32().await.map_err(io)?;
    let kind = stream.read_u32().await.map_err(io)?;
    let len = stream.read_u32().await.map_err(io)?;
    if len > MAX_OPTION_REPLY {
        return Err(proto_err(export, format!("option reply of {len} bytes is too long")));
    }
    let mut data = vec![0u8; len as usize];
    stream.read_exact(&mut data).await.map_err(io)?;
    Ok((option, kind, data))
}

enum Info {
    Export(u64, u16),
    BlockSize(u32, u32, u32),
}

/// Parses an `NBD_REP_INFO` payload; `None` for info types the client does not use.
fn parse_info(data: &[u8]) -> Option<Info> {
    let kind = u16::from_be_bytes(data.get(..2)?.try_into().ok()?);
    let u32_at = |i: usize| -> Option<u32> { Some(u32::from_be_bytes(data.get(i..i + 4)?.try_into().ok()?)) };
    match kind {
        INFO_EXPORT if data.len() == 12 => Some(Info::Export(
            u64::from_be_bytes(data[2..10].try_into().ok()?),
            u16::from_be_bytes(data[10..12].try_into().ok()?),
        )),
        INFO_BLOCK_SIZE if data.len() == 14 => Some(Info::BlockSize(u32_at(2)?, u32_at(6)?, u32_at(10)?)),
        _ => None,
    }
}

fn message(data: &[u8]) -> String {
    if data.is_empty() {
        "no message".into()
    } else {
        String::from_utf8_lossy(data).into_owned()
    }
}

//! The newstyle fixed handshake as a typestate: [`Negotiating`] → [`Transmission`].
//!
//! `Negotiating::start` sends the greeting and reads the client flags; `negotiate` answers
//! options until the client picks an export (`NBD_OPT_GO` or `NBD_OPT_EXPORT_NAME`), which
//! yields a `Transmission` bound to that export, or aborts, which yields `None`. Only a
//! `Transmission` can serve requests, so no request is ever read before an export is chosen.
//!
//! Policy: structured replies, TLS and metadata contexts are not offered (`NBD_REP_ERR_UNSUP`),
//! so every reply in transmission is a simple reply. Clients must set
//! `NBD_FLAG_C_FIXED_NEWSTYLE`: only fixed newstyle can answer unknown options with errors.

use std::io;
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::option::{ClientOption, OptionError, MAX_OPTION_LEN};
use super::proto::*;
use super::registry::{Export, ExportRegistry};
use super::request::MAX_PAYLOAD;
use hlstore_core::device::BlockDevice;

/// Why a connection ended before or outside the normal disconnect.
#[derive(Debug)]
pub enum Disconnect {
    /// The socket failed or the peer went away.
    Io(io::Error),
    /// The peer broke the protocol; the connection was closed.
    Protocol(String),
}

impl From<io::Error> for Disconnect {
    fn from(e: io::Error) -> Self {
        Disconnect::Io(e)
    }
}

impl std::fmt::Display for Disconnect {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Disconnect::Io(e) => write!(f, "connection error: {e}"),
            Disconnect::Protocol(m) => write!(f, "protocol violation: {m}"),
        }
    }
}

/// Handshake state: greeting sent, options being haggled.
#[derive(Debug)]
pub struct Negotiating<S> {
    stream: S,
    no_zeroes: bool,
}

/// Transmission state: an export is chosen and requests may be served.
#[derive(Debug)]
pub struct Transmission<S, D> {
    pub(crate) stream: S,
    pub(crate) export: Arc<Export<D>>,
    pub(crate) flags: u16,
}

impl<S, D> Transmission<S, D> {
    /// The export the client chose.
    pub fn export(&self) -> &Arc<Export<D>> {
        &self.export
    }

    /// The transmission flags sent to the client.
    pub fn flags(&self) -> u16 {
        self.flags
    }
}

/// Transmission flags for `export`: everything the server implements, `READ_ONLY` for a
/// read-only export, and `CAN_MULTI_CONN` when the device keeps flushes consistent across
/// connections.
pub fn transmission_flags<D: BlockDevice>(export: &Export<D>) -> u16 {
    let mut flags = FLAG_HAS_FLAGS | FLAG_SEND_FLUSH | FLAG_SEND_FUA | FLAG_SEND_TRIM | FLAG_SEND_WRITE_ZEROES;
    if export.read_only {
        flags |= FLAG_READ_ONLY;
    }
    if export.device.multi_conn() {
        flags |= FLAG_CAN_MULTI_CONN;
    }
    flags
}

/// Preferred block size advertised for `device`: its block size, within the limits.
pub fn preferred_block_size<D: BlockDevice>(device: &D) -> u32 {
    device.block_size().clamp(1, MAX_PAYLOAD)
}

impl<S: AsyncRead + AsyncWrite + Unpin> Negotiating<S> {
    /// Sends the greeting and reads the client flags.
    pub async fn start(mut stream: S) -> Result<Self, Disconnect> {
        let mut greeting = Vec::with_capacity(18);
        greeting.extend_from_slice(&NBD_MAGIC.to_be_bytes());
        greeting.extend_from_slice(&IHAVEOPT.to_be_bytes());
        greeting.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
        stream.write_all(&greeting).await?;
        stream.flush().await?;
        let client_flags = stream.read_u32().await?;
        if client_flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
            return Err(Disconnect::Protocol(format!("unknown client flags {client_flags:#x}")));
        }
        if client_flags & FLAG_C_FIXED_NEWSTYLE == 0 {
            return Err(Disconnect::Protocol("client does not speak fixed newstyle".into()));
        }
        Ok(Negotiating { stream, no_zeroes: client_flags & FLAG_C_NO_ZEROES != 0 })
    }

    /// Answers options until the client enters transmission (`Some`) or aborts (`None`).
    /// `shutting_down` is polled before each option: once true, options get
    /// `NBD_REP_ERR_SHUTDOWN` and the handshake ends.
    pub async fn negotiate<D: BlockDevice>(
        mut self,
        registry: &ExportRegistry<D>,
        shutting_down: impl Fn() -> bool,
    ) -> Result<Option<Transmission<S, D>>, Disconnect> {
        loop {
            let magic = self.stream.read_u64().await?;
            if magic != IHAVEOPT {
                return Err(Disconnect::Protocol(format!("bad option magic {magic:#x}")));
            }
            let code = self.stream.read_u32().await?;
            let len = self.stream.read_u32().await?;
            if len > MAX_OPTION_LEN {
                if code == OPT_EXPORT_NAME {
                    return Err(Disconnect::Protocol(format!("NBD_OPT_EXPORT_NAME of {len} bytes")));
                }
                let mut payload = (&mut self.stream).take(u64::from(len));
                tokio::io::copy(&mut payload, &mut tokio::io::sink()).await?;
                self.reply_error(code, REP_ERR_TOO_BIG, "option too long").await?;
                continue;
            }
            let mut data = vec![0u8; len as usize];
            self.stream.read_exact(&mut data).await?;
            if shutting_down() {
                self.reply_error(code, REP_ERR_SHUTDOWN, "server is shutting down").await?;
                return Ok(None);
            }
            let option = match ClientOption::parse(code, &data) {
                Ok(option) => option,
                Err(OptionError::Invalid(msg)) if code == OPT_EXPORT_NAME => {
                    return Err(Disconnect::Protocol(format!("NBD_OPT_EXPORT_NAME: {msg}")));
                }
                Err(OptionError::Invalid(msg)) => {
                    self.reply_error(code, REP_ERR_INVALID, msg).await?;
                    continue;
                }
            };
            match option {
                ClientOption::Abort => {
                    // The client may already have closed; a failed ACK is no error.
                    let _ = self.reply(code, REP_ACK, &[]).await;
                    return Ok(None);
                }
                ClientOption::List => {
                    for name in registry.names() {
                        let mut payload = (name.len() as u32).to_be_bytes().to_vec();
                        payload.extend_from_slice(name.as_bytes());
                        self.reply(code, REP_SERVER, &payload).await?;
                    }
                    self.reply(code, REP_ACK, &[]).await?;
                }
                ClientOption::Unsupported(_) => {
                    self.reply_error(code, REP_ERR_UNSUP, "option not supported by this server").await?;
                }
                ClientOption::ExportName(name) => {
                    let Some(export) = registry.get(&name) else {
                        return Err(Disconnect::Protocol(format!("NBD_OPT_EXPORT_NAME: unknown export {name:?}")));
                    };
                    let flags = transmission_flags(&export);
                    let mut reply = export.device.size().to_be_bytes().to_vec();
                    reply.extend_from_slice(&flags.to_be_bytes());
                    if !self.no_zeroes {
                        reply.extend_from_slice(&[0u8; EXPORT_NAME_PADDING]);
                    }
                    self.stream.write_all(&reply).await?;
                    self.stream.flush().await?;
                    return Ok(Some(Transmission { stream: self.stream, export, flags }));
                }
                ClientOption::Info { go, name, requests } => {
                    let Some(export) = registry.get(&name) else {
                        let msg = format!("no export named {name:?}");
                        self.reply_error(code, REP_ERR_UNKNOWN, &msg).await?;
                        continue;
                    };
                    let flags = self.send_info(code, &export, &requests).await?;
                    self.reply(code, REP_ACK, &[]).await?;
                    if go {
                        return Ok(Some(Transmission { stream: self.stream, export, flags }));
                    }
                }
            }
        }
    }

    /// Sends the `NBD_REP_INFO` replies for `export`; returns its transmission flags.
    async fn send_info<D: BlockDevice>(
        &mut self,
        code: u32,
        export: &Export<D>,
        requests: &[u16],
    ) -> Result<u16, Disconnect> {
        let device = export.device.as_ref();
        let flags = transmission_flags(export);
        let mut info = INFO_EXPORT.to_be_bytes().to_vec();
        info.extend_from_slice(&device.size().to_be_bytes());
        info.extend_from_slice(&flags.to_be_bytes());
        self.reply(code, REP_INFO, &info).await?;
        // Sent even when not requested: with a minimum of 1 it constrains nothing but the
        // maximum, which is the protocol's default anyway.
        let mut sizes = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
        sizes.extend_from_slice(&1u32.to_be_bytes());
        sizes.extend_from_slice(&preferred_block_size(device).to_be_bytes());
        sizes.extend_from_slice(&MAX_PAYLOAD.to_be_bytes());
        self.reply(code, REP_INFO, &sizes).await?;
        if requests.contains(&INFO_NAME) {
            let mut name = INFO_NAME.to_be_bytes().to_vec();
            name.extend_from_slice(export.name.as_bytes());
            self.reply(code, REP_INFO, &name).await?;
        }
        if requests.contains(&INFO_DESCRIPTION) {
            let mut desc = INFO_DESCRIPTION.to_be_bytes().to_vec();
            desc.extend_from_slice(format!("hlstore volume {}", device.name()).as_bytes());
            self.reply(code, REP_INFO, &desc).await?;
        }
        Ok(flags)
    }

    async fn reply(&mut self, option: u32, reply_type: u32, data: &[u8]) -> io::Result<()> {
        let mut out = Vec::with_capacity(20 + data.len());
        out.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
        out.extend_from_slice(&option.to_be_bytes());
        out.extend_from_slice(&reply_type.to_be_bytes());
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        out.extend_from_slice(data);
        self.stream.write_all(&out).await?;
        self.stream.flush().await
    }

    async fn reply_error(&mut self, option: u32, reply_type: u32, message: &str) -> io::Result<()> {
        tracing::debug!(option, reply_type, message, "nbd option refused");
        self.reply(option, reply_type, message.as_bytes()).await
    }
}

//! `NbdClient`: one NBD connection in the transmission phase, shared by many callers.
//!
//! Requests are pipelined: each caller takes a handle, registers a waiter in [`InFlight`],
//! writes its request under the writer lock and awaits its reply, which the one reader
//! task delivers in whatever order the server answers. At most
//! [`ClientOptions::max_in_flight`] requests are outstanding (a semaphore bounds memory).
//!
//! Contract:
//! - Once it has one of the `max_in_flight` slots, every request returns within
//!   [`ClientOptions::request_timeout`] (the wait for the writer lock included); so no
//!   request waits longer than twice the timeout on a hung server. A request that times out kills the connection: its state on the
//!   server is unknown, so later requests fail at once with `Unavailable` instead of
//!   queueing behind a hung server. There is no reconnect; the owner makes a new client.
//! - A caller's future dropped in the middle of writing its request would leave a partial
//!   request on the socket; a guard kills the connection in that case.
//! - READ/WRITE larger than the server's maximum block size are split into chunks sent
//!   concurrently; TRIM/WRITE_ZEROES are split at [`ZERO_CHUNK`]. A split request fails if
//!   any chunk fails (chunks already done stay done, as with any failed NBD write).
//! - Requests outside the export fail with `OutOfRange` without being sent; writes to a
//!   read-only export fail with `InvalidArgument`.
//! - Features the server does not advertise are emulated where that keeps the meaning:
//!   FUA → write then FLUSH; WRITE_ZEROES → WRITE of zeroes; TRIM (advisory) → nothing;
//!   FLUSH on a server without a write cache → nothing.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::future::try_join_all;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, WriteHalf};
use tokio::net::{TcpStream, UnixStream};
use tokio::sync::{Mutex, Semaphore};
use tokio::task::JoinHandle;

use super::errors::{reply_error, RequestContext};
use super::handshake::{negotiate, ExportInfo};
use super::inflight::{InFlight, Reply};
use super::uri::{NbdAddress, NbdUri};
use hlstore_core::error::{Error, Result};
use hlstore_nbd::proto::*;

/// Largest TRIM/WRITE_ZEROES sent as one request (the length field is 32 bits).
pub const ZERO_CHUNK: u64 = 1 << 30;
/// Largest zero buffer written at once when the server has no WRITE_ZEROES.
const ZERO_WRITE_CHUNK: u64 = 4 * 1024 * 1024;

/// Connection tuning.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Bound on connecting plus the handshake.
    pub connect_timeout: Duration,
    /// Bound on one request, from submission to reply (see the module contract).
    pub request_timeout: Duration,
    /// Requests outstanding at once on the connection.
    pub max_in_flight: usize,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            connect_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(30),
            max_in_flight: 64,
        }
    }
}

type Writer = WriteHalf<Box<dyn Stream>>;

/// Any byte stream a client can run on (TCP, unix socket, an in-memory duplex in tests).
pub trait Stream: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Stream for T {}

/// An NBD client connection. `Send + Sync`: share it behind an `Arc`.
pub struct NbdClient {
    export: String,
    info: ExportInfo,
    opts: ClientOptions,
    writer: Mutex<Option<Writer>>,
    inflight: Arc<InFlight>,
    reader: JoinHandle<()>,
    next_handle: AtomicU64,
    slots: Semaphore,
}

impl std::fmt::Debug for NbdClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NbdClient").field("export", &self.export).field("info", &self.info).finish_non_exhaustive()
    }
}

impl NbdClient {
    /// Connects to `uri` and negotiates its export.
    pub async fn connect(uri: &NbdUri, opts: ClientOptions) -> Result<Self> {
        let what = format!("nbd: connecting to {uri}");
        let connect = async {
            let stream: Box<dyn Stream> = match &uri.address {
                NbdAddress::Tcp { host, port } => {
                    let s = TcpStream::connect((host.as_str(), *port)).await.map_err(|e| Error::io(&what, e))?;
                    // Latency matters more than packet count for small requests.
                    s.set_nodelay(true).map_err(|e| Error::io(&what, e))?;
                    Box::new(s)
                }
                NbdAddress::Unix(path) => Box::new(UnixStream::connect(path).await.map_err(|e| Error::io(&what, e))?),
            };
            Self::handshake(stream, &uri.export, opts.clone()).await
        };
        tokio::time::timeout(opts.connect_timeout, connect)
            .await
            .map_err(|_| Error::Unavailable(format!("{what}: no answer within {:?}", opts.connect_timeout)))?
    }

    /// Runs the handshake on an already connected stream.
    pub async fn handshake(mut stream: Box<dyn Stream>, export: &str, opts: ClientOptions) -> Result<Self> {
        let info = negotiate(&mut stream, export).await?;
        let (reader, writer) = tokio::io::split(stream);
        let inflight = InFlight::new(export.to_string());
        let reader =
            tokio::spawn(inflight.clone().read_replies(tokio::io::BufReader::with_capacity(256 * 1024, reader)));
        Ok(NbdClient {
            export: export.to_string(),
            info,
            slots: Semaphore::new(opts.max_in_flight.max(1)),
            opts,
            writer: Mutex::new(Some(writer)),
            inflight,
            reader,
            next_handle: AtomicU64::new(1),
        })
    }

    pub fn export(&self) -> &str {
        &self.export
    }

    pub fn info(&self) -> ExportInfo {
        self.info
    }

    pub fn size(&self) -> u64 {
        self.info.size
    }

    /// Whether the connection is dead (every request fails from now on).
    pub fn is_dead(&self) -> bool {
        self.inflight.is_dead()
    }

    /// Reads `len` bytes at `offset`.
    pub async fn read(&self, offset: u64, len: usize) -> Result<Vec<u8>> {
        self.check_range(offset, len as u64)?;
        if len == 0 {
            return Ok(Vec::new());
        }
        let chunks = self.split(offset, len as u64, self.max_chunk());
        let parts =
            try_join_all(chunks.iter().map(|&(off, n)| self.request(CMD_READ, 0, off, n as u32, None, "read"))).await?;
        if parts.len() == 1 {
            return Ok(parts.into_iter().next().unwrap_or_default());
        }
        let mut out = Vec::with_capacity(len);
        for part in parts {
            out.extend_from_slice(&part);
        }
        Ok(out)
    }

    /// Writes `data` at `offset`; with `fua`, returns once it is durable.
    pub async fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<()> {
        self.check_writable("write")?;
        self.check_range(offset, data.len() as u64)?;
        if data.is_empty() {
            return Ok(());
        }
        let flags = if fua && self.info.has(FLAG_SEND_FUA) { CMD_FLAG_FUA } else { 0 };
        let chunks = self.split(offset, data.len() as u64, self.max_chunk());
        try_join_all(chunks.iter().map(|&(off, n)| {
            let start = (off - offset) as usize;
            let payload = &data[start..start + n as usize];
            self.request(CMD_WRITE, flags, off, n as u32, Some(payload), "write")
        }))
        .await?;
        if fua && flags == 0 {
            self.flush().await?;
        }
        Ok(())
    }

    /// Makes every write acknowledged before the call durable.
    pub async fn flush(&self) -> Result<()> {
        if !self.info.has(FLAG_SEND_FLUSH) {
            // The server says it has no volatile write cache: every acked write is durable.
            return Ok(());
        }
        self.request(CMD_FLUSH, 0, 0, 0, None, "flush").await.map(drop)
    }

    /// Discards a range (reads of it return zeroes on servers that deallocate; TRIM is
    /// advisory in NBD, so on a server without TRIM this does nothing).
    pub async fn trim(&self, offset: u64, len: u64) -> Result<()> {
        self.check_writable("trim")?;
        self.check_range(offset, len)?;
        if !self.info.has(FLAG_SEND_TRIM) || len == 0 {
            return Ok(());
        }
        let chunks = self.split(offset, len, ZERO_CHUNK);
        try_join_all(chunks.iter().map(|&(off, n)| self.request(CMD_TRIM, 0, off, n as u32, None, "trim"))).await?;
        Ok(())
    }

    /// Zeroes a range; `may_trim` lets the server deallocate it (else `NO_HOLE` is sent).
    pub async fn write_zeroes(&self, offset: u64, len: u64, may_trim: bool) -> Result<()> {
        self.check_writable("write_zeroes")?;
        self.check_range(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        if !self.info.has(FLAG_SEND_WRITE_ZEROES) {
            let zeroes = vec![0u8; ZERO_WRITE_CHUNK.min(len) as usize];
            let mut done = 0;
            while done < len {
                let n = (len - done).min(ZERO_WRITE_CHUNK);
                self.write(offset + done, &zeroes[..n as usize], false).await?;
                done += n;
            }
            return Ok(());
        }
        let flags = if may_trim { 0 } else { CMD_FLAG_NO_HOLE };
        let chunks = self.split(offset, len, ZERO_CHUNK);
        try_join_all(
            chunks.iter().map(|&(off, n)| self.request(CMD_WRITE_ZEROES, flags, off, n as u32, None, "write_zeroes")),
        )
        .await?;
        Ok(())
    }

    /// Sends `NBD_CMD_DISC` after the requests in flight and closes the connection.
    /// Requests after this fail with `Unavailable`.
    pub async fn disconnect(&self) -> Result<()> {
        let what = || format!("nbd export {:?}: disconnect", self.export);
        // Wait until every in-flight request has its reply (all permits free).
        let permits = u32::try_from(self.opts.max_in_flight.max(1)).unwrap_or(u32::MAX);
        let _all = tokio::time::timeout(self.opts.request_timeout, self.slots.acquire_many(permits)).await;
        let mut writer = self.writer.lock().await;
        // Closed before DISC goes out, so the server's close is not taken for a failure.
        let alive = !self.inflight.is_dead();
        self.inflight.close("disconnected");
        let result = match writer.as_mut() {
            Some(w) if alive => {
                let header = request_header(CMD_DISC, 0, 0, 0, 0);
                let sent = async {
                    w.write_all(&header).await?;
                    w.flush().await?;
                    w.shutdown().await
                };
                tokio::time::timeout(self.opts.request_timeout, sent)
                    .await
                    .map_err(|_| Error::Unavailable(format!("{}: timed out", what())))
                    .and_then(|r| r.map_err(|e| Error::io(what(), e)))
            }
            _ => Ok(()),
        };
        *writer = None;
        result
    }

    fn check_writable(&self, op: &str) -> Result<()> {
        if self.info.read_only() {
            return Err(Error::InvalidArgument(format!("nbd export {:?} is read-only: {op} refused", self.export)));
        }
        Ok(())
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<()> {
        if offset.checked_add(len).is_none_or(|end| end > self.info.size) {
            return Err(Error::OutOfRange { volume: self.export.clone(), offset, length: len, size: self.info.size });
        }
        Ok(())
    }

    /// Largest READ/WRITE payload, a multiple of the minimum block size.
    fn max_chunk(&self) -> u64 {
        let min = u64::from(self.info.min_block.max(1));
        let max = u64::from(self.info.max_block.min(MAX_PAYLOAD_CAP)).max(min);
        max - max % min
    }

    /// Splits `[offset, offset+len)` into pieces of at most `chunk` bytes.
    fn split(&self, offset: u64, len: u64, chunk: u64) -> Vec<(u64, u64)> {
        let mut out = Vec::with_capacity(len.div_ceil(chunk.max(1)).max(1) as usize);
        let mut done = 0;
        loop {
            let n = (len - done).min(chunk);
            out.push((offset + done, n));
            done += n;
            if done >= len {
                return out;
            }
        }
    }

    /// Sends one request and waits for its reply (bounded by the request timeout).
    async fn request(
        &self,
        cmd: u16,
        flags: u16,
        offset: u64,
        length: u32,
        payload: Option<&[u8]>,
        op: &'static str,
    ) -> Result<Vec<u8>> {
        let timeout = self.opts.request_timeout;
        let cx = RequestContext { export: &self.export, op, offset, length: u64::from(length), size: self.info.size };
        // Waiting for a free slot is not bounded by the timeout: the requests holding the
        // slots are, and a dead connection frees them at once.
        let _slot =
            self.slots.acquire().await.map_err(|_| Error::Internal("nbd client request semaphore closed".into()))?;
        match tokio::time::timeout(timeout, self.send_and_wait(cmd, flags, offset, length, payload)).await {
            Ok(Ok(reply)) if reply.errno == 0 => Ok(reply.data),
            Ok(Ok(reply)) => Err(reply_error(reply.errno, cx)),
            Ok(Err(e)) => Err(e),
            Err(_) => {
                let reason = format!("{op} at offset {offset} got no reply within {timeout:?}");
                self.inflight.kill(&reason);
                Err(Error::Unavailable(format!("nbd export {:?}: {reason}", self.export)))
            }
        }
    }

    async fn send_and_wait(
        &self,
        cmd: u16,
        flags: u16,
        offset: u64,
        length: u32,
        payload: Option<&[u8]>,
    ) -> Result<Reply> {
        let handle = self.next_handle.fetch_add(1, Ordering::Relaxed);
        let read_len = if cmd == CMD_READ { length } else { 0 };
        let rx = self.inflight.register(handle, read_len)?;
        {
            let mut writer = self.writer.lock().await;
            let Some(w) = writer.as_mut() else {
                self.inflight.forget(handle);
                return Err(Error::Unavailable(format!("nbd export {:?}: disconnected", self.export)));
            };
            let guard = KillOnDrop(Some(&self.inflight));
            let header = request_header(cmd, flags, handle, offset, length);
            let sent = async {
                w.write_all(&header).await?;
                if let Some(data) = payload {
                    w.write_all(data).await?;
                }
                w.flush().await
            };
            if let Err(e) = sent.await {
                self.inflight.kill(&format!("write failed: {e}"));
            }
            guard.disarm();
        }
        rx.await.map_err(|_| {
            let reason = self.inflight.dead_reason().unwrap_or_else(|| "reply channel closed".into());
            Error::Unavailable(format!("nbd export {:?}: connection is down: {reason}", self.export))
        })?
    }
}

/// Upper bound on one READ/WRITE whatever the server advertises (our own allocation bound).
const MAX_PAYLOAD_CAP: u32 = 32 * 1024 * 1024;

impl Drop for NbdClient {
    fn drop(&mut self) {
        self.inflight.close("client dropped");
        self.reader.abort();
    }
}

/// Kills the connection if a request is abandoned while partly written.
struct KillOnDrop<'a>(Option<&'a InFlight>);

impl KillOnDrop<'_> {
    fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for KillOnDrop<'_> {
    fn drop(&mut self) {
        if let Some(inflight) = self.0.take() {
            inflight.kill("a request was abandoned while being sent");
        }
    }
}

fn request_header(cmd: u16, flags: u16, handle: u64, offset: u64, length: u32) -> [u8; REQUEST_HEADER_LEN] {
    let mut h = [0u8; REQUEST_HEADER_LEN];
    h[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    h[4..6].copy_from_slice(&flags.to_be_bytes());
    h[6..8].copy_from_slice(&cmd.to_be_bytes());
    h[8..16].copy_from_slice(&handle.to_be_bytes());
    h[16..24].copy_from_slice(&offset.to_be_bytes());
    h[24..28].copy_from_slice(&length.to_be_bytes());
    h
}

//! The transmission phase of one connection: pipelined requests, serialised replies.
//!
//! Shape: the reading loop parses each request, validates it ([`plan`]), reads a write's
//! payload, and spawns a task per request; tasks run concurrently and send their replies to
//! one writer task that owns the socket's write half, so replies go out whole and in
//! completion order (the client matches them by cookie). In-flight work is bounded by a
//! byte budget ([`IN_FLIGHT_BUDGET`]): the reader stops reading when it is spent.
//!
//! Ending: on `NBD_CMD_DISC`, on shutdown, on EOF, when the export is removed or replaced
//! (a detach), after a reply with `ESHUTDOWN` (the device was fenced by a newer engine),
//! or after a protocol violation, the
//! reader stops, every in-flight request still completes and gets its reply, then the
//! connection closes. A reply is sent only after the device operation returned, which is
//! what makes `CAN_MULTI_CONN` honest for a device that reports `multi_conn()`.

use std::io;
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::sync::{mpsc, Semaphore};
use tokio_util::sync::CancellationToken;

use super::block_io;
use super::errno::errno_for;
use super::export_io::OpClass;
use super::handshake::{Disconnect, Transmission};
use super::proto::{ESHUTDOWN, REQUEST_HEADER_LEN, SIMPLE_REPLY_MAGIC};
use super::registry::Export;
use super::request::{plan_for_export, Op, Plan, RequestHeader, MAX_PAYLOAD};
use super::stats::NbdStats;
use hlstore_core::device::BlockDevice;

/// Bytes of requests in flight per connection: each request costs [`REQUEST_COST`] plus its
/// payload. Holds at least one maximal request.
pub const IN_FLIGHT_BUDGET: u32 = 2 * MAX_PAYLOAD;
/// Fixed cost of a request against the budget (bounds the number of in-flight requests).
pub const REQUEST_COST: u32 = 64 * 1024;
/// How long a shutting-down server waits for in-flight replies to be sent.
pub const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(10);
/// Replies queued for the writer before request tasks wait.
const REPLY_QUEUE: usize = 256;

/// One simple reply.
#[derive(Debug)]
struct Reply {
    cookie: u64,
    error: u32,
    data: Vec<u8>,
}

impl<S, D> Transmission<S, D>
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    D: BlockDevice,
{
    /// Serves requests until disconnect, shutdown (`cancel`) or a protocol violation.
    pub async fn serve(self, stats: Arc<NbdStats>, cancel: CancellationToken) -> Result<(), Disconnect> {
        let Transmission { stream, export, .. } = self;
        let (rd, wr) = tokio::io::split(stream);
        let mut reader = BufReader::with_capacity(128 * 1024, rd);
        let conn_cancel = cancel.child_token();
        let (tx, rx) = mpsc::channel::<Reply>(REPLY_QUEUE);
        let mut writer = tokio::spawn(write_replies(wr, rx, conn_cancel.clone()));
        let budget = Arc::new(Semaphore::new(IN_FLIGHT_BUDGET as usize));

        let outcome = read_requests(&mut reader, &export, &stats, &tx, &budget, &conn_cancel).await;
        // Let every in-flight request finish and reply, then close. On shutdown, a client
        // that stops reading its replies gets [`SHUTDOWN_GRACE`], then a hard disconnect.
        drop(tx);
        let joined = tokio::select! {
            joined = &mut writer => joined,
            _ = async {
                cancel.cancelled().await;
                tokio::time::sleep(SHUTDOWN_GRACE).await;
            } => {
                writer.abort();
                return Err(Disconnect::Io(io::Error::new(io::ErrorKind::TimedOut, "replies not taken before shutdown")));
            }
        };
        let written = joined.map_err(|e| Disconnect::Io(io::Error::other(e)))?;
        outcome?;
        written.map_err(Disconnect::Io)
    }
}

async fn read_requests<R, D>(
    reader: &mut R,
    export: &Arc<Export<D>>,
    stats: &Arc<NbdStats>,
    tx: &mpsc::Sender<Reply>,
    budget: &Arc<Semaphore>,
    cancel: &CancellationToken,
) -> Result<(), Disconnect>
where
    R: AsyncRead + Unpin,
    D: BlockDevice,
{
    let size = export.device.size();
    loop {
        let mut buf = [0u8; REQUEST_HEADER_LEN];
        tokio::select! {
            biased;
            _ = cancel.cancelled() => return Ok(()),
            _ = export.closed.cancelled() => {
                tracing::debug!(nbd.export = %export.name, "export removed: closing the connection");
                return Ok(());
            }
            read = reader.read_exact(&mut buf) => match read {
                Ok(_) => {}
                // The client went away without NBD_CMD_DISC (a hard disconnect).
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
                Err(e) => return Err(e.into()),
            },
        }
        let header = RequestHeader::parse(&buf)
            .map_err(|bad| Disconnect::Protocol(format!("bad request magic {:#010x}", bad.0)))?;
        let op = match plan_for_export(&header, size, export.read_only) {
            Plan::Serve(Op::Disconnect) => return Ok(()),
            Plan::Serve(op) => op,
            Plan::Close(why) => return Err(Disconnect::Protocol(format!("{why} (length {})", header.length))),
            Plan::Reject { errno, drain } => {
                let mut payload = (&mut *reader).take(u64::from(drain));
                let drained = tokio::io::copy(&mut payload, &mut tokio::io::sink()).await?;
                if drained != u64::from(drain) {
                    return Ok(());
                }
                tracing::debug!(
                    nbd.export = %export.name, command = header.command, offset = header.offset,
                    length = header.length, errno, "nbd request rejected"
                );
                NbdStats::bump(&stats.errors);
                export.io.record_error();
                let reply = Reply { cookie: header.cookie, error: errno, data: Vec::new() };
                if tx.send(reply).await.is_err() {
                    return Ok(());
                }
                continue;
            }
        };
        let payload_len = match op {
            Op::Read { length, .. } | Op::Write { length, .. } => length,
            _ => 0,
        };
        let permit = budget
            .clone()
            .acquire_many_owned(REQUEST_COST + payload_len)
            .await
            .map_err(|_| Disconnect::Io(io::Error::other("request budget closed")))?;
        let payload = match op {
            Op::Write { length, .. } => {
                let mut data = vec![0u8; length as usize];
                reader.read_exact(&mut data).await?;
                data
            }
            _ => Vec::new(),
        };
        let export = export.clone();
        let stats = stats.clone();
        let tx = tx.clone();
        let cookie = header.cookie;
        tokio::spawn(async move {
            let reply = execute(&export, op, payload, &stats, cookie).await;
            // The writer is gone only if the connection failed; nothing left to tell.
            let _ = tx.send(reply).await;
            drop(permit);
        });
    }
}

async fn execute<D: BlockDevice>(export: &Export<D>, op: Op, payload: Vec<u8>, stats: &NbdStats, cookie: u64) -> Reply {
    let started = std::time::Instant::now();
    let (class, bytes) = match op {
        Op::Read { length, .. } => (OpClass::Read, u64::from(length)),
        Op::Write { length, .. } => (OpClass::Write, u64::from(length)),
        Op::Flush | Op::Disconnect => (OpClass::Flush, 0),
        Op::Trim { .. } | Op::WriteZeroes { .. } => (OpClass::Discard, 0),
    };
    let mut data = Vec::new();
    let result = match op {
        Op::Read { offset, length } => block_io::read(export, offset, length).await.map(|d| {
            NbdStats::bump(&stats.reads);
            NbdStats::add(&stats.read_bytes, d.len() as u64);
            data = d;
        }),
        Op::Write { offset, length, fua } => block_io::write(export, offset, payload, fua).await.map(|rmw| {
            NbdStats::bump(&stats.writes);
            NbdStats::add(&stats.written_bytes, u64::from(length));
            if rmw {
                NbdStats::bump(&stats.read_modify_writes);
            }
        }),
        Op::Flush => export.device.flush().await.map(|()| NbdStats::bump(&stats.flushes)),
        Op::Trim { offset, length, fua } => {
            block_io::trim(export, offset, length, fua).await.map(|()| NbdStats::bump(&stats.trims))
        }
        Op::WriteZeroes { offset, length, fua, may_trim } => {
            block_io::write_zeroes(export, offset, length, may_trim, fua).await.map(|rmw| {
                NbdStats::bump(&stats.write_zeroes);
                if rmw {
                    NbdStats::bump(&stats.read_modify_writes);
                }
            })
        }
        Op::Disconnect => Ok(()),
    };
    match result {
        Ok(()) => {
            if !matches!(op, Op::Disconnect) {
                export.io.record(class, bytes, started.elapsed());
            }
            Reply { cookie, error: 0, data }
        }
        Err(err) => {
            export.io.record_error();
            let is_write = matches!(op, Op::Write { .. } | Op::WriteZeroes { .. });
            let errno = errno_for(&err, is_write);
            tracing::warn!(nbd.export = %export.name, ?op, errno, error = %err, "nbd request failed");
            NbdStats::bump(&stats.errors);
            Reply { cookie, error: errno, data: Vec::new() }
        }
    }
}

/// Writes replies as they come; flushes when no more are queued. On a write error it
/// cancels the connection so the reader stops too.
async fn write_replies<W: AsyncWrite + Unpin>(
    wr: W,
    mut rx: mpsc::Receiver<Reply>,
    cancel: CancellationToken,
) -> io::Result<()> {
    let mut out = BufWriter::with_capacity(128 * 1024, wr);
    let result = async {
        while let Some(mut reply) = rx.recv().await {
            loop {
                let mut header = [0u8; 16];
                header[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
                header[4..8].copy_from_slice(&reply.error.to_be_bytes());
                header[8..16].copy_from_slice(&reply.cookie.to_be_bytes());
                out.write_all(&header).await?;
                out.write_all(&reply.data).await?;
                if reply.error == ESHUTDOWN {
                    // The device was fenced by a newer engine: it will never serve again.
                    // Stop reading requests; the in-flight ones still get their replies,
                    // then the connection closes and the client reconnects (to the new
                    // engine, wherever the volume is attached now).
                    cancel.cancel();
                }
                match rx.try_recv() {
                    Ok(next) => reply = next,
                    Err(_) => break,
                }
            }
            out.flush().await?;
        }
        out.shutdown().await
    }
    .await;
    if result.is_err() {
        cancel.cancel();
    }
    result
}

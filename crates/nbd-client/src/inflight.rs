//! `InFlight`: the requests sent on one connection and not yet answered (handle → waiter),
//! and the reader task that answers them.
//!
//! Invariants:
//! - Once the connection is dead (`dead` is set), it stays dead: every waiter present or
//!   future gets `Unavailable` with the reason, and nothing more is sent.
//! - The reader task is the only one reading the socket; it reads a READ reply's payload
//!   even when its waiter went away, so the stream never loses sync. A reply it cannot
//!   place (unknown handle, bad magic) kills the connection.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use hlstore_core::error::{Error, Result};
use hlstore_nbd::proto::{SIMPLE_REPLY_LEN, SIMPLE_REPLY_MAGIC};

/// A reply: the errno (0 on success) and, for a successful READ, the data.
#[derive(Debug)]
pub(crate) struct Reply {
    pub errno: u32,
    pub data: Vec<u8>,
}

struct Waiter {
    /// Payload length that follows a successful reply (READ only).
    read_len: u32,
    tx: oneshot::Sender<Result<Reply>>,
}

#[derive(Default)]
struct Table {
    waiters: HashMap<u64, Waiter>,
    dead: Option<String>,
}

/// The table of requests in flight on one connection. Cheap to share (`Arc`).
pub(crate) struct InFlight {
    export: String,
    table: Mutex<Table>,
    /// Cancelled when the connection dies: stops the reader task.
    cancel: CancellationToken,
}

impl InFlight {
    pub fn new(export: String) -> Arc<Self> {
        Arc::new(InFlight { export, table: Mutex::default(), cancel: CancellationToken::new() })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        // Entries are inserted and removed whole; a poisoned table is still consistent.
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers a request about to be sent; fails if the connection is already dead.
    pub fn register(&self, handle: u64, read_len: u32) -> Result<oneshot::Receiver<Result<Reply>>> {
        let mut table = self.lock();
        if let Some(reason) = &table.dead {
            return Err(self.dead_error(reason));
        }
        let (tx, rx) = oneshot::channel();
        table.waiters.insert(handle, Waiter { read_len, tx });
        Ok(rx)
    }

    /// Forgets a request that was never (completely) sent.
    pub fn forget(&self, handle: u64) {
        self.lock().waiters.remove(&handle);
    }

    /// The reason the connection died, if it did.
    pub fn dead_reason(&self) -> Option<String> {
        self.lock().dead.clone()
    }

    pub fn is_dead(&self) -> bool {
        self.cancel.is_cancelled()
    }

    /// Marks the connection dead (first reason wins) and fails every waiting request.
    pub fn kill(&self, reason: &str) {
        self.end(reason, true)
    }

    /// Like [`InFlight::kill`], for an orderly close (logged at debug level).
    pub fn close(&self, reason: &str) {
        self.end(reason, false)
    }

    fn end(&self, reason: &str, failure: bool) {
        let waiters = {
            let mut table = self.lock();
            if table.dead.is_none() {
                if failure {
                    tracing::warn!(nbd.export = %self.export, "nbd client: connection lost: {reason}");
                } else {
                    tracing::debug!(nbd.export = %self.export, "nbd client: connection closed: {reason}");
                }
                table.dead = Some(reason.to_string());
            }
            std::mem::take(&mut table.waiters)
        };
        self.cancel.cancel();
        let reason = self.dead_reason().unwrap_or_default();
        for (_, waiter) in waiters {
            let _ = waiter.tx.send(Err(self.dead_error(&reason)));
        }
    }

    fn dead_error(&self, reason: &str) -> Error {
        Error::Unavailable(format!("nbd export {:?}: connection is down: {reason}", self.export))
    }

    /// The reader task: answers waiters until the stream ends, fails, or `kill` is called.
    pub async fn read_replies<R: AsyncRead + Unpin>(self: Arc<Self>, mut reader: R) {
        let reason = tokio::select! {
            _ = self.cancel.cancelled() => return,
            reason = self.read_loop(&mut reader) => reason,
        };
        self.kill(&reason);
    }

    async fn read_loop<R: AsyncRead + Unpin>(&self, reader: &mut R) -> String {
        let mut header = [0u8; SIMPLE_REPLY_LEN];
        loop {
            if let Err(e) = reader.read_exact(&mut header).await {
                return if e.kind() == std::io::ErrorKind::UnexpectedEof {
                    "the server closed the connection".into()
                } else {
                    format!("read failed: {e}")
                };
            }
            let magic = u32::from_be_bytes([header[0], header[1], header[2], header[3]]);
            let errno = u32::from_be_bytes([header[4], header[5], header[6], header[7]]);
            let mut handle_bytes = [0u8; 8];
            handle_bytes.copy_from_slice(&header[8..16]);
            let handle = u64::from_be_bytes(handle_bytes);
            if magic != SIMPLE_REPLY_MAGIC {
                return format!("protocol error: reply magic {magic:#010x} (structured replies were not negotiated)");
            }
            let Some(waiter) = self.lock().waiters.remove(&handle) else {
                return format!("protocol error: reply to unknown handle {handle}");
            };
            let mut data = Vec::new();
            if errno == 0 && waiter.read_len > 0 {
                data = vec![0u8; waiter.read_len as usize];
                if let Err(e) = reader.read_exact(&mut data).await {
                    let reason = format!("reading reply payload failed: {e}");
                    let _ = waiter.tx.send(Err(self.dead_error(&reason)));
                    return reason;
                }
            }
            // The requester may have given up (its future dropped): nothing to do then.
            let _ = waiter.tx.send(Ok(Reply { errno, data }));
        }
    }
}

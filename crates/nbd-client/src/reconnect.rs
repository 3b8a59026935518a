//! `Reconnecting`: an [`NbdClient`] that survives its server going away for a while — an
//! agent restart (the engine is re-attached by the new process), a detach and re-attach
//! (a replica replacement), or an engine fenced by a newer one on the same node.
//!
//! Contract:
//! - A request that fails because the connection died (`Unavailable`: EOF, reset, a request
//!   timeout) or because the server shut the export down (`ESHUTDOWN` → `StaleEpoch`) is
//!   retried, whole, on a new connection; the caller sees nothing but the delay. Every other
//!   error (EIO, out of range, refused) is the answer and is returned as is.
//! - Reconnecting is single-flight: the first failed request of a connection makes the new
//!   one, the others wait for it and retry on it (the generation counter tells whether the
//!   connection they failed on has been replaced already).
//! - The retry window bounds it: once a request has been failing for longer than
//!   [`ReconnectPolicy::window`], it fails with the last error (the export is gone for good:
//!   detached, or its node lost). A window of zero means no reconnect at all.
//!
//! Why retrying is safe: NBD requests are idempotent. A WRITE retried after its first
//! attempt landed writes the same bytes again; a FLUSH retried covers at least what the
//! first one covered; a write acknowledged by the old engine is on a write quorum of
//! replicas, which the new engine's attach finds. Concurrent overlapping writes have no
//! defined order in NBD (or in the block layer) to begin with, so re-sending one of them
//! changes nothing a client may rely on.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::sync::Mutex;
use tokio::time::Instant;

use super::client::{ClientOptions, NbdClient};
use super::handshake::ExportInfo;
use super::uri::NbdUri;
use hlstore_core::error::{Error, ErrorKind, Result};

/// How long and how often to reconnect.
#[derive(Debug, Clone, Copy)]
pub struct ReconnectPolicy {
    /// How long a request keeps being retried (zero: never reconnect).
    pub window: Duration,
    /// First pause between connection attempts; doubled up to `max_backoff`.
    pub min_backoff: Duration,
    pub max_backoff: Duration,
}

impl ReconnectPolicy {
    /// No reconnect: the first dead connection fails every request.
    pub const NEVER: ReconnectPolicy =
        ReconnectPolicy { window: Duration::ZERO, min_backoff: Duration::ZERO, max_backoff: Duration::ZERO };

    /// Reconnect for up to `window`.
    pub fn within(window: Duration) -> Self {
        ReconnectPolicy { window, min_backoff: Duration::from_millis(50), max_backoff: Duration::from_secs(1) }
    }
}

/// Whether an error means "the connection (or its engine) is gone", so a new connection
/// may succeed where this one failed.
pub fn is_retryable(e: &Error) -> bool {
    matches!(e.kind(), ErrorKind::Unavailable | ErrorKind::StaleEpoch)
}

/// Counters of a [`Reconnecting`] client.
#[derive(Debug, Default)]
pub struct ReconnectStats {
    /// Connections made after the first.
    pub reconnects: AtomicU64,
    /// Requests sent again on a new connection.
    pub retried_requests: AtomicU64,
}

/// An NBD client that reconnects (see the module docs). `Send + Sync`; share it in an `Arc`.
pub struct Reconnecting {
    uri: Option<NbdUri>,
    opts: ClientOptions,
    policy: ReconnectPolicy,
    current: RwLock<(u64, Arc<NbdClient>)>,
    reconnecting: Mutex<()>,
    generation: AtomicU64,
    stats: ReconnectStats,
}

impl std::fmt::Debug for Reconnecting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reconnecting").field("uri", &self.uri).field("policy", &self.policy).finish_non_exhaustive()
    }
}

impl Reconnecting {
    /// Connects to `uri` (the first connection is not retried: a wrong address or export
    /// should fail at once).
    pub async fn connect(uri: &NbdUri, opts: ClientOptions, policy: ReconnectPolicy) -> Result<Self> {
        let client = NbdClient::connect(uri, opts.clone()).await?;
        Ok(Self::with_client(client, Some(uri.clone()), opts, policy))
    }

    /// Wraps a connected client that is never replaced (no URI to reconnect to).
    pub fn fixed(client: NbdClient) -> Self {
        Self::with_client(client, None, ClientOptions::default(), ReconnectPolicy::NEVER)
    }

    fn with_client(client: NbdClient, uri: Option<NbdUri>, opts: ClientOptions, policy: ReconnectPolicy) -> Self {
        Reconnecting {
            uri,
            opts,
            policy,
            current: RwLock::new((0, Arc::new(client))),
            reconnecting: Mutex::new(()),
            generation: AtomicU64::new(0),
            stats: ReconnectStats::default(),
        }
    }

    /// The connection in use now and its generation.
    fn current(&self) -> (u64, Arc<NbdClient>) {
        let g = self.current.read().unwrap_or_else(|e| e.into_inner());
        (g.0, g.1.clone())
    }

    /// The connection in use now.
    pub fn client(&self) -> Arc<NbdClient> {
        self.current().1
    }

    pub fn stats(&self) -> &ReconnectStats {
        &self.stats
    }

    pub fn export(&self) -> String {
        self.client().export().to_string()
    }

    /// What the export looked like at the latest handshake.
    pub fn info(&self) -> ExportInfo {
        self.client().info()
    }

    pub fn size(&self) -> u64 {
        self.client().size()
    }

    /// Whether the current connection is dead (the next request reconnects, if allowed).
    pub fn is_dead(&self) -> bool {
        self.client().is_dead()
    }

    pub async fn read(&self, offset: u64, len: usize) -> Result<Vec<u8>> {
        self.run("read", |c| async move { c.read(offset, len).await }).await
    }

    pub async fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<()> {
        self.run("write", |c| async move { c.write(offset, data, fua).await }).await
    }

    pub async fn flush(&self) -> Result<()> {
        self.run("flush", |c| async move { c.flush().await }).await
    }

    pub async fn trim(&self, offset: u64, len: u64) -> Result<()> {
        self.run("trim", |c| async move { c.trim(offset, len).await }).await
    }

    pub async fn write_zeroes(&self, offset: u64, len: u64, may_trim: bool) -> Result<()> {
        self.run("write_zeroes", |c| async move { c.write_zeroes(offset, len, may_trim).await }).await
    }

    /// Disconnects the current connection (no reconnect afterwards for requests that were
    /// in flight on it: they fail).
    pub async fn disconnect(&self) -> Result<()> {
        self.client().disconnect().await
    }

    /// Runs `op` on the current connection, reconnecting and retrying as the module docs say.
    async fn run<T, F, Fut>(&self, what: &'static str, op: F) -> Result<T>
    where
        F: Fn(Arc<NbdClient>) -> Fut,
        Fut: std::future::Future<Output = Result<T>>,
    {
        let mut deadline: Option<Instant> = None;
        let mut retried = false;
        loop {
            let (generation, client) = self.current();
            let err = match op(client).await {
                Ok(v) => return Ok(v),
                Err(e) if is_retryable(&e) && self.uri.is_some() && !self.policy.window.is_zero() => e,
                Err(e) => return Err(e),
            };
            let deadline = *deadline.get_or_insert_with(|| Instant::now() + self.policy.window);
            if Instant::now() >= deadline {
                return Err(err);
            }
            if !retried {
                retried = true;
                self.stats.retried_requests.fetch_add(1, Ordering::Relaxed);
            }
            tracing::debug!(op = what, error = %err, "nbd request failed on a dead connection; retrying on a new one");
            self.reconnect(generation, deadline, &err).await?;
        }
    }

    /// Replaces the connection of `generation` (unless another request did already),
    /// trying until `deadline`.
    async fn reconnect(&self, generation: u64, deadline: Instant, why: &Error) -> Result<()> {
        let _one = self.reconnecting.lock().await;
        if self.generation.load(Ordering::Acquire) != generation {
            return Ok(()); // replaced while we waited
        }
        let Some(uri) = &self.uri else { return Err(Error::Unavailable(why.to_string())) };
        let started = Instant::now();
        tracing::warn!(nbd.uri = %uri, error = %why, "nbd connection lost; reconnecting");
        let mut pause = self.policy.min_backoff;
        let mut attempts = 0u32;
        loop {
            attempts += 1;
            let left = deadline.saturating_duration_since(Instant::now());
            let opts =
                ClientOptions { connect_timeout: self.opts.connect_timeout.min(left.max(pause)), ..self.opts.clone() };
            match NbdClient::connect(uri, opts).await {
                Ok(c) => {
                    let next = generation + 1;
                    *self.current.write().unwrap_or_else(|e| e.into_inner()) = (next, Arc::new(c));
                    self.generation.store(next, Ordering::Release);
                    self.stats.reconnects.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(
                        nbd.uri = %uri, attempts, after_ms = started.elapsed().as_millis() as u64,
                        "nbd connection re-established"
                    );
                    return Ok(());
                }
                Err(e) if Instant::now() + pause >= deadline => {
                    tracing::error!(nbd.uri = %uri, attempts, error = %e, "nbd reconnect gave up");
                    return Err(Error::Unavailable(format!(
                        "nbd export {uri}: connection lost ({why}) and not re-established within {:?} \
                         ({attempts} attempts; last: {e})",
                        self.policy.window
                    )));
                }
                Err(e) => {
                    tracing::debug!(nbd.uri = %uri, attempts, error = %e, "nbd reconnect attempt failed");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(self.policy.max_backoff).max(Duration::from_millis(1));
                }
            }
        }
    }
}

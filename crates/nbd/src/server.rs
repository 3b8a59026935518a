//! `NbdServer`: accepts connections on TCP or unix listeners and runs each through the
//! handshake and transmission phases.
//!
//! Lifecycle: every connection is a task in the listener's `JoinSet`; `shutdown()` on the
//! [`ShutdownHandle`] stops accepting, lets every connection finish the requests it has in
//! flight, and `serve_*` returns once all of them are closed. A failing connection never
//! affects another one or the listener.

use std::io;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::handshake::{Disconnect, Negotiating};
use super::registry::ExportRegistry;
use super::stats::NbdStats;
use hlstore_core::device::BlockDevice;

/// Longest time a client may take from connecting to entering transmission.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause after a failed `accept` (e.g. out of file descriptors) before trying again.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Stops a server: no new connections, in-flight requests complete, then connections close.
#[derive(Debug, Clone)]
pub struct ShutdownHandle(CancellationToken);

impl ShutdownHandle {
    pub fn shutdown(&self) {
        self.0.cancel();
    }

    pub fn is_shutdown(&self) -> bool {
        self.0.is_cancelled()
    }
}

/// An NBD server over an [`ExportRegistry`]. Cheap to clone; clones share exports, counters
/// and the shutdown handle, so one server can listen on several sockets.
#[derive(Debug)]
pub struct NbdServer<D> {
    registry: ExportRegistry<D>,
    stats: Arc<NbdStats>,
    cancel: CancellationToken,
}

impl<D> Clone for NbdServer<D> {
    fn clone(&self) -> Self {
        NbdServer { registry: self.registry.clone(), stats: self.stats.clone(), cancel: self.cancel.clone() }
    }
}

impl<D: BlockDevice> NbdServer<D> {
    pub fn new(registry: ExportRegistry<D>) -> Self {
        NbdServer { registry, stats: Arc::new(NbdStats::default()), cancel: CancellationToken::new() }
    }

    pub fn registry(&self) -> &ExportRegistry<D> {
        &self.registry
    }

    pub fn stats(&self) -> Arc<NbdStats> {
        self.stats.clone()
    }

    pub fn shutdown_handle(&self) -> ShutdownHandle {
        ShutdownHandle(self.cancel.clone())
    }

    /// Serves NBD on a TCP listener until shutdown.
    pub async fn serve_tcp(&self, listener: TcpListener) -> io::Result<()> {
        let mut connections = JoinSet::new();
        loop {
            tokio::select! {
                _ = self.cancel.cancelled() => break,
                Some(_) = connections.join_next(), if !connections.is_empty() => {}
                accepted = listener.accept() => match accepted {
                    Ok((stream, peer)) => {
                        // Latency matters more than packet count for small replies.
                        if let Err(e) = stream.set_nodelay(true) {
                            tracing::debug!(%peer, error = %e, "nbd: cannot set TCP_NODELAY");
                        }
                        connections.spawn(self.clone().run_connection(stream, peer.to_string()));
                    }
                    Err(e) => accept_failed(e).await,
                },
            }
        }
        while connections.join_next().await.is_some() {}
        Ok(())
    }

    /// Serves NBD on a unix socket listener until shutdown.
    pub async fn serve_unix(&self, listener: UnixListener) -> io::Result<()> {
        let mut connections = JoinSet::new();
        loop {
            tokio::select! {
                _ = self.cancel.cancelled() => break,
                Some(_) = connections.join_next(), if !connections.is_empty() => {}
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => {
                        connections.spawn(self.clone().run_connection(stream, "unix".to_string()));
                    }
                    Err(e) => accept_failed(e).await,
                },
            }
        }
        while connections.join_next().await.is_some() {}
        Ok(())
    }

    async fn run_connection<S>(self, stream: S, peer: String)
    where
        S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        let stats = self.stats.clone();
        NbdStats::bump(&stats.connections_total);
        stats.connections_active.fetch_add(1, Ordering::Relaxed);
        let result = self.session(stream).await;
        stats.connections_active.fetch_sub(1, Ordering::Relaxed);
        match result {
            Ok(()) => tracing::debug!(nbd.peer = %peer, "nbd connection closed"),
            Err(Disconnect::Protocol(msg)) => {
                NbdStats::bump(&stats.protocol_violations);
                tracing::warn!(nbd.peer = %peer, "nbd connection closed: protocol violation: {msg}");
            }
            Err(Disconnect::Io(e)) => tracing::debug!(nbd.peer = %peer, error = %e, "nbd connection failed"),
        }
    }

    async fn session<S>(&self, stream: S) -> Result<(), Disconnect>
    where
        S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        let cancel = self.cancel.clone();
        let handshake = async {
            let negotiating = Negotiating::start(stream).await?;
            negotiating.negotiate(&self.registry, || cancel.is_cancelled()).await
        };
        let transmission = tokio::select! {
            _ = self.cancel.cancelled() => return Ok(()),
            r = tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake) => match r {
                Ok(r) => r?,
                Err(_) => return Err(Disconnect::Protocol("handshake timed out".into())),
            },
        };
        let Some(transmission) = transmission else {
            return Ok(());
        };
        NbdStats::bump(&self.stats.sessions_total);
        tracing::debug!(nbd.export = %transmission.export.name, flags = transmission.flags, "nbd transmission");
        transmission.serve(self.stats.clone(), self.cancel.clone()).await
    }
}

async fn accept_failed(e: io::Error) {
    tracing::warn!(error = %e, "nbd: accept failed");
    tokio::time::sleep(ACCEPT_BACKOFF).await;
}

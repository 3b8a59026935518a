//! The server side: connections off a TCP listener (TLS handshakes run beside the accept
//! loop, so a slow or hostile client cannot stall it), the verified peer identity as
//! tonic connect info, and [`AuthLayer`], which authorises every call by its method.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::Stream;
use hlstore_core::identity::PeerIdentity;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_util::either::Either;

use crate::state::TlsState;

/// A handshake slower than this is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// What a server knows about the other end of a connection.
#[derive(Debug, Clone)]
pub struct PeerInfo {
    pub remote: Option<SocketAddr>,
    /// The verified identity; `None` only on a plaintext (`--insecure`) listener.
    pub identity: Option<PeerIdentity>,
}

/// A served connection: TLS, or plaintext behind `--insecure`, and who is at the other end.
pub struct Conn {
    io: Either<TcpStream, Box<tokio_rustls::server::TlsStream<TcpStream>>>,
    info: PeerInfo,
}

impl tonic::transport::server::Connected for Conn {
    type ConnectInfo = PeerInfo;
    fn connect_info(&self) -> PeerInfo {
        self.info.clone()
    }
}

impl AsyncRead for Conn {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Conn {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// The connections `listener` accepts, with TLS (`tls`) or in plaintext (`None`). Sockets
/// get TCP_NODELAY (small acks must not wait for delayed ACKs). The accept loop ends when
/// the stream is dropped.
pub fn incoming(
    listener: TcpListener,
    tls: Option<Arc<TlsState>>,
) -> impl Stream<Item = io::Result<Conn>> + Send + 'static {
    let (tx, rx) = mpsc::channel::<io::Result<Conn>>(64);
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                a = listener.accept() => a,
                _ = tx.closed() => return,
            };
            let (sock, remote) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accepting a gRPC connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            if let Err(e) = sock.set_nodelay(true) {
                tracing::warn!(error = %e, "could not set TCP_NODELAY on a gRPC connection");
            }
            let Some(tls) = tls.clone() else {
                let conn = Conn { io: Either::Left(sock), info: PeerInfo { remote: Some(remote), identity: None } };
                if tx.send(Ok(conn)).await.is_err() {
                    return;
                }
                continue;
            };
            let tx = tx.clone();
            tokio::spawn(async move {
                if let Some(conn) = handshake(&tls, sock, remote).await {
                    let _ = tx.send(Ok(conn)).await;
                }
            });
        }
    });
    tokio_stream_from(rx)
}

fn tokio_stream_from<T: Send + 'static>(mut rx: mpsc::Receiver<T>) -> impl Stream<Item = T> + Send + 'static {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

/// Runs the TLS handshake; a failure is logged (who, why) and the connection dropped.
async fn handshake(tls: &TlsState, sock: TcpStream, remote: SocketAddr) -> Option<Conn> {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls.server_config());
    let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(sock)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tracing::warn!(peer = %remote, error = %e, "TLS handshake failed; connection refused");
            return None;
        }
        Err(_) => {
            tracing::warn!(peer = %remote, "TLS handshake timed out; connection dropped");
            return None;
        }
    };
    let (_, conn) = stream.get_ref();
    let identity = match conn.peer_certificates().and_then(|c| c.first()) {
        Some(der) => crate::identity::identity_of(der),
        None => Err("no client certificate".to_string()),
    };
    match identity {
        Ok(id) => Some(Conn {
            io: Either::Right(Box::new(stream)),
            info: PeerInfo { remote: Some(remote), identity: Some(id) },
        }),
        Err(e) => {
            tracing::warn!(peer = %remote, error = %e, "client certificate carries no usable identity; connection refused");
            None
        }
    }
}

/// Decides whether an identity may call a gRPC method (`/package.Service/Method`); the
/// error is the refusal's message.
pub type Policy = Arc<dyn Fn(&str, &PeerIdentity) -> Result<(), String> + Send + Sync>;

/// Authorises every request: the caller's identity (from the connection) is checked by
/// the policy and put into the request's extensions for the services. Requests on a
/// plaintext connection pass unchecked: those exist only when the server runs with
/// `--insecure`.
#[derive(Clone)]
pub struct AuthLayer {
    policy: Policy,
}

impl AuthLayer {
    pub fn new(policy: Policy) -> Self {
        AuthLayer { policy }
    }
}

impl<S> tower::Layer<S> for AuthLayer {
    type Service = Auth<S>;
    fn layer(&self, inner: S) -> Auth<S> {
        Auth { inner, policy: self.policy.clone() }
    }
}

#[derive(Clone)]
pub struct Auth<S> {
    inner: S,
    policy: Policy,
}

impl<S, B, R> tower::Service<http::Request<B>> for Auth<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
    R: Default + Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<R>;
    type Error = S::Error;
    type Future = Pin<Box<dyn std::future::Future<Output = Result<http::Response<R>, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        let info = req.extensions().get::<PeerInfo>().cloned();
        let verdict = match info {
            None => Err("no connection information (internal error)".to_string()),
            Some(PeerInfo { identity: None, .. }) => Ok(None),
            Some(PeerInfo { identity: Some(id), remote }) => match (self.policy)(req.uri().path(), &id) {
                Ok(()) => Ok(Some(id)),
                Err(msg) => {
                    let remote = remote.map(|r| r.to_string()).unwrap_or_default();
                    tracing::warn!(peer = %remote, identity = %id, method = req.uri().path(), "call refused: {msg}");
                    Err(msg)
                }
            },
        };
        match verdict {
            Ok(id) => {
                if let Some(id) = id {
                    req.extensions_mut().insert(id);
                }
                Box::pin(self.inner.call(req))
            }
            Err(msg) => {
                let resp = tonic::Status::permission_denied(msg).into_http::<R>();
                Box::pin(async move { Ok(resp) })
            }
        }
    }
}

//! The client side: tonic channels over TLS that verify the server's node certificate
//! and present this side's certificate, or plaintext when the caller runs `--insecure`.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_util::either::Either;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::files::TlsError;
use crate::state::TlsState;

/// Which server certificate a client accepts (always a `node` certificate of the CA).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expect {
    /// Any node of the cluster: the CLI or the CSI controller reaching "an agent".
    AnyNode,
    /// This node: an agent dialling a peer it knows by id, a CSI node plugin its own agent.
    Node(String),
}

/// How a client reaches agents: with TLS from a directory, or in plaintext.
#[derive(Debug, Clone)]
pub enum ClientTls {
    Tls(Arc<TlsState>),
    /// `--insecure`: plaintext, for agents started with `--insecure`.
    Insecure,
}

/// A client connection: plaintext (`--insecure`) or TLS.
type ClientConn = Either<TcpStream, Box<tokio_rustls::client::TlsStream<TcpStream>>>;

/// `host:port` of an endpoint URL (`http://`, `https://` or bare `host:port`).
fn authority(uri: &Uri) -> io::Result<(String, u16)> {
    let host = uri.host().ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, format!("{uri}: no host")))?;
    let host = host.trim_start_matches('[').trim_end_matches(']').to_string();
    Ok((host, uri.port_u16().unwrap_or(7400)))
}

async fn dial(tls: ClientTls, expect: Expect, uri: Uri) -> io::Result<TokioIo<ClientConn>> {
    let (host, port) = authority(&uri)?;
    let target = format!("the agent at {host}:{port}");
    let sock = TcpStream::connect((host.as_str(), port)).await?;
    sock.set_nodelay(true)?;
    let state = match tls {
        ClientTls::Insecure => return Ok(TokioIo::new(Either::Left(sock))),
        ClientTls::Tls(s) => s,
    };
    let config = state.client_config(&expect, &target).map_err(|e| io::Error::other(e.to_string()))?;
    // The verifier decides by the node id, not by this name (SNI only).
    let name = match &expect {
        Expect::Node(n) => ServerName::try_from(n.clone()),
        Expect::AnyNode => ServerName::try_from(host.clone()),
    }
    .or_else(|_| ServerName::try_from("hlstore-agent".to_string()))
    .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
    let stream = tokio_rustls::TlsConnector::from(config).connect(name, sock).await.map_err(|e| {
        let detail = tls_reason(&e);
        io::Error::new(
            e.kind(),
            format!(
                "TLS handshake with {target} (client certificate {}): {detail}",
                state.dir().join(crate::files::CERT_FILE).display()
            ),
        )
    })?;
    Ok(TokioIo::new(Either::Right(Box::new(stream))))
}

/// The reason of a failed handshake in words: hlstore's own certificate checks say what
/// did not match; rustls' other errors are described as they are.
fn tls_reason(e: &io::Error) -> String {
    use rustls::{CertificateError, Error};
    if let Some(Error::InvalidCertificate(CertificateError::Other(o))) = e.get_ref().and_then(|r| r.downcast_ref()) {
        return o.0.to_string();
    }
    crate::describe(e)
}

/// The `Endpoint` for `url` (`http://`, `https://` or `host:port`: the scheme does not
/// decide whether the hop uses TLS, the [`ClientTls`] given to [`lazy`] / [`connect`]
/// does). Set timeouts on it, then make the channel with one of those.
pub fn endpoint(url: &str) -> Result<Endpoint, TlsError> {
    let url = match url.split_once("://") {
        Some((_, rest)) => format!("http://{rest}"),
        None => format!("http://{url}"),
    };
    Endpoint::from_shared(url.clone())
        .map(|e| e.tcp_nodelay(true))
        .map_err(|e| TlsError::Config(format!("endpoint {url:?}: {e}")))
}

/// A channel that connects on first use and reconnects after failures.
pub fn lazy(ep: Endpoint, tls: &ClientTls, expect: Expect) -> Channel {
    let tls = tls.clone();
    ep.connect_with_connector_lazy(tower::service_fn(move |uri: Uri| dial(tls.clone(), expect.clone(), uri)))
}

/// [`lazy`] on [`endpoint`]`(url)` with a connect timeout.
pub fn channel_lazy(
    url: &str,
    tls: &ClientTls,
    expect: Expect,
    connect_timeout: Duration,
) -> Result<Channel, TlsError> {
    Ok(lazy(endpoint(url)?.connect_timeout(connect_timeout), tls, expect))
}

/// A channel connected now; the error says why not (the TLS reason included).
pub async fn connect(ep: Endpoint, tls: &ClientTls, expect: Expect) -> Result<Channel, String> {
    let tls = tls.clone();
    let uri = ep.uri().clone();
    ep.connect_with_connector(tower::service_fn(move |uri: Uri| dial(tls.clone(), expect.clone(), uri)))
        .await
        .map_err(|e| format!("connecting to {uri}: {}", crate::describe(&e)))
}

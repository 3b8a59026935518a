//! `Cluster`: this node's view of its peers (node id → gRPC endpoint) and cached channels.
//!
//! Membership is static, given at start (`--peers`). Channels connect lazily and reconnect
//! by themselves. The calls made over them live in `peers.rs`.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use tonic::transport::Channel;

use hlstore_core::error::{Error, Result};
use hlstore_tls::client::{channel_lazy, ClientTls};
use hlstore_tls::Expect;

pub struct Cluster {
    pub self_id: String,
    peers: BTreeMap<String, String>,
    channels: Mutex<BTreeMap<String, Channel>>,
    /// How this agent reaches its peers: mutual TLS expecting each peer's own node
    /// certificate, or plaintext (`--insecure`).
    tls: ClientTls,
}

impl Cluster {
    /// `peers` must include this node.
    pub fn new(self_id: String, peers: BTreeMap<String, String>, tls: ClientTls) -> Self {
        Self { self_id, peers, channels: Mutex::new(BTreeMap::new()), tls }
    }

    /// A new lazily connecting channel to `node` (its own connection: each attached
    /// volume's replica traffic gets one, so one volume's writes do not queue behind
    /// another's).
    pub fn new_channel(&self, node: &str) -> Result<Channel> {
        let url = self.endpoint(node)?;
        channel_lazy(url, &self.tls, Expect::Node(node.to_string()), Duration::from_secs(5))
            .map_err(|e| Error::InvalidArgument(format!("endpoint {url:?} of node {node}: {e}")))
    }

    /// Node ids, sorted.
    pub fn nodes(&self) -> Vec<String> {
        self.peers.keys().cloned().collect()
    }

    pub fn endpoint(&self, node: &str) -> Result<&str> {
        self.peers.get(node).map(String::as_str).ok_or_else(|| {
            Error::NotFound(format!(
                "node {node:?} is not a member of this cluster (members: {})",
                self.nodes().join(", ")
            ))
        })
    }

    pub(crate) fn channel(&self, node: &str) -> Result<Channel> {
        let mut chans = self.channels.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = chans.get(node) {
            return Ok(c.clone());
        }
        let url = self.endpoint(node)?;
        let ch = channel_lazy(url, &self.tls, Expect::Node(node.to_string()), Duration::from_secs(1))
            .map_err(|e| Error::InvalidArgument(format!("endpoint {url:?} of node {node}: {e}")))?;
        chans.insert(node.to_string(), ch.clone());
        Ok(ch)
    }
}

/// Parses `--peers id=host:port,id2=...` (an `http://` or `https://` prefix is accepted
/// and ignored: whether a hop uses TLS is the agent's `--tls-dir` / `--insecure`).
pub fn parse_peers(s: &str) -> Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    for item in s.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        let (id, ep) = item.split_once('=').ok_or_else(|| {
            Error::InvalidArgument(format!("peer {item:?} must be ID=ENDPOINT, e.g. n2=http://10.0.0.2:7400"))
        })?;
        let ep = if ep.starts_with("http://") || ep.starts_with("https://") {
            ep.to_string()
        } else {
            format!("http://{ep}")
        };
        out.insert(id.to_string(), ep);
    }
    Ok(out)
}

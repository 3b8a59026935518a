//! `Cluster`: this node's view of its peers (node id → gRPC endpoint) and cached channels.
//!
//! Membership is static, given at start (`--peers`). Channels connect lazily and reconnect
//! by themselves. The calls made over them live in `peers.rs`.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use tonic::transport::{Channel, Endpoint};

use hlstore_core::error::{Error, Result};

pub struct Cluster {
    pub self_id: String,
    peers: BTreeMap<String, String>,
    channels: Mutex<BTreeMap<String, Channel>>,
}

impl Cluster {
    /// `peers` must include this node.
    pub fn new(self_id: String, peers: BTreeMap<String, String>) -> Self {
        Self { self_id, peers, channels: Mutex::new(BTreeMap::new()) }
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
        let url = self.endpoint(node)?.to_string();
        let ch = Endpoint::from_shared(url.clone())
            .map_err(|e| Error::InvalidArgument(format!("endpoint {url:?} of node {node}: {e}")))?
            .connect_timeout(Duration::from_secs(1))
            .tcp_nodelay(true)
            .connect_lazy();
        chans.insert(node.to_string(), ch.clone());
        Ok(ch)
    }
}

/// Parses `--peers id=http://host:port,id2=...`.
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

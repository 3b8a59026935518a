//! Mutual TLS for every hlstore gRPC hop (agent ↔ agent replica traffic, CLI / CSI →
//! agent volume API).
//!
//! - [`files`]: a TLS directory (`ca.crt`, `tls.crt`, `tls.key`: the layout of a
//!   Kubernetes TLS secret) loaded with errors that name the missing or bad file.
//! - [`identity`]: the role and node a certificate carries (URI SANs
//!   `urn:hlstore:role:<role>` and `urn:hlstore:node:<id>`, the node id also as a DNS SAN).
//! - [`issue`]: the cluster CA and certificates (`hlstore cert`, `hlstore dev up`).
//! - [`state`]: the loaded directory, reloaded when its files change (cert-manager
//!   rotates them) without a restart.
//! - [`server`]: the listener's connections (TLS handshakes off the accept loop, the
//!   peer's identity as tonic connect info) and [`server::AuthLayer`], which puts the
//!   identity into each request and asks a policy whether it may call the method.
//! - [`client`]: channels that verify the server is a node of the cluster (a named node
//!   when the caller knows which) and present this side's certificate.
//!
//! Trust: one CA per cluster. Servers require a client certificate from it; clients
//! require a `node` certificate from it. Plaintext exists only behind `--insecure`.

pub mod client;
pub mod files;
pub mod identity;
pub mod issue;
pub mod server;
pub mod state;
mod verify;

pub use client::Expect;
pub use files::{TlsError, CA_FILE, CA_KEY_FILE, CERT_FILE, KEY_FILE};
pub use hlstore_core::identity::{PeerIdentity, Role};
pub use state::TlsState;

/// The crypto provider every configuration is built with (explicitly: more than one
/// provider is compiled into the binary, so rustls has no process default).
/// On a CPU without AES instructions (the Raspberry Pi 4's Cortex-A72 as Raspberry Pi OS
/// runs it) ChaCha20-Poly1305 is several times faster than AES-GCM: both sides then offer
/// it first (rustls servers follow the client's order).
pub(crate) fn provider() -> std::sync::Arc<rustls::crypto::CryptoProvider> {
    #[allow(unused_mut)]
    let mut p = rustls::crypto::ring::default_provider();
    #[cfg(target_arch = "aarch64")]
    if !std::arch::is_aarch64_feature_detected!("aes") {
        prefer_chacha(&mut p);
    }
    std::sync::Arc::new(p)
}

/// Moves the ChaCha20-Poly1305 suites to the front (keeping the others' order).
#[cfg_attr(not(target_arch = "aarch64"), allow(dead_code))]
fn prefer_chacha(p: &mut rustls::crypto::CryptoProvider) {
    use rustls::CipherSuite::{TLS13_CHACHA20_POLY1305_SHA256, TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256};
    p.cipher_suites.sort_by_key(|s| {
        !matches!(s.suite(), TLS13_CHACHA20_POLY1305_SHA256 | TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256)
    });
}

/// A one-line description of an error and its sources, without repeats (tonic and
/// hyper wrap the TLS error that says what went wrong several layers down).
pub fn describe(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        let s = err.to_string();
        if !s.is_empty() && !parts.iter().any(|p| p.contains(&s)) {
            parts.push(s);
        }
        cur = err.source();
    }
    let mut out = parts.join(": ");
    if let Some(hint) = alert_hint(&out) {
        out.push_str(" (");
        out.push_str(hint);
        out.push(')');
    }
    out
}

/// What a TLS alert from the server means for an hlstore client.
fn alert_hint(msg: &str) -> Option<&'static str> {
    if msg.contains("CertificateRequired") {
        Some("the agent requires a client certificate from the cluster's CA")
    } else if msg.contains("UnknownCA") || msg.contains("BadCertificate") || msg.contains("DecryptError") {
        Some("the agent refused this client certificate: it is not issued by the cluster's CA")
    } else if msg.contains("UnknownIssuer") {
        Some("the agent's certificate is not issued by the CA in this side's ca.crt: another cluster's certificates?")
    } else if msg.contains("CertificateExpired") {
        Some("the agent refused this client certificate: it has expired")
    } else if msg.contains("InvalidContentType") || msg.contains("corrupt message") {
        Some("the other side does not speak TLS: is it an agent started with --insecure?")
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn chacha_first_keeps_every_suite() {
        let mut p = rustls::crypto::ring::default_provider();
        let before = p.cipher_suites.len();
        super::prefer_chacha(&mut p);
        assert_eq!(p.cipher_suites.len(), before);
        assert_eq!(p.cipher_suites[0].suite(), rustls::CipherSuite::TLS13_CHACHA20_POLY1305_SHA256);
    }
}

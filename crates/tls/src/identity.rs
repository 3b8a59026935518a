//! The identity in an hlstore certificate: URI SANs `urn:hlstore:role:<admin|node|backup>`
//! and, for `node`, `urn:hlstore:node:<id>` plus the node id as a DNS SAN (what a peer
//! verifies the name against). The common name is only for people.

use hlstore_core::identity::{PeerIdentity, Role};
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

pub const ROLE_URI_PREFIX: &str = "urn:hlstore:role:";
pub const NODE_URI_PREFIX: &str = "urn:hlstore:node:";

/// Node ids are DNS labels (they name peers in certificates): 1–63 of `a-z 0-9 -`, not
/// starting or ending with `-`. Kubernetes node names may have dots: allowed between labels.
pub fn check_node_id(id: &str) -> Result<(), String> {
    let ok_label = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    };
    if id.len() <= 253 && id.split('.').all(ok_label) {
        Ok(())
    } else {
        Err(format!(
            "node id {id:?} is not a DNS name (lowercase letters, digits and '-', labels of 1-63 separated by '.')"
        ))
    }
}

/// A certificate's `notAfter` in Unix seconds (`None` if `der` does not parse).
pub fn not_after(der: &[u8]) -> Option<i64> {
    X509Certificate::from_der(der).ok().map(|(_, c)| c.validity().not_after.timestamp())
}

/// The identity `der` carries. Does not verify the signature (that is the TLS stack's).
pub fn identity_of(der: &[u8]) -> Result<PeerIdentity, String> {
    let (_, cert) = X509Certificate::from_der(der).map_err(|e| format!("not an X.509 certificate: {e}"))?;
    let name = cert.subject().iter_common_name().next().and_then(|cn| cn.as_str().ok()).unwrap_or_default().to_string();
    let mut roles = Vec::new();
    let mut nodes = Vec::new();
    let mut dns = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for n in &san.value.general_names {
            match n {
                GeneralName::URI(u) => {
                    if let Some(r) = u.strip_prefix(ROLE_URI_PREFIX) {
                        roles.push(r.to_string());
                    } else if let Some(id) = u.strip_prefix(NODE_URI_PREFIX) {
                        nodes.push(id.to_string());
                    }
                }
                GeneralName::DNSName(d) => dns.push(d.to_string()),
                _ => {}
            }
        }
    }
    let role = match roles.as_slice() {
        [r] => r.parse::<Role>()?,
        [] => {
            return Err(format!(
                "certificate {name:?} carries no hlstore role (a URI SAN {ROLE_URI_PREFIX}admin|node|backup)"
            ))
        }
        _ => return Err(format!("certificate {name:?} carries more than one hlstore role: {}", roles.join(", "))),
    };
    let node = match (role, nodes.as_slice()) {
        (Role::Node, [id]) => {
            check_node_id(id)?;
            if !dns.iter().any(|d| d == id) {
                return Err(format!("node certificate {name:?} for node {id:?} lacks the DNS name {id:?}"));
            }
            Some(id.clone())
        }
        (Role::Node, []) => {
            return Err(format!("node certificate {name:?} names no node (a URI SAN {NODE_URI_PREFIX}<id>)"))
        }
        (Role::Node, _) => return Err(format!("certificate {name:?} names more than one node: {}", nodes.join(", "))),
        (_, []) => None,
        (r, _) => return Err(format!("{r} certificate {name:?} must not name a node")),
    };
    Ok(PeerIdentity { role, node, name })
}

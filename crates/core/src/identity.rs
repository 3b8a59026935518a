//! Who is calling: the identity a verified client certificate carries.
//!
//! Every gRPC hop is mutual TLS (`hlstore-tls`); the server puts the caller's
//! [`PeerIdentity`] into each request's extensions, where services that care about more
//! than the method (the replica service: "an engine on n2 cannot claim replicas as n1")
//! read it. A server run with `--insecure` has no identities; nothing is inserted then.

use std::fmt;
use std::str::FromStr;

/// What a certificate may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Role {
    /// Operators, the CLI and the CSI controller: every volume call.
    Admin,
    /// A node agent (replica traffic between agents, calls forwarded to other agents) and
    /// the CSI node plugin on that node. Carries a node id.
    Node,
    /// The backup CronJob: lists, snapshots and reads volumes; deletes only the snapshots
    /// backups take; cannot create, change or delete volumes.
    Backup,
}

impl Role {
    pub const ALL: [Role; 3] = [Role::Admin, Role::Node, Role::Backup];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Node => "node",
            Role::Backup => "backup",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Role::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| format!("unknown role {s:?} (roles: admin, node, backup)"))
    }
}

/// The verified identity of a TLS peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerIdentity {
    pub role: Role,
    /// The node id, for [`Role::Node`] certificates.
    pub node: Option<String>,
    /// The certificate's common name (for logs and error messages).
    pub name: String,
}

impl fmt::Display for PeerIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.node {
            Some(n) => write!(f, "{} certificate {:?} (node {n})", self.role, self.name),
            None => write!(f, "{} certificate {:?}", self.role, self.name),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_round_trip_and_unknown_roles_are_named() {
        for r in Role::ALL {
            assert_eq!(r.as_str().parse::<Role>().unwrap(), r);
        }
        assert!("root".parse::<Role>().unwrap_err().contains("\"root\""));
    }
}

//! `NbdUri`: where an export lives, parsed from the NBD URI scheme
//! (`nbd://host[:port]/name`, `nbd+unix:///name?socket=/path`).
//!
//! Only the parts the engine serves are accepted: plain TCP and unix sockets, no TLS
//! (`nbds://`) and no other query parameters than `socket`. Export names are
//! percent-decoded; an empty name is an ordinary (default) export name.

use std::fmt;
use std::path::PathBuf;

use hlstore_core::error::{Error, Result};

/// The IANA port of NBD, used when a `nbd://` URI names none.
pub const DEFAULT_PORT: u16 = 10809;

/// How to reach the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NbdAddress {
    /// `host:port` (the host may be a name, an IPv4 address or a bracketed IPv6 address).
    Tcp { host: String, port: u16 },
    /// A unix domain socket.
    Unix(PathBuf),
}

/// A parsed NBD URI: an address and an export name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdUri {
    pub address: NbdAddress,
    pub export: String,
}

impl NbdUri {
    /// Parses `nbd://host[:port]/name` or `nbd+unix:///name?socket=/path`.
    pub fn parse(uri: &str) -> Result<Self> {
        let bad = |why: &str| Error::InvalidArgument(format!("NBD URI {uri:?}: {why}"));
        let (scheme, rest) = uri.split_once("://").ok_or_else(|| bad("expected nbd://... or nbd+unix://..."))?;
        let (before_query, query) = match rest.split_once('?') {
            Some((b, q)) => (b, Some(q)),
            None => (rest, None),
        };
        let (authority, path) = match before_query.find('/') {
            Some(i) => (&before_query[..i], &before_query[i + 1..]),
            None => (before_query, ""),
        };
        let export = percent_decode(path).ok_or_else(|| bad("bad percent-encoding in the export name"))?;
        let mut socket = None;
        for pair in query.into_iter().flat_map(|q| q.split('&')).filter(|p| !p.is_empty()) {
            match pair.split_once('=') {
                Some(("socket", value)) => {
                    let value = percent_decode(value).ok_or_else(|| bad("bad percent-encoding in socket"))?;
                    socket = Some(PathBuf::from(value));
                }
                _ => return Err(bad(&format!("unsupported query parameter {pair:?}"))),
            }
        }
        let address = match scheme {
            "nbd" => {
                if socket.is_some() {
                    return Err(bad("socket= is only valid with nbd+unix://"));
                }
                parse_authority(authority).map_err(|why| bad(&why))?
            }
            "nbd+unix" => {
                if !authority.is_empty() {
                    return Err(bad("nbd+unix:// takes no host (write nbd+unix:///name?socket=PATH)"));
                }
                NbdAddress::Unix(socket.ok_or_else(|| bad("nbd+unix:// needs ?socket=PATH"))?)
            }
            "nbds" | "nbds+unix" => return Err(bad("TLS is not supported")),
            other => return Err(bad(&format!("unknown scheme {other:?}"))),
        };
        Ok(NbdUri { address, export })
    }
}

impl fmt::Display for NbdUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.address {
            NbdAddress::Tcp { host, port } => write!(f, "nbd://{host}:{port}/{}", self.export),
            NbdAddress::Unix(path) => write!(f, "nbd+unix:///{}?socket={}", self.export, path.display()),
        }
    }
}

fn parse_authority(authority: &str) -> std::result::Result<NbdAddress, String> {
    if authority.is_empty() {
        return Err("nbd:// needs a host".into());
    }
    if authority.contains('@') {
        return Err("user names are not supported".into());
    }
    let (host, port) = if let Some(rest) = authority.strip_prefix('[') {
        let (host, after) = rest.split_once(']').ok_or("unclosed '[' in IPv6 host")?;
        match after {
            "" => (host, None),
            p => (host, Some(p.strip_prefix(':').ok_or("expected ':' after ']'")?)),
        }
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        }
    };
    if host.is_empty() {
        return Err("nbd:// needs a host".into());
    }
    let port = match port {
        None => DEFAULT_PORT,
        Some(p) => p.parse::<u16>().map_err(|_| format!("bad port {p:?}"))?,
    };
    Ok(NbdAddress::Tcp { host: host.to_string(), port })
}

/// Decodes `%XX` escapes; `None` on a malformed escape or non-UTF-8 result.
fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3)?;
            let hex = std::str::from_utf8(hex).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tcp(host: &str, port: u16) -> NbdAddress {
        NbdAddress::Tcp { host: host.into(), port }
    }

    #[test]
    fn parses_the_forms_the_engine_prints() {
        let u = NbdUri::parse("nbd://127.0.0.1:10900/vol-1").unwrap();
        assert_eq!(u, NbdUri { address: tcp("127.0.0.1", 10900), export: "vol-1".into() });
        assert_eq!(NbdUri::parse("nbd://host/").unwrap().address, tcp("host", DEFAULT_PORT));
        assert_eq!(NbdUri::parse("nbd://host").unwrap().export, "");
        assert_eq!(
            NbdUri::parse("nbd://[::1]:99/a%20b").unwrap(),
            NbdUri { address: tcp("::1", 99), export: "a b".into() }
        );
        let u = NbdUri::parse("nbd+unix:///disk?socket=/run/x%2By.sock").unwrap();
        assert_eq!(u.address, NbdAddress::Unix("/run/x+y.sock".into()));
        assert_eq!(u.export, "disk");
        assert_eq!(NbdUri::parse(&u.to_string()).unwrap(), u);
    }

    #[test]
    fn rejects_what_it_cannot_serve() {
        for bad in [
            "",
            "/dev/nbd0",
            "http://h/x",
            "nbds://h/x",
            "nbd:///x",
            "nbd://h:port/x",
            "nbd://h:70000/x",
            "nbd://u@h/x",
            "nbd://h/x?socket=/s",
            "nbd+unix:///x",
            "nbd+unix://h/x?socket=/s",
            "nbd+unix:///x?socket=/s&tls=on",
            "nbd://h/%zz",
            "nbd://[::1/x",
        ] {
            let err = NbdUri::parse(bad).unwrap_err();
            assert_eq!(err.kind(), hlstore_core::ErrorKind::InvalidArgument, "{bad}");
        }
    }
}

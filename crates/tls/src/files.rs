//! A TLS directory: `ca.crt` (the cluster CA), `tls.crt` (this side's certificate, chain
//! allowed), `tls.key` (its private key, PKCS#8, SEC1 or PKCS#1 PEM). The names are those
//! of a Kubernetes `kubernetes.io/tls` secret with `ca.crt`, as cert-manager writes it, so
//! a mounted secret is a TLS directory as it is.

use std::path::{Path, PathBuf};

use hlstore_core::identity::PeerIdentity;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

pub const CA_FILE: &str = "ca.crt";
pub const CERT_FILE: &str = "tls.crt";
pub const KEY_FILE: &str = "tls.key";
/// The CA's private key: only in the directory `hlstore cert init` makes; never read by
/// agents or clients.
pub const CA_KEY_FILE: &str = "ca.key";

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("TLS: {what} {} does not exist ({hint})", path.display())]
    Missing { what: &'static str, path: PathBuf, hint: String },
    #[error("TLS: reading {}: {source}", path.display())]
    Read { path: PathBuf, source: std::io::Error },
    #[error("TLS: {}: {msg}", path.display())]
    Bad { path: PathBuf, msg: String },
    #[error("TLS: {0}")]
    Config(String),
}

pub(crate) const DIR_HINT: &str =
    "--tls-dir / HLSTORE_TLS_DIR must name a directory holding ca.crt, tls.crt and tls.key; \
     `hlstore dev up` writes them under DIR/tls/, `hlstore cert issue` for other installs";

/// The parsed contents of a TLS directory.
#[derive(Debug)]
pub struct Material {
    pub dir: PathBuf,
    pub roots: Vec<CertificateDer<'static>>,
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
    /// Who this side's certificate says it is.
    pub identity: PeerIdentity,
    /// The three files' bytes, to notice a change.
    pub(crate) raw: [Vec<u8>; 3],
}

/// The bytes of `dir`'s three files: CA, certificate, key (the reload check compares them).
pub(crate) fn read_raw(dir: &Path) -> Result<[Vec<u8>; 3], TlsError> {
    let mut raw: [Vec<u8>; 3] = Default::default();
    let files = [("CA certificate", CA_FILE), ("certificate", CERT_FILE), ("private key", KEY_FILE)];
    for (slot, (what, name)) in raw.iter_mut().zip(files) {
        let path = dir.join(name);
        match std::fs::read(&path) {
            Ok(b) => *slot = b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let hint = if dir.is_dir() {
                    DIR_HINT.to_string()
                } else {
                    format!("the directory {} does not exist either; {DIR_HINT}", dir.display())
                };
                return Err(TlsError::Missing { what, path, hint });
            }
            Err(e) => return Err(TlsError::Read { path, source: e }),
        }
    }
    Ok(raw)
}

pub(crate) fn certs(path: &Path, bytes: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs: Vec<_> = CertificateDer::pem_slice_iter(bytes)
        .collect::<Result<_, _>>()
        .map_err(|e| TlsError::Bad { path: path.to_path_buf(), msg: format!("not a PEM certificate file: {e}") })?;
    if certs.is_empty() {
        return Err(TlsError::Bad { path: path.to_path_buf(), msg: "holds no PEM certificate".into() });
    }
    Ok(certs)
}

/// Loads and checks `dir`: every file parses, the key belongs to the certificate, the
/// certificate carries an hlstore role, and it is issued by `ca.crt`'s CA.
pub fn load(dir: &Path) -> Result<Material, TlsError> {
    let raw = read_raw(dir)?;
    let (ca_path, cert_path, key_path) = (dir.join(CA_FILE), dir.join(CERT_FILE), dir.join(KEY_FILE));
    let roots = certs(&ca_path, &raw[0])?;
    let chain = certs(&cert_path, &raw[1])?;
    let key = PrivateKeyDer::from_pem_slice(&raw[2]).map_err(|e| TlsError::Bad {
        path: key_path.clone(),
        msg: format!("not a PEM private key (PKCS#8, SEC1 or PKCS#1): {e}"),
    })?;
    let identity =
        crate::identity::identity_of(&chain[0]).map_err(|msg| TlsError::Bad { path: cert_path.clone(), msg })?;
    // The key must sign for the certificate, and the certificate must chain to the CA:
    // checked here so a wrong file is named at start, not as a peer's handshake failure.
    let signer = crate::provider()
        .key_provider
        .load_private_key(key.clone_key())
        .map_err(|e| TlsError::Bad { path: key_path.clone(), msg: format!("unusable private key: {e}") })?;
    rustls::sign::CertifiedKey::new(chain.clone(), signer).keys_match().map_err(|e| TlsError::Bad {
        path: key_path.clone(),
        msg: format!("this key does not belong to the certificate {}: {e}", cert_path.display()),
    })?;
    crate::verify::check_issued_by(&chain, &roots).map_err(|msg| TlsError::Bad {
        path: cert_path.clone(),
        msg: format!("not issued by the CA in {}: {msg}", ca_path.display()),
    })?;
    Ok(Material { dir: dir.to_path_buf(), roots, chain, key, identity, raw })
}

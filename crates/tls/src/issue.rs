//! The cluster CA and the certificates it issues (ECDSA P-256).
//!
//! `init` makes `ca.crt` + `ca.key`; `issue` makes a TLS directory (`ca.crt`, `tls.crt`,
//! `tls.key`) for a role: `node` certificates carry the node id as a DNS SAN and a URI
//! SAN and are usable as server and client certificates (agents are both); `admin` and
//! `backup` certificates are client certificates. Private keys are written 0600.

use std::net::IpAddr;
use std::path::Path;

use hlstore_core::identity::Role;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

use crate::files::{TlsError, CA_FILE, CA_KEY_FILE, CERT_FILE, KEY_FILE};
use crate::identity::{check_node_id, NODE_URI_PREFIX, ROLE_URI_PREFIX};

/// What to put in a certificate.
#[derive(Debug, Clone)]
pub struct CertSpec {
    pub role: Role,
    /// Required for `node`, refused otherwise.
    pub node: Option<String>,
    /// Common name (default: the node id or `hlstore-<role>`).
    pub name: Option<String>,
    /// Extra DNS names and IP addresses (a node certificate's other names: its host name,
    /// its address; not needed by hlstore's own clients, which check the node id).
    pub dns: Vec<String>,
    pub ips: Vec<IpAddr>,
    pub days: u32,
}

fn rc(what: &str) -> impl Fn(rcgen::Error) -> TlsError + '_ {
    move |e| TlsError::Config(format!("{what}: {e}"))
}

fn validity(p: &mut CertificateParams, days: u32) {
    let now = time::OffsetDateTime::now_utc();
    // A little slack for clocks that disagree by a few minutes.
    p.not_before = now - time::Duration::minutes(10);
    p.not_after = now + time::Duration::days(i64::from(days.max(1)));
}

fn write_private(path: &Path, data: &str) -> Result<(), TlsError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|e| TlsError::Read { path: tmp.clone(), source: e })?;
    f.write_all(data.as_bytes())
        .and_then(|_| f.sync_all())
        .map_err(|e| TlsError::Read { path: tmp.clone(), source: e })?;
    std::fs::rename(&tmp, path).map_err(|e| TlsError::Read { path: path.to_path_buf(), source: e })
}

fn write_public(path: &Path, data: &str) -> Result<(), TlsError> {
    hlstore_core::durable_file::write_atomic(path, data.as_bytes())
        .map_err(|e| TlsError::Config(format!("writing {}: {e}", path.display())))
}

/// Creates a CA in `dir` (`ca.crt`, `ca.key`). Refuses to overwrite an existing one.
pub fn init_ca(dir: &Path, name: &str, days: u32) -> Result<(), TlsError> {
    let (crt, key) = (dir.join(CA_FILE), dir.join(CA_KEY_FILE));
    if crt.exists() || key.exists() {
        return Err(TlsError::Config(format!(
            "{} already holds a CA ({CA_FILE} / {CA_KEY_FILE}); remove them to make a new one \
             (every certificate it issued stops working)",
            dir.display()
        )));
    }
    std::fs::create_dir_all(dir).map_err(|e| TlsError::Read { path: dir.to_path_buf(), source: e })?;
    let kp = KeyPair::generate().map_err(rc("generating the CA key"))?;
    let mut p = CertificateParams::default();
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.distinguished_name = DistinguishedName::new();
    p.distinguished_name.push(DnType::CommonName, name);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    validity(&mut p, days);
    let cert = p.self_signed(&kp).map_err(rc("signing the CA certificate"))?;
    write_private(&key, &kp.serialize_pem())?;
    write_public(&crt, &cert.pem())
}

/// Issues a certificate for `spec`, signed by the CA in `ca_dir`, into `out`
/// (`ca.crt`, `tls.crt`, `tls.key`; replaced atomically, key last so a reloading agent
/// never pairs a new certificate with an old key for long).
pub fn issue(ca_dir: &Path, spec: &CertSpec, out: &Path) -> Result<(), TlsError> {
    let ca_crt_path = ca_dir.join(CA_FILE);
    let read = |p: &Path, what: &'static str| -> Result<String, TlsError> {
        std::fs::read_to_string(p).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                TlsError::Missing {
                    what,
                    path: p.to_path_buf(),
                    hint: "`hlstore cert init --dir DIR` makes a CA".into(),
                }
            } else {
                TlsError::Read { path: p.to_path_buf(), source: e }
            }
        })
    };
    let ca_pem = read(&ca_crt_path, "CA certificate")?;
    let ca_key_pem = read(&ca_dir.join(CA_KEY_FILE), "CA private key")?;
    let ca_key = KeyPair::from_pem(&ca_key_pem).map_err(rc("reading the CA key"))?;
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key).map_err(rc("reading the CA certificate"))?;

    let mut p = CertificateParams::default();
    let mut sans = vec![uri(&format!("{ROLE_URI_PREFIX}{}", spec.role))?];
    let cn = match (spec.role, &spec.node) {
        (Role::Node, Some(node)) => {
            check_node_id(node).map_err(TlsError::Config)?;
            sans.push(dns(node)?);
            sans.push(uri(&format!("{NODE_URI_PREFIX}{node}"))?);
            p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
            node.clone()
        }
        (Role::Node, None) => return Err(TlsError::Config("a node certificate needs --node ID".into())),
        (r, Some(_)) => {
            return Err(TlsError::Config(format!("a {r} certificate names no node (--node is for role node)")))
        }
        (r, None) => {
            p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
            format!("hlstore-{r}")
        }
    };
    for d in &spec.dns {
        sans.push(dns(d)?);
    }
    sans.extend(spec.ips.iter().map(|ip| SanType::IpAddress(*ip)));
    p.subject_alt_names = sans;
    p.distinguished_name = DistinguishedName::new();
    p.distinguished_name.push(DnType::CommonName, spec.name.clone().unwrap_or(cn));
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
    p.use_authority_key_identifier_extension = true;
    validity(&mut p, spec.days);
    let kp = KeyPair::generate().map_err(rc("generating a key"))?;
    let cert = p.signed_by(&kp, &issuer).map_err(rc("signing the certificate"))?;
    std::fs::create_dir_all(out).map_err(|e| TlsError::Read { path: out.to_path_buf(), source: e })?;
    write_public(&out.join(CA_FILE), &ca_pem)?;
    write_public(&out.join(CERT_FILE), &cert.pem())?;
    write_private(&out.join(KEY_FILE), &kp.serialize_pem())
}

fn uri(s: &str) -> Result<SanType, TlsError> {
    Ok(SanType::URI(s.try_into().map_err(|e| TlsError::Config(format!("URI {s:?}: {e}")))?))
}

fn dns(s: &str) -> Result<SanType, TlsError> {
    Ok(SanType::DnsName(s.try_into().map_err(|e| TlsError::Config(format!("DNS name {s:?}: {e}")))?))
}

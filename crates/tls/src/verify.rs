//! Certificate checks on top of rustls' WebPKI verifiers: the chain and validity come
//! from WebPKI; which name the server must carry comes from hlstore's identities.

use std::sync::Arc;

use hlstore_core::identity::Role;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::ClientCertVerifier;
use rustls::server::WebPkiClientVerifier;
use rustls::{CertificateError, DigitallySignedStruct, OtherError, RootCertStore, SignatureScheme};

use crate::client::Expect;

pub(crate) fn root_store(roots: &[CertificateDer<'static>]) -> Result<Arc<RootCertStore>, String> {
    let mut store = RootCertStore::empty();
    for r in roots {
        store.add(r.clone()).map_err(|e| format!("unusable CA certificate: {e}"))?;
    }
    Ok(Arc::new(store))
}

pub(crate) fn client_verifier(roots: &[CertificateDer<'static>]) -> Result<Arc<dyn ClientCertVerifier>, String> {
    WebPkiClientVerifier::builder_with_provider(root_store(roots)?, crate::provider())
        .build()
        .map_err(|e| format!("client certificate verifier: {e}"))
}

/// Whether `chain` is a client certificate issued by `roots` and valid now.
pub(crate) fn check_issued_by(
    chain: &[CertificateDer<'static>],
    roots: &[CertificateDer<'static>],
) -> Result<(), String> {
    let v = client_verifier(roots)?;
    v.verify_client_cert(&chain[0], &chain[1..], UnixTime::now()).map(|_| ()).map_err(|e| e.to_string())
}

fn other(msg: String) -> rustls::Error {
    #[derive(Debug)]
    struct Msg(String);
    impl std::fmt::Display for Msg {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(&self.0)
        }
    }
    impl std::error::Error for Msg {}
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(Msg(msg)))))
}

/// Accepts only a `node` certificate from the cluster's CA, for the expected node when the
/// caller knows which (an agent dialling a peer), else for any node (the CLI or the CSI
/// controller reaching "some agent"); the DNS name checked is the node id either way.
#[derive(Debug)]
pub(crate) struct NodeVerifier {
    inner: Arc<WebPkiServerVerifier>,
    expect: Expect,
    /// For messages: where the client is connecting.
    target: String,
}

impl NodeVerifier {
    pub(crate) fn new(roots: &[CertificateDer<'static>], expect: Expect, target: String) -> Result<Self, String> {
        let inner = WebPkiServerVerifier::builder_with_provider(root_store(roots)?, crate::provider())
            .build()
            .map_err(|e| format!("server certificate verifier: {e}"))?;
        Ok(NodeVerifier { inner, expect, target })
    }
}

impl ServerCertVerifier for NodeVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let id = crate::identity::identity_of(end_entity)
            .map_err(|e| other(format!("{} presented an unusable certificate: {e}", self.target)))?;
        let Some(node) = id.node.clone().filter(|_| id.role == Role::Node) else {
            return Err(other(format!(
                "{} presented a {} certificate ({:?}), not a node certificate",
                self.target, id.role, id.name
            )));
        };
        if let Expect::Node(want) = &self.expect {
            if *want != node {
                return Err(other(format!(
                    "{} presented the certificate of node {node:?}, but node {want:?} was expected there \
                     (is --peers right?)",
                    self.target
                )));
            }
        }
        let name = ServerName::try_from(node.clone())
            .map_err(|e| other(format!("node id {node:?} is not a DNS name: {e}")))?;
        self.inner.verify_server_cert(end_entity, intermediates, &name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

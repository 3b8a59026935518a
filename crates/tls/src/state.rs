//! A loaded TLS directory, reloaded when its files change.
//!
//! cert-manager renews certificates into the mounted secret (an atomic symlink swap);
//! `hlstore cert issue` rewrites the files. [`TlsState::watch`] compares the three files'
//! bytes every few seconds and swaps in the new configuration when they load cleanly and
//! still name the same role and node; connections made after the swap use it, connections
//! already open keep theirs (TLS never re-authenticates a live connection). A half-written
//! or wrong set of files is logged and the previous one kept.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use hlstore_core::identity::PeerIdentity;
use rustls::{ClientConfig, ServerConfig};

use crate::client::Expect;
use crate::files::{self, Material, TlsError};
use crate::verify;

/// How often [`TlsState::watch`] looks at the files.
pub const RELOAD_INTERVAL: Duration = Duration::from_secs(2);

/// `notAfter` of a TLS directory's certificates, in Unix seconds (see [`TlsState::expiry`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CertExpiry {
    /// This side's certificate (tls.crt).
    pub certificate: Option<i64>,
    /// The CA (ca.crt; the earliest when it holds several).
    pub ca: Option<i64>,
}

struct Loaded {
    material: Material,
    server: Arc<ServerConfig>,
}

pub struct TlsState {
    dir: PathBuf,
    current: RwLock<Arc<Loaded>>,
}

impl std::fmt::Debug for TlsState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsState").field("dir", &self.dir).field("identity", &self.identity()).finish()
    }
}

const ALPN_H2: &[u8] = b"h2";

fn build(material: Material) -> Result<Loaded, TlsError> {
    let verifier = verify::client_verifier(&material.roots).map_err(TlsError::Config)?;
    let mut server = ServerConfig::builder_with_provider(crate::provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(material.chain.clone(), material.key.clone_key())
        .map_err(|e| TlsError::Bad { path: material.dir.join(files::KEY_FILE), msg: e.to_string() })?;
    server.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(Loaded { material, server: Arc::new(server) })
}

impl TlsState {
    /// Loads `dir` (see [`files::load`] for what is checked).
    pub fn load(dir: &Path) -> Result<Arc<TlsState>, TlsError> {
        let loaded = build(files::load(dir)?)?;
        Ok(Arc::new(TlsState { dir: dir.to_path_buf(), current: RwLock::new(Arc::new(loaded)) }))
    }

    fn current(&self) -> Arc<Loaded> {
        self.current.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Who this side's certificate says it is.
    pub fn identity(&self) -> PeerIdentity {
        self.current().material.identity.clone()
    }

    /// When this side's certificate and the CA's expire (`notAfter`, Unix seconds), for
    /// the agent's metrics: the files loaded now, after any reload.
    pub fn expiry(&self) -> CertExpiry {
        let cur = self.current();
        let m = &cur.material;
        CertExpiry {
            certificate: m.chain.first().and_then(|c| crate::identity::not_after(c)),
            ca: m.roots.iter().filter_map(|c| crate::identity::not_after(c)).min(),
        }
    }

    pub(crate) fn server_config(&self) -> Arc<ServerConfig> {
        self.current().server.clone()
    }

    /// A client configuration presenting this directory's certificate and accepting the
    /// server `expect` says (`target` names the server in error messages).
    pub(crate) fn client_config(&self, expect: &Expect, target: &str) -> Result<Arc<ClientConfig>, TlsError> {
        let cur = self.current();
        let m = &cur.material;
        let verifier =
            verify::NodeVerifier::new(&m.roots, expect.clone(), target.to_string()).map_err(TlsError::Config)?;
        let mut c = ClientConfig::builder_with_provider(crate::provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Config(e.to_string()))?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_client_auth_cert(m.chain.clone(), m.key.clone_key())
            .map_err(|e| TlsError::Bad { path: m.dir.join(files::KEY_FILE), msg: e.to_string() })?;
        c.alpn_protocols = vec![ALPN_H2.to_vec()];
        Ok(Arc::new(c))
    }

    /// Loads the files again if they changed. `Ok(true)`: swapped in; `Ok(false)`:
    /// unchanged; `Err`: changed but not usable (the previous configuration stays).
    pub fn reload(&self) -> Result<bool, TlsError> {
        let raw = files::read_raw(&self.dir)?;
        let old = self.current();
        if raw == old.material.raw {
            return Ok(false);
        }
        let new = build(files::load(&self.dir)?)?;
        let (was, now) = (&old.material.identity, &new.material.identity);
        if (was.role, &was.node) != (now.role, &now.node) {
            return Err(TlsError::Config(format!(
                "the new certificate in {} is a {now}, the running one a {was}; restart to change identity",
                self.dir.display()
            )));
        }
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(new);
        Ok(true)
    }

    /// Reloads every `every` on the current tokio runtime for as long as `self` lives.
    pub fn watch(self: &Arc<Self>, every: Duration) {
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            let mut last_error = String::new();
            loop {
                tick.tick().await;
                let Some(state) = weak.upgrade() else { return };
                match state.reload() {
                    Ok(true) => {
                        last_error.clear();
                        tracing::info!(dir = %state.dir.display(), identity = %state.identity(), "TLS certificates reloaded");
                    }
                    Ok(false) => last_error.clear(),
                    Err(e) => {
                        let msg = e.to_string();
                        if msg != last_error {
                            tracing::warn!(error = %msg, "TLS files changed but cannot be used; keeping the previous ones");
                            last_error = msg;
                        }
                    }
                }
            }
        });
    }
}

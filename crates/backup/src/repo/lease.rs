//! Writer leases (`locks/<id>`): a running backup announces itself and refreshes the lease
//! so prune knows which packs a writer may still reference. Leases are not locks: nothing
//! ever waits for one; prune only postpones deleting condemned packs while a lease that
//! started before the condemnation is alive. A `prune` lease keeps a second prune away
//! (`prune::prune_lease`). A lease is refreshed [`LEASE_REFRESHES_PER_TTL`] times per TTL
//! for as long as its holder runs, however long that is.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::backend::Backend;
use crate::error::Result;
use crate::snapshot::now_secs;

/// A lease expires this long after its last refresh (a killed writer stops blocking prune).
pub const LEASE_TTL_SECS: u64 = 300;
/// Leases are refreshed this many times per TTL (every 60 s by default), so a few failed
/// refreshes in a row still leave the lease alive.
pub const LEASE_REFRESHES_PER_TTL: u32 = 5;
/// Environment knob for the TTL in seconds (tests shorten it to watch refreshes work).
pub const LEASE_TTL_ENV: &str = "HLSTORE_LEASE_TTL_SECS";

/// The TTL in effect: [`LEASE_TTL_ENV`] when set to a positive number, else the default.
pub fn lease_ttl_secs() -> u64 {
    std::env::var(LEASE_TTL_ENV)
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
        .filter(|&v| v > 0)
        .unwrap_or(LEASE_TTL_SECS)
}

/// Contents of a lease object.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LeaseInfo {
    pub purpose: String,
    pub started: u64,
    pub expires: u64,
    pub host: String,
    pub pid: u32,
}

/// A held lease; refreshed by a background thread, removed on drop.
pub struct Lease {
    key: String,
    backend: Arc<dyn Backend>,
    /// Dropped to stop the refresher at once (it waits on the channel between refreshes:
    /// sleeping in steps of 100 ms made every backup wait ~50 ms more at its end).
    stop: Option<std::sync::mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// Unix milliseconds until which the last stored copy of the lease is alive.
    valid_until_ms: Arc<AtomicU64>,
    /// Set when a refresh was stored after the previous copy had expired (the lease was
    /// dead for a while, even if alive again now).
    lapsed: Arc<AtomicBool>,
    ttl: u64,
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

impl Lease {
    /// Writes the lease and starts refreshing it.
    pub fn acquire(backend: Arc<dyn Backend>, purpose: &str) -> Result<Lease> {
        let key = format!("locks/{}", hex::encode(rand::random::<[u8; 8]>()));
        let started = now_secs();
        let ttl = lease_ttl_secs();
        let refresh = Duration::from_millis((ttl * 1000 / LEASE_REFRESHES_PER_TTL as u64).max(10));
        let info = LeaseInfo {
            purpose: purpose.into(),
            started,
            expires: started + ttl,
            host: crate::snapshot::hostname(),
            pid: std::process::id(),
        };
        let before = now_ms();
        backend.put(&key, &serde_json::to_vec(&info).unwrap_or_default())?;
        let valid_until_ms = Arc::new(AtomicU64::new(before + ttl * 1000));
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let lapsed = Arc::new(AtomicBool::new(false));
        let (b, k, valid, gap) = (backend.clone(), key.clone(), valid_until_ms.clone(), lapsed.clone());
        let thread = std::thread::Builder::new()
            .name("hlstore-lease".into())
            .spawn(move || {
                let mut info = info;
                // Until the sender is dropped (or sends): refresh every `refresh`.
                while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(refresh) {
                    let before = now_ms();
                    info.expires = now_secs() + ttl;
                    match b.put(&k, &serde_json::to_vec(&info).unwrap_or_default()) {
                        Ok(()) => {
                            if now_ms() >= valid.swap(before + ttl * 1000, Ordering::Relaxed) {
                                gap.store(true, Ordering::Relaxed);
                            }
                        }
                        Err(e) => tracing::warn!(lease = %k, error = %e, "lease refresh failed"),
                    }
                }
            })
            .ok();
        Ok(Lease { key, backend, stop: Some(stop), thread, valid_until_ms, lapsed, ttl })
    }

    /// Checks the lease has been alive all along and will stay alive a little longer (at
    /// least one refresh period). A backup calls this before saving its snapshot: if its
    /// refreshes failed for most of a TTL (a backend outage, a suspended process), a
    /// prune may have taken it for dead and deleted packs the backup reuses, so it must
    /// not claim them.
    pub fn check(&self) -> Result<()> {
        let margin = self.ttl * 1000 / LEASE_REFRESHES_PER_TTL as u64;
        let until = self.valid_until_ms.load(Ordering::Relaxed);
        let now = now_ms();
        if now + margin < until && !self.lapsed.load(Ordering::Relaxed) {
            return Ok(());
        }
        let state = if self.lapsed.load(Ordering::Relaxed) {
            "it expired for a while before a refresh got through".to_string()
        } else if now < until {
            format!("it expires in {} ms", until - now)
        } else {
            format!("it expired {} ms ago", now - until)
        };
        Err(crate::error::Error::LeaseLapsed(format!(
            "{} could not be refreshed ({state}); a prune may have deleted data this run reuses",
            self.key
        )))
    }

    /// Object key of this lease.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// Live leases in the repository (expired ones are ignored).
    pub fn live(backend: &dyn Backend) -> Result<Vec<LeaseInfo>> {
        Ok(Self::live_keyed(backend)?.into_iter().map(|(_, l)| l).collect())
    }

    /// Live leases with their object keys.
    pub fn live_keyed(backend: &dyn Backend) -> Result<Vec<(String, LeaseInfo)>> {
        let now = now_secs();
        let mut out = Vec::new();
        for o in backend.list("locks/")? {
            let Ok(b) = backend.get(&o.key) else { continue };
            if let Ok(info) = serde_json::from_slice::<LeaseInfo>(&b) {
                if info.expires > now {
                    out.push((o.key, info));
                }
            }
        }
        Ok(out)
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        if let Err(e) = self.backend.delete(&self.key) {
            tracing::warn!(lease = %self.key, error = %e, "could not remove lease");
        }
    }
}

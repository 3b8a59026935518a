//! Writer leases (`locks/<id>`): a running backup announces itself and refreshes the lease
//! so prune knows which packs a writer may still reference. Leases are not locks: nothing
//! ever waits for one; prune only postpones deleting condemned packs while a lease that
//! started before the condemnation is alive.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::backend::Backend;
use crate::error::Result;
use crate::snapshot::now_secs;

/// A lease expires this long after its last refresh (a killed writer stops blocking prune).
pub const LEASE_TTL_SECS: u64 = 300;
/// Refresh period.
pub const LEASE_REFRESH: Duration = Duration::from_secs(60);

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
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Lease {
    /// Writes the lease and starts refreshing it.
    pub fn acquire(backend: Arc<dyn Backend>, purpose: &str) -> Result<Lease> {
        let key = format!("locks/{}", hex::encode(rand::random::<[u8; 8]>()));
        let started = now_secs();
        let info = LeaseInfo {
            purpose: purpose.into(),
            started,
            expires: started + LEASE_TTL_SECS,
            host: crate::snapshot::hostname(),
            pid: std::process::id(),
        };
        backend.put(&key, &serde_json::to_vec(&info).unwrap_or_default())?;
        let stop = Arc::new(AtomicBool::new(false));
        let (b, k, s) = (backend.clone(), key.clone(), stop.clone());
        let thread = std::thread::Builder::new()
            .name("hlstore-lease".into())
            .spawn(move || {
                let mut info = info;
                let step = Duration::from_millis(200);
                let mut waited = Duration::ZERO;
                while !s.load(Ordering::Relaxed) {
                    std::thread::sleep(step);
                    waited += step;
                    if waited >= LEASE_REFRESH {
                        waited = Duration::ZERO;
                        info.expires = now_secs() + LEASE_TTL_SECS;
                        if let Err(e) = b.put(&k, &serde_json::to_vec(&info).unwrap_or_default()) {
                            tracing::warn!(lease = %k, error = %e, "lease refresh failed");
                        }
                    }
                }
            })
            .ok();
        Ok(Lease { key, backend, stop, thread })
    }

    /// Live leases in the repository (expired ones are ignored).
    pub fn live(backend: &dyn Backend) -> Result<Vec<LeaseInfo>> {
        let now = now_secs();
        let mut out = Vec::new();
        for o in backend.list("locks/")? {
            let Ok(b) = backend.get(&o.key) else { continue };
            if let Ok(info) = serde_json::from_slice::<LeaseInfo>(&b) {
                if info.expires > now {
                    out.push(info);
                }
            }
        }
        Ok(out)
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        if let Err(e) = self.backend.delete(&self.key) {
            tracing::warn!(lease = %self.key, error = %e, "could not remove lease");
        }
    }
}

//! `ExportRegistry`: export name → device, shared by every listener of a server.
//!
//! Invariants:
//! - Names are matched exactly (the empty name is an ordinary name).
//! - Every export of one device (the same `Arc`) shares one [`RangeLock`], also across
//!   remove/insert, as long as any connection still uses it: read-modify-writes are
//!   serialised across all connections of a device.
//! - Removing (or replacing) an export stops new connections from opening it and closes the
//!   open ones: each stops reading requests, answers those in flight, and closes (the
//!   export's `closed` token). A client that reconnects finds whatever is exported under
//!   the name then: the engine that replaced it after a detach/attach, or nothing.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock, Weak};

use super::export_io::ExportIo;
use super::range_lock::RangeLock;
use hlstore_core::device::BlockDevice;

/// One exported device and its cross-connection block lock.
#[derive(Debug)]
pub struct Export<D> {
    pub name: String,
    pub device: Arc<D>,
    /// Advertised as `NBD_FLAG_READ_ONLY`; writes, trims and zeroings get `EPERM`.
    pub read_only: bool,
    pub(crate) locks: Arc<RangeLock>,
    /// Per-export I/O counters; kept when the name is re-inserted.
    pub io: Arc<ExportIo>,
    /// Cancelled when the export is removed or replaced: its connections close.
    pub(crate) closed: tokio_util::sync::CancellationToken,
}

#[derive(Debug)]
struct Inner<D> {
    exports: BTreeMap<String, Arc<Export<D>>>,
    /// Device identity (its `Arc` pointer) → its lock, while the lock is alive.
    locks: HashMap<usize, Weak<RangeLock>>,
}

/// The exports a server offers. Cheap to clone (a shared handle).
#[derive(Debug)]
pub struct ExportRegistry<D> {
    inner: Arc<RwLock<Inner<D>>>,
}

impl<D> Clone for ExportRegistry<D> {
    fn clone(&self) -> Self {
        ExportRegistry { inner: self.inner.clone() }
    }
}

impl<D: BlockDevice> Default for ExportRegistry<D> {
    fn default() -> Self {
        Self::new()
    }
}

impl<D: BlockDevice> ExportRegistry<D> {
    pub fn new() -> Self {
        ExportRegistry { inner: Arc::new(RwLock::new(Inner { exports: BTreeMap::new(), locks: HashMap::new() })) }
    }

    /// Exports `device` as `name`, replacing (and returning) any device of that name.
    pub fn insert(&self, name: impl Into<String>, device: Arc<D>) -> Option<Arc<D>> {
        self.insert_export(name.into(), device, false)
    }

    /// Exports `device` read-only as `name` (e.g. a snapshot for a backup reader).
    pub fn insert_read_only(&self, name: impl Into<String>, device: Arc<D>) -> Option<Arc<D>> {
        self.insert_export(name.into(), device, true)
    }

    fn insert_export(&self, name: String, device: Arc<D>, read_only: bool) -> Option<Arc<D>> {
        let mut inner = self.write();
        inner.locks.retain(|_, lock| lock.strong_count() > 0);
        let key = Arc::as_ptr(&device) as usize;
        let locks = match inner.locks.get(&key).and_then(Weak::upgrade) {
            Some(lock) => lock,
            None => {
                let lock = Arc::new(RangeLock::new());
                inner.locks.insert(key, Arc::downgrade(&lock));
                lock
            }
        };
        let io = inner.exports.get(&name).map(|old| old.io.clone()).unwrap_or_default();
        let closed = tokio_util::sync::CancellationToken::new();
        let export = Arc::new(Export { name: name.clone(), device, read_only, locks, io, closed });
        inner.exports.insert(name, export).map(|old| {
            old.closed.cancel();
            old.device.clone()
        })
    }

    /// Stops exporting `name` and closes its connections (after the requests in flight are
    /// answered); returns its device if it was exported.
    pub fn remove(&self, name: &str) -> Option<Arc<D>> {
        self.write().exports.remove(name).map(|old| {
            old.closed.cancel();
            old.device.clone()
        })
    }

    /// The export called `name`.
    pub fn get(&self, name: &str) -> Option<Arc<Export<D>>> {
        self.read().exports.get(name).cloned()
    }

    /// All export names, sorted.
    pub fn names(&self) -> Vec<String> {
        self.read().exports.keys().cloned().collect()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Inner<D>> {
        // Every update replaces whole entries; a poisoned registry is still consistent.
        self.inner.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Inner<D>> {
        self.inner.write().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MemDevice;

    #[test]
    fn one_lock_per_device_across_names_and_reinsert() {
        let reg = ExportRegistry::new();
        let dev = Arc::new(MemDevice::new("d", 4096).unwrap());
        reg.insert("a", dev.clone());
        reg.insert("b", dev.clone());
        let a = reg.get("a").unwrap();
        assert!(Arc::ptr_eq(&a.locks, &reg.get("b").unwrap().locks));
        assert!(reg.remove("a").is_some());
        reg.remove("b");
        reg.insert("c", dev.clone());
        assert!(Arc::ptr_eq(&a.locks, &reg.get("c").unwrap().locks), "live connection's lock reused");
        let other = Arc::new(MemDevice::new("e", 4096).unwrap());
        reg.insert("e", other);
        assert!(!Arc::ptr_eq(&a.locks, &reg.get("e").unwrap().locks));
        assert_eq!(reg.names(), vec!["c".to_string(), "e".to_string()]);
        assert!(reg.get("a").is_none());
    }

    #[test]
    fn removing_or_replacing_an_export_closes_it() {
        let reg = ExportRegistry::new();
        let dev = Arc::new(MemDevice::new("d", 4096).unwrap());
        reg.insert("a", dev.clone());
        let first = reg.get("a").unwrap();
        reg.insert("a", dev.clone());
        assert!(first.closed.is_cancelled(), "replaced export closes");
        let second = reg.get("a").unwrap();
        assert!(!second.closed.is_cancelled());
        reg.remove("a");
        assert!(second.closed.is_cancelled(), "removed export closes");
    }
}

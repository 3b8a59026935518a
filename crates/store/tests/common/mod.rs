//! Test harnesses that give the conformance suite and the model test one interface over
//! both store implementations.
#![allow(dead_code)]

use std::sync::Arc;

use hlstore_core::Epoch;
use hlstore_store::{DiskStore, MemStore, ReplicaStore};

/// A store under test plus the faults the tests inject.
pub trait Harness {
    type S: ReplicaStore;
    fn store(&self) -> Arc<Self::S>;
    /// Crash and reopen: power loss for the memory store; drop and reopen (a process crash)
    /// for the disk store.
    fn crash(&mut self);
    /// Power cut and reopen: whatever no flush made durable may be lost. The memory store
    /// loses every unflushed change; the disk store loses the data of every slot no
    /// fdatasync covered while the metadata already written survives.
    fn power_cut(&mut self);
    /// Flip a byte of the stored block containing `offset`, behind the store's back.
    fn corrupt(&self, volume: &str, offset: u64);
    /// After a flush: checks the space really used on disk for `volume` is about `bytes`.
    fn after_flush_space_check(&self, _volume: &str, _bytes: u64) {}
}

pub struct MemHarness(Arc<MemStore>);

impl MemHarness {
    pub fn new() -> Self {
        Self(Arc::new(MemStore::new()))
    }
}

impl Harness for MemHarness {
    type S = MemStore;
    fn store(&self) -> Arc<MemStore> {
        self.0.clone()
    }
    fn crash(&mut self) {
        self.0.crash();
    }
    fn power_cut(&mut self) {
        self.0.crash();
    }
    fn corrupt(&self, volume: &str, offset: u64) {
        assert!(self.0.corrupt(volume, offset), "block at {offset} is not allocated");
    }
}

pub struct DiskHarness {
    dir: tempfile::TempDir,
    store: Option<Arc<DiskStore>>,
}

impl DiskHarness {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(DiskStore::open_simulating_power_loss(dir.path()).unwrap());
        Self { dir, store: Some(store) }
    }
}

impl Harness for DiskHarness {
    type S = DiskStore;
    fn store(&self) -> Arc<DiskStore> {
        self.store.clone().unwrap()
    }
    fn crash(&mut self) {
        let s = self.store.take().unwrap();
        assert_eq!(Arc::strong_count(&s), 1, "test still holds the store");
        drop(s);
        self.store = Some(Arc::new(DiskStore::open_simulating_power_loss(self.dir.path()).unwrap()));
    }
    fn power_cut(&mut self) {
        let s = self.store.take().unwrap();
        let s = Arc::try_unwrap(s).unwrap_or_else(|_| panic!("test still holds the store"));
        s.power_cut().unwrap();
        self.store = Some(Arc::new(DiskStore::open_simulating_power_loss(self.dir.path()).unwrap()));
    }
    fn corrupt(&self, volume: &str, offset: u64) {
        use std::os::unix::fs::FileExt;
        let (path, at) = self.store().block_location(volume, offset).unwrap().expect("block is allocated");
        let f = std::fs::OpenOptions::new().read(true).write(true).open(path).unwrap();
        let pos = at + offset % 4096;
        let mut b = [0u8; 1];
        f.read_exact_at(&mut b, pos).unwrap();
        b[0] ^= 0x40;
        f.write_all_at(&b, pos).unwrap();
        f.sync_all().unwrap();
    }
    fn after_flush_space_check(&self, volume: &str, bytes: u64) {
        let s = self.store();
        s.flush(volume, Epoch(s.state(volume).unwrap().epoch)).unwrap();
        let used = s.disk_usage(volume).unwrap();
        assert!(used <= bytes + 64 * 1024, "slot file uses {used} bytes on disk for {bytes} live bytes");
    }
}

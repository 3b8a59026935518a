//! An in-memory node agent for volume backup tests: volumes with per-block write
//! sequence numbers, snapshots that copy them, changed-block tracking by sequence number
//! (like the engine's), an NBD-less writer, read counters and a read fault.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

use hlstore_backup::volume::{VolumeAgent, VolumeSnapshot};
use hlstore_backup::{Error, RestoreSink, Result};

pub const BLOCK: u64 = 4096;

#[derive(Clone)]
struct Vol {
    data: Vec<u8>,
    /// Seq of the last write of each block (0: never written).
    wseq: Vec<u64>,
    attached: bool,
    replicas: u32,
}

#[derive(Clone)]
struct Snap {
    info: VolumeSnapshot,
    data: Vec<u8>,
    wseq: Vec<u64>,
}

#[derive(Default)]
struct State {
    vols: BTreeMap<String, Vol>,
    snaps: BTreeMap<(String, String), Snap>,
    seq: u64,
    clock: i64,
}

#[derive(Default)]
pub struct FakeAgent {
    st: Mutex<State>,
    pub bytes_read: AtomicU64,
    pub bytes_written: AtomicU64,
    pub syncs: AtomicU64,
    pub fail_reads: AtomicBool,
    /// When non-zero, writes fail once this many bytes were written (a lost connection).
    pub fail_writes_after: AtomicU64,
}

fn no(what: &str) -> Error {
    Error::Agent(format!("{what} not found"))
}

impl FakeAgent {
    pub fn new() -> Self {
        Self::default()
    }

    /// Creates a volume and writes `data` at 0 (every block written, zeros too).
    pub fn volume_with(&self, name: &str, size: u64, data: &[u8]) {
        self.create_volume(name, size, 3).unwrap();
        self.write(name, 0, data);
    }

    /// A client write.
    pub fn write(&self, name: &str, offset: u64, data: &[u8]) {
        assert_eq!(offset % BLOCK, 0);
        assert_eq!(data.len() as u64 % BLOCK, 0);
        let mut st = self.st.lock().unwrap();
        st.seq += 1;
        let seq = st.seq;
        let v = st.vols.get_mut(name).expect("volume");
        v.data[offset as usize..offset as usize + data.len()].copy_from_slice(data);
        for b in offset / BLOCK..(offset + data.len() as u64) / BLOCK {
            v.wseq[b as usize] = seq;
        }
    }

    pub fn contents(&self, name: &str) -> Vec<u8> {
        self.st.lock().unwrap().vols[name].data.clone()
    }

    pub fn snapshot_contents(&self, volume: &str, name: &str) -> Vec<u8> {
        self.st.lock().unwrap().snaps[&(volume.to_string(), name.to_string())].data.clone()
    }

    pub fn snapshot_names(&self, volume: &str) -> Vec<String> {
        self.list_snapshots(volume).unwrap().into_iter().map(|s| s.name).collect()
    }

    pub fn replicas(&self, name: &str) -> u32 {
        self.st.lock().unwrap().vols[name].replicas
    }

    pub fn is_attached(&self, name: &str) -> bool {
        self.st.lock().unwrap().vols[name].attached
    }
}

fn extents(blocks: impl Iterator<Item = u64>) -> Vec<Range<u64>> {
    let mut out: Vec<Range<u64>> = Vec::new();
    for b in blocks {
        let r = b * BLOCK..(b + 1) * BLOCK;
        match out.last_mut() {
            Some(l) if l.end == r.start => l.end = r.end,
            _ => out.push(r),
        }
    }
    out
}

impl VolumeAgent for FakeAgent {
    fn create_snapshot(&self, volume: &str, name: &str, labels: &BTreeMap<String, String>) -> Result<VolumeSnapshot> {
        let mut st = self.st.lock().unwrap();
        let v = st.vols.get(volume).ok_or_else(|| no(volume))?.clone();
        st.clock += 1;
        let info = VolumeSnapshot {
            volume: volume.into(),
            name: name.into(),
            seq: st.seq,
            size: v.data.len() as u64,
            created: st.clock,
            ready: true,
            labels: labels.clone(),
        };
        let key = (volume.to_string(), name.to_string());
        st.snaps.insert(key, Snap { info: info.clone(), data: v.data, wseq: v.wseq });
        Ok(info)
    }

    fn delete_snapshot(&self, volume: &str, name: &str) -> Result<bool> {
        Ok(self.st.lock().unwrap().snaps.remove(&(volume.to_string(), name.to_string())).is_some())
    }

    fn list_snapshots(&self, volume: &str) -> Result<Vec<VolumeSnapshot>> {
        let st = self.st.lock().unwrap();
        Ok(st.snaps.values().filter(|s| s.info.volume == volume).map(|s| s.info.clone()).collect())
    }

    fn changed_blocks(&self, volume: &str, from: &str, to: &str) -> Result<Vec<Range<u64>>> {
        let st = self.st.lock().unwrap();
        let to = st.snaps.get(&(volume.to_string(), to.to_string())).ok_or_else(|| no(to))?;
        let since = if from.is_empty() {
            0
        } else {
            st.snaps.get(&(volume.to_string(), from.to_string())).ok_or_else(|| no(from))?.info.seq
        };
        Ok(extents((0..to.wseq.len() as u64).filter(|&b| to.wseq[b as usize] > since)))
    }

    fn read_snapshot(&self, volume: &str, name: &str, offset: u64, buf: &mut [u8]) -> Result<()> {
        if self.fail_reads.load(Ordering::Relaxed) {
            return Err(Error::Agent("read snapshot: replica unavailable".into()));
        }
        let st = self.st.lock().unwrap();
        let s = st.snaps.get(&(volume.to_string(), name.to_string())).ok_or_else(|| no(name))?;
        let end = offset as usize + buf.len();
        buf.copy_from_slice(s.data.get(offset as usize..end).ok_or_else(|| Error::Agent("read past end".into()))?);
        self.bytes_read.fetch_add(buf.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    fn volume_size(&self, volume: &str) -> Result<Option<u64>> {
        Ok(self.st.lock().unwrap().vols.get(volume).map(|v| v.data.len() as u64))
    }

    fn create_volume(&self, volume: &str, size: u64, replicas: u32) -> Result<()> {
        if size == 0 || !size.is_multiple_of(BLOCK) {
            return Err(Error::Agent(format!("bad size {size}")));
        }
        let v = Vol { data: vec![0; size as usize], wseq: vec![0; (size / BLOCK) as usize], attached: false, replicas };
        self.st.lock().unwrap().vols.insert(volume.into(), v);
        Ok(())
    }

    fn delete_volume(&self, volume: &str) -> Result<()> {
        self.st.lock().unwrap().vols.remove(volume);
        Ok(())
    }

    fn attach_volume(&self, volume: &str) -> Result<String> {
        self.st.lock().unwrap().vols.get_mut(volume).ok_or_else(|| no(volume))?.attached = true;
        Ok(format!("fake://{volume}"))
    }

    fn detach_volume(&self, volume: &str) -> Result<()> {
        self.st.lock().unwrap().vols.get_mut(volume).ok_or_else(|| no(volume))?.attached = false;
        Ok(())
    }

    fn open_writer(&self, nbd_uri: &str) -> Result<Box<dyn RestoreSink + '_>> {
        let name = nbd_uri.strip_prefix("fake://").ok_or_else(|| Error::Agent("bad uri".into()))?;
        Ok(Box::new(FakeSink { agent: self, volume: name.to_string() }))
    }
}

struct FakeSink<'a> {
    agent: &'a FakeAgent,
    volume: String,
}

impl RestoreSink for FakeSink<'_> {
    fn write_at(&self, offset: u64, data: &[u8]) -> Result<()> {
        let mut st = self.agent.st.lock().unwrap();
        let v = st.vols.get_mut(&self.volume).ok_or_else(|| no(&self.volume))?;
        if !v.attached {
            return Err(Error::Agent("write to a detached volume".into()));
        }
        let limit = self.agent.fail_writes_after.load(Ordering::Relaxed);
        if limit > 0 && self.agent.bytes_written.load(Ordering::Relaxed) >= limit {
            return Err(Error::Agent("connection lost".into()));
        }
        let end = offset as usize + data.len();
        v.data
            .get_mut(offset as usize..end)
            .ok_or_else(|| Error::Agent("write past end".into()))?
            .copy_from_slice(data);
        self.agent.bytes_written.fetch_add(data.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    fn sync(&self) -> Result<()> {
        self.agent.syncs.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

impl FakeAgent {
    /// Deletes a snapshot as an operator would.
    pub fn delete_snapshot_for_test(&self, name: &str) {
        let vol = self.st.lock().unwrap().snaps.keys().find(|k| k.1 == name).map(|k| k.0.clone()).expect("snapshot");
        assert!(VolumeAgent::delete_snapshot(self, &vol, name).unwrap());
    }
}

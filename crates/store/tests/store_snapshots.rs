//! Snapshots of the disk store (and of the memory store, which keeps the same rules)
//! against a model: random writes, trims, snapshot creates and deletes, flushes and
//! reopen; every snapshot must read back exactly the image it was taken of,
//! `changed_blocks` must hold every block that differs and only blocks written or trimmed
//! in between, and deleting snapshots must give their space back.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use hlstore_core::ErrorKind;
use hlstore_core::{Epoch, Offset, Seq};
use hlstore_store::{DiskStore, MemStore, ReplicaStore, SnapshotInfo, VolumeRecord, BLOCK_SIZE};
use proptest::prelude::*;

const BLOCKS: u64 = 24;
const BS: u64 = BLOCK_SIZE;

fn content(seq: u64, block: u64) -> Vec<u8> {
    if seq == 0 {
        return vec![0; BS as usize];
    }
    let mut d = Vec::with_capacity(BS as usize);
    while d.len() < BS as usize {
        d.extend_from_slice(&seq.to_le_bytes());
        d.extend_from_slice(&block.to_le_bytes());
    }
    d
}

fn snap(name: &str, seq: u64) -> SnapshotInfo {
    SnapshotInfo { name: name.into(), seq, size: 0, created: 0, labels: BTreeMap::new(), partial: false }
}

/// The store under test: the disk store, or the memory store (whose snapshots must keep
/// the same rules; a "reopen" of it is a power loss right after a flush).
struct Store {
    dir: tempfile::TempDir,
    disk: Option<Arc<DiskStore>>,
    mem: Option<Arc<MemStore>>,
}

impl Store {
    fn new(blocks: u64) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let s = Arc::new(DiskStore::open(dir.path()).unwrap());
        Self::with(Self { dir, disk: Some(s), mem: None }, blocks)
    }
    fn mem(blocks: u64) -> Self {
        let dir = tempfile::tempdir().unwrap();
        Self::with(Self { dir, disk: None, mem: Some(Arc::new(MemStore::new())) }, blocks)
    }
    fn with(self, blocks: u64) -> Self {
        self.s().create(VolumeRecord::new("v", blocks * BS)).unwrap();
        self.s().open("v", Epoch(1)).unwrap();
        self
    }
    fn s(&self) -> &dyn ReplicaStore {
        match (&self.disk, &self.mem) {
            (Some(d), _) => d.as_ref(),
            (None, Some(m)) => m.as_ref(),
            (None, None) => unreachable!("a store is always open"),
        }
    }
    fn reopen(&mut self) {
        if let Some(m) = &self.mem {
            m.crash();
            return;
        }
        drop(self.disk.take());
        self.disk = Some(Arc::new(DiskStore::open(self.dir.path()).unwrap()));
    }
    /// Bytes on disk (None for the memory store).
    fn disk_usage(&self) -> Option<u64> {
        self.disk.as_ref().map(|d| d.disk_usage("v").unwrap())
    }
}

#[derive(Debug, Clone)]
enum Op {
    Write { block: u64, count: u64 },
    Trim { block: u64, count: u64 },
    Snapshot,
    Delete(usize),
    Flush,
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    let range = (0..BLOCKS).prop_flat_map(|b| (Just(b), 1..=(BLOCKS - b).min(5)));
    prop_oneof![
        6 => range.clone().prop_map(|(block, count)| Op::Write { block, count }),
        2 => range.prop_map(|(block, count)| Op::Trim { block, count }),
        3 => Just(Op::Snapshot),
        2 => (0..8usize).prop_map(Op::Delete),
        1 => Just(Op::Flush),
        1 => Just(Op::Reopen),
    ]
}

/// A snapshot's seq and image.
type Taken = (u64, BTreeMap<u64, u64>);

/// The model: the live image, each snapshot's image and seq, and which blocks each seq
/// touched (for `changed_blocks`).
#[derive(Default)]
struct Model {
    live: BTreeMap<u64, u64>,
    snaps: BTreeMap<String, Taken>,
    touched: BTreeMap<u64, BTreeSet<u64>>,
}

impl Model {
    fn touched(&self, a: u64, b: u64) -> BTreeSet<u64> {
        let mut out = BTreeSet::new();
        if a >= b {
            return out;
        }
        for blocks in self.touched.range(a + 1..=b).map(|(_, v)| v) {
            out.extend(blocks);
        }
        out
    }
}

/// `got` holds every block that differs between images `x` and `y`, and only blocks in
/// `touched`.
#[track_caller]
fn check_changed(got: Vec<u64>, x: &BTreeMap<u64, u64>, y: &BTreeMap<u64, u64>, touched: BTreeSet<u64>, what: &str) {
    let got: BTreeSet<u64> = got.into_iter().collect();
    let differ: BTreeSet<u64> = (0..BLOCKS).filter(|b| x.get(b) != y.get(b)).collect();
    assert!(got.is_superset(&differ), "{what}: {got:?} misses some of {differ:?}");
    assert!(got.is_subset(&touched), "{what}: {got:?} has blocks outside {touched:?}");
}

fn image(m: &BTreeMap<u64, u64>, blocks: u64) -> Vec<u8> {
    (0..blocks).flat_map(|b| content(m.get(&b).copied().unwrap_or(0), b)).collect()
}

fn run(mut st: Store, ops: Vec<Op>) {
    let mut m = Model::default();
    let mut seq = 0u64;
    let mut n = 0;
    for op in ops {
        match op {
            Op::Write { block, count } => {
                seq += 1;
                let data: Vec<u8> = (block..block + count).flat_map(|b| content(seq, b)).collect();
                st.s().write("v", Epoch(1), Seq(seq), Offset(block * BS), &data, false).unwrap();
                for b in block..block + count {
                    m.live.insert(b, seq);
                }
                m.touched.entry(seq).or_default().extend(block..block + count);
            }
            Op::Trim { block, count } => {
                seq += 1;
                st.s().trim("v", Epoch(1), Seq(seq), Offset(block * BS), count * BS).unwrap();
                for b in block..block + count {
                    m.live.remove(&b);
                }
                m.touched.entry(seq).or_default().extend(block..block + count);
            }
            Op::Snapshot => {
                n += 1;
                let name = format!("s{n}");
                let got = st.s().create_snapshot("v", Epoch(1), snap(&name, seq)).unwrap();
                assert_eq!((got.seq, got.size), (seq, BLOCKS * BS));
                m.snaps.insert(name, (seq, m.live.clone()));
            }
            Op::Delete(i) => {
                let Some(name) = m.snaps.keys().nth(i).cloned() else { continue };
                assert!(st.s().delete_snapshot("v", Epoch(1), &name).unwrap());
                assert!(!st.s().delete_snapshot("v", Epoch(1), &name).unwrap(), "second delete of {name}");
                m.snaps.remove(&name);
            }
            Op::Flush => {
                st.s().flush("v", Epoch(1)).unwrap();
            }
            Op::Reopen => {
                // Flushed first: this test is about snapshots, not torn writes.
                st.s().flush("v", Epoch(1)).unwrap();
                st.reopen();
            }
        }
        let listed: Vec<String> = st.s().list_snapshots("v").unwrap().into_iter().map(|s| s.name).collect();
        let mut want: Vec<(u64, String)> = m.snaps.iter().map(|(k, (s, _))| (*s, k.clone())).collect();
        want.sort();
        assert_eq!(listed, want.into_iter().map(|(_, k)| k).collect::<Vec<_>>());
        for (name, (sseq, img)) in &m.snaps {
            let got = st.s().read_snapshot("v", name, Offset(0), BLOCKS * BS).unwrap();
            assert!(got == image(img, BLOCKS), "snapshot {name} (seq {sseq}) reads wrong");
            let to_live = st.s().changed_blocks("v", Some(name), None).unwrap();
            check_changed(to_live, img, &m.live, m.touched(*sseq, u64::MAX), &format!("since {name}"));
            let all = st.s().changed_blocks("v", None, Some(name)).unwrap();
            check_changed(all, &BTreeMap::new(), img, m.touched(0, *sseq), &format!("up to {name}"));
        }
        let names: Vec<(&String, &Taken)> = m.snaps.iter().collect();
        for w in names.windows(2) {
            let (a, b) = if w[0].1 .0 <= w[1].1 .0 { (w[0], w[1]) } else { (w[1], w[0]) };
            let got = st.s().changed_blocks("v", Some(a.0), Some(b.0)).unwrap();
            check_changed(got, &a.1 .1, &b.1 .1, m.touched(a.1 .0, b.1 .0), &format!("{} to {}", a.0, b.0));
        }
        assert!(st.s().read("v", Epoch(1), Offset(0), BLOCKS * BS).unwrap() == image(&m.live, BLOCKS), "live image");
    }
    // Deleting every snapshot leaves only the live blocks on disk.
    for name in m.snaps.keys() {
        st.s().delete_snapshot("v", Epoch(1), name).unwrap();
    }
    st.s().flush("v", Epoch(1)).unwrap();
    if let Some(used) = st.disk_usage() {
        assert!(used <= m.live.len() as u64 * BS + 64 * 1024, "{used} bytes on disk for {} live blocks", m.live.len());
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]
    #[test]
    fn snapshots_match_the_model(ops in proptest::collection::vec(op(), 1..60)) {
        run(Store::new(BLOCKS), ops.clone());
        run(Store::mem(BLOCKS), ops);
    }
}

#[test]
fn bad_requests_get_clear_errors() {
    bad_requests(Store::new(8));
    bad_requests(Store::mem(8));
}

fn bad_requests(st: Store) {
    let s = st.s();
    s.write("v", Epoch(1), Seq(1), Offset(0), &content(1, 0), false).unwrap();
    assert_eq!(s.create_snapshot("v", Epoch(1), snap("a/b", 1)).unwrap_err().kind(), ErrorKind::InvalidArgument);
    assert_eq!(s.create_snapshot("v", Epoch(0), snap("x", 1)).unwrap_err().kind(), ErrorKind::StaleEpoch);
    assert_eq!(s.create_snapshot("nope", Epoch(1), snap("x", 1)).unwrap_err().kind(), ErrorKind::NotFound);
    // A replica that already applied writes past the point cannot take it.
    assert_eq!(s.create_snapshot("v", Epoch(1), snap("x", 0)).unwrap_err().kind(), ErrorKind::Unavailable);
    s.create_snapshot("v", Epoch(1), snap("a", 1)).unwrap();
    // Idempotent by name.
    assert_eq!(s.create_snapshot("v", Epoch(1), snap("a", 1)).unwrap().seq, 1);
    s.write("v", Epoch(1), Seq(2), Offset(BS), &content(2, 1), false).unwrap();
    s.create_snapshot("v", Epoch(1), snap("b", 2)).unwrap();
    assert_eq!(s.read_snapshot("v", "zz", Offset(0), BS).unwrap_err().kind(), ErrorKind::NotFound);
    assert_eq!(s.read_snapshot("v", "a", Offset(0), 100).unwrap_err().kind(), ErrorKind::InvalidArgument);
    assert_eq!(s.read_snapshot("v", "a", Offset(0), 9 * BS).unwrap_err().kind(), ErrorKind::OutOfRange);
    assert_eq!(s.changed_blocks("v", Some("b"), Some("a")).unwrap_err().kind(), ErrorKind::InvalidArgument);
    assert_eq!(s.changed_blocks("v", Some("a"), Some("b")).unwrap(), [1]);
    assert_eq!(s.changed_blocks("v", None, Some("a")).unwrap(), [0]);
    assert_eq!(s.delete_snapshot("v", Epoch(0), "a").unwrap_err().kind(), ErrorKind::StaleEpoch);
    assert!(!s.delete_snapshot("v", Epoch(1), "zz").unwrap());
}

/// A thousand snapshots on one volume, each seeing a different version of one block; all
/// readable, then all deleted with the space returned.
#[test]
fn a_thousand_snapshots() {
    let st = Store::new(64);
    let s = st.s();
    for i in 1..=1000u64 {
        let b = i % 64;
        s.write("v", Epoch(1), Seq(i), Offset(b * BS), &content(i, b), false).unwrap();
        s.create_snapshot("v", Epoch(1), snap(&format!("s{i}"), i)).unwrap();
    }
    assert_eq!(s.list_snapshots("v").unwrap().len(), 1000);
    for i in [1u64, 2, 63, 64, 65, 500, 999, 1000] {
        let b = i % 64;
        assert_eq!(s.read_snapshot("v", &format!("s{i}"), Offset(b * BS), BS).unwrap(), content(i, b), "s{i}");
    }
    assert!(st.disk_usage().unwrap() >= 1000 * BS, "every version is kept");
    for i in 1..=1000u64 {
        assert!(s.delete_snapshot("v", Epoch(1), &format!("s{i}")).unwrap());
    }
    s.flush("v", Epoch(1)).unwrap();
    let used = st.disk_usage().unwrap();
    assert!(used <= 64 * BS + 64 * 1024, "{used} bytes on disk after deleting every snapshot");
}

/// A power cut between a snapshot delete's (durable) record deletion and the batch freeing
/// its versions (synced only by the next flush) leaves those versions with no snapshot
/// seeing them: the next open drops them and hands their space back.
#[test]
fn versions_a_cut_short_delete_left_are_dropped_at_open() {
    let dir = tempfile::tempdir().unwrap();
    let blocks = 256u64;
    {
        let s = DiskStore::open(dir.path()).unwrap();
        s.create(VolumeRecord::new("v", blocks * BS)).unwrap();
        s.open("v", Epoch(1)).unwrap();
        s.write("v", Epoch(1), Seq(1), Offset(0), &vec![1u8; (blocks * BS) as usize], false).unwrap();
        s.create_snapshot("v", Epoch(1), snap("a", 1)).unwrap();
        s.write("v", Epoch(1), Seq(2), Offset(0), &vec![2u8; (blocks * BS) as usize], false).unwrap();
        s.flush("v", Epoch(1)).unwrap();
        assert!(s.disk_usage("v").unwrap() >= 2 * blocks * BS, "the snapshot keeps the first versions");
        s.forget_snapshot_record("v", "a").unwrap();
    }
    let s = DiskStore::open(dir.path()).unwrap();
    assert!(s.list_snapshots("v").unwrap().is_empty());
    let used = s.disk_usage("v").unwrap();
    assert!(used <= blocks * BS + 64 * 1024, "{used} bytes on disk for {} live bytes", blocks * BS);
    assert!(s.read("v", Epoch(1), Offset(0), blocks * BS).unwrap().iter().all(|&b| b == 2));
    // The freed slots are reused by new writes without disturbing the live data.
    s.write("v", Epoch(1), Seq(3), Offset(0), &vec![3u8; (BS * 8) as usize], false).unwrap();
    s.flush("v", Epoch(1)).unwrap();
    let got = s.read("v", Epoch(1), Offset(0), blocks * BS).unwrap();
    assert!(got[..(8 * BS) as usize].iter().all(|&b| b == 3) && got[(8 * BS) as usize..].iter().all(|&b| b == 2));
}

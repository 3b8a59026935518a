//! `apply_resync` of the disk store (which applies runs of data chunks with one metadata
//! batch) against the memory store (chunk by chunk), on random chunk lists: repeated
//! blocks, older seqs, trims and zero blocks mixed in, before and after a reopen.

use hlstore_core::{Epoch, Offset, Seq};
use hlstore_store::{Change, ChunkData, DiskStore, MemStore, ReplicaStore, ResyncChunk, VolumeRecord, BLOCK_SIZE};
use proptest::prelude::*;

const BLOCKS: u64 = 24;
const BS: u64 = BLOCK_SIZE;

fn chunk() -> impl Strategy<Value = (u64, u64, u8)> {
    (0..BLOCKS, 1..40u64, 0..10u8)
}

fn to_chunk((block, seq, kind): (u64, u64, u8)) -> ResyncChunk {
    let data = match kind {
        0 => ChunkData::Trim(BS * (1 + block % 3).min(BLOCKS - block)),
        1 => ChunkData::Zero,
        _ => ChunkData::Data(vec![(seq as u8).wrapping_mul(7) | 1; BS as usize].into()),
    };
    ResyncChunk { offset: block * BS, seq, data }
}

fn prepare(s: &impl ReplicaStore) {
    s.create(VolumeRecord::new("v", BLOCKS * BS)).unwrap();
    s.open("v", Epoch(1)).unwrap();
    for b in (0..BLOCKS).step_by(3) {
        s.write("v", Epoch(1), Seq(20), Offset(b * BS), &vec![0xEE; BS as usize], false).unwrap();
    }
}

/// Content, allocated bytes and the change list (trims of one seq in offset order: the
/// stores may list those in either order, and trims at one seq and offset once or each).
type View = (Vec<u8>, u64, Vec<(u8, u64, u64, u64)>);

fn view(s: &impl ReplicaStore) -> View {
    let st = s.state("v").unwrap();
    let mut changes: Vec<(u8, u64, u64, u64)> = s
        .changes_since("v", Epoch(1), Seq(0))
        .unwrap()
        .into_iter()
        .map(|c| match c {
            Change::Trim { offset, len, seq } => (0, seq, offset, len),
            Change::Block { offset, seq } => (1, offset, seq, 0),
        })
        .collect();
    changes.sort_unstable();
    // Trims at one (seq, offset): the longest covers the others.
    changes.dedup_by(|later, kept| {
        let same = later.0 == 0 && kept.0 == 0 && later.1 == kept.1 && later.2 == kept.2;
        if same {
            kept.3 = kept.3.max(later.3);
        }
        same
    });
    (s.read("v", Epoch(1), Offset(0), BLOCKS * BS).unwrap(), st.allocated_bytes, changes)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]
    #[test]
    fn disk_apply_resync_matches_the_memory_store(
        calls in proptest::collection::vec(proptest::collection::vec(chunk(), 1..20), 1..4),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let disk = DiskStore::open(dir.path()).unwrap();
        let mem = MemStore::new();
        prepare(&disk);
        prepare(&mem);
        for call in &calls {
            let chunks: Vec<ResyncChunk> = call.iter().copied().map(to_chunk).collect();
            let a = disk.apply_resync("v", Epoch(1), &chunks).unwrap();
            let b = mem.apply_resync("v", Epoch(1), &chunks).unwrap();
            prop_assert_eq!(a, b, "apply stats");
            let (d, m) = (view(&disk), view(&mem));
            prop_assert!(d.0 == m.0, "data differs after {:?}", call);
            prop_assert_eq!(d.1, m.1, "allocated bytes after {:?}", call);
            prop_assert_eq!(&d.2, &m.2, "changes after {:?}", call);
        }
        disk.flush("v", Epoch(1)).unwrap();
        drop(disk);
        let disk = DiskStore::open(dir.path()).unwrap();
        prop_assert!(view(&disk) == view(&mem), "disk store differs after a reopen");
    }
}

/// A resync may send a trim and a zero block with the same seq and offset: the second must
/// not shorten the trim record the change index keeps (the longer range stays listed).
#[test]
fn a_zero_block_does_not_shorten_a_trim_with_the_same_seq_and_offset() {
    let dir = tempfile::tempdir().unwrap();
    let disk = DiskStore::open(dir.path()).unwrap();
    prepare(&disk);
    let trim = ResyncChunk { offset: 3 * BS, seq: 30, data: ChunkData::Trim(3 * BS) };
    let zero = ResyncChunk { offset: 3 * BS, seq: 30, data: ChunkData::Zero };
    disk.apply_resync("v", Epoch(1), &[trim, zero]).unwrap();
    let trims: Vec<(u64, u64)> = disk
        .changes_since("v", Epoch(1), Seq(25))
        .unwrap()
        .into_iter()
        .filter_map(|c| match c {
            Change::Trim { offset, len, .. } => Some((offset, len)),
            _ => None,
        })
        .collect();
    assert_eq!(trims, vec![(3 * BS, 3 * BS)]);
}

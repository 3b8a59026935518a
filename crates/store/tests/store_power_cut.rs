//! Property test of the disk store's recovery after a power cut that loses the data of
//! some unflushed writes and keeps others: random writes, trims and flushes, then the data
//! of a random subset of the blocks written since the last flush is lost (zeroed behind
//! the store's back) and the store reopens. Checked against the history of writes:
//! - every block reads without a checksum error, holding its flushed content or content
//!   written after the flush;
//! - the replica's clean prefix `cp` (its `last_seq`, lowered to its resync mark) never
//!   covers a lost write: every block whose last write is at or below `cp` holds it;
//! - `cp` is at least the last flushed seq, and with nothing lost it is the last seq.

use std::collections::BTreeMap;
use std::os::unix::fs::FileExt;

use hlstore_core::{Epoch, Offset, Seq};
use hlstore_store::{DiskStore, ReplicaStore, VolumeRecord, BLOCK_SIZE};
use proptest::prelude::*;

const BLOCKS: u64 = 8;
const BS: usize = BLOCK_SIZE as usize;

#[derive(Debug, Clone)]
enum Op {
    Write { block: u64 },
    Trim { block: u64 },
    Flush,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0..BLOCKS).prop_map(|block| Op::Write { block }),
        1 => (0..BLOCKS).prop_map(|block| Op::Trim { block }),
        1 => Just(Op::Flush),
    ]
}

/// A block's content from a write or trim: (seq, data; None when trimmed).
type Version = (u64, Option<Vec<u8>>);

/// Content written at `seq`.
fn content(seq: u64) -> Vec<u8> {
    let mut b = vec![(seq % 251) as u8 + 1; BS];
    b[..8].copy_from_slice(&seq.to_le_bytes());
    b
}

fn run(ops: &[Op], lose: &[bool]) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().unwrap();
    let store = DiskStore::open(dir.path()).unwrap();
    store.create(VolumeRecord::new("v", BLOCKS * BLOCK_SIZE)).unwrap();
    store.open("v", Epoch(1)).unwrap();
    // Per block: (seq, content) of every write and trim, in order.
    let mut history: BTreeMap<u64, Vec<Version>> = BTreeMap::new();
    let (mut seq, mut flushed) = (0u64, 0u64);
    for op in ops {
        match *op {
            Op::Write { block } => {
                seq += 1;
                store.write("v", Epoch(1), Seq(seq), Offset(block * BLOCK_SIZE), &content(seq), false).unwrap();
                history.entry(block).or_default().push((seq, Some(content(seq))));
            }
            Op::Trim { block } => {
                seq += 1;
                store.trim("v", Epoch(1), Seq(seq), Offset(block * BLOCK_SIZE), BLOCK_SIZE).unwrap();
                history.entry(block).or_default().push((seq, None));
            }
            Op::Flush => flushed = store.flush("v", Epoch(1)).unwrap().get(),
        }
    }
    // The power cut: the current data of some blocks written after the flush is lost.
    let mut lost_any = false;
    for (b, h) in &history {
        let Some(&(s, Some(_))) = h.last() else { continue };
        if s > flushed && lose[*b as usize] {
            let (path, at) = store.block_location("v", b * BLOCK_SIZE).unwrap().expect("allocated");
            let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
            f.write_all_at(&[0u8; BS], at).unwrap();
            lost_any = true;
        }
    }
    drop(store);
    let store = DiskStore::open(dir.path()).unwrap();
    let st = store.state("v").unwrap();
    let cp = st.resync_from.map_or(st.last_seq, |f| f.min(st.last_seq));
    prop_assert!(cp >= flushed, "clean prefix {cp} below the flushed seq {flushed}: {st:?}");
    prop_assert!(st.durable_seq <= cp, "durable seq above the clean prefix: {st:?}");
    if !lost_any {
        prop_assert_eq!(cp, seq, "nothing was lost: {:?}", st);
    }
    for b in 0..BLOCKS {
        let got = store.read("v", Epoch(1), Offset(b * BLOCK_SIZE), BLOCK_SIZE);
        prop_assert!(got.is_ok(), "block {} after recovery: {:?}", b, got.err());
        let got = got.unwrap();
        let h = history.get(&b).cloned().unwrap_or_default();
        let as_read = |c: &Option<Vec<u8>>| c.clone().unwrap_or_else(|| vec![0u8; BS]);
        let at_flush = h.iter().rev().find(|(s, _)| *s <= flushed).map_or(vec![0u8; BS], |(_, c)| as_read(c));
        let allowed = got == at_flush || h.iter().any(|(s, c)| *s > flushed && as_read(c) == got);
        prop_assert!(allowed, "block {} holds content nobody wrote since the flush", b);
        if let Some((s, c)) = h.last() {
            if *s <= cp {
                prop_assert!(got == as_read(c), "block {} lost seq {} although the replica claims up to {}", b, s, cp);
            }
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 100, ..ProptestConfig::default() })]
    #[test]
    fn recovery_claims_only_what_survived(
        ops in prop::collection::vec(op(), 1..40),
        lose in prop::collection::vec(any::<bool>(), BLOCKS as usize),
    ) {
        run(&ops, &lose)?;
    }
}

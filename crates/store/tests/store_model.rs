//! Model-based test: random sequences of write / trim / flush / crash-and-reopen against a
//! `BTreeMap` model, for both stores. After a crash each block must hold its last flushed
//! content or content written after that flush; without a crash, exactly the last write.

mod common;

use std::collections::{BTreeMap, BTreeSet};

use common::{DiskHarness, Harness, MemHarness};
use hlstore_core::{Epoch, Offset, Seq};
use hlstore_store::{BlockWrite, Change, ReplicaStore, VolumeRecord, BLOCK_SIZE};
use proptest::prelude::*;

const BLOCKS: u64 = 32;
const BS: usize = BLOCK_SIZE as usize;

#[derive(Debug, Clone)]
enum Op {
    Write {
        block: u64,
        count: u64,
    },
    /// Several writes (they may overlap) applied as one `write_many` group.
    Group {
        writes: Vec<(u64, u64)>,
        fua: bool,
    },
    Trim {
        block: u64,
        count: u64,
    },
    WriteZeroes {
        block: u64,
        count: u64,
    },
    Flush,
    Fua {
        block: u64,
    },
    Crash,
}

fn op() -> impl Strategy<Value = Op> {
    let range = (0..BLOCKS).prop_flat_map(|b| (Just(b), 1..=(BLOCKS - b).min(6)));
    prop_oneof![
        6 => range.clone().prop_map(|(block, count)| Op::Write { block, count }),
        3 => (proptest::collection::vec(range.clone(), 1..6), any::<bool>())
            .prop_map(|(writes, fua)| Op::Group { writes, fua }),
        2 => range.clone().prop_map(|(block, count)| Op::Trim { block, count }),
        1 => range.prop_map(|(block, count)| Op::WriteZeroes { block, count }),
        2 => Just(Op::Flush),
        1 => (0..BLOCKS).prop_map(|block| Op::Fua { block }),
        1 => Just(Op::Crash),
    ]
}

/// Block content written at `seq` (0 = zeroes).
fn content(seq: u64, block: u64) -> Vec<u8> {
    if seq == 0 {
        return vec![0; BS];
    }
    let mut d = Vec::with_capacity(BS);
    while d.len() < BS {
        d.extend_from_slice(&seq.to_le_bytes());
        d.extend_from_slice(&block.to_le_bytes());
    }
    d
}

/// Per block: the last flushed value and every value written since (seq; 0 = zeroes).
#[derive(Default)]
struct Model {
    current: BTreeMap<u64, u64>,
    durable: BTreeMap<u64, u64>,
    since_flush: BTreeMap<u64, BTreeSet<u64>>,
    /// Allocated blocks and the seq that wrote them: what the change index must list and
    /// what `allocated_bytes` must count (re-read from the store after a crash).
    index: BTreeMap<u64, u64>,
}

impl Model {
    fn set(&mut self, block: u64, seq: u64) {
        self.index.insert(block, seq);
        self.current.insert(block, seq);
        self.since_flush.entry(block).or_default().insert(seq);
    }
    fn flush(&mut self) {
        self.durable = self.current.clone();
        self.since_flush.clear();
    }
}

/// The blocks `changes_since(0)` lists, with their seqs (a block listed twice fails).
fn block_index(s: &impl ReplicaStore) -> BTreeMap<u64, u64> {
    let mut out = BTreeMap::new();
    for c in s.changes_since("m", Epoch(1), Seq(0)).unwrap() {
        if let Change::Block { offset, seq } = c {
            assert!(out.insert(offset / BLOCK_SIZE, seq).is_none(), "block {} listed twice", offset / BLOCK_SIZE);
        }
    }
    out
}

fn run<H: Harness>(mut h: H, ops: Vec<Op>) -> Result<(), TestCaseError> {
    let s = h.store();
    s.create(VolumeRecord::new("m", BLOCKS * BLOCK_SIZE)).unwrap();
    s.open("m", Epoch(1)).unwrap();
    drop(s);
    let mut m = Model::default();
    let mut seq = 0u64;
    for op in ops {
        let s = h.store();
        match op {
            Op::Write { block, count } => {
                seq += 1;
                let data: Vec<u8> = (block..block + count).flat_map(|b| content(seq, b)).collect();
                s.write("m", Epoch(1), Seq(seq), Offset(block * BLOCK_SIZE), &data, false).unwrap();
                (block..block + count).for_each(|b| m.set(b, seq));
            }
            Op::Group { writes, fua } => {
                let mut datas = Vec::new();
                for &(block, count) in &writes {
                    seq += 1;
                    datas.push((seq, block, (block..block + count).flat_map(|b| content(seq, b)).collect::<Vec<u8>>()));
                }
                let group: Vec<BlockWrite<'_>> = datas
                    .iter()
                    .map(|(seq, block, data)| BlockWrite { seq: Seq(*seq), offset: Offset(block * BLOCK_SIZE), data })
                    .collect();
                let durable = s.write_many("m", Epoch(1), &group, fua).unwrap();
                for (seq, block, data) in &datas {
                    (*block..block + data.len() as u64 / BLOCK_SIZE).for_each(|b| m.set(b, *seq));
                }
                if fua {
                    prop_assert!(durable.get() >= seq, "a FUA group returned durable {durable:?} < {seq}");
                    m.flush();
                }
            }
            Op::Fua { block } => {
                seq += 1;
                s.write("m", Epoch(1), Seq(seq), Offset(block * BLOCK_SIZE), &content(seq, block), true).unwrap();
                m.set(block, seq);
                m.flush();
            }
            Op::Trim { block, count } => {
                seq += 1;
                s.trim("m", Epoch(1), Seq(seq), Offset(block * BLOCK_SIZE), count * BLOCK_SIZE).unwrap();
                (block..block + count).for_each(|b| {
                    m.set(b, 0);
                    m.index.remove(&b);
                });
            }
            Op::WriteZeroes { block, count } => {
                seq += 1;
                s.write_zeroes("m", Epoch(1), Seq(seq), Offset(block * BLOCK_SIZE), count * BLOCK_SIZE).unwrap();
                (block..block + count).for_each(|b| {
                    m.set(b, 0);
                    m.index.insert(b, seq);
                });
            }
            Op::Flush => {
                s.flush("m", Epoch(1)).unwrap();
                m.flush();
            }
            Op::Crash => {
                drop(s);
                h.crash();
                let s = h.store();
                let all = s.read("m", Epoch(1), Offset(0), BLOCKS * BLOCK_SIZE).unwrap();
                for b in 0..BLOCKS {
                    let got = &all[b as usize * BS..(b as usize + 1) * BS];
                    let durable = m.durable.get(&b).copied().unwrap_or(0);
                    let mut allowed: Vec<u64> = vec![durable];
                    allowed.extend(m.since_flush.get(&b).into_iter().flatten().copied());
                    let hit = allowed.iter().find(|&&v| content(v, b) == got);
                    prop_assert!(
                        hit.is_some(),
                        "block {b} after crash holds neither old nor new content (allowed seqs {allowed:?})"
                    );
                    m.current.insert(b, *hit.unwrap());
                }
                m.flush();
                m.index = block_index(&*s);
                continue;
            }
        }
        let s = h.store();
        let all = s.read("m", Epoch(1), Offset(0), BLOCKS * BLOCK_SIZE).unwrap();
        for b in 0..BLOCKS {
            let want = content(m.current.get(&b).copied().unwrap_or(0), b);
            prop_assert!(all[b as usize * BS..(b as usize + 1) * BS] == want[..], "block {b} differs from the model");
        }
        let allocated = s.state("m").unwrap().allocated_bytes;
        prop_assert_eq!(allocated, m.index.len() as u64 * BLOCK_SIZE, "allocated bytes");
        prop_assert_eq!(block_index(&*s), m.index.clone(), "the change index lists each block once, at its last seq");
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn disk_store_matches_model(ops in proptest::collection::vec(op(), 1..60)) {
        run(DiskHarness::new(), ops)?;
    }

    #[test]
    fn mem_store_matches_model(ops in proptest::collection::vec(op(), 1..60)) {
        run(MemHarness::new(), ops)?;
    }
}

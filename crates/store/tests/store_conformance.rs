//! One conformance suite for every `ReplicaStore` implementation (in-memory and on-disk).
//! Each test is instantiated for both stores by the `suite!` macro at the bottom.

mod common;

use common::{DiskHarness, Harness, MemHarness};
use hlstore_core::ErrorKind;
use hlstore_core::{Epoch, Offset, Seq};
use hlstore_store::Change;
use hlstore_store::{ChunkData, History, HistoryEntry, ReplicaStore, ResyncChunk, VolumeRecord, BLOCK_SIZE};

const BS: u64 = BLOCK_SIZE;

fn block(fill: u8) -> Vec<u8> {
    vec![fill; BS as usize]
}

/// Creates `name` with `blocks` blocks and opens it at epoch 1.
fn make<H: Harness>(h: &H, name: &str, blocks: u64) {
    h.store().create(VolumeRecord::new(name, blocks * BS)).unwrap();
    h.store().open(name, Epoch(1)).unwrap();
}

fn create_list_delete<H: Harness>(h: H) {
    let s = h.store();
    let info = s.create(VolumeRecord::new("v1", 16 * BS)).unwrap();
    assert_eq!(info.state.allocated_bytes, 0);
    // Idempotent for the same definition; AlreadyExists for another.
    s.create(VolumeRecord::new("v1", 16 * BS)).unwrap();
    let err = s.create(VolumeRecord::new("v1", 32 * BS)).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::AlreadyExists);
    s.create(VolumeRecord::new("v2", 8 * BS)).unwrap();
    let names: Vec<String> = s.list().unwrap().into_iter().map(|i| i.record.volume_id).collect();
    assert_eq!(names, ["v1", "v2"]);
    assert!(s.delete("v1").unwrap());
    assert!(!s.delete("v1").unwrap());
    assert_eq!(s.info("v1").unwrap_err().kind(), ErrorKind::NotFound);
    assert_eq!(s.list().unwrap().len(), 1);
    for bad in ["", ".hidden", "a/b", "sp ace"] {
        assert_eq!(s.create(VolumeRecord::new(bad, BS)).unwrap_err().kind(), ErrorKind::InvalidArgument, "{bad:?}");
    }
    assert_eq!(s.create(VolumeRecord::new("odd", 1000)).unwrap_err().kind(), ErrorKind::InvalidArgument);
    assert_eq!(s.create(VolumeRecord::new("zero", 0)).unwrap_err().kind(), ErrorKind::InvalidArgument);
}

fn write_read_roundtrip<H: Harness>(h: H) {
    make(&h, "v", 64);
    let s = h.store();
    assert_eq!(
        s.read("v", Epoch(1), Offset(0), 4 * BS).unwrap(),
        vec![0; 4 * BS as usize],
        "unwritten blocks read as zeroes"
    );
    let mut data = Vec::new();
    for i in 0..8u8 {
        data.extend_from_slice(&block(i + 1));
    }
    s.write("v", Epoch(1), Seq(1), Offset(4 * BS), &data, false).unwrap();
    assert_eq!(s.read("v", Epoch(1), Offset(4 * BS), 8 * BS).unwrap(), data);
    // A read spanning written and unwritten blocks.
    let r = s.read("v", Epoch(1), Offset(2 * BS), 4 * BS).unwrap();
    assert_eq!(&r[..2 * BS as usize], &vec![0; 2 * BS as usize][..]);
    assert_eq!(&r[2 * BS as usize..], &data[..2 * BS as usize]);
    // Overwrite part of it.
    s.write("v", Epoch(1), Seq(2), Offset(5 * BS), &block(0xee), false).unwrap();
    let r = s.read("v", Epoch(1), Offset(4 * BS), 3 * BS).unwrap();
    assert_eq!(&r[BS as usize..2 * BS as usize], &block(0xee)[..]);
    assert_eq!(&r[2 * BS as usize..], &block(3)[..]);
    assert_eq!(s.state("v").unwrap().allocated_bytes, 8 * BS);
    assert_eq!(s.state("v").unwrap().last_seq, 2);
}

fn rejects_bad_ranges<H: Harness>(h: H) {
    make(&h, "v", 16);
    let s = h.store();
    s.write("v", Epoch(1), Seq(1), Offset(0), &block(7), false).unwrap();
    let unaligned = s.write("v", Epoch(1), Seq(2), Offset(100), &block(1), false).unwrap_err();
    assert_eq!(unaligned.kind(), ErrorKind::InvalidArgument);
    assert!(unaligned.to_string().contains("multiples of 4096"), "{unaligned}");
    assert_eq!(
        s.write("v", Epoch(1), Seq(2), Offset(0), &[1u8; 100], false).unwrap_err().kind(),
        ErrorKind::InvalidArgument
    );
    let oor = s.write("v", Epoch(1), Seq(2), Offset(16 * BS), &block(1), false).unwrap_err();
    assert_eq!(oor.kind(), ErrorKind::OutOfRange);
    assert!(oor.to_string().contains("volume v"), "{oor}");
    assert_eq!(s.read("v", Epoch(1), Offset(15 * BS), 2 * BS).unwrap_err().kind(), ErrorKind::OutOfRange);
    assert_eq!(
        s.read("v", Epoch(1), Offset(u64::MAX - BS + 1), BS).unwrap_err().kind(),
        ErrorKind::OutOfRange,
        "offset+len overflows"
    );
    assert_eq!(s.read("v", Epoch(1), Offset((u64::MAX / BS) * BS), 2 * BS).unwrap_err().kind(), ErrorKind::OutOfRange);
    assert_eq!(s.trim("v", Epoch(1), Seq(2), Offset(8 * BS), 9 * BS).unwrap_err().kind(), ErrorKind::OutOfRange);
    // Nothing changed.
    assert_eq!(s.read("v", Epoch(1), Offset(0), BS).unwrap(), block(7));
    assert_eq!(s.state("v").unwrap().last_seq, 1);
    assert_eq!(s.read("nope", Epoch(1), Offset(0), BS).unwrap_err().kind(), ErrorKind::NotFound);
}

fn epoch_fencing<H: Harness>(h: H) {
    make(&h, "v", 16);
    let s = h.store();
    s.write("v", Epoch(1), Seq(1), Offset(0), &block(1), false).unwrap();
    assert_eq!(s.open("v", Epoch(3)).unwrap().epoch, 3);
    for err in [
        s.write("v", Epoch(1), Seq(2), Offset(0), &block(2), false).unwrap_err(),
        s.read("v", Epoch(1), Offset(0), BS).unwrap_err(),
        s.flush("v", Epoch(1)).unwrap_err(),
        s.trim("v", Epoch(1), Seq(2), Offset(0), BS).unwrap_err(),
        s.open("v", Epoch(2)).unwrap_err(),
    ] {
        assert_eq!(err.kind(), ErrorKind::StaleEpoch, "{err}");
    }
    // A newer epoch than the opened one must be opened first.
    assert_eq!(
        s.write("v", Epoch(4), Seq(2), Offset(0), &block(2), false).unwrap_err().kind(),
        ErrorKind::InvalidArgument
    );
    assert_eq!(s.read("v", Epoch(3), Offset(0), BS).unwrap(), block(1));
    // The epoch is durable.
    drop(s);
    let mut h = h;
    h.crash();
    assert_eq!(h.store().state("v").unwrap().epoch, 3);
    assert_eq!(
        h.store().write("v", Epoch(2), Seq(2), Offset(0), &block(2), false).unwrap_err().kind(),
        ErrorKind::StaleEpoch
    );
}

fn trim_frees_space<H: Harness>(h: H) {
    make(&h, "v", 256);
    let s = h.store();
    let data: Vec<u8> = (0..64 * BS).map(|i| (i % 251) as u8).collect();
    s.write("v", Epoch(1), Seq(1), Offset(0), &data, false).unwrap();
    s.flush("v", Epoch(1)).unwrap();
    assert_eq!(s.state("v").unwrap().allocated_bytes, 64 * BS);
    s.trim("v", Epoch(1), Seq(2), Offset(16 * BS), 32 * BS).unwrap();
    assert_eq!(s.state("v").unwrap().allocated_bytes, 32 * BS);
    assert_eq!(s.read("v", Epoch(1), Offset(16 * BS), 32 * BS).unwrap(), vec![0; 32 * BS as usize]);
    assert_eq!(s.read("v", Epoch(1), Offset(0), 16 * BS).unwrap(), &data[..16 * BS as usize]);
    // Trim of a range with nothing allocated is fine and changes nothing.
    s.trim("v", Epoch(1), Seq(3), Offset(128 * BS), 128 * BS).unwrap();
    assert_eq!(s.state("v").unwrap().allocated_bytes, 32 * BS);
    // write_zeroes without a hole keeps the blocks allocated.
    s.write_zeroes("v", Epoch(1), Seq(4), Offset(16 * BS), 4 * BS).unwrap();
    assert_eq!(s.state("v").unwrap().allocated_bytes, 36 * BS);
    assert_eq!(s.read("v", Epoch(1), Offset(16 * BS), 4 * BS).unwrap(), vec![0; 4 * BS as usize]);
    h.after_flush_space_check("v", 36 * BS);
}

fn thin_provisioning<H: Harness>(h: H) {
    let s = h.store();
    s.create(VolumeRecord::new("big", 1 << 40)).unwrap();
    s.open("big", Epoch(1)).unwrap();
    assert_eq!(s.state("big").unwrap().allocated_bytes, 0);
    s.write("big", Epoch(1), Seq(1), Offset((1 << 40) - BS), &block(9), false).unwrap();
    s.write("big", Epoch(1), Seq(2), Offset(1 << 39), &block(8), false).unwrap();
    s.flush("big", Epoch(1)).unwrap();
    assert_eq!(s.state("big").unwrap().allocated_bytes, 2 * BS);
    assert_eq!(s.read("big", Epoch(1), Offset((1 << 40) - BS), BS).unwrap(), block(9));
    h.after_flush_space_check("big", 2 * BS);
}

fn flush_survives_crash<H: Harness>(mut h: H) {
    make(&h, "v", 64);
    let s = h.store();
    for seq in 1..=10u64 {
        s.write("v", Epoch(1), Seq(seq), Offset(seq * BS), &block(seq as u8), false).unwrap();
    }
    assert_eq!(s.flush("v", Epoch(1)).unwrap(), Seq(10));
    s.write("v", Epoch(1), Seq(11), Offset(11 * BS), &block(11), true).unwrap();
    s.write("v", Epoch(1), Seq(12), Offset(12 * BS), &block(12), false).unwrap();
    s.write("v", Epoch(1), Seq(13), Offset(BS), &block(13), false).unwrap();
    drop(s);
    h.crash();
    let s = h.store();
    for seq in 2..=11u64 {
        assert_eq!(s.read("v", Epoch(1), Offset(seq * BS), BS).unwrap(), block(seq as u8), "flushed block {seq}");
    }
    let b1 = s.read("v", Epoch(1), Offset(BS), BS).unwrap();
    assert!(b1 == block(1) || b1 == block(13), "block 1 holds its old or new content");
    let b12 = s.read("v", Epoch(1), Offset(12 * BS), BS).unwrap();
    assert!(b12 == block(0) || b12 == block(12));
    let st = s.state("v").unwrap();
    assert!(st.durable_seq >= 11);
}

fn expand_grows<H: Harness>(h: H) {
    make(&h, "v", 16);
    let s = h.store();
    s.write("v", Epoch(1), Seq(1), Offset(15 * BS), &block(5), false).unwrap();
    let info = s.expand("v", Epoch(1), 32 * BS).unwrap();
    assert_eq!(info.record.size, 32 * BS);
    s.write("v", Epoch(1), Seq(2), Offset(31 * BS), &block(6), false).unwrap();
    assert_eq!(s.read("v", Epoch(1), Offset(15 * BS), 17 * BS).unwrap()[..BS as usize], block(5)[..]);
    assert_eq!(s.read("v", Epoch(1), Offset(31 * BS), BS).unwrap(), block(6));
    assert_eq!(s.expand("v", Epoch(1), 8 * BS).unwrap_err().kind(), ErrorKind::InvalidArgument);
    assert_eq!(s.expand("v", Epoch(1), 40 * BS + 1).unwrap_err().kind(), ErrorKind::InvalidArgument);
    assert_eq!(s.info("v").unwrap().record.size, 32 * BS);
}

fn changes_since_lists_exactly<H: Harness>(h: H) {
    make(&h, "v", 64);
    let s = h.store();
    s.write("v", Epoch(1), Seq(1), Offset(0), &block(1), false).unwrap();
    s.write("v", Epoch(1), Seq(2), Offset(10 * BS), &[block(2), block(2)].concat(), false).unwrap();
    s.write("v", Epoch(1), Seq(3), Offset(20 * BS), &block(3), false).unwrap();
    s.write("v", Epoch(1), Seq(4), Offset(0), &block(4), false).unwrap(); // overwrites seq 1
    s.trim("v", Epoch(1), Seq(5), Offset(20 * BS), 4 * BS).unwrap(); // removes seq 3
    s.write("v", Epoch(1), Seq(6), Offset(30 * BS), &block(6), false).unwrap();
    let c = s.changes_since("v", Epoch(1), Seq(2)).unwrap();
    assert_eq!(
        c,
        vec![
            Change::Trim { offset: 20 * BS, len: 4 * BS, seq: 5 },
            Change::Block { offset: 0, seq: 4 },
            Change::Block { offset: 30 * BS, seq: 6 },
        ]
    );
    let all = s.changes_since("v", Epoch(1), Seq(0)).unwrap();
    let blocks: Vec<u64> = all
        .iter()
        .filter_map(|c| match c {
            Change::Block { offset, .. } => Some(offset / BS),
            _ => None,
        })
        .collect();
    assert_eq!(blocks, [0, 10, 11, 30]);
    assert!(s.changes_since("v", Epoch(1), Seq(6)).unwrap().is_empty());
}

fn resync_never_overwrites_newer<H: Harness>(h: H) {
    make(&h, "v", 64);
    let s = h.store();
    s.begin_resync("v", Epoch(1), Seq(0), false, History::default()).unwrap();
    assert_eq!(s.state("v").unwrap().resync_from, Some(0));
    s.write("v", Epoch(1), Seq(10), Offset(0), &block(10), false).unwrap(); // foreground write during resync
    let chunks = vec![
        ResyncChunk { offset: 0, seq: 5, data: ChunkData::Data(block(5).into()) }, // older: skipped
        ResyncChunk { offset: BS, seq: 6, data: ChunkData::Data(block(6).into()) },
        ResyncChunk { offset: 2 * BS, seq: 7, data: ChunkData::Data(block(7).into()) },
        ResyncChunk { offset: 3 * BS, seq: 8, data: ChunkData::Zero },
    ];
    let stats = s.apply_resync("v", Epoch(1), &chunks).unwrap();
    assert_eq!((stats.applied, stats.skipped_newer), (3, 1));
    assert_eq!(s.read("v", Epoch(1), Offset(0), BS).unwrap(), block(10));
    assert_eq!(s.read("v", Epoch(1), Offset(BS), BS).unwrap(), block(6));
    // A zero block is kept as a one-block trim, which a resync from this replica carries on.
    let zero = Change::Trim { offset: 3 * BS, len: BS, seq: 8 };
    assert!(
        s.changes_since("v", Epoch(1), Seq(7)).unwrap().contains(&zero),
        "{:?}",
        s.changes_since("v", Epoch(1), Seq(7))
    );
    // A trim chunk removes only blocks older than itself.
    s.write("v", Epoch(1), Seq(11), Offset(4 * BS), &block(11), false).unwrap();
    let trim = ResyncChunk { offset: 0, seq: 9, data: ChunkData::Trim(8 * BS) };
    s.apply_resync("v", Epoch(1), &[trim]).unwrap();
    assert_eq!(s.read("v", Epoch(1), Offset(0), BS).unwrap(), block(10), "seq 10 is newer than the trim");
    assert_eq!(s.read("v", Epoch(1), Offset(BS), BS).unwrap(), block(0), "seq 6 is older than the trim");
    assert_eq!(s.read("v", Epoch(1), Offset(4 * BS), BS).unwrap(), block(11));
    let bad = ResyncChunk { offset: 0, seq: 12, data: ChunkData::Data(vec![1; 10].into()) };
    assert_eq!(s.apply_resync("v", Epoch(1), &[bad]).unwrap_err().kind(), ErrorKind::InvalidArgument);
    let st = s.end_resync("v", Epoch(1)).unwrap();
    assert_eq!(st.resync_from, None);
    assert_eq!(st.durable_seq, st.last_seq);
}

fn resync_checkpoints_resume_only_the_same_resync<H: Harness>(mut h: H) {
    make(&h, "v", 64);
    let s = h.store();
    assert_eq!(
        s.checkpoint_resync("v", Epoch(1), Offset(0)).unwrap_err().kind(),
        ErrorKind::InvalidArgument,
        "no resync"
    );
    assert_eq!(s.begin_resync("v", Epoch(1), Seq(3), true, History::default()).unwrap().resync_done, None);
    let chunks: Vec<_> = (0..8)
        .map(|i| ResyncChunk { offset: i * BS, seq: 4 + i, data: ChunkData::Data(block(i as u8).into()) })
        .collect();
    s.apply_resync("v", Epoch(1), &chunks).unwrap();
    let st = s.checkpoint_resync("v", Epoch(1), Offset(8 * BS)).unwrap();
    assert_eq!(st.resync_done, Some((8 * BS, 11)), "checkpoint at the durable seq");
    assert_eq!(st.durable_seq, 11);
    // Survives later writes and a crash; kept by a resume of the same resync under the
    // same epoch.
    s.apply_resync("v", Epoch(1), &[ResyncChunk { offset: 9 * BS, seq: 12, data: ChunkData::Data(block(9).into()) }])
        .unwrap();
    s.flush("v", Epoch(1)).unwrap();
    drop(s);
    h.crash();
    let s = h.store();
    assert_eq!(s.state("v").unwrap().resync_done, Some((8 * BS, 11)));
    assert_eq!(s.read("v", Epoch(1), Offset(7 * BS), BS).unwrap(), block(7), "checkpointed data is durable");
    assert_eq!(
        s.begin_resync("v", Epoch(1), Seq(3), true, History::default()).unwrap().resync_done,
        Some((8 * BS, 11))
    );
    // Dropped when not resuming, from another point, or under another epoch.
    s.checkpoint_resync("v", Epoch(1), Offset(8 * BS)).unwrap();
    assert_eq!(s.begin_resync("v", Epoch(1), Seq(3), false, History::default()).unwrap().resync_done, None);
    s.checkpoint_resync("v", Epoch(1), Offset(8 * BS)).unwrap();
    assert_eq!(s.begin_resync("v", Epoch(1), Seq(2), true, History::default()).unwrap().resync_done, None);
    s.checkpoint_resync("v", Epoch(1), Offset(8 * BS)).unwrap();
    s.open("v", Epoch(2)).unwrap();
    assert_eq!(s.begin_resync("v", Epoch(2), Seq(2), true, History::default()).unwrap().resync_done, None);
    // The split change list: blocks below the checkpoint only when written after its seq.
    s.write("v", Epoch(2), Seq(20), Offset(2 * BS), &block(20), false).unwrap();
    let split = s.changes_since_split("v", Epoch(2), Seq(3), (4 * BS, 11)).unwrap();
    let blocks: Vec<u64> = split
        .iter()
        .filter_map(|c| match c {
            Change::Block { offset, .. } => Some(offset / BS),
            _ => None,
        })
        .collect();
    assert_eq!(blocks, [2, 4, 5, 6, 7, 9]);
    let st = s.end_resync("v", Epoch(2)).unwrap();
    assert_eq!((st.resync_from, st.resync_done), (None, None));
}

/// The clean prefix a replica reports: how far it holds the history with no gap (what the
/// engine's source choice and resync start rely on).
fn clean_prefix(st: &hlstore_store::ReplicaState) -> u64 {
    st.resync_from.map_or(st.last_seq, |f| f.min(st.last_seq)).min(st.durable_seq)
}

fn power_cut_before_a_flush_claims_only_what_survived<H: Harness>(mut h: H) {
    make(&h, "v", 64);
    let s = h.store();
    s.write("v", Epoch(1), Seq(1), Offset(0), &block(1), false).unwrap();
    s.write("v", Epoch(1), Seq(2), Offset(BS), &block(2), false).unwrap();
    assert_eq!(s.flush("v", Epoch(1)).unwrap(), Seq(2));
    // Unflushed: an overwrite of block 0 (twice), a new block 5, an overwrite of block 1.
    s.write("v", Epoch(1), Seq(3), Offset(0), &block(3), false).unwrap();
    s.write("v", Epoch(1), Seq(4), Offset(0), &block(4), false).unwrap();
    s.write("v", Epoch(1), Seq(5), Offset(5 * BS), &block(5), false).unwrap();
    s.write("v", Epoch(1), Seq(6), Offset(BS), &block(6), false).unwrap();
    drop(s);
    h.power_cut();
    let s = h.store();
    // Every block holds the content of a write the replica still claims, or older.
    assert_eq!(
        s.read("v", Epoch(1), Offset(0), BS).unwrap(),
        block(1),
        "both unflushed overwrites of block 0 were lost"
    );
    assert_eq!(s.read("v", Epoch(1), Offset(BS), BS).unwrap(), block(2));
    assert_eq!(s.read("v", Epoch(1), Offset(5 * BS), BS).unwrap(), block(0));
    let st = s.state("v").unwrap();
    assert_eq!(clean_prefix(&st), 2, "the replica lost seqs 3..=6 and must not claim them: {st:?}");
    assert!(st.durable_seq <= 2, "durable_seq claims lost writes: {st:?}");
    // A later flush does not bring the claim back.
    s.flush("v", Epoch(1)).unwrap();
    assert_eq!(clean_prefix(&s.state("v").unwrap()), 2, "{:?}", s.state("v").unwrap());
}

fn resync_chunks_below_the_durable_mark_are_flushed_for_real<H: Harness>(mut h: H) {
    make(&h, "v", 64);
    let s = h.store();
    for seq in 1..=10u64 {
        s.write("v", Epoch(1), Seq(seq), Offset((20 + seq) * BS), &block(seq as u8), false).unwrap();
    }
    assert_eq!(s.flush("v", Epoch(1)).unwrap(), Seq(10));
    // A resync copies older blocks (seqs below the durable mark) into blocks 0..8.
    s.begin_resync("v", Epoch(1), Seq(0), false, History::default()).unwrap();
    let chunks: Vec<_> = (0..8)
        .map(|i| ResyncChunk { offset: i * BS, seq: 2 + i, data: ChunkData::Data(block(0x80 + i as u8).into()) })
        .collect();
    s.apply_resync("v", Epoch(1), &chunks).unwrap();
    assert_eq!(s.flush("v", Epoch(1)).unwrap(), Seq(10));
    drop(s);
    h.power_cut();
    let s = h.store();
    for i in 0..8u64 {
        assert_eq!(
            s.read("v", Epoch(1), Offset(i * BS), BS).unwrap(),
            block(0x80 + i as u8),
            "flushed resync block {i}"
        );
    }
}

fn unflushed_resync_chunks_lost_in_a_power_cut_are_copied_again<H: Harness>(mut h: H) {
    make(&h, "v", 64);
    let s = h.store();
    for seq in 1..=10u64 {
        s.write("v", Epoch(1), Seq(seq), Offset((20 + seq) * BS), &block(seq as u8), false).unwrap();
    }
    assert_eq!(s.flush("v", Epoch(1)).unwrap(), Seq(10));
    s.write("v", Epoch(1), Seq(11), Offset(3 * BS), &block(11), true).unwrap();
    s.begin_resync("v", Epoch(1), Seq(1), false, History::default()).unwrap();
    let chunks: Vec<_> = (0..4)
        .map(|i| ResyncChunk { offset: i * BS, seq: 2 + i, data: ChunkData::Data(block(0x80 + i as u8).into()) })
        .collect();
    s.apply_resync("v", Epoch(1), &chunks).unwrap();
    drop(s);
    h.power_cut();
    let s = h.store();
    // Lost chunks read as what the block held before (never a checksum error), and a new
    // resync from the replica's mark copies them again (not skipped as "same seq").
    for i in 0..3u64 {
        assert_eq!(s.read("v", Epoch(1), Offset(i * BS), BS).unwrap(), block(0), "lost resync block {i} rolled back");
    }
    assert_eq!(s.read("v", Epoch(1), Offset(3 * BS), BS).unwrap(), block(11), "a newer durable write is kept");
    let st = s.state("v").unwrap();
    assert!(st.resync_from.is_some_and(|f| f <= 1), "still marked as resyncing: {st:?}");
    let stats = s.apply_resync("v", Epoch(1), &chunks).unwrap();
    assert_eq!((stats.applied, stats.skipped_newer), (3, 1));
    s.flush("v", Epoch(1)).unwrap();
    drop(s);
    h.power_cut();
    for i in 0..3u64 {
        assert_eq!(h.store().read("v", Epoch(1), Offset(i * BS), BS).unwrap(), block(0x80 + i as u8));
    }
}

fn corruption_is_reported<H: Harness>(h: H) {
    make(&h, "v", 16);
    let s = h.store();
    s.write("v", Epoch(1), Seq(1), Offset(0), &[block(1), block(2), block(3)].concat(), false).unwrap();
    s.flush("v", Epoch(1)).unwrap();
    h.corrupt("v", BS + 17);
    let err = s.read("v", Epoch(1), Offset(0), 3 * BS).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Corruption);
    let msg = err.to_string();
    assert!(msg.contains("volume v") && msg.contains(&format!("offset {BS}")), "{msg}");
    // Healthy neighbours still read; the damaged block keeps failing until rewritten.
    assert_eq!(s.read("v", Epoch(1), Offset(0), BS).unwrap(), block(1));
    assert_eq!(s.read("v", Epoch(1), Offset(2 * BS), BS).unwrap(), block(3));
    assert_eq!(s.read("v", Epoch(1), Offset(BS), BS).unwrap_err().kind(), ErrorKind::Corruption);
    s.write("v", Epoch(1), Seq(2), Offset(BS), &block(4), false).unwrap();
    assert_eq!(s.read("v", Epoch(1), Offset(BS), BS).unwrap(), block(4));
}

fn delete_and_recreate<H: Harness>(mut h: H) {
    make(&h, "v", 16);
    h.store().write("v", Epoch(1), Seq(1), Offset(0), &block(1), true).unwrap();
    assert!(h.store().delete("v").unwrap());
    h.crash();
    assert_eq!(h.store().state("v").unwrap_err().kind(), ErrorKind::NotFound);
    make(&h, "v", 16);
    assert_eq!(h.store().read("v", Epoch(1), Offset(0), BS).unwrap(), block(0));
    assert_eq!(h.store().state("v").unwrap().allocated_bytes, 0);
}

fn set_replica_set_is_durable_and_fenced<H: Harness>(mut h: H) {
    make(&h, "v", 16);
    let s = h.store();
    s.write("v", Epoch(1), Seq(1), Offset(0), &block(1), true).unwrap();
    let info = s.set_replica_set("v", Epoch(2), vec!["a".into(), "b".into(), "d".into()]).unwrap();
    assert_eq!((info.record.epoch, info.record.replica_set.clone()), (2, vec!["a".into(), "b".into(), "d".into()]));
    assert_eq!(s.set_replica_set("v", Epoch(1), vec!["x".into()]).unwrap_err().kind(), ErrorKind::StaleEpoch);
    drop(s);
    h.crash();
    let info = h.store().info("v").unwrap();
    assert_eq!(info.record.replica_set, ["a", "b", "d"]);
    assert_eq!(info.record.epoch, 2);
    assert_eq!(h.store().read("v", Epoch(2), Offset(0), BS).unwrap(), block(1));
}

/// Labels are set and removed durably, leave the other labels and the epoch alone, and
/// are checked.
fn set_labels_is_durable_and_keeps_the_rest<H: Harness>(mut h: H) {
    make(&h, "v", 16);
    let s = h.store();
    s.write("v", Epoch(1), Seq(1), Offset(0), &block(1), true).unwrap();
    let one = |k: &str, v: &str| std::collections::BTreeMap::from([(k.to_string(), v.to_string())]);
    s.set_labels("v", one("a", "1")).unwrap();
    let info = s.set_labels("v", one("b", "2")).unwrap();
    assert_eq!(info.record.labels.len(), 2, "{:?}", info.record.labels);
    assert_eq!(info.record.epoch, 1, "labels change no epoch");
    let info = s.set_labels("v", one("a", "")).unwrap();
    assert_eq!(info.record.labels, one("b", "2"), "an empty value removes the label");
    assert_eq!(s.set_labels("v", one("", "x")).unwrap_err().kind(), ErrorKind::InvalidArgument);
    assert_eq!(s.set_labels("v", one("k", &"x".repeat(300))).unwrap_err().kind(), ErrorKind::InvalidArgument);
    assert_eq!(s.set_labels("nope", one("a", "1")).unwrap_err().kind(), ErrorKind::NotFound);
    drop(s);
    h.crash();
    let info = h.store().info("v").unwrap();
    assert_eq!(info.record.labels, one("b", "2"));
    assert_eq!(h.store().read("v", Epoch(1), Offset(0), BS).unwrap(), block(1));
}

/// The epoch history is durable at once (set, or with a resync mark), kept by later
/// claims and record changes, and fenced like any write.
fn history_is_durable_and_fenced<H: Harness>(mut h: H) {
    make(&h, "v", 16);
    let s = h.store();
    assert!(s.state("v").unwrap().history.is_empty(), "a new replica has no history");
    let a1 = HistoryEntry { epoch: 1, start: 1 << 40, base: 0 };
    let a2 = HistoryEntry { epoch: 2, start: 2 << 40, base: (1 << 40) + 5 };
    let one = History::from_entries(&[a1]).unwrap();
    let two = History::from_entries(&[a1, a2]).unwrap();
    assert_eq!(s.set_history("v", Epoch(1), one).unwrap().history, one);
    drop(s);
    h.crash();
    let s = h.store();
    assert_eq!(s.state("v").unwrap().history, one);
    s.open("v", Epoch(2)).unwrap();
    assert_eq!(s.set_history("v", Epoch(1), two).unwrap_err().kind(), ErrorKind::StaleEpoch);
    let st = s.begin_resync("v", Epoch(2), Seq(7), true, two).unwrap();
    assert_eq!((st.history, st.resync_from), (two, Some(7)));
    // An empty history with a mark keeps the recorded one.
    assert_eq!(s.begin_resync("v", Epoch(2), Seq(7), true, History::default()).unwrap().history, two);
    s.set_replica_set("v", Epoch(2), vec!["a".into()]).unwrap();
    drop(s);
    h.crash();
    let s = h.store();
    let st = s.state("v").unwrap();
    assert_eq!((st.history, st.resync_from), (two, Some(7)));
}

macro_rules! suite {
    ($($name:ident),* $(,)?) => {
        mod mem {
            use super::*;
            $( #[test] fn $name() { super::$name(MemHarness::new()); } )*
        }
        mod disk {
            use super::*;
            $( #[test] fn $name() { super::$name(DiskHarness::new()); } )*
        }
    };
}

suite!(
    create_list_delete,
    write_read_roundtrip,
    rejects_bad_ranges,
    epoch_fencing,
    trim_frees_space,
    thin_provisioning,
    flush_survives_crash,
    expand_grows,
    changes_since_lists_exactly,
    resync_never_overwrites_newer,
    resync_checkpoints_resume_only_the_same_resync,
    corruption_is_reported,
    delete_and_recreate,
    set_replica_set_is_durable_and_fenced,
    set_labels_is_durable_and_keeps_the_rest,
    power_cut_before_a_flush_claims_only_what_survived,
    resync_chunks_below_the_durable_mark_are_flushed_for_real,
    unflushed_resync_chunks_lost_in_a_power_cut_are_copied_again,
    history_is_durable_and_fenced,
);

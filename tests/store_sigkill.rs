//! Kill -9 a process that writes into a replica store in a loop, reopen the store, and check
//! it against what the process reported as flushed: every flushed write is there and every
//! block holds exactly one write's content (never a mix, never garbage). Three rounds, so
//! recovery of an already-recovered store is exercised too.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use hlstore_core::{Epoch, Offset};
use hlstore_store::{DiskStore, ReplicaStore, BLOCK_SIZE};

const BLOCKS: u64 = 1024;

fn pattern_block(seq: u64) -> u64 {
    seq.wrapping_mul(7919) % BLOCKS
}

/// Decodes a block written by `hlstore debug store-write-loop`: (seq, block) or None for
/// zeroes. Panics on content that is neither.
fn decode(data: &[u8]) -> Option<(u64, u64)> {
    if data.iter().all(|&b| b == 0) {
        return None;
    }
    let seq = u64::from_le_bytes(data[0..8].try_into().unwrap());
    let block = u64::from_le_bytes(data[8..16].try_into().unwrap());
    for rec in data.chunks(16) {
        assert_eq!(rec, [seq.to_le_bytes(), block.to_le_bytes()].concat(), "torn or foreign block content");
    }
    Some((seq, block))
}

/// Runs the writer until it reported `flushes` more flushes (and a bit more), then kills
/// it with SIGKILL. Returns the last flushed seq it reported.
fn run_and_kill(dir: &std::path::Path, write_blocks: u64, flushes: usize) -> u64 {
    let mut child = Command::new(env!("CARGO_BIN_EXE_hlstore"))
        .args(["debug", "store-write-loop", "--blocks", &BLOCKS.to_string(), "--flush-every", "8"])
        .args(["--write-blocks", &write_blocks.to_string(), "--data-dir"])
        .arg(dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start hlstore");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut last_flushed = 0;
    let mut seen = 0;
    let deadline = Instant::now() + Duration::from_secs(120);
    while seen < flushes {
        assert!(Instant::now() < deadline, "writer made no progress");
        let line = lines.next().expect("writer exited early").unwrap();
        if let Some(s) = line.strip_prefix("flushed ") {
            last_flushed = s.parse().unwrap();
            seen += 1;
        }
    }
    // Let it run on past the last flush we know about, so unflushed writes are in flight.
    std::thread::sleep(Duration::from_millis(30));
    // SAFETY: kill(2) with a pid we own and a valid signal number.
    let rc = unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
    assert_eq!(rc, 0, "kill failed");
    let status = child.wait().unwrap();
    assert!(!status.success(), "the writer must have been killed");
    // Drain what it printed before dying: flushes reported are durable too.
    for line in lines.map_while(Result::ok) {
        if let Some(s) = line.strip_prefix("flushed ") {
            last_flushed = s.parse().unwrap();
        }
    }
    last_flushed
}

fn check(dir: &std::path::Path, write_blocks: u64, flushed: u64) {
    let store = DiskStore::open(dir).expect("reopen needs no manual repair");
    let st = store.state("crash").unwrap();
    assert!(st.last_seq >= flushed, "store lost flushed writes: last_seq {} < flushed {flushed}", st.last_seq);
    let covers = |seq: u64, b: u64| {
        let first = pattern_block(seq);
        b >= first && b < (first + write_blocks).min(BLOCKS)
    };
    // The newest write covering each block among the flushed ones.
    let mut must_have = vec![0u64; BLOCKS as usize];
    for seq in 1..=flushed {
        let first = pattern_block(seq);
        for b in first..(first + write_blocks).min(BLOCKS) {
            must_have[b as usize] = seq;
        }
    }
    let all = store.read("crash", Epoch(1), Offset(0), BLOCKS * BLOCK_SIZE).expect("no block may fail its checksum");
    for b in 0..BLOCKS {
        let data = &all[(b * BLOCK_SIZE) as usize..((b + 1) * BLOCK_SIZE) as usize];
        match decode(data) {
            None => assert_eq!(must_have[b as usize], 0, "block {b}: flushed write seq {} lost", must_have[b as usize]),
            Some((seq, block)) => {
                assert_eq!(block, b, "block {b} holds another block's data");
                assert!(covers(seq, b), "block {b} holds seq {seq}, which never wrote it");
                assert!(
                    seq >= must_have[b as usize],
                    "block {b}: holds seq {seq}, older than flushed seq {}",
                    must_have[b as usize]
                );
                assert!(seq <= st.last_seq, "block {b}: seq {seq} beyond last_seq {}", st.last_seq);
            }
        }
    }
}

fn kill_rounds(write_blocks: u64) {
    let dir = tempfile::tempdir().unwrap();
    for round in 0..3 {
        let flushed = run_and_kill(dir.path(), write_blocks, 40 + round * 20);
        assert!(flushed > 0);
        check(dir.path(), write_blocks, flushed);
    }
}

#[test]
fn sigkill_mid_write_loop_4k_writes() {
    kill_rounds(1);
}

#[test]
fn sigkill_mid_write_loop_multiblock_writes() {
    kill_rounds(16);
}

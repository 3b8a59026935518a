//! Measures what a chunker and a zstd level would store for one file, without a
//! repository: unique chunks, compressed bytes (plus per-blob overhead) and single-core
//! compression speed. Used to choose the defaults recorded in `benches/README.md`.
//!
//! Usage: cargo run --release -p hlstore-backup --example chunk_sizes -- FILE [LEVEL...]

use std::collections::HashSet;
use std::time::Instant;

use hlstore_backup::chunk::{cdc, is_zero};
use hlstore_backup::ChunkerConfig;

fn main() {
    let mut args = std::env::args().skip(1);
    let path = args.next().expect("usage: chunk_sizes FILE [LEVEL...]");
    let mut levels: Vec<i32> = args.map(|a| a.parse().expect("zstd level")).collect();
    if levels.is_empty() {
        levels = vec![1, 3];
    }
    let data = std::fs::read(&path).expect("read file");
    let configs = [
        ChunkerConfig::Fixed { size: 64 << 10 },
        ChunkerConfig::Cdc { min: 16 << 10, avg: 64 << 10, max: 256 << 10 },
        ChunkerConfig::Cdc { min: 64 << 10, avg: 256 << 10, max: 1 << 20 },
        ChunkerConfig::Cdc { min: 128 << 10, avg: 512 << 10, max: 2 << 20 },
        ChunkerConfig::Cdc { min: 256 << 10, avg: 1 << 20, max: 4 << 20 },
    ];
    println!("| chunker | chunks | unique MiB | zstd | stored MiB | MB/s (1 core, compress) |");
    println!("|---|---|---|---|---|---|");
    for c in configs {
        let t = Instant::now();
        let mut chunks: Vec<&[u8]> = Vec::new();
        let mut pos = 0;
        while pos < data.len() {
            let n = match c {
                ChunkerConfig::Fixed { size } => (size as usize).min(data.len() - pos),
                ChunkerConfig::Cdc { min, avg, max } => {
                    cdc::cut(&data[pos..], min as usize, avg as usize, max as usize)
                }
            };
            chunks.push(&data[pos..pos + n]);
            pos += n;
        }
        let cut_s = t.elapsed().as_secs_f64();
        let mut seen = HashSet::new();
        let unique: Vec<&[u8]> =
            chunks.iter().copied().filter(|c| !is_zero(c) && seen.insert(*blake3::hash(c).as_bytes())).collect();
        let unique_bytes: usize = unique.iter().map(|c| c.len()).sum();
        for &level in &levels {
            let t = Instant::now();
            let stored: usize = unique
                .iter()
                .map(|c| {
                    let z = zstd::bulk::compress(c, level).unwrap().len();
                    z.min(c.len()) + 40 + 45
                })
                .sum();
            let s = t.elapsed().as_secs_f64();
            println!(
                "| {c:?} | {} | {:.1} | {level} | {:.1} | {:.0} (cut {:.0}) |",
                chunks.len(),
                unique_bytes as f64 / 1048576.0,
                stored as f64 / 1048576.0,
                unique_bytes as f64 / 1e6 / s,
                data.len() as f64 / 1e6 / cut_s
            );
        }
    }
}

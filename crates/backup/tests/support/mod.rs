//! Shared test helpers: generated images and repositories.

#![allow(dead_code)]

pub mod weed;

use std::path::Path;
use std::sync::Arc;

use hlstore_backup::{backend::Backend, ChunkerConfig, FsBackend, KdfParams, RepoConfig, Repository};
use rand::{RngCore, SeedableRng};

pub const PASSWORD: &[u8] = b"correct horse battery staple";

/// Cheap argon2 parameters for tests (real ones are stored per key file).
pub fn test_kdf() -> KdfParams {
    KdfParams { m_cost_kib: 64, t_cost: 1, p_cost: 1 }
}

/// Small packs and chunks so tests exercise many packs; one fixed chunker for every source
/// (the version 1 layout), so tests can reason about chunk boundaries.
pub fn test_config() -> RepoConfig {
    RepoConfig {
        chunker: ChunkerConfig::Fixed { size: 16 * 1024 },
        file_chunker: None,
        pack_size: 1 << 20,
        ..RepoConfig::default()
    }
}

pub fn init_repo(backend: Arc<dyn Backend>, config: RepoConfig) -> Repository {
    Repository::init(backend, PASSWORD, config, test_kdf()).unwrap()
}

pub fn fs_repo(dir: &Path) -> (Arc<dyn Backend>, Repository) {
    let b: Arc<dyn Backend> = Arc::new(FsBackend::new(dir));
    let r = init_repo(b.clone(), test_config());
    (b, r)
}

/// An image mixing random data, zero runs, repeated text and repeated blocks. Images of
/// different seeds share no stored chunk.
pub fn mixed_image(size: usize, seed: u64) -> Vec<u8> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut out = Vec::with_capacity(size);
    let text = format!("image {seed}: the quick brown fox jumps over the lazy dog.\n").into_bytes();
    let mut k = 0u64;
    while out.len() < size {
        let run = (37 * 1024 + (rng.next_u32() as usize % (300 * 1024))).min(size - out.len());
        match k % 4 {
            0 => {
                let s = out.len();
                out.resize(s + run, 0);
                rng.fill_bytes(&mut out[s..]);
            }
            1 => out.resize(out.len() + run, 0),
            2 => {
                for i in 0..run {
                    out.push(text[i % text.len()]);
                }
            }
            _ => {
                // Copy an earlier region (dedup within the image).
                let from = rng.next_u32() as usize % out.len().max(1);
                let n = run.min(out.len() - from);
                let copy = out[from..from + n].to_vec();
                out.extend_from_slice(&copy);
                if n == 0 {
                    out.push(1);
                }
            }
        }
        k += 1;
    }
    out.truncate(size);
    out
}

/// Incompressible random bytes.
pub fn random_image(size: usize, seed: u64) -> Vec<u8> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut v = vec![0u8; size];
    rng.fill_bytes(&mut v);
    v
}

/// Overwrites `runs` random `len`-byte runs with fresh random data.
pub fn scatter_changes(img: &mut [u8], runs: usize, len: usize, seed: u64) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    for _ in 0..runs {
        let off = rng.next_u64() as usize % (img.len() - len);
        rng.fill_bytes(&mut img[off..off + len]);
    }
}

pub fn blake(b: &[u8]) -> String {
    blake3::hash(b).to_hex().to_string()
}

pub fn write(path: &Path, data: &[u8]) {
    std::fs::write(path, data).unwrap();
}

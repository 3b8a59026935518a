//! Content-defined chunking with a gear rolling hash and normalized chunking (FastCDC, Xia
//! et al. 2016): a stricter mask before the average size and a looser one after it keeps
//! chunk sizes close to the average.

/// The gear table: 256 pseudo-random u64s from a fixed splitmix64 sequence (part of the
/// format: changing it changes every CDC cut point).
fn gear() -> &'static [u64; 256] {
    static TABLE: std::sync::OnceLock<[u64; 256]> = std::sync::OnceLock::new();
    TABLE.get_or_init(|| {
        let mut t = [0u64; 256];
        let mut x: u64 = 0x6a09_e667_f3bc_c908;
        for v in t.iter_mut() {
            x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = x;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            *v = z ^ (z >> 31);
        }
        t
    })
}

fn mask(bits: u32) -> u64 {
    // Spread the one bits over the high half of the word, where the gear hash mixes best.
    if bits == 0 {
        0
    } else {
        u64::MAX << (64 - bits.min(63))
    }
}

/// Length of the first chunk of `data` (which is either the whole remaining source or at
/// least `max` bytes long). Returns `data.len()` when no cut point is found before the end.
///
/// A chunk that would start with `max` zero bytes is cut at `max` without hashing (free
/// space in filesystem images): all-zero chunks are holes, never stored.
pub fn cut(data: &[u8], min: usize, avg: usize, max: usize) -> usize {
    let n = data.len();
    if n <= min {
        return n;
    }
    if n >= max && super::is_zero(&data[..max]) {
        return max;
    }
    let end = n.min(max);
    let bits = (avg as f64).log2().round() as u32;
    let mask_s = mask(bits + 1);
    let mask_l = mask(bits.saturating_sub(1));
    let g = gear();
    let mut h: u64 = 0;
    let mid = avg.min(end);
    let mut i = min;
    while i < mid {
        h = (h << 1).wrapping_add(g[data[i] as usize]);
        if h & mask_s == 0 {
            return i + 1;
        }
        i += 1;
    }
    while i < end {
        h = (h << 1).wrapping_add(g[data[i] as usize]);
        if h & mask_l == 0 {
            return i + 1;
        }
        i += 1;
    }
    end
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{RngCore, SeedableRng};

    fn cuts(data: &[u8]) -> Vec<usize> {
        let mut out = Vec::new();
        let mut pos = 0;
        while pos < data.len() {
            let n = cut(&data[pos..], 16 * 1024, 64 * 1024, 256 * 1024);
            out.push(pos + n);
            pos += n;
        }
        out
    }

    #[test]
    fn sizes_stay_in_bounds_and_insertions_resync() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut data = vec![0u8; 4 << 20];
        rng.fill_bytes(&mut data);
        let a = cuts(&data);
        let mut prev = 0;
        for &c in &a[..a.len() - 1] {
            assert!(c - prev >= 16 * 1024 && c - prev <= 256 * 1024);
            prev = c;
        }
        let avg = data.len() / a.len();
        assert!(avg > 32 * 1024 && avg < 128 * 1024, "avg {avg}");
        // Insert 100 bytes near the start: later cut points shift by exactly 100.
        let mut b = data[..1000].to_vec();
        b.extend_from_slice(&[9u8; 100]);
        b.extend_from_slice(&data[1000..]);
        let cb: std::collections::HashSet<usize> = cuts(&b).into_iter().collect();
        let shared = a.iter().filter(|&&c| cb.contains(&(c + 100))).count();
        assert!(shared * 10 >= a.len() * 9, "{shared} of {}", a.len());
    }
}

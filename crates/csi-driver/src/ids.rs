//! Mapping between CSI names/ids and hlstore names.
//!
//! - volume id = the hlstore volume name. A CSI name that is already a valid hlstore name
//!   (1-128 of `[A-Za-z0-9._-]`, not starting with `.`; Kubernetes' `pvc-<uuid>` is) is used
//!   as is; anything else is mapped deterministically to `<cleaned prefix>-<hash>`, so the
//!   same name always gives the same id (CreateVolume idempotency).
//! - snapshot id = `<volume>@<snapshot>`; `@` never occurs in a volume name.

use crate::error::{CsiError, Result};

/// Longest hlstore volume (and snapshot) name.
pub const MAX_NAME: usize = 128;
/// Hex digits of the hash suffix of a mapped name.
const HASH_HEX: usize = 16;

/// Whether `s` is usable as an hlstore volume or snapshot name.
pub fn is_valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_NAME
        && !s.starts_with('.')
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// FNV-1a, 64 bit: stable across versions and platforms (unlike `DefaultHasher`).
fn fnv64(data: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in data {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// The hlstore name for a CSI name (volume or snapshot).
pub fn name_for(csi_name: &str) -> String {
    if is_valid_name(csi_name) {
        return csi_name.to_string();
    }
    let mut clean: String = csi_name
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') { c } else { '-' })
        .take(MAX_NAME - HASH_HEX - 1)
        .collect();
    while clean.starts_with('.') {
        clean.remove(0);
    }
    format!("{clean}-{:016x}", fnv64(csi_name.as_bytes())).trim_start_matches('-').to_string()
}

/// `<volume>@<snapshot>`.
pub fn snapshot_id(volume: &str, snapshot: &str) -> String {
    format!("{volume}@{snapshot}")
}

/// Splits a snapshot id; malformed ids are `InvalidArgument`.
pub fn parse_snapshot_id(id: &str) -> Result<(String, String)> {
    match id.split_once('@') {
        Some((v, s)) if is_valid_name(v) && is_valid_name(s) => Ok((v.to_string(), s.to_string())),
        _ => Err(CsiError::InvalidArgument(format!("snapshot id {id:?} is not of the form <volume>@<snapshot>"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kubernetes_names_are_kept() {
        let n = "pvc-3f1c2a9e-5b7d-4c1e-9a0b-1234567890ab";
        assert_eq!(name_for(n), n);
    }

    #[test]
    fn other_names_map_deterministically_to_valid_distinct_names() {
        let a = name_for("my volume/1");
        assert_eq!(a, name_for("my volume/1"));
        assert!(is_valid_name(&a), "{a}");
        assert!(a.starts_with("my-volume-1-"), "{a}");
        assert_ne!(a, name_for("my volume/2"));
        assert_ne!(a, name_for("my-volume-1"));
        let long = "x".repeat(300);
        let m = name_for(&long);
        assert!(is_valid_name(&m) && m.len() <= MAX_NAME, "{m}");
        assert_ne!(m, name_for(&"x".repeat(301)));
        assert!(is_valid_name(&name_for("...hidden")));
        assert!(is_valid_name(&name_for("ünïcödé")));
    }

    #[test]
    fn snapshot_ids_round_trip_and_reject_garbage() {
        let id = snapshot_id("vol-1", "snap.a");
        assert_eq!(parse_snapshot_id(&id).unwrap(), ("vol-1".to_string(), "snap.a".to_string()));
        for bad in ["", "novolume", "@s", "v@", "v@s@t", "v w@s"] {
            assert!(parse_snapshot_id(bad).is_err(), "{bad:?}");
        }
    }
}

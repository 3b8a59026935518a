//! The password-protected key file (`keys/<id>`): argon2id parameters, salt and the sealed
//! master key. Several key files may exist (one per password); any one opens the repository.

use argon2::{Algorithm, Argon2, Block, Params, Version};
use rand::RngCore;
use serde::{Deserialize, Serialize};

use super::{open_with, seal_with, MasterKey};
use crate::error::{Error, Result};

/// Environment knob for the argon2id cost used by `init`: `m_kib,t,p` (e.g. `8,1,1` in tests).
pub const KDF_ENV: &str = "HLSTORE_KDF_PARAMS";

/// Argon2id cost parameters, stored in the key file.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct KdfParams {
    pub m_cost_kib: u32,
    pub t_cost: u32,
    pub p_cost: u32,
}

impl Default for KdfParams {
    /// 64 MiB, 3 passes: about a second on a Raspberry Pi 4.
    fn default() -> Self {
        KdfParams { m_cost_kib: 64 * 1024, t_cost: 3, p_cost: 1 }
    }
}

impl KdfParams {
    /// The defaults, overridden by `HLSTORE_KDF_PARAMS` when set.
    pub fn from_env() -> Result<Self> {
        let Ok(v) = std::env::var(KDF_ENV) else {
            return Ok(Self::default());
        };
        let parts: Vec<u32> = v
            .split(',')
            .map(|s| s.trim().parse::<u32>())
            .collect::<std::result::Result<_, _>>()
            .map_err(|_| Error::Invalid(format!("{KDF_ENV}={v:?} is not `m_kib,t,p`")))?;
        match parts[..] {
            [m, t, p] => Ok(KdfParams { m_cost_kib: m, t_cost: t, p_cost: p }),
            _ => Err(Error::Invalid(format!("{KDF_ENV}={v:?} is not `m_kib,t,p`"))),
        }
    }

    fn derive(&self, password: &[u8], salt: &[u8]) -> Result<[u8; 32]> {
        let params = Params::new(self.m_cost_kib, self.t_cost, self.p_cost, Some(32))
            .map_err(|e| Error::Invalid(format!("argon2 parameters: {e}")))?;
        let mut out = [0u8; 32];
        let blocks = params.block_count();
        let argon = Argon2::new(Algorithm::Argon2id, Version::V0x13, params);
        let hashed = match HugeMemory::new(blocks) {
            Some(memory) => argon.hash_password_into_with_memory(password, salt, &mut out, memory),
            None => argon.hash_password_into(password, salt, &mut out),
        };
        hashed.map_err(|e| Error::Invalid(format!("argon2: {e}")))?;
        Ok(out)
    }
}

/// Argon2's working memory (64 MiB by default) mapped for transparent huge pages, where
/// the kernel grants them on request (`madvise` mode, Debian's default): touching it in
/// 4 KiB pages was 16,000 page faults, a quarter of the time a repository takes to open.
struct HugeMemory {
    blocks: *mut Block,
    count: usize,
    map: *mut libc::c_void,
    map_len: usize,
}

impl HugeMemory {
    const HUGE_PAGE: usize = 2 << 20;

    /// `count` zeroed blocks, or None if the mapping fails (the caller then lets argon2
    /// allocate).
    fn new(count: usize) -> Option<Self> {
        let bytes = count.checked_mul(std::mem::size_of::<Block>())?;
        let map_len = bytes.checked_add(Self::HUGE_PAGE)?;
        // SAFETY: an anonymous private mapping with no address hint: it aliases nothing.
        let map = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if map == libc::MAP_FAILED {
            return None;
        }
        // The first huge-page boundary in the mapping: `bytes` from it still lie inside.
        let start = (map as usize).div_ceil(Self::HUGE_PAGE) * Self::HUGE_PAGE;
        // SAFETY: [start, start + bytes) lies inside the mapping made above; a refused
        // advice only means small pages.
        unsafe { libc::madvise(start as *mut libc::c_void, bytes, libc::MADV_HUGEPAGE) };
        Some(Self { blocks: start as *mut Block, count, map, map_len })
    }
}

impl AsMut<[Block]> for HugeMemory {
    fn as_mut(&mut self) -> &mut [Block] {
        // SAFETY: `blocks` is 2 MiB-aligned (more than `Block`'s 64) and `count` blocks
        // from it lie inside the mapping, which lives as long as `self` and is reached
        // only through this exclusive borrow; anonymous mappings start zeroed, and all
        // zeros is a valid `Block` (an array of u64).
        unsafe { std::slice::from_raw_parts_mut(self.blocks, self.count) }
    }
}

impl Drop for HugeMemory {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping `new` made; no borrow of it outlives `self`.
        unsafe { libc::munmap(self.map, self.map_len) };
    }
}

/// Serialized key file.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyFile {
    pub version: u32,
    pub kdf: String,
    pub params: KdfParams,
    pub salt: String,
    /// hex of `nonce || ciphertext || tag` of the 64-byte master key.
    pub sealed: String,
    pub created: u64,
}

const AAD: &[u8] = b"hlstore-keyfile-v1";

impl KeyFile {
    /// Seals `key` under `password`.
    pub fn create(key: &MasterKey, password: &[u8], params: KdfParams) -> Result<Self> {
        let mut salt = [0u8; 16];
        rand::thread_rng().fill_bytes(&mut salt);
        let kek = params.derive(password, &salt)?;
        Ok(KeyFile {
            version: 1,
            kdf: "argon2id".into(),
            params,
            salt: hex::encode(salt),
            sealed: hex::encode(seal_with(&kek, &key.to_bytes(), AAD)),
            created: crate::snapshot::now_secs(),
        })
    }

    /// Opens the master key; a wrong password is [`Error::WrongPassword`].
    pub fn open(&self, password: &[u8], object: &str) -> Result<MasterKey> {
        if self.kdf != "argon2id" {
            return Err(Error::corrupt(object, format!("unknown kdf {:?}", self.kdf)));
        }
        let salt = hex::decode(&self.salt).map_err(|_| Error::corrupt(object, "bad salt"))?;
        let sealed = hex::decode(&self.sealed).map_err(|_| Error::corrupt(object, "bad sealed key"))?;
        let kek = self.params.derive(password, &salt)?;
        let plain = open_with(&kek, &sealed, AAD).ok_or(Error::WrongPassword)?;
        MasterKey::from_bytes(&plain).ok_or_else(|| Error::corrupt(object, "bad key length"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrong_password_is_reported() {
        let p = KdfParams { m_cost_kib: 8, t_cost: 1, p_cost: 1 };
        let k = MasterKey::generate();
        let f = KeyFile::create(&k, b"right", p).unwrap();
        let k2 = f.open(b"right", "keys/x").unwrap();
        assert_eq!(k.to_bytes(), k2.to_bytes());
        assert!(matches!(f.open(b"wrong", "keys/x"), Err(Error::WrongPassword)));
    }
}

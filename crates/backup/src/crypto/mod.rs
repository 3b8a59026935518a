//! Cryptography: the repository master key, the password-protected key file, chunk ids and
//! the authenticated-encryption envelope every stored object uses.
//!
//! Invariants: every ciphertext is XChaCha20-Poly1305 with a fresh random 24-byte nonce and
//! associated data naming what the bytes are (chunk id, object kind), so a blob cannot be
//! swapped for another undetected; chunk ids are BLAKE3 keyed by a secret, so they reveal
//! nothing about content to someone without the password.

mod keyfile;

pub use keyfile::{KdfParams, KeyFile};

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use rand::RngCore;

use crate::chunk::ChunkId;
use crate::error::{Error, Result};

/// Nonce length of XChaCha20-Poly1305.
pub const NONCE_LEN: usize = 24;
/// Authentication tag length.
pub const TAG_LEN: usize = 16;
/// Bytes an encryption adds to a plaintext.
pub const OVERHEAD: usize = NONCE_LEN + TAG_LEN;

/// The repository's secrets: the data encryption key and the chunk-id key.
#[derive(Clone)]
pub struct MasterKey {
    enc: [u8; 32],
    id: [u8; 32],
}

impl std::fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MasterKey(..)")
    }
}

impl MasterKey {
    /// A fresh random key.
    pub fn generate() -> Self {
        let mut k = MasterKey { enc: [0; 32], id: [0; 32] };
        rand::thread_rng().fill_bytes(&mut k.enc);
        rand::thread_rng().fill_bytes(&mut k.id);
        k
    }

    pub(crate) fn to_bytes(&self) -> [u8; 64] {
        let mut out = [0u8; 64];
        out[..32].copy_from_slice(&self.enc);
        out[32..].copy_from_slice(&self.id);
        out
    }

    pub(crate) fn from_bytes(b: &[u8]) -> Option<Self> {
        if b.len() != 64 {
            return None;
        }
        let mut k = MasterKey { enc: [0; 32], id: [0; 32] };
        k.enc.copy_from_slice(&b[..32]);
        k.id.copy_from_slice(&b[32..]);
        Some(k)
    }

    /// The keyed-BLAKE3 id of a chunk's plaintext.
    pub fn chunk_id(&self, data: &[u8]) -> ChunkId {
        ChunkId(*blake3::keyed_hash(&self.id, data).as_bytes())
    }

    /// Encrypts `plain` as `nonce || ciphertext || tag`, bound to `aad`.
    pub fn seal(&self, plain: &[u8], aad: &[u8]) -> Vec<u8> {
        seal_with(&self.enc, plain, aad)
    }

    /// [`MasterKey::open`] in place: decrypts `sealed` where it lies and returns the
    /// plaintext, a slice of it (no copy of the ciphertext).
    pub fn open_in_place<'a>(&self, sealed: &'a mut [u8], aad: &[u8], object: &str) -> Result<&'a [u8]> {
        use chacha20poly1305::aead::AeadInPlace;
        let damaged = || Error::corrupt(object, "authentication failed (data damaged)");
        if sealed.len() < OVERHEAD {
            return Err(damaged());
        }
        let (nonce, rest) = sealed.split_at_mut(NONCE_LEN);
        let (msg, tag) = rest.split_at_mut(rest.len() - TAG_LEN);
        XChaCha20Poly1305::new((&self.enc).into())
            .decrypt_in_place_detached(XNonce::from_slice(nonce), aad, msg, chacha20poly1305::Tag::from_slice(tag))
            .map_err(|_| damaged())?;
        Ok(msg)
    }

    /// Decrypts what [`MasterKey::seal`] produced; `object` names it in errors.
    pub fn open(&self, sealed: &[u8], aad: &[u8], object: &str) -> Result<Vec<u8>> {
        open_with(&self.enc, sealed, aad).ok_or_else(|| Error::corrupt(object, "authentication failed (data damaged)"))
    }
}

pub(crate) fn seal_with(key: &[u8; 32], plain: &[u8], aad: &[u8]) -> Vec<u8> {
    let cipher = XChaCha20Poly1305::new(key.into());
    let mut nonce = [0u8; NONCE_LEN];
    rand::thread_rng().fill_bytes(&mut nonce);
    let ct = cipher
        .encrypt(XNonce::from_slice(&nonce), Payload { msg: plain, aad })
        .expect("XChaCha20-Poly1305 encryption of an in-memory buffer cannot fail");
    let mut out = Vec::with_capacity(NONCE_LEN + ct.len());
    out.extend_from_slice(&nonce);
    out.extend_from_slice(&ct);
    out
}

pub(crate) fn open_with(key: &[u8; 32], sealed: &[u8], aad: &[u8]) -> Option<Vec<u8>> {
    if sealed.len() < OVERHEAD {
        return None;
    }
    let cipher = XChaCha20Poly1305::new(key.into());
    let (nonce, ct) = sealed.split_at(NONCE_LEN);
    cipher.decrypt(XNonce::from_slice(nonce), Payload { msg: ct, aad }).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_open_round_trip_and_tamper() {
        let k = MasterKey::generate();
        let s = k.seal(b"hello", b"aad");
        assert_eq!(k.open(&s, b"aad", "x").unwrap(), b"hello");
        assert!(k.open(&s, b"other", "x").is_err());
        let mut bad = s.clone();
        bad[30] ^= 1;
        assert!(k.open(&bad, b"aad", "x").is_err());
        let k2 = MasterKey::generate();
        assert!(k2.open(&s, b"aad", "x").is_err());
    }

    #[test]
    fn chunk_ids_are_keyed() {
        let a = MasterKey::generate();
        let b = MasterKey::generate();
        assert_eq!(a.chunk_id(b"x"), a.chunk_id(b"x"));
        assert_ne!(a.chunk_id(b"x"), b.chunk_id(b"x"));
        assert_ne!(a.chunk_id(b"x").0, *blake3::hash(b"x").as_bytes());
    }
}

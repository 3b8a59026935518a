//! `Repository`: init, open (password → master key), index loading and snapshot IO.

use std::collections::HashSet;
use std::sync::Arc;

use super::config::RepoConfig;
use crate::backend::Backend;
use crate::crypto::{KdfParams, KeyFile, MasterKey};
use crate::error::{Error, Result};
use crate::index::{decode_index, encode_index, IndexedPack, MasterIndex};
use crate::pack::{self, pack_id_from_key, FOOTER_LEN};
use crate::snapshot::{Snapshot, SnapshotMeta};

/// An opened repository.
pub struct Repository {
    backend: Arc<dyn Backend>,
    key: MasterKey,
    config: RepoConfig,
    /// The key file the password opened (`keys/<id>`).
    key_id: String,
}

/// One key file (password) of the repository.
#[derive(Debug, Clone, serde::Serialize)]
pub struct KeyInfo {
    /// Key file id (`keys/<id>`).
    pub id: String,
    /// Unix seconds.
    pub created: u64,
    pub kdf: String,
    pub params: KdfParams,
    /// True for the key the current password opened.
    pub current: bool,
}

impl std::fmt::Debug for Repository {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Repository")
            .field("location", &self.backend.location())
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// The master index and how it was assembled.
#[derive(Debug, Default)]
pub struct IndexLoad {
    pub index: MasterIndex,
    /// Index files that were read.
    pub index_files: Vec<String>,
    /// Index files that could not be read, with the reason.
    pub bad_index_files: Vec<(String, String)>,
    /// Packs no index file mentions, recovered from their own trailers.
    pub unindexed: Vec<IndexedPack>,
    /// Packs no index mentions whose trailer is unreadable.
    pub bad_packs: Vec<(String, String)>,
    /// Sizes of every stored pack (from one LIST).
    pub pack_sizes: std::collections::HashMap<String, u64>,
}

impl Repository {
    /// Creates a new repository; fails if one exists.
    pub fn init(backend: Arc<dyn Backend>, password: &[u8], config: RepoConfig, kdf: KdfParams) -> Result<Repository> {
        config.validate()?;
        match backend.get("config") {
            Ok(_) => return Err(Error::RepositoryExists(backend.location())),
            Err(Error::NotFound(_)) => {}
            Err(e) => return Err(e),
        }
        let key = MasterKey::generate();
        let kf = KeyFile::create(&key, password, kdf)?;
        let kid = hex::encode(rand::random::<[u8; 8]>());
        backend.put(&format!("keys/{kid}"), &serde_json::to_vec_pretty(&kf).unwrap_or_default())?;
        backend.put("config", &serde_json::to_vec_pretty(&config).unwrap_or_default())?;
        Ok(Repository { backend, key, config, key_id: kid })
    }

    /// The repository's configuration (stored unencrypted: readable without the password,
    /// e.g. while the key is being derived).
    pub fn read_config(backend: &dyn Backend) -> Result<RepoConfig> {
        let raw = match backend.get("config") {
            Ok(b) => b,
            Err(Error::NotFound(_)) => return Err(Error::NoRepository(backend.location())),
            Err(e) => return Err(e),
        };
        let config: RepoConfig = serde_json::from_slice(&raw).map_err(|e| Error::corrupt("config", e.to_string()))?;
        config.validate()?;
        Ok(config)
    }

    /// Opens an existing repository with a password.
    pub fn open(backend: Arc<dyn Backend>, password: &[u8]) -> Result<Repository> {
        let config = Self::read_config(backend.as_ref())?;
        let keys = backend.list("keys/")?;
        if keys.is_empty() {
            return Err(Error::corrupt("keys/", "no key files"));
        }
        let mut last = Error::WrongPassword;
        for k in keys {
            let b = backend.get(&k.key)?;
            let kf: KeyFile = match serde_json::from_slice(&b) {
                Ok(kf) => kf,
                Err(e) => {
                    last = Error::corrupt(&k.key, e.to_string());
                    continue;
                }
            };
            match kf.open(password, &k.key) {
                Ok(key) => {
                    let key_id = k.key.strip_prefix("keys/").unwrap_or(&k.key).to_string();
                    return Ok(Repository { backend, key, config, key_id });
                }
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    /// Id of the key file the password opened.
    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    /// Every key file (password) of the repository, oldest first.
    pub fn list_keys(&self) -> Result<Vec<KeyInfo>> {
        let mut out = Vec::new();
        for o in self.backend.list("keys/")? {
            let id = o.key.strip_prefix("keys/").unwrap_or(&o.key).to_string();
            let b = self.backend.get(&o.key)?;
            let kf: KeyFile = serde_json::from_slice(&b).map_err(|e| Error::corrupt(&o.key, e.to_string()))?;
            let current = id == self.key_id;
            out.push(KeyInfo { id, created: kf.created, kdf: kf.kdf, params: kf.params, current });
        }
        out.sort_by(|a, b| (a.created, &a.id).cmp(&(b.created, &b.id)));
        Ok(out)
    }

    /// Adds a password: a new key file sealing the same master key. Returns its id.
    pub fn add_key(&self, password: &[u8], kdf: KdfParams) -> Result<String> {
        if password.is_empty() {
            return Err(Error::Invalid("empty password".into()));
        }
        let kf = KeyFile::create(&self.key, password, kdf)?;
        let id = hex::encode(rand::random::<[u8; 8]>());
        self.backend.put(&format!("keys/{id}"), &serde_json::to_vec_pretty(&kf).unwrap_or_default())?;
        Ok(id)
    }

    /// Removes a password (a unique id prefix is enough). The key in use and the last key
    /// cannot be removed (use [`Repository::change_password`] for the one in use).
    pub fn remove_key(&self, id: &str) -> Result<String> {
        let keys = self.list_keys()?;
        let m: Vec<&KeyInfo> = keys.iter().filter(|k| !id.is_empty() && k.id.starts_with(id)).collect();
        let k = match m[..] {
            [k] => k,
            [] => return Err(Error::Invalid(format!("no key matches id {id:?}"))),
            _ => return Err(Error::Invalid(format!("key id prefix {id:?} is ambiguous"))),
        };
        if k.current {
            return Err(Error::Invalid(format!(
                "key {} is the one this password opened; change it with `hlstore backup key passwd`, or remove it with another password",
                k.id
            )));
        }
        if keys.len() < 2 {
            return Err(Error::Invalid("cannot remove the last key".into()));
        }
        self.backend.delete(&format!("keys/{}", k.id))?;
        Ok(k.id.clone())
    }

    /// Replaces the current password: writes a key file for `new` (same master key), then
    /// deletes the one the old password opened. Returns the new key id.
    pub fn change_password(&mut self, new: &[u8], kdf: KdfParams) -> Result<String> {
        let id = self.add_key(new, kdf)?;
        self.backend.delete(&format!("keys/{}", self.key_id))?;
        self.key_id = id.clone();
        Ok(id)
    }

    pub fn backend(&self) -> &Arc<dyn Backend> {
        &self.backend
    }

    pub fn key(&self) -> &MasterKey {
        &self.key
    }

    pub fn config(&self) -> &RepoConfig {
        &self.config
    }

    /// Loads every index file and recovers packs that no index mentions from their
    /// trailers. Cost: one LIST of `index/`, one of `data/`, a GET per index file and a
    /// ranged GET per unindexed pack — independent of the number of chunks.
    pub fn load_index(&self) -> Result<IndexLoad> {
        let mut out = IndexLoad::default();
        for o in self.backend.list("data/")? {
            if let Some(id) = pack_id_from_key(&o.key) {
                out.pack_sizes.insert(id.to_string(), o.size);
            }
        }
        let mut files = self.backend.list("index/")?;
        files.sort_by(|a, b| a.key.cmp(&b.key));
        for f in files {
            let bytes = match self.backend.get(&f.key) {
                Ok(b) => b,
                Err(Error::NotFound(_)) => continue, // removed by a concurrent prune
                Err(e) => return Err(e),
            };
            match decode_index(&self.key, &bytes, &f.key) {
                Ok(packs) => {
                    for p in &packs {
                        out.index.add_pack(p);
                    }
                    out.index_files.push(f.key);
                }
                Err(e) => out.bad_index_files.push((f.key, e.to_string())),
            }
        }
        let mut orphans: Vec<(String, u64)> =
            out.pack_sizes.iter().filter(|(id, _)| !out.index.has_pack(id)).map(|(id, s)| (id.clone(), *s)).collect();
        orphans.sort();
        for (id, size) in orphans {
            match self.read_pack_trailer(&id, size) {
                Ok(entries) => {
                    let p = IndexedPack { id, len: size, entries };
                    out.index.add_pack(&p);
                    out.unindexed.push(p);
                }
                Err(e) => out.bad_packs.push((id, e.to_string())),
            }
        }
        Ok(out)
    }

    /// Reads a pack's own index with two ranged reads (footer, then trailer).
    pub fn read_pack_trailer(&self, id: &str, size: u64) -> Result<Vec<pack::PackEntry>> {
        let key = pack::pack_key(id);
        if size < (pack::HEADER_LEN + FOOTER_LEN) as u64 {
            return Err(Error::corrupt(format!("pack {id}"), "too short (truncated)"));
        }
        let footer = self.backend.get_range(&key, size - FOOTER_LEN as u64, FOOTER_LEN as u64)?;
        let tlen = pack::parse_footer(&footer, id)? as u64;
        if tlen + (FOOTER_LEN + pack::HEADER_LEN) as u64 > size {
            return Err(Error::corrupt(format!("pack {id}"), "trailer length out of range"));
        }
        let sealed = self.backend.get_range(&key, size - FOOTER_LEN as u64 - tlen, tlen)?;
        pack::parse_trailer(&self.key, &sealed, id, size)
    }

    /// Writes one index file for `packs`; returns its key.
    pub fn write_index(&self, packs: &[IndexedPack]) -> Result<String> {
        let bytes = encode_index(&self.key, packs)?;
        let key = format!("index/{}", blake3::hash(&bytes).to_hex());
        self.backend.put(&key, &bytes)?;
        Ok(key)
    }

    /// Snapshot ids (full hex), unsorted.
    pub fn snapshot_ids(&self) -> Result<Vec<String>> {
        Ok(self
            .backend
            .list("snapshots/")?
            .into_iter()
            .filter_map(|o| o.key.strip_prefix("snapshots/").map(str::to_string))
            .collect())
    }

    /// Resolves a unique id prefix, or a `latest` selector (see [`crate::select`]).
    pub fn resolve_snapshot(&self, prefix: &str) -> Result<String> {
        if let Some(filter) = crate::select::parse_latest(prefix) {
            return crate::select::resolve_latest(prefix, &filter?, &self.list_snapshots()?);
        }
        if prefix.is_empty() {
            return Err(Error::UnknownSnapshot(prefix.into()));
        }
        let m: Vec<String> = self.snapshot_ids()?.into_iter().filter(|id| id.starts_with(prefix)).collect();
        match m.len() {
            0 => Err(Error::UnknownSnapshot(prefix.into())),
            1 => Ok(m.into_iter().next().unwrap_or_default()),
            _ => Err(Error::AmbiguousSnapshot(prefix.into())),
        }
    }

    /// Loads a whole snapshot (metadata and chunk list).
    pub fn load_snapshot(&self, id: &str) -> Result<Snapshot> {
        let key = format!("snapshots/{id}");
        let bytes = match self.backend.get(&key) {
            Ok(b) => b,
            Err(Error::NotFound(_)) => return Err(Error::UnknownSnapshot(id.into())),
            Err(e) => return Err(e),
        };
        Snapshot::decode(&self.key, id, &bytes)
    }

    /// Metadata of every snapshot, oldest first. Unreadable snapshots are errors.
    pub fn list_snapshots(&self) -> Result<Vec<SnapshotMeta>> {
        let mut out = Vec::new();
        for id in self.snapshot_ids()? {
            match self.load_snapshot(&id) {
                Ok(s) => out.push(s.meta),
                Err(Error::UnknownSnapshot(_)) => continue, // forgotten concurrently
                Err(e) => return Err(e),
            }
        }
        out.sort_by(|a, b| (a.time, a.nanos, &a.id).cmp(&(b.time, b.nanos, &b.id)));
        Ok(out)
    }

    /// True when snapshots may reference parts of chunks (format version 2).
    pub fn partial_refs(&self) -> bool {
        self.config.version >= 2
    }

    /// Stores a snapshot (the last step of a backup).
    pub fn save_snapshot(&self, s: &Snapshot) -> Result<()> {
        // Version 1 repositories keep version 1 manifests (older builds read them).
        let version = if self.config.version < 2 { 1 } else { crate::snapshot::VERSION };
        self.backend.put(&format!("snapshots/{}", s.meta.id), &s.encode_as(&self.key, version)?)
    }

    /// Removes a snapshot.
    pub fn forget(&self, id: &str) -> Result<()> {
        self.backend.delete(&format!("snapshots/{id}"))
    }

    /// Packs condemned by prune markers (`trash/`); backups do not dedup against them.
    pub fn condemned_packs(&self) -> Result<HashSet<String>> {
        let mut out = HashSet::new();
        for m in crate::prune::read_markers(self.backend.as_ref())? {
            out.extend(m.1.packs);
        }
        Ok(out)
    }
}

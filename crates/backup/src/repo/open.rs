//! `Repository`: init, open (password → master key), index loading and snapshot IO.

use std::collections::HashSet;
use std::sync::Arc;

use super::config::{RepoConfig, FORMAT_VERSION};
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
        config.chunker.validate()?;
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
        Ok(Repository { backend, key, config })
    }

    /// Opens an existing repository with a password.
    pub fn open(backend: Arc<dyn Backend>, password: &[u8]) -> Result<Repository> {
        let raw = match backend.get("config") {
            Ok(b) => b,
            Err(Error::NotFound(_)) => return Err(Error::NoRepository(backend.location())),
            Err(e) => return Err(e),
        };
        let config: RepoConfig = serde_json::from_slice(&raw).map_err(|e| Error::corrupt("config", e.to_string()))?;
        if config.version != FORMAT_VERSION {
            return Err(Error::UnsupportedVersion(config.version, FORMAT_VERSION));
        }
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
                Ok(key) => return Ok(Repository { backend, key, config }),
                Err(e) => last = e,
            }
        }
        Err(last)
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

    /// Resolves a unique id prefix.
    pub fn resolve_snapshot(&self, prefix: &str) -> Result<String> {
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

    /// Stores a snapshot (the last step of a backup).
    pub fn save_snapshot(&self, s: &Snapshot) -> Result<()> {
        self.backend.put(&format!("snapshots/{}", s.meta.id), &s.encode(&self.key)?)
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

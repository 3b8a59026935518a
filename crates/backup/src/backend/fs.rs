//! Filesystem backend (a local directory, an NFS or TrueNAS share). Atomic puts by writing a
//! temporary file, fsyncing it and renaming it into place.

use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use super::{Backend, ObjectInfo};
use crate::error::{Error, Result};

/// A repository in a directory.
pub struct FsBackend {
    root: PathBuf,
}

impl FsBackend {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        FsBackend { root: root.into() }
    }

    fn path(&self, key: &str) -> PathBuf {
        self.root.join(key)
    }
}

fn map_err(op: &'static str, key: &str, e: std::io::Error) -> Error {
    if e.kind() == std::io::ErrorKind::NotFound {
        Error::NotFound(key.to_string())
    } else {
        Error::io(format!("{op} {key}"), e)
    }
}

impl Backend for FsBackend {
    fn location(&self) -> String {
        format!("file://{}", self.root.display())
    }

    fn put(&self, key: &str, data: &[u8]) -> Result<()> {
        let path = self.path(key);
        let dir = path.parent().unwrap_or(&self.root).to_path_buf();
        fs::create_dir_all(&dir).map_err(|e| map_err("mkdir for", key, e))?;
        let tmp = dir.join(format!(".tmp-{}-{}", std::process::id(), rand::random::<u64>()));
        let res = (|| {
            let mut f = fs::File::create(&tmp)?;
            f.write_all(data)?;
            f.sync_all()?;
            fs::rename(&tmp, &path)?;
            fs::File::open(&dir)?.sync_all()
        })();
        if res.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        res.map_err(|e| map_err("put", key, e))
    }

    fn get(&self, key: &str) -> Result<Vec<u8>> {
        fs::read(self.path(key)).map_err(|e| map_err("get", key, e))
    }

    fn get_range(&self, key: &str, offset: u64, len: u64) -> Result<Vec<u8>> {
        let mut f = fs::File::open(self.path(key)).map_err(|e| map_err("get", key, e))?;
        f.seek(SeekFrom::Start(offset)).map_err(|e| map_err("seek", key, e))?;
        let mut out = Vec::with_capacity(len as usize);
        f.take(len).read_to_end(&mut out).map_err(|e| map_err("read", key, e))?;
        Ok(out)
    }

    fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>> {
        // Walk the directory that contains the prefix, then filter by the full prefix.
        let dir_part = match prefix.rfind('/') {
            Some(i) => &prefix[..i],
            None => "",
        };
        let mut out = Vec::new();
        walk(&self.root, &self.root.join(dir_part), &mut out)?;
        out.retain(|o| o.key.starts_with(prefix));
        Ok(out)
    }

    fn delete(&self, key: &str) -> Result<()> {
        match fs::remove_file(self.path(key)) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(map_err("delete", key, e)),
        }
    }
}

fn walk(root: &Path, dir: &Path, out: &mut Vec<ObjectInfo>) -> Result<()> {
    let rd = match fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::io(format!("list {}", dir.display()), e)),
    };
    for ent in rd {
        let ent = ent.map_err(|e| Error::io(format!("list {}", dir.display()), e))?;
        let name = ent.file_name();
        if name.to_string_lossy().starts_with(".tmp-") {
            continue;
        }
        let ft = ent.file_type().map_err(|e| Error::io(format!("stat {}", ent.path().display()), e))?;
        if ft.is_dir() {
            walk(root, &ent.path(), out)?;
        } else if ft.is_file() {
            let size = ent.metadata().map(|m| m.len()).unwrap_or(0);
            let rel = ent.path();
            let rel = rel.strip_prefix(root).unwrap_or(&rel);
            out.push(ObjectInfo { key: rel.to_string_lossy().replace('\\', "/"), size });
        }
    }
    Ok(())
}

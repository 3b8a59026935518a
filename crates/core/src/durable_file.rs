//! Small state files written so that a power cut leaves the old or the new content, never
//! an empty or half-written file: [`write_atomic`] (temp file in the same directory, fsync
//! it, rename over the target, fsync the directory) and [`sync_dir`].
//!
//! Every state file of the node agent and the CLI goes through here (`node.json`,
//! `attachments.json`, the dev cluster's `cluster.json`). Readers must still be defensive:
//! files written by older versions (plain `fs::write`) can be empty or truncated after a
//! power cut — see `node::adopt_data_dir` and `VolumeManager::restore_attachments` for the
//! rule each file follows.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::Path;

use crate::error::{Error, Result};

/// Suffix of the temp file next to the target (a leftover one is harmless: it is replaced
/// by the next write and never read).
pub const TMP_SUFFIX: &str = ".tmp";

/// Replaces `path` with `body` atomically and durably: after this returns, a power cut
/// leaves `body`; if it is cut short, the old content (or no file, if there was none).
pub fn write_atomic(path: &Path, body: &[u8]) -> Result<()> {
    let dir = parent_of(path);
    let mut tmp_name = path.file_name().unwrap_or_default().to_os_string();
    tmp_name.push(TMP_SUFFIX);
    let tmp = dir.join(tmp_name);
    let ctx = |what: &str, p: &Path| format!("{what} {}", p.display());
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&tmp)
        .map_err(|e| Error::io(ctx("creating", &tmp), e))?;
    f.write_all(body).map_err(|e| Error::io(ctx("writing", &tmp), e))?;
    f.sync_all().map_err(|e| Error::io(ctx("syncing", &tmp), e))?;
    drop(f);
    std::fs::rename(&tmp, path)
        .map_err(|e| Error::io(format!("renaming {} to {}", tmp.display(), path.display()), e))?;
    sync_dir(dir)
}

/// Makes the entries of directory `dir` (creations, renames, removals) durable.
pub fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(|e| Error::io(format!("syncing directory {}", dir.display()), e))
}

/// `create_dir_all` that also makes every directory it created durable (each new entry's
/// parent is synced).
pub fn create_dir_all(dir: &Path) -> Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    let parent = parent_of(dir);
    create_dir_all(parent)?;
    match std::fs::create_dir(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && dir.is_dir() => return Ok(()),
        Err(e) => return Err(Error::io(format!("creating {}", dir.display()), e)),
    }
    sync_dir(parent)
}

fn parent_of(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_content_and_leaves_no_temp_file() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("state.json");
        write_atomic(&p, b"one").unwrap();
        write_atomic(&p, b"two").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        let names: Vec<_> = std::fs::read_dir(d.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, ["state.json"]);
        let nested = d.path().join("a/b/c");
        create_dir_all(&nested).unwrap();
        assert!(nested.is_dir());
        create_dir_all(&nested).unwrap();
    }

    #[test]
    fn a_missing_directory_is_a_clear_error() {
        let d = tempfile::tempdir().unwrap();
        let err = write_atomic(&d.path().join("missing/state.json"), b"x").unwrap_err();
        assert!(err.to_string().contains("missing/state.json.tmp"), "{err}");
    }
}

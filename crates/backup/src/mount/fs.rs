//! `RepoFs`: the FUSE filesystem over a [`Tree`]. Read-only: every write-like request
//! fails with `EROFS` (the mount is read-only too). Requests run on the FUSE threads and
//! block on the backend (a ranged GET per chunk not in the cache).

use std::collections::HashMap;
use std::ffi::OsStr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, UNIX_EPOCH};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, KernelConfig, LockOwner,
    OpenFlags, ReplyAttr, ReplyData, ReplyDirectory, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyXattr, Request,
};

use super::reader::{ChunkSource, ImageReader};
use super::tree::{NodeKind, Tree};
use crate::error::{Error, Result};
use crate::snapshot::Snapshot;

/// How long the kernel may cache names and attributes (the view never changes).
const ATTR_TTL: Duration = Duration::from_secs(3600);
/// Largest read the kernel is asked to send.
const MAX_READ: u32 = 1024 * 1024;
/// Backups whose chunk lists are kept loaded (an open image needs its list).
const LOADED_SNAPSHOTS: usize = 16;

/// The filesystem. Construct with [`RepoFs::new`], mount with [`super::RepoMount`].
pub struct RepoFs {
    tree: Tree,
    chunks: Arc<ChunkSource>,
    loaded: Mutex<HashMap<usize, Arc<Snapshot>>>,
    uid: u32,
    gid: u32,
}

fn errno(op: &str, e: &Error) -> Errno {
    tracing::warn!(fuse.op = op, "backup mount: {e}");
    match e {
        Error::Io { source, .. } => source.raw_os_error().map_or(Errno::EIO, Errno::from_i32),
        _ => Errno::EIO,
    }
}

impl RepoFs {
    pub fn new(tree: Tree, chunks: Arc<ChunkSource>) -> RepoFs {
        // SAFETY: getuid/getgid cannot fail and touch no memory.
        let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
        RepoFs { tree, chunks, loaded: Mutex::new(HashMap::new()), uid, gid }
    }

    fn snapshot(&self, n: usize) -> Result<Arc<Snapshot>> {
        if let Some(s) = self.loaded.lock().ok().and_then(|l| l.get(&n).cloned()) {
            return Ok(s);
        }
        let id = &self.tree.metas()[n].id;
        let s = Arc::new(self.chunks.repo().load_snapshot(id)?);
        if let Ok(mut l) = self.loaded.lock() {
            if l.len() >= LOADED_SNAPSHOTS {
                l.clear();
            }
            l.insert(n, s.clone());
        }
        Ok(s)
    }

    fn attr(&self, ino: INodeNo) -> Option<FileAttr> {
        let node = self.tree.node(ino.0)?;
        let (kind, perm, size) = match &node.kind {
            NodeKind::Dir(_) => (FileType::Directory, 0o555, 0),
            NodeKind::Image(n) => (FileType::RegularFile, 0o444, self.tree.metas()[*n].size),
            NodeKind::Meta(n) => (FileType::RegularFile, 0o444, self.tree.meta_json(*n).len() as u64),
        };
        let t = UNIX_EPOCH + Duration::from_secs(node.time);
        Some(FileAttr {
            ino,
            size,
            blocks: size.div_ceil(512),
            atime: t,
            mtime: t,
            ctime: t,
            crtime: t,
            kind,
            perm,
            nlink: node.nlink,
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            flags: 0,
            blksize: 4096,
        })
    }
}

impl Filesystem for RepoFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        // Only fails by proposing the nearest allowed value: take it.
        if let Err(nearest) = config.set_max_readahead(MAX_READ) {
            let _ = config.set_max_readahead(nearest);
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let found = name.to_str().and_then(|n| self.tree.lookup(parent.0, n)).and_then(|i| self.attr(INodeNo(i)));
        match found {
            Some(attr) => reply.entry(&ATTR_TTL, &attr, Generation(0)),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.attr(ino) {
            Some(attr) => reply.attr(&ATTR_TTL, &attr),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if flags.0 & libc::O_ACCMODE != libc::O_RDONLY {
            return reply.error(Errno::EROFS);
        }
        match self.tree.node(ino.0).map(|n| &n.kind) {
            None => reply.error(Errno::ENOENT),
            Some(NodeKind::Dir(_)) => reply.error(Errno::EISDIR),
            Some(NodeKind::Image(n)) => match self.snapshot(*n) {
                // The contents never change: the page cache may keep them across opens.
                Ok(_) => reply.opened(FileHandle(0), FopenFlags::FOPEN_KEEP_CACHE),
                Err(e) => reply.error(errno("open", &e)),
            },
            Some(NodeKind::Meta(_)) => reply.opened(FileHandle(0), FopenFlags::FOPEN_KEEP_CACHE),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        match self.tree.node(ino.0).map(|n| &n.kind) {
            None => reply.error(Errno::ENOENT),
            Some(NodeKind::Dir(_)) => reply.error(Errno::EISDIR),
            Some(NodeKind::Meta(n)) => {
                let json = self.tree.meta_json(*n);
                let from = (offset as usize).min(json.len());
                let to = from.saturating_add(size as usize).min(json.len());
                reply.data(&json[from..to])
            }
            Some(NodeKind::Image(n)) => {
                let r = self
                    .snapshot(*n)
                    .and_then(|s| ImageReader::new(s, self.chunks.clone()).read(offset, size as usize));
                match r {
                    Ok(data) => reply.data(&data),
                    Err(e) => reply.error(errno("read", &e)),
                }
            }
        }
    }

    fn readdir(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        let Some(node) = self.tree.node(ino.0) else {
            return reply.error(Errno::ENOENT);
        };
        let NodeKind::Dir(entries) = &node.kind else {
            return reply.error(Errno::ENOTDIR);
        };
        let dots = [(ino.0, ".".to_string()), (node.parent, "..".to_string())];
        let all = dots.iter().map(|(i, n)| (*i, n.as_str())).chain(entries.iter().map(|(n, i)| (*i, n.as_str())));
        for (k, (child, name)) in all.enumerate().skip(offset as usize) {
            let kind = match self.tree.node(child).map(|n| &n.kind) {
                Some(NodeKind::Dir(_)) => FileType::Directory,
                _ => FileType::RegularFile,
            };
            if reply.add(INodeNo(child), (k + 1) as u64, kind, name) {
                break;
            }
        }
        reply.ok()
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let bytes: u64 = self.tree.metas().iter().map(|m| m.size).sum();
        reply.statfs(bytes.div_ceil(4096), 0, 0, self.tree.len() as u64, 0, 4096, 255, 4096);
    }

    // No extended attributes; ENOSYS makes the kernel stop asking.
    fn getxattr(&self, _req: &Request, _ino: INodeNo, _name: &OsStr, _size: u32, reply: ReplyXattr) {
        reply.error(Errno::ENOSYS)
    }

    fn listxattr(&self, _req: &Request, _ino: INodeNo, _size: u32, reply: ReplyXattr) {
        reply.error(Errno::ENOSYS)
    }
}

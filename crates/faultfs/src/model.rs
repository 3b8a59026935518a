//! `Model`: the filesystem state, live and durable, without FUSE (unit-testable).
//!
//! Durability rules (what survives a [`Model::cut`]):
//! - A regular file's content and size become durable only by `fsync`/`fdatasync` of that
//!   file ([`Model::fsync`]). Until then they sit in the file's unsynced op log (writes,
//!   size changes, punched/zeroed ranges).
//! - A directory's entries (create, mkdir, mknod, symlink, link, unlink, rmdir, rename in
//!   or out) become durable only by `fsync` of that directory ([`Model::fsyncdir`]); a
//!   rename across directories needs both. A new file whose entry is durable but whose
//!   content is not comes back empty.
//! - Attributes other than size (mode, owner, times) are not tracked: they keep their live
//!   value for whatever survives.
//! - An inode stays in memory while the kernel holds a reference (lookup count), while any
//!   live entry, durable entry or unsynced directory op names it; so an unlinked file that
//!   is still open keeps its content, and a durable entry always has an inode to point to.
//!
//! At a cut every directory goes back to its durable entries and every file to its durable
//! content ([`CutMode::Drop`]); [`CutMode::Torn`] keeps, per file and per directory, a
//! seeded random prefix of the unsynced op log, and may tear the last kept write at a
//! 512-byte sector boundary. Then whatever the root no longer reaches is dropped. If a torn
//! cut keeps a directory reachable twice (a cross-directory rename half applied), the
//! first entry in name order wins and the other is removed.
//!
//! Inode numbers are never reused, so a kernel reference to an inode dropped by a cut
//! answers `ENOENT` instead of reaching another file.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::ffi::{OsStr, OsString};
use std::time::SystemTime;

use crate::pages::{Pages, PAGE};

/// Inode number.
pub type Ino = u64;
/// The root directory's inode.
pub const ROOT: Ino = 1;
/// Sector size at which a torn write may stop.
pub const SECTOR: u64 = 512;
/// Longest file name accepted.
pub const NAME_MAX: usize = 255;

/// Errors are errno values (the FUSE layer passes them on).
pub type Errno = i32;
pub type Result<T> = std::result::Result<T, Errno>;

/// What an inode is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    File,
    Dir,
    Symlink,
}

/// How a power cut treats unsynced state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CutMode {
    /// Everything not made durable is gone.
    Drop,
    /// A seeded random prefix of each file's and directory's unsynced ops survives.
    Torn { seed: u64 },
}

/// `renameat2` behaviour.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RenameMode {
    Replace,
    NoReplace,
    Exchange,
}

/// Attributes handed to the kernel.
#[derive(Debug, Clone, PartialEq)]
pub struct Attr {
    pub ino: Ino,
    pub kind: Kind,
    pub size: u64,
    pub allocated: u64,
    pub perm: u16,
    pub nlink: u32,
    pub uid: u32,
    pub gid: u32,
    pub atime: SystemTime,
    pub mtime: SystemTime,
    pub ctime: SystemTime,
}

/// Attribute changes of a `setattr`.
#[derive(Debug, Clone, Default)]
pub struct SetAttr {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub atime: Option<SystemTime>,
    pub mtime: Option<SystemTime>,
}

/// Counters for `stats` on the control socket.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Stats {
    pub files: u64,
    pub dirs: u64,
    pub bytes_live: u64,
    pub bytes_unsynced: u64,
    pub unsynced_dir_ops: u64,
    pub open_handles: u64,
    pub cuts: u64,
}

/// What a cut did.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct CutReport {
    /// Inodes that no longer exist.
    pub dropped_inodes: u64,
    /// Unsynced file ops thrown away (whole ops; a torn write counts as kept).
    pub dropped_file_ops: u64,
    /// Unsynced directory ops thrown away.
    pub dropped_dir_ops: u64,
    /// Writes kept only partly (torn mode).
    pub torn_writes: u64,
}

#[derive(Debug, Clone)]
enum FileOp {
    Write { off: u64, data: Vec<u8> },
    SetSize(u64),
    Zero { off: u64, len: u64 },
}

impl FileOp {
    fn apply(&self, p: &mut Pages) {
        match self {
            FileOp::Write { off, data } => p.write(*off, data),
            FileOp::SetSize(s) => p.set_size(*s),
            FileOp::Zero { off, len } => p.zero(*off, *len),
        }
    }

    fn bytes(&self) -> u64 {
        match self {
            FileOp::Write { data, .. } => data.len() as u64,
            FileOp::SetSize(_) => 0,
            FileOp::Zero { len, .. } => *len,
        }
    }
}

#[derive(Debug, Clone)]
enum DirOp {
    Insert(OsString, Ino),
    Remove(OsString),
}

impl DirOp {
    fn apply(&self, entries: &mut BTreeMap<OsString, Ino>) {
        match self {
            DirOp::Insert(n, i) => {
                entries.insert(n.clone(), *i);
            }
            DirOp::Remove(n) => {
                entries.remove(n);
            }
        }
    }

    fn ino(&self) -> Option<Ino> {
        match self {
            DirOp::Insert(_, i) => Some(*i),
            DirOp::Remove(_) => None,
        }
    }
}

#[derive(Debug, Clone, Default)]
struct FileData {
    live: Pages,
    durable: Pages,
    log: Vec<FileOp>,
}

#[derive(Debug, Clone, Default)]
struct DirData {
    live: BTreeMap<OsString, Ino>,
    durable: BTreeMap<OsString, Ino>,
    log: Vec<DirOp>,
    parent: Ino,
}

#[derive(Debug, Clone)]
enum Body {
    File(FileData),
    Dir(DirData),
    Symlink(Vec<u8>),
}

#[derive(Debug, Clone)]
struct Inode {
    body: Body,
    perm: u16,
    uid: u32,
    gid: u32,
    atime: SystemTime,
    mtime: SystemTime,
    ctime: SystemTime,
    /// Live directory entries naming this inode.
    links: u32,
    /// Kernel references (lookups not yet forgotten).
    lookups: u64,
    /// Open handles.
    open: u32,
}

impl Inode {
    fn kind(&self) -> Kind {
        match self.body {
            Body::File(_) => Kind::File,
            Body::Dir(_) => Kind::Dir,
            Body::Symlink(_) => Kind::Symlink,
        }
    }
}

/// A tiny deterministic generator (splitmix64) so a seed means the same cut everywhere.
#[derive(Debug, Clone)]
pub struct SplitMix(u64);

impl SplitMix {
    pub fn new(seed: u64) -> Self {
        SplitMix(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..=n`.
    pub fn upto(&mut self, n: u64) -> u64 {
        if n == u64::MAX {
            return self.next_u64();
        }
        self.next_u64() % (n + 1)
    }
}

/// The filesystem state.
#[derive(Debug)]
pub struct Model {
    inodes: HashMap<Ino, Inode>,
    next_ino: Ino,
    cuts: u64,
    /// Capacity reported by statfs.
    capacity: u64,
}

fn check_name(name: &OsStr) -> Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let b = name.as_bytes();
    if b.is_empty() || b == b"." || b == b".." || b.contains(&b'/') {
        return Err(libc::EINVAL);
    }
    if b.len() > NAME_MAX {
        return Err(libc::ENAMETOOLONG);
    }
    Ok(())
}

impl Model {
    /// An empty filesystem (the root directory only) reporting `capacity` bytes in statfs.
    pub fn new(capacity: u64, uid: u32, gid: u32) -> Self {
        let now = SystemTime::now();
        let root = Inode {
            body: Body::Dir(DirData { parent: ROOT, ..Default::default() }),
            perm: 0o755,
            uid,
            gid,
            atime: now,
            mtime: now,
            ctime: now,
            links: 1,
            lookups: 0,
            open: 0,
        };
        Model { inodes: HashMap::from([(ROOT, root)]), next_ino: ROOT + 1, cuts: 0, capacity }
    }

    fn node(&self, ino: Ino) -> Result<&Inode> {
        self.inodes.get(&ino).ok_or(libc::ENOENT)
    }

    fn node_mut(&mut self, ino: Ino) -> Result<&mut Inode> {
        self.inodes.get_mut(&ino).ok_or(libc::ENOENT)
    }

    fn dir(&self, ino: Ino) -> Result<&DirData> {
        match &self.node(ino)?.body {
            Body::Dir(d) => Ok(d),
            _ => Err(libc::ENOTDIR),
        }
    }

    fn dir_mut(&mut self, ino: Ino) -> Result<&mut DirData> {
        match &mut self.node_mut(ino)?.body {
            Body::Dir(d) => Ok(d),
            _ => Err(libc::ENOTDIR),
        }
    }

    fn file(&self, ino: Ino) -> Result<&FileData> {
        match &self.node(ino)?.body {
            Body::File(f) => Ok(f),
            Body::Dir(_) => Err(libc::EISDIR),
            Body::Symlink(_) => Err(libc::EINVAL),
        }
    }

    fn file_mut(&mut self, ino: Ino) -> Result<&mut FileData> {
        match &mut self.node_mut(ino)?.body {
            Body::File(f) => Ok(f),
            Body::Dir(_) => Err(libc::EISDIR),
            Body::Symlink(_) => Err(libc::EINVAL),
        }
    }

    /// Attributes of `ino`.
    pub fn getattr(&self, ino: Ino) -> Result<Attr> {
        let n = self.node(ino)?;
        let (size, allocated, nlink) = match &n.body {
            Body::File(f) => (f.live.size(), f.live.allocated(), n.links),
            Body::Dir(d) => {
                let subdirs = d.live.values().filter(|i| self.inodes.get(i).is_some_and(|c| c.kind() == Kind::Dir));
                (d.live.len() as u64, 0, 2 + subdirs.count() as u32)
            }
            Body::Symlink(t) => (t.len() as u64, 0, n.links),
        };
        Ok(Attr {
            ino,
            kind: n.kind(),
            size,
            allocated,
            perm: n.perm,
            nlink,
            uid: n.uid,
            gid: n.gid,
            atime: n.atime,
            mtime: n.mtime,
            ctime: n.ctime,
        })
    }

    /// Looks `name` up in `parent`; counts a kernel reference.
    pub fn lookup(&mut self, parent: Ino, name: &OsStr) -> Result<Attr> {
        let ino = *self.dir(parent)?.live.get(name).ok_or(libc::ENOENT)?;
        self.node_mut(ino)?.lookups += 1;
        self.getattr(ino)
    }

    /// Drops `n` kernel references.
    pub fn forget(&mut self, ino: Ino, n: u64) {
        if let Some(node) = self.inodes.get_mut(&ino) {
            node.lookups = node.lookups.saturating_sub(n);
            self.maybe_free(ino);
        }
    }

    /// Creates a file, directory or symlink (to `target`) owned by `(uid, gid)`; counts a
    /// kernel reference.
    pub fn create(
        &mut self,
        parent: Ino,
        name: &OsStr,
        kind: Kind,
        mode: u32,
        (uid, gid): (u32, u32),
        target: Option<&[u8]>,
    ) -> Result<Attr> {
        check_name(name)?;
        if self.dir(parent)?.live.contains_key(name) {
            return Err(libc::EEXIST);
        }
        let ino = self.next_ino;
        self.next_ino += 1;
        let now = SystemTime::now();
        let body = match kind {
            Kind::File => Body::File(FileData::default()),
            Kind::Dir => Body::Dir(DirData { parent, ..Default::default() }),
            Kind::Symlink => Body::Symlink(target.unwrap_or_default().to_vec()),
        };
        let perm = if kind == Kind::Symlink { 0o777 } else { (mode & 0o7777) as u16 };
        let node = Inode { body, perm, uid, gid, atime: now, mtime: now, ctime: now, links: 1, lookups: 1, open: 0 };
        self.inodes.insert(ino, node);
        self.dir_insert(parent, name, ino)?;
        self.getattr(ino)
    }

    fn touch(&mut self, ino: Ino) {
        if let Some(n) = self.inodes.get_mut(&ino) {
            let now = SystemTime::now();
            n.mtime = now;
            n.ctime = now;
        }
    }

    fn dir_insert(&mut self, parent: Ino, name: &OsStr, ino: Ino) -> Result<()> {
        let d = self.dir_mut(parent)?;
        d.live.insert(name.to_os_string(), ino);
        d.log.push(DirOp::Insert(name.to_os_string(), ino));
        self.touch(parent);
        Ok(())
    }

    fn dir_remove(&mut self, parent: Ino, name: &OsStr) -> Result<Ino> {
        let d = self.dir_mut(parent)?;
        let ino = d.live.remove(name).ok_or(libc::ENOENT)?;
        d.log.push(DirOp::Remove(name.to_os_string()));
        self.touch(parent);
        Ok(ino)
    }

    /// Removes a non-directory entry.
    pub fn unlink(&mut self, parent: Ino, name: &OsStr) -> Result<()> {
        let ino = *self.dir(parent)?.live.get(name).ok_or(libc::ENOENT)?;
        if self.node(ino)?.kind() == Kind::Dir {
            return Err(libc::EISDIR);
        }
        self.dir_remove(parent, name)?;
        self.unlinked(ino);
        Ok(())
    }

    fn unlinked(&mut self, ino: Ino) {
        if let Some(n) = self.inodes.get_mut(&ino) {
            n.links = n.links.saturating_sub(1);
            n.ctime = SystemTime::now();
        }
        self.maybe_free(ino);
    }

    /// Removes an empty directory.
    pub fn rmdir(&mut self, parent: Ino, name: &OsStr) -> Result<()> {
        let ino = *self.dir(parent)?.live.get(name).ok_or(libc::ENOENT)?;
        if !self.dir(ino)?.live.is_empty() {
            return Err(libc::ENOTEMPTY);
        }
        self.dir_remove(parent, name)?;
        self.unlinked(ino);
        Ok(())
    }

    /// A new name for a file or symlink; counts a kernel reference.
    pub fn link(&mut self, ino: Ino, parent: Ino, name: &OsStr) -> Result<Attr> {
        check_name(name)?;
        if self.node(ino)?.kind() == Kind::Dir {
            return Err(libc::EPERM);
        }
        if self.dir(parent)?.live.contains_key(name) {
            return Err(libc::EEXIST);
        }
        self.dir_insert(parent, name, ino)?;
        let n = self.node_mut(ino)?;
        n.links += 1;
        n.lookups += 1;
        n.ctime = SystemTime::now();
        self.getattr(ino)
    }

    /// Whether `anc` is `ino` or one of its ancestors (live tree).
    fn is_ancestor(&self, anc: Ino, mut ino: Ino) -> bool {
        loop {
            if ino == anc {
                return true;
            }
            match self.dir(ino) {
                Ok(d) if d.parent != ino => ino = d.parent,
                _ => return false,
            }
        }
    }

    /// `renameat2`.
    pub fn rename(
        &mut self,
        parent: Ino,
        name: &OsStr,
        newparent: Ino,
        newname: &OsStr,
        mode: RenameMode,
    ) -> Result<()> {
        check_name(newname)?;
        let src = *self.dir(parent)?.live.get(name).ok_or(libc::ENOENT)?;
        let dst = self.dir(newparent)?.live.get(newname).copied();
        let src_dir = self.node(src)?.kind() == Kind::Dir;
        if src_dir && self.is_ancestor(src, newparent) {
            return Err(libc::EINVAL);
        }
        match (mode, dst) {
            (RenameMode::NoReplace, Some(_)) => return Err(libc::EEXIST),
            (RenameMode::Exchange, None) => return Err(libc::ENOENT),
            (RenameMode::Exchange, Some(dst)) => {
                let dst_dir = self.node(dst)?.kind() == Kind::Dir;
                if dst_dir && self.is_ancestor(dst, parent) {
                    return Err(libc::EINVAL);
                }
                if src == dst {
                    return Ok(());
                }
                self.dir_remove(parent, name)?;
                self.dir_remove(newparent, newname)?;
                self.dir_insert(parent, name, dst)?;
                self.dir_insert(newparent, newname, src)?;
                if src_dir {
                    self.dir_mut(src)?.parent = newparent;
                }
                if dst_dir {
                    self.dir_mut(dst)?.parent = parent;
                }
                return Ok(());
            }
            _ => {}
        }
        if let Some(dst) = dst {
            if dst == src {
                return Ok(()); // Two names of one inode: rename does nothing.
            }
            match (src_dir, self.node(dst)?.kind() == Kind::Dir) {
                (true, false) => return Err(libc::ENOTDIR),
                (false, true) => return Err(libc::EISDIR),
                (true, true) if !self.dir(dst)?.live.is_empty() => return Err(libc::ENOTEMPTY),
                _ => {}
            }
            self.dir_remove(newparent, newname)?;
            self.unlinked(dst);
        }
        self.dir_remove(parent, name)?;
        self.dir_insert(newparent, newname, src)?;
        if src_dir {
            self.dir_mut(src)?.parent = newparent;
        }
        Ok(())
    }

    /// The target of a symlink.
    pub fn readlink(&self, ino: Ino) -> Result<Vec<u8>> {
        match &self.node(ino)?.body {
            Body::Symlink(t) => Ok(t.clone()),
            _ => Err(libc::EINVAL),
        }
    }

    /// Entries of a directory, `.` and `..` first.
    pub fn readdir(&self, ino: Ino) -> Result<Vec<(Ino, Kind, OsString)>> {
        let d = self.dir(ino)?;
        let mut out = vec![(ino, Kind::Dir, OsString::from(".")), (d.parent, Kind::Dir, OsString::from(".."))];
        for (name, &child) in &d.live {
            let kind = self.inodes.get(&child).map(Inode::kind).unwrap_or(Kind::File);
            out.push((child, kind, name.clone()));
        }
        Ok(out)
    }

    pub fn open(&mut self, ino: Ino) -> Result<()> {
        self.node_mut(ino)?.open += 1;
        Ok(())
    }

    pub fn release(&mut self, ino: Ino) {
        if let Some(n) = self.inodes.get_mut(&ino) {
            n.open = n.open.saturating_sub(1);
        }
        self.maybe_free(ino);
    }

    pub fn read(&self, ino: Ino, off: u64, len: u64) -> Result<Vec<u8>> {
        Ok(self.file(ino)?.live.read(off, len))
    }

    pub fn write(&mut self, ino: Ino, off: u64, data: &[u8]) -> Result<()> {
        off.checked_add(data.len() as u64).filter(|e| *e <= i64::MAX as u64).ok_or(libc::EFBIG)?;
        let f = self.file_mut(ino)?;
        f.live.write(off, data);
        f.log.push(FileOp::Write { off, data: data.to_vec() });
        self.touch(ino);
        Ok(())
    }

    pub fn setattr(&mut self, ino: Ino, s: &SetAttr) -> Result<Attr> {
        if let Some(size) = s.size {
            if size > i64::MAX as u64 {
                return Err(libc::EFBIG);
            }
            let f = self.file_mut(ino)?;
            f.live.set_size(size);
            f.log.push(FileOp::SetSize(size));
            self.touch(ino);
        }
        let n = self.node_mut(ino)?;
        if let Some(m) = s.mode {
            n.perm = (m & 0o7777) as u16;
        }
        if let Some(u) = s.uid {
            n.uid = u;
        }
        if let Some(g) = s.gid {
            n.gid = g;
        }
        if let Some(t) = s.atime {
            n.atime = t;
        }
        if let Some(t) = s.mtime {
            n.mtime = t;
        }
        n.ctime = SystemTime::now();
        self.getattr(ino)
    }

    /// `fallocate`: plain (allocate, may grow), `KEEP_SIZE`, `PUNCH_HOLE|KEEP_SIZE`,
    /// `ZERO_RANGE` (with or without `KEEP_SIZE`). Allocation itself is not modelled (the
    /// file stays sparse); only its effect on the size is.
    pub fn fallocate(&mut self, ino: Ino, off: u64, len: u64, mode: i32) -> Result<()> {
        const KNOWN: i32 = libc::FALLOC_FL_KEEP_SIZE | libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_ZERO_RANGE;
        let end = off.checked_add(len).filter(|e| *e <= i64::MAX as u64).ok_or(libc::EFBIG)?;
        if len == 0 {
            return Err(libc::EINVAL);
        }
        if mode & !KNOWN != 0 {
            return Err(libc::EOPNOTSUPP);
        }
        let keep = mode & libc::FALLOC_FL_KEEP_SIZE != 0;
        let punch = mode & libc::FALLOC_FL_PUNCH_HOLE != 0;
        let zero = mode & libc::FALLOC_FL_ZERO_RANGE != 0;
        if punch && (!keep || zero) {
            return Err(libc::EINVAL);
        }
        let f = self.file_mut(ino)?;
        if punch || zero {
            f.live.zero(off, len);
            f.log.push(FileOp::Zero { off, len });
        }
        if !keep && end > f.live.size() {
            f.live.set_size(end);
            f.log.push(FileOp::SetSize(end));
        }
        self.touch(ino);
        Ok(())
    }

    /// `lseek(SEEK_DATA / SEEK_HOLE)`.
    pub fn seek(&self, ino: Ino, off: u64, want_data: bool) -> Result<u64> {
        self.file(ino)?.live.seek(off, want_data).ok_or(libc::ENXIO)
    }

    /// `fsync`/`fdatasync` of a file (its content and size become durable), or of a
    /// directory (same as [`Model::fsyncdir`]).
    pub fn fsync(&mut self, ino: Ino) -> Result<()> {
        if self.node(ino)?.kind() == Kind::Dir {
            return self.fsyncdir(ino);
        }
        if let Ok(f) = self.file_mut(ino) {
            f.durable = f.live.clone();
            f.log.clear();
        }
        Ok(())
    }

    /// `fsync` of a directory: its entries become durable.
    pub fn fsyncdir(&mut self, ino: Ino) -> Result<()> {
        let d = self.dir_mut(ino)?;
        let before: BTreeSet<Ino> = d.durable.values().copied().chain(d.log.iter().filter_map(DirOp::ino)).collect();
        d.durable = d.live.clone();
        d.log.clear();
        for i in before {
            self.maybe_free(i);
        }
        Ok(())
    }

    /// Whether any directory's durable entries or unsynced ops name `ino`.
    fn named_by_any_dir(&self, ino: Ino) -> bool {
        self.inodes.values().any(|n| match &n.body {
            Body::Dir(d) => d.durable.values().any(|&i| i == ino) || d.log.iter().any(|op| op.ino() == Some(ino)),
            _ => false,
        })
    }

    /// Frees `ino` (and, for a directory, what only it kept alive) once nothing can reach it.
    fn maybe_free(&mut self, ino: Ino) {
        let mut work = vec![ino];
        while let Some(ino) = work.pop() {
            let Some(n) = self.inodes.get(&ino) else { continue };
            if ino == ROOT || n.links > 0 || n.lookups > 0 || n.open > 0 || self.named_by_any_dir(ino) {
                continue;
            }
            if let Some(Inode { body: Body::Dir(d), .. }) = self.inodes.remove(&ino) {
                work.extend(d.durable.values().copied());
                work.extend(d.log.iter().filter_map(DirOp::ino));
            }
        }
    }

    /// Open handles (the kernel's), for the "writers are gone" check before a cut.
    pub fn open_handles(&self) -> u64 {
        self.inodes.values().map(|n| u64::from(n.open)).sum()
    }

    /// The power cut (see the module docs).
    pub fn cut(&mut self, mode: CutMode) -> CutReport {
        let mut report = CutReport::default();
        let mut rng = match mode {
            CutMode::Drop => None,
            CutMode::Torn { seed } => Some(SplitMix::new(seed)),
        };
        let mut inos: Vec<Ino> = self.inodes.keys().copied().collect();
        inos.sort_unstable();
        // 1. What each file and directory comes back with.
        for &ino in &inos {
            let Some(n) = self.inodes.get_mut(&ino) else { continue };
            match &mut n.body {
                Body::File(f) => {
                    let keep = rng.as_mut().map_or(0, |r| r.upto(f.log.len() as u64) as usize);
                    let mut content = std::mem::take(&mut f.durable);
                    for (i, op) in f.log.iter().take(keep).enumerate() {
                        let tear = i + 1 == keep && rng.as_mut().is_some_and(|r| r.upto(1) == 1);
                        match (op, rng.as_mut()) {
                            (FileOp::Write { off, data }, Some(r)) if tear => {
                                let cut = torn_length(*off, data.len() as u64, r);
                                if cut < data.len() as u64 {
                                    report.torn_writes += 1;
                                }
                                content.write(*off, &data[..cut as usize]);
                            }
                            _ => op.apply(&mut content),
                        }
                    }
                    report.dropped_file_ops += (f.log.len() - keep) as u64;
                    f.live = content.clone();
                    f.durable = content;
                    f.log.clear();
                }
                Body::Dir(d) => {
                    let keep = rng.as_mut().map_or(0, |r| r.upto(d.log.len() as u64) as usize);
                    let mut entries = std::mem::take(&mut d.durable);
                    for op in d.log.iter().take(keep) {
                        op.apply(&mut entries);
                    }
                    report.dropped_dir_ops += (d.log.len() - keep) as u64;
                    d.live = entries.clone();
                    d.durable = entries;
                    d.log.clear();
                }
                Body::Symlink(_) => {}
            }
        }
        // 2. What the root reaches; a directory reached twice keeps its first entry.
        let mut links: HashMap<Ino, u32> = HashMap::from([(ROOT, 1)]);
        let mut queue = VecDeque::from([ROOT]);
        while let Some(dir) = queue.pop_front() {
            let entries: Vec<(OsString, Ino)> = match self.inodes.get(&dir) {
                Some(Inode { body: Body::Dir(d), .. }) => d.live.iter().map(|(k, v)| (k.clone(), *v)).collect(),
                _ => continue,
            };
            for (name, child) in entries {
                let is_dir = matches!(self.inodes.get(&child), Some(Inode { body: Body::Dir(_), .. }));
                if is_dir && links.contains_key(&child) {
                    if let Ok(d) = self.dir_mut(dir) {
                        d.live.remove(&name);
                        d.durable.remove(&name);
                    }
                    continue;
                }
                *links.entry(child).or_insert(0) += 1;
                if is_dir {
                    if let Ok(d) = self.dir_mut(child) {
                        d.parent = dir;
                    }
                    queue.push_back(child);
                }
            }
        }
        // 3. Drop the rest.
        let before = self.inodes.len();
        self.inodes.retain(|ino, _| links.contains_key(ino));
        report.dropped_inodes = (before - self.inodes.len()) as u64;
        for (ino, n) in self.inodes.iter_mut() {
            n.links = links[ino];
            n.open = 0;
        }
        self.cuts += 1;
        report
    }

    pub fn stats(&self) -> Stats {
        let mut s = Stats { cuts: self.cuts, ..Default::default() };
        for n in self.inodes.values() {
            s.open_handles += u64::from(n.open);
            match &n.body {
                Body::File(f) => {
                    s.files += 1;
                    s.bytes_live += f.live.size();
                    s.bytes_unsynced += f.log.iter().map(FileOp::bytes).sum::<u64>();
                }
                Body::Dir(d) => {
                    s.dirs += 1;
                    s.unsynced_dir_ops += d.log.len() as u64;
                }
                Body::Symlink(_) => s.files += 1,
            }
        }
        s
    }

    /// (total bytes, free bytes, inodes used) for statfs.
    pub fn statfs(&self) -> (u64, u64, u64) {
        let used: u64 = self
            .inodes
            .values()
            .map(|n| match &n.body {
                Body::File(f) => f.live.allocated(),
                _ => PAGE,
            })
            .sum();
        (self.capacity, self.capacity.saturating_sub(used), self.inodes.len() as u64)
    }
}

/// Bytes of a write at `off` of `len` bytes that reach the disk when it is torn: a random
/// sector boundary inside the write (all of it when it lies within one sector).
fn torn_length(off: u64, len: u64, rng: &mut SplitMix) -> u64 {
    let first = (off / SECTOR + 1) * SECTOR; // first boundary after `off`
    let end = off + len;
    if first >= end {
        return len;
    }
    let boundaries = (end - 1 - first) / SECTOR + 1; // boundaries in [first, end)
    first + rng.upto(boundaries - 1) * SECTOR - off
}

#[cfg(test)]
mod tests;

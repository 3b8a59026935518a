//! `BlockFileFs`: the FUSE filesystem, a root directory holding one regular file whose
//! bytes are the NBD export.
//!
//! Every data operation is spawned as a task on the tokio runtime and replies from there, so
//! the FUSE threads only decode requests and many requests run against the NBD connection at
//! once (the client pipelines them).
//!
//! Mapping (what each file operation becomes on the export):
//! - read → READ; write → WRITE (with FUA when the file was opened `O_SYNC`/`O_DSYNC`);
//!   fsync, fdatasync and flush (every `close`) → FLUSH.
//! - fallocate `PUNCH_HOLE` → WRITE_ZEROES that may deallocate (the NBD spelling of a punched
//!   hole: unlike TRIM, which is advisory in NBD, it guarantees that reads return zeroes, as
//!   `fallocate(2)` promises and as the loop driver relies on: it sends both discards and
//!   "zero, may unmap" requests as punched holes); `ZERO_RANGE` → WRITE_ZEROES with
//!   `NO_HOLE`; plain preallocation inside the file → nothing (the volume is thin); anything
//!   that would change the size → `EOPNOTSUPP`.
//! - The file's size is fixed: writes past the end get `ENOSPC` (a short write at the end),
//!   truncation to another size gets `EPERM`.
//! - Engine errors become errno values in [`errno_for`]: a dead connection is `EIO`.

use std::ffi::{OsStr, OsString};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, KernelConfig, LockOwner,
    OpenFlags, ReplyAttr, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyWrite, ReplyXattr,
    Request, TimeOrNow, WriteFlags,
};

use crate::Reconnecting;
use hlstore_core::error::{Error, ErrorKind};

/// Inode of the one file.
const FILE_INO: INodeNo = INodeNo(2);
/// How long the kernel may cache names and attributes (they never change).
const ATTR_TTL: Duration = Duration::from_secs(60);
/// Largest FUSE read/write request (the kernel's default page limit allows 1 MiB).
pub const MAX_IO: u32 = 1024 * 1024;

// fallocate(2) mode bits (Linux ABI).
const FALLOC_FL_KEEP_SIZE: i32 = 0x01;
const FALLOC_FL_PUNCH_HOLE: i32 = 0x02;
const FALLOC_FL_ZERO_RANGE: i32 = 0x10;

/// The filesystem. Construct with [`BlockFileFs::new`], mount with [`super::FuseMount`].
pub struct BlockFileFs {
    client: Arc<Reconnecting>,
    runtime: tokio::runtime::Handle,
    file_name: OsString,
    size: u64,
    read_only: bool,
    uid: u32,
    gid: u32,
    created: SystemTime,
}

impl BlockFileFs {
    /// A filesystem exposing `client`'s export as `file_name`; requests run on `runtime`.
    pub fn new(client: Arc<Reconnecting>, file_name: impl Into<OsString>, runtime: tokio::runtime::Handle) -> Self {
        // SAFETY: getuid/getgid cannot fail and touch no memory.
        let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
        let info = client.info();
        BlockFileFs {
            size: info.size,
            read_only: info.read_only(),
            client,
            runtime,
            file_name: file_name.into(),
            uid,
            gid,
            created: SystemTime::now(),
        }
    }

    fn attr(&self, ino: INodeNo) -> Option<FileAttr> {
        let (kind, perm, nlink, size) = match ino {
            INodeNo::ROOT => (FileType::Directory, 0o755, 2, 0),
            FILE_INO => (FileType::RegularFile, if self.read_only { 0o400 } else { 0o600 }, 1, self.size),
            _ => return None,
        };
        Some(FileAttr {
            ino,
            size,
            blocks: size.div_ceil(512),
            atime: self.created,
            mtime: self.created,
            ctime: self.created,
            crtime: self.created,
            kind,
            perm,
            nlink,
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            flags: 0,
            blksize: 4096,
        })
    }

    /// Runs `op` on the runtime and hands its result to `reply`.
    fn spawn<T, F>(&self, op: F, reply: impl FnOnce(Result<T, Errno>) + Send + 'static)
    where
        F: std::future::Future<Output = Result<T, Errno>> + Send + 'static,
        T: Send + 'static,
    {
        self.runtime.spawn(async move { reply(op.await) });
    }
}

/// The errno a file operation returns for an engine error.
pub fn errno_for(err: &Error) -> Errno {
    match err.kind() {
        ErrorKind::InvalidArgument => Errno::EINVAL,
        ErrorKind::OutOfRange => Errno::ENOSPC,
        ErrorKind::Io => match err {
            Error::Io { source, .. } => source.raw_os_error().map(Errno::from_i32).unwrap_or(Errno::EIO),
            _ => Errno::EIO,
        },
        ErrorKind::NotFound
        | ErrorKind::AlreadyExists
        | ErrorKind::StaleEpoch
        | ErrorKind::Corruption
        | ErrorKind::Unavailable
        | ErrorKind::Conflict
        | ErrorKind::Internal => Errno::EIO,
        ErrorKind::NoSpace => Errno::ENOSPC,
        ErrorKind::Unsupported => Errno::EOPNOTSUPP,
    }
}

fn log_err(op: &str, offset: u64, err: &Error) -> Errno {
    tracing::warn!(fuse.op = op, offset, "block file: {err}");
    errno_for(err)
}

impl Filesystem for BlockFileFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        // Both calls only fail by proposing the nearest allowed value: take it.
        if let Err(nearest) = config.set_max_write(MAX_IO) {
            let _ = config.set_max_write(nearest);
        }
        if let Err(nearest) = config.set_max_readahead(MAX_IO) {
            let _ = config.set_max_readahead(nearest);
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match self.attr(FILE_INO) {
            Some(attr) if parent == INodeNo::ROOT && name == self.file_name => {
                reply.entry(&ATTR_TTL, &attr, Generation(0))
            }
            _ => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.attr(ino) {
            Some(attr) => reply.attr(&ATTR_TTL, &attr),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let Some(attr) = self.attr(ino) else {
            return reply.error(Errno::ENOENT);
        };
        // The size is the export's; owner and mode are fixed. Times are accepted and not kept.
        if size.is_some_and(|s| s != attr.size) || mode.is_some() || uid.is_some() || gid.is_some() {
            return reply.error(Errno::EPERM);
        }
        reply.attr(&ATTR_TTL, &attr)
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if ino != FILE_INO {
            return reply.error(if ino == INodeNo::ROOT { Errno::EISDIR } else { Errno::ENOENT });
        }
        let wants_write = flags.0 & libc::O_ACCMODE != libc::O_RDONLY;
        if wants_write && self.read_only {
            return reply.error(Errno::EROFS);
        }
        // Direct I/O: no page cache of this file between the caller and the export (see the
        // module docs of `fuse`); parallel direct writes: the kernel does not serialise
        // writes to the file, the export orders them.
        reply.opened(FileHandle(0), FopenFlags::FOPEN_DIRECT_IO | FopenFlags::FOPEN_PARALLEL_DIRECT_WRITES)
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
        if ino != FILE_INO {
            return reply.error(Errno::EISDIR);
        }
        let len = u64::from(size).min(self.size.saturating_sub(offset));
        if len == 0 {
            return reply.data(&[]);
        }
        let client = self.client.clone();
        self.spawn(
            async move { client.read(offset, len as usize).await.map_err(|e| log_err("read", offset, &e)) },
            |r| match r {
                Ok(data) => reply.data(&data),
                Err(errno) => reply.error(errno),
            },
        );
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        if ino != FILE_INO {
            return reply.error(Errno::EISDIR);
        }
        if self.read_only {
            return reply.error(Errno::EROFS);
        }
        let room = self.size.saturating_sub(offset);
        if room == 0 && !data.is_empty() {
            return reply.error(Errno::ENOSPC);
        }
        let n = (data.len() as u64).min(room) as usize;
        let data = data[..n].to_vec();
        let fua = flags.0 & (libc::O_SYNC | libc::O_DSYNC) != 0;
        let client = self.client.clone();
        self.spawn(
            async move { client.write(offset, &data, fua).await.map_err(|e| log_err("write", offset, &e)) },
            move |r| match r {
                Ok(()) => reply.written(n as u32),
                Err(errno) => reply.error(errno),
            },
        );
    }

    fn flush(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, _lock_owner: LockOwner, reply: ReplyEmpty) {
        self.fsync_reply(ino, "flush", reply);
    }

    fn fsync(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        self.fsync_reply(ino, "fsync", reply);
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        if ino != FILE_INO {
            return reply.error(Errno::EISDIR);
        }
        let end = offset.checked_add(length);
        let inside = end.is_some_and(|end| end <= self.size);
        let keep_size = mode & FALLOC_FL_KEEP_SIZE != 0;
        let punch = mode & FALLOC_FL_PUNCH_HOLE != 0;
        let zero = mode & FALLOC_FL_ZERO_RANGE != 0;
        if mode & !(FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE) != 0 || (punch && zero) {
            return reply.error(Errno::EOPNOTSUPP);
        }
        if !punch && !zero {
            // Preallocation: nothing to do inside the file; growing it is impossible.
            return if inside || keep_size { reply.ok() } else { reply.error(Errno::EOPNOTSUPP) };
        }
        if self.read_only {
            return reply.error(Errno::EROFS);
        }
        // Clip to the file (the kernel allows ranges past EOF with KEEP_SIZE).
        let length = length.min(self.size.saturating_sub(offset));
        if length == 0 {
            return if inside || keep_size { reply.ok() } else { reply.error(Errno::EOPNOTSUPP) };
        }
        if !inside && !keep_size {
            return reply.error(Errno::EOPNOTSUPP);
        }
        let client = self.client.clone();
        self.spawn(
            async move {
                client.write_zeroes(offset, length, punch).await.map_err(|e| log_err("fallocate", offset, &e))
            },
            |r| match r {
                Ok(()) => reply.ok(),
                Err(errno) => reply.error(errno),
            },
        );
    }

    // No extended attributes. ENOSYS makes the kernel stop asking (it then answers
    // EOPNOTSUPP itself).
    fn getxattr(&self, _req: &Request, _ino: INodeNo, _name: &OsStr, _size: u32, reply: ReplyXattr) {
        reply.error(Errno::ENOSYS)
    }

    fn listxattr(&self, _req: &Request, _ino: INodeNo, _size: u32, reply: ReplyXattr) {
        reply.error(Errno::ENOSYS)
    }

    fn setxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _value: &[u8],
        _flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::ENOSYS)
    }

    fn removexattr(&self, _req: &Request, _ino: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::ENOSYS)
    }

    fn readdir(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        if ino != INodeNo::ROOT {
            return reply.error(Errno::ENOTDIR);
        }
        let entries: [(INodeNo, FileType, &OsStr); 3] = [
            (INodeNo::ROOT, FileType::Directory, OsStr::new(".")),
            (INodeNo::ROOT, FileType::Directory, OsStr::new("..")),
            (FILE_INO, FileType::RegularFile, self.file_name.as_os_str()),
        ];
        for (i, (ino, kind, name)) in entries.into_iter().enumerate().skip(offset as usize) {
            if reply.add(ino, (i + 1) as u64, kind, name) {
                break;
            }
        }
        reply.ok()
    }
}

impl BlockFileFs {
    fn fsync_reply(&self, ino: INodeNo, op: &'static str, reply: ReplyEmpty) {
        if ino != FILE_INO || self.read_only {
            return reply.ok();
        }
        let client = self.client.clone();
        self.spawn(async move { client.flush().await.map_err(|e| log_err(op, 0, &e)) }, |r| match r {
            Ok(()) => reply.ok(),
            Err(errno) => reply.error(errno),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn engine_errors_become_file_errnos() {
        assert_eq!(errno_for(&Error::InvalidArgument("x".into())), Errno::EINVAL);
        let range = Error::OutOfRange { volume: "v".into(), offset: 0, length: 1, size: 0 };
        assert_eq!(errno_for(&range), Errno::ENOSPC);
        assert_eq!(errno_for(&Error::Unavailable("down".into())), Errno::EIO);
        assert_eq!(errno_for(&Error::Fenced("newer engine".into())), Errno::EIO);
        let eperm = Error::io("write", std::io::Error::from_raw_os_error(libc::EPERM));
        assert_eq!(errno_for(&eperm), Errno::EPERM, "the server's errno is passed on");
        assert_eq!(errno_for(&Error::io("x", std::io::Error::other("no errno"))), Errno::EIO);
    }
}

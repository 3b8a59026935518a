//! Free space of the filesystem holding a node's data directory, the input of placement
//! (which node gets a new replica) and of CSI `GetCapacity`.

use std::path::Path;

/// Size and free bytes of one filesystem, as the node agent may use them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FsSpace {
    /// Size of the filesystem.
    pub total: u64,
    /// Bytes an unprivileged writer can still allocate (`f_bavail`).
    pub available: u64,
}

impl FsSpace {
    /// The space left for replicas when `reserved` bytes are kept free for other uses.
    pub fn minus_reserved(self, reserved: u64) -> FsSpace {
        FsSpace { total: self.total.saturating_sub(reserved), available: self.available.saturating_sub(reserved) }
    }
}

/// `statvfs(2)` of `path`; `None` if it fails (missing path, not a filesystem).
pub fn fs_space(path: &Path) -> Option<FsSpace> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    // SAFETY: a zeroed statvfs is a valid value of this plain C struct.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid NUL-terminated path and `st` a writable statvfs.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return None;
    }
    let frsize = st.f_frsize as u64;
    Some(FsSpace { total: st.f_blocks as u64 * frsize, available: st.f_bavail as u64 * frsize })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statvfs_of_a_directory_and_a_missing_path() {
        let s = fs_space(Path::new("/")).expect("statvfs /");
        assert!(s.total > 0 && s.available <= s.total);
        assert!(fs_space(Path::new("/no/such/dir/here")).is_none());
        let r = FsSpace { total: 100, available: 30 }.minus_reserved(40);
        assert_eq!(r, FsSpace { total: 60, available: 0 });
    }
}

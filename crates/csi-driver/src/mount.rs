//! The node's mount table and the tools that change it: mount, bind, unmount, filesystem
//! probing, mkfs, filesystem growth, statvfs.
//!
//! Invariants:
//! - [`probe`] uses `blkid -p` (a fresh low-level probe, no cache) and reports any
//!   signature (filesystem, partition table, RAID member...); the node formats only an
//!   [`Probe::Empty`] device, so data is never overwritten by mkfs.
//! - Every external tool runs with a deadline ([`TOOL_TIMEOUT`]) and its stderr is part of
//!   the error.

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use tokio::process::Command;

use crate::error::{CsiError, Result};

/// Deadline of one external tool run (mkfs of a large volume is the slowest).
pub const TOOL_TIMEOUT: Duration = Duration::from_secs(300);

/// One line of `/proc/self/mountinfo`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    /// `major:minor` of the mounted device.
    pub dev: String,
    /// Root of the mount within its filesystem (`/loop3` for a bind of `/dev/loop3`).
    pub root: String,
    pub mount_point: PathBuf,
    pub fs_type: String,
    pub source: String,
    /// Mounted read-only (per-mount option `ro`).
    pub read_only: bool,
}

/// Undoes mountinfo's octal escapes (`\040` = space).
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c)) {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parses mountinfo text; malformed lines are skipped.
pub fn parse_mountinfo(text: &str) -> Vec<MountEntry> {
    text.lines()
        .filter_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            let f: Vec<&str> = left.split(' ').collect();
            let r: Vec<&str> = right.split(' ').collect();
            Some(MountEntry {
                dev: f.get(2)?.to_string(),
                root: unescape(f.get(3)?),
                mount_point: PathBuf::from(unescape(f.get(4)?)),
                fs_type: r.first()?.to_string(),
                source: unescape(r.get(1)?),
                read_only: f.get(5)?.split(',').any(|o| o == "ro"),
            })
        })
        .collect()
}

/// The mount table of this process's mount namespace.
pub fn mounts() -> Result<Vec<MountEntry>> {
    let text =
        std::fs::read_to_string("/proc/self/mountinfo").map_err(|e| CsiError::io("reading /proc/self/mountinfo", e))?;
    Ok(parse_mountinfo(&text))
}

/// `path` made absolute and free of symlinks when it exists (as the kernel reports it).
pub fn canonical(path: &Path) -> PathBuf {
    std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf())
}

/// The topmost mount at `path`, if `path` is a mount point.
pub fn mount_at(path: &Path) -> Result<Option<MountEntry>> {
    let p = canonical(path);
    Ok(mounts()?.into_iter().rev().find(|m| m.mount_point == p))
}

/// `major:minor` of a block device node.
pub fn dev_numbers(dev: &Path) -> Result<String> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let md = std::fs::metadata(dev).map_err(|e| CsiError::io(format!("stat {}", dev.display()), e))?;
    if !md.file_type().is_block_device() {
        return Err(CsiError::Internal(format!("{} is not a block device", dev.display())));
    }
    let rdev = md.rdev();
    Ok(format!("{}:{}", libc::major(rdev), libc::minor(rdev)))
}

/// Mounts that use block device `dev`: filesystems on it, and bind mounts of its device
/// node (a published raw block volume).
pub fn users_of(dev: &Path) -> Result<Vec<MountEntry>> {
    let numbers = dev_numbers(dev)?;
    let name = dev.file_name().map(|n| format!("/{}", n.to_string_lossy())).unwrap_or_default();
    Ok(mounts()?.into_iter().filter(|m| m.dev == numbers || (m.fs_type == "devtmpfs" && m.root == name)).collect())
}

/// Runs a tool to completion with [`TOOL_TIMEOUT`]; returns its output whatever the status.
pub async fn run(program: &str, args: &[&std::ffi::OsStr]) -> Result<Output> {
    let mut cmd = Command::new(program);
    cmd.args(args).stdin(std::process::Stdio::null()).kill_on_drop(true);
    let desc = format!("{program} {}", args.iter().map(|a| a.to_string_lossy()).collect::<Vec<_>>().join(" "));
    match tokio::time::timeout(TOOL_TIMEOUT, cmd.output()).await {
        Ok(Ok(out)) => Ok(out),
        Ok(Err(e)) => Err(CsiError::io(format!("running {desc} (is it installed?)"), e)),
        Err(_) => Err(CsiError::Tool(format!("{desc} did not finish within {TOOL_TIMEOUT:?}"))),
    }
}

/// Like [`run`], and fails unless the tool exited 0; returns stdout.
pub async fn run_ok(program: &str, args: &[&std::ffi::OsStr]) -> Result<String> {
    let out = run(program, args).await?;
    if out.status.success() {
        return Ok(String::from_utf8_lossy(&out.stdout).into_owned());
    }
    let desc = format!("{program} {}", args.iter().map(|a| a.to_string_lossy()).collect::<Vec<_>>().join(" "));
    Err(CsiError::Tool(format!("{desc} failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr).trim())))
}

fn os(s: &str) -> &std::ffi::OsStr {
    std::ffi::OsStr::new(s)
}

/// `mount -t FS -o OPTS DEV TARGET`.
pub async fn mount_fs(dev: &Path, target: &Path, fs_type: &str, options: &[String]) -> Result<()> {
    let opts = options.join(",");
    let mut args = vec![os("-t"), os(fs_type)];
    if !opts.is_empty() {
        args.extend([os("-o"), os(&opts)]);
    }
    args.extend([dev.as_os_str(), target.as_os_str()]);
    run_ok("mount", &args).await.map(|_| ())
}

/// `mount --bind SOURCE TARGET`, then remounted read-only when asked.
pub async fn bind(source: &Path, target: &Path, read_only: bool) -> Result<()> {
    run_ok("mount", &[os("--bind"), source.as_os_str(), target.as_os_str()]).await?;
    if read_only {
        if let Err(e) = run_ok("mount", &[os("-o"), os("remount,bind,ro"), target.as_os_str()]).await {
            let _ = unmount(target).await;
            return Err(e);
        }
    }
    Ok(())
}

/// Unmounts every mount stacked at `target` (none: OK).
pub async fn unmount(target: &Path) -> Result<()> {
    while mount_at(target)?.is_some() {
        run_ok("umount", &[target.as_os_str()]).await?;
    }
    Ok(())
}

/// What `blkid -p` found on a device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    /// No signature at all: safe to format.
    Empty,
    /// A filesystem of this type.
    Filesystem(String),
    /// Something else (partition table, RAID member...): never formatted.
    Other(String),
}

/// Parses `blkid -p -o export` output.
pub fn parse_probe(export: &str) -> Probe {
    let get = |k: &str| export.lines().find_map(|l| l.strip_prefix(k).and_then(|v| v.strip_prefix('=')));
    match (get("TYPE"), get("PTTYPE"), get("USAGE")) {
        (Some(t), _, Some("filesystem")) | (Some(t), _, None) => Probe::Filesystem(t.to_string()),
        (Some(t), _, Some(u)) => Probe::Other(format!("{t} ({u})")),
        (None, Some(pt), _) => Probe::Other(format!("partition table {pt}")),
        (None, None, _) if export.trim().is_empty() => Probe::Empty,
        (None, None, _) => Probe::Other(export.trim().replace('\n', " ")),
    }
}

/// Probes `dev` for any signature.
pub async fn probe(dev: &Path) -> Result<Probe> {
    let out = run("blkid", &[os("-p"), os("-o"), os("export"), dev.as_os_str()]).await?;
    match out.status.code() {
        Some(0) => Ok(parse_probe(&String::from_utf8_lossy(&out.stdout))),
        // blkid: 2 = nothing found.
        Some(2) => Ok(Probe::Empty),
        _ => Err(CsiError::Tool(format!(
            "blkid -p {} failed ({}): {}",
            dev.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))),
    }
}

/// Creates a filesystem on a device that [`probe`] found empty. New volumes read as
/// zeroes, so discarding at mkfs time would only cost time.
pub async fn mkfs(dev: &Path, fs_type: &str) -> Result<()> {
    match fs_type {
        "ext4" => run_ok("mkfs.ext4", &[os("-q"), os("-F"), os("-E"), os("nodiscard"), dev.as_os_str()]).await,
        "xfs" => run_ok("mkfs.xfs", &[os("-q"), os("-K"), dev.as_os_str()]).await,
        other => return Err(CsiError::InvalidArgument(format!("cannot create a {other} filesystem"))),
    }
    .map(|_| ())
}

/// Grows the filesystem mounted at `mount_point` (on `dev`) to the device size.
pub async fn grow(fs_type: &str, dev: &Path, mount_point: &Path) -> Result<()> {
    match fs_type {
        "ext4" | "ext3" | "ext2" => run_ok("resize2fs", &[dev.as_os_str()]).await,
        "xfs" => run_ok("xfs_growfs", &[mount_point.as_os_str()]).await,
        other => return Err(CsiError::FailedPrecondition(format!("cannot grow a {other} filesystem"))),
    }
    .map(|_| ())
}

/// Grows an unmounted ext2/3/4 filesystem that is smaller than its device (the volume
/// was expanded while it was not staged); `true` if it grew. Growing offline needs no
/// kernel support (an online ext4 resize needs CAP_SYS_RESOURCE, which containers and some
/// hosts lack), so staging after an expand always ends with the whole volume usable.
/// Other filesystems are grown online by NodeExpandVolume.
pub async fn grow_offline(fs_type: &str, dev: &Path) -> Result<bool> {
    if !matches!(fs_type, "ext4" | "ext3" | "ext2") {
        return Ok(false);
    }
    let head = run_ok("dumpe2fs", &[os("-h"), dev.as_os_str()]).await?;
    let field = |name: &str| {
        head.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .ok_or_else(|| CsiError::Tool(format!("dumpe2fs -h {}: no {name}", dev.display())))
    };
    let (blocks, block_size) = (field("Block count:")?, field("Block size:")?);
    if (blocks + 1) * block_size > device_size(dev)? {
        return Ok(false);
    }
    // resize2fs insists on a freshly checked filesystem; exit codes 0-1 mean clean/fixed.
    let out = run("e2fsck", &[os("-f"), os("-p"), dev.as_os_str()]).await?;
    if !matches!(out.status.code(), Some(0 | 1)) {
        return Err(CsiError::FailedPrecondition(format!(
            "{} needs repair before it can grow (e2fsck: {}); it was not mounted",
            dev.display(),
            String::from_utf8_lossy(&out.stdout).trim()
        )));
    }
    run_ok("resize2fs", &[dev.as_os_str()]).await?;
    Ok(true)
}

/// Size in bytes of a block device (or file).
pub fn device_size(dev: &Path) -> Result<u64> {
    use std::io::Seek;
    let mut f = std::fs::File::open(dev).map_err(|e| CsiError::io(format!("opening {}", dev.display()), e))?;
    f.seek(std::io::SeekFrom::End(0)).map_err(|e| CsiError::io(format!("size of {}", dev.display()), e))
}

/// Space and inode usage of a mounted filesystem.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FsUsage {
    pub total_bytes: u64,
    pub available_bytes: u64,
    pub used_bytes: u64,
    pub total_inodes: u64,
    pub free_inodes: u64,
}

pub fn statvfs(path: &Path) -> Result<FsUsage> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| CsiError::InvalidArgument(format!("path {} contains a NUL byte", path.display())))?;
    // SAFETY: an all-zero statvfs is a valid value of this plain C struct.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a NUL-terminated path and `st` a valid, writable statvfs.
    let rc = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
    if rc != 0 {
        return Err(CsiError::io(format!("statvfs {}", path.display()), std::io::Error::last_os_error()));
    }
    let frsize = st.f_frsize as u64;
    Ok(FsUsage {
        total_bytes: st.f_blocks as u64 * frsize,
        available_bytes: st.f_bavail as u64 * frsize,
        used_bytes: (st.f_blocks as u64).saturating_sub(st.f_bfree as u64) * frsize,
        total_inodes: st.f_files as u64,
        free_inodes: st.f_ffree as u64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_lines_parse_with_escapes() {
        let text = "36 35 98:0 /mnt1 /mnt/with\\040space rw,noatime master:1 - ext3 /dev/root rw,errors=continue\n\
                    40 22 0:5 /loop3 /var/lib/k/publish/p1 rw shared:2 - devtmpfs udev rw\n\
                    garbage line\n";
        let m = parse_mountinfo(text);
        assert_eq!(m.len(), 2);
        assert_eq!(m[0].mount_point, PathBuf::from("/mnt/with space"));
        assert_eq!((m[0].dev.as_str(), m[0].fs_type.as_str(), m[0].source.as_str()), ("98:0", "ext3", "/dev/root"));
        assert_eq!((m[1].root.as_str(), m[1].fs_type.as_str()), ("/loop3", "devtmpfs"));
        assert!(!m[0].read_only);
        let ro = parse_mountinfo("50 22 7:0 / /mnt/ro ro,relatime - ext4 /dev/loop0 rw\n");
        assert!(ro[0].read_only, "per-mount ro counts, not the superblock's rw");
    }

    #[test]
    fn blkid_export_is_classified() {
        assert_eq!(
            parse_probe("DEVNAME=/dev/loop0\nUUID=x\nTYPE=ext4\nUSAGE=filesystem\n"),
            Probe::Filesystem("ext4".into())
        );
        assert_eq!(parse_probe("TYPE=xfs\n"), Probe::Filesystem("xfs".into()));
        assert!(matches!(parse_probe("DEVNAME=/dev/loop0\nPTUUID=1\nPTTYPE=gpt\n"), Probe::Other(_)));
        assert!(matches!(parse_probe("TYPE=linux_raid_member\nUSAGE=raid\n"), Probe::Other(_)));
        assert_eq!(parse_probe(""), Probe::Empty);
    }
}

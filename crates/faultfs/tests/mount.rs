//! Mounts faultfs and runs a real program on it (python3: files, fsync, rename, punch
//! hole, a directory), cuts the power over the control socket, and checks what remains.

use std::path::Path;
use std::process::Command;

use hlstore_faultfs::control;

const WRITER: &str = r#"
import os, sys
d = sys.argv[1]
def put(name, data, sync_file):
    fd = os.open(os.path.join(d, name), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.write(fd, data)
    if sync_file:
        os.fsync(fd)
    os.close(fd)
def sync_dir(path):
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    os.fsync(fd)
    os.close(fd)
put("synced", b"durable", True)
put("data-only", b"lost name", True)        # entry made durable by the dir fsync below
put("name-only", b"lost data", False)
os.mkdir(os.path.join(d, "sub"))
put("sub/inner", b"inner", True)
sync_dir(os.path.join(d, "sub"))
# Atomic replace: tmp + fsync + rename + fsync dir.
put("state.tmp", b"v1", True)
os.rename(os.path.join(d, "state.tmp"), os.path.join(d, "state"))
sync_dir(d)
put("late", b"never synced dir", True)     # created after the last dir fsync
with open(os.path.join(d, "synced"), "r+b") as f:
    f.write(b"CHANGED")                     # not synced: reverts
fd = os.open(os.path.join(d, "state"), os.O_RDWR)
os.pwrite(fd, b"x" * 8192, 0)
os.fsync(fd)
os.posix_fallocate(fd, 0, 8192)
import ctypes, ctypes.util
libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
# FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, synced: stays punched
if libc.fallocate(fd, 3, ctypes.c_long(0), ctypes.c_long(4096)) != 0:
    raise OSError(ctypes.get_errno(), "fallocate")
os.fsync(fd)
os.close(fd)
print(os.statvfs(d).f_blocks > 0)
"#;

#[test]
fn python_writer_then_power_cut() {
    if !Path::new("/dev/fuse").exists() {
        eprintln!("skipping: no /dev/fuse");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let sock = dir.path().join("ctl.sock");
    let mounted = hlstore_faultfs::mount(&mnt, Some(&sock), 1 << 30).expect("mount faultfs");
    let out = Command::new("python3").arg("-c").arg(WRITER).arg(&mnt).output().expect("run python3");
    assert!(out.status.success(), "writer failed: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "True", "statfs reports a capacity");

    let stats = control::send(&sock, "stats").unwrap();
    assert_eq!(stats["ok"], true);
    assert!(stats["bytes_unsynced"].as_u64().unwrap() >= 7, "{stats}");
    let bad = control::send(&sock, "cut sideways").unwrap();
    assert_eq!(bad["ok"], false, "{bad}");
    let cut = control::send(&sock, "cut drop").unwrap();
    assert_eq!(cut["ok"], true, "{cut}");
    assert_eq!(cut["cuts"], 1);

    let mut names: Vec<String> =
        std::fs::read_dir(&mnt).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    assert_eq!(names, ["data-only", "name-only", "state", "sub", "synced"], "entries of the last dir fsync");
    assert_eq!(std::fs::read(mnt.join("synced")).unwrap(), b"durable");
    assert_eq!(std::fs::read(mnt.join("name-only")).unwrap(), b"", "entry durable, data never synced");
    assert_eq!(std::fs::read(mnt.join("data-only")).unwrap(), b"lost name");
    assert_eq!(std::fs::read(mnt.join("sub/inner")).unwrap(), b"inner");
    let state = std::fs::read(mnt.join("state")).unwrap();
    assert_eq!(state.len(), 8192);
    assert!(state[..4096].iter().all(|&b| b == 0) && state[4096..].iter().all(|&b| b == b'x'));
    assert!(!mnt.join("late").exists());
    // The filesystem keeps working after a cut.
    std::fs::write(mnt.join("after"), b"ok").unwrap();
    assert_eq!(std::fs::read(mnt.join("after")).unwrap(), b"ok");
    mounted.unmount().unwrap();
}

//! A real filesystem on an NBD export without kernel NBD: `NbdServer<MemDevice>` → NBD
//! client → FUSE block file → loop device → ext4. Needs root, `/dev/fuse` and loop devices
//! (Debian: fuse3, util-linux, e2fsprogs, mount); fails clearly without them.

mod fuse_support;
#[path = "../../nbd/tests/nbd_support/mod.rs"]
mod nbd_support;

use std::path::{Path, PathBuf};

use fuse_support::*;
use hlstore_nbd_client::ClientOptions;
use nbd_support::*;

const SIZE: u64 = 256 * MIB;

/// Files written on the filesystem: name, length, pattern seed.
const FILES: [(&str, usize, u64); 3] = [("a.bin", 1 << 20, 11), ("b.bin", 3 << 20, 12), ("odd.bin", 123_457, 13)];

fn write_files(dir: PathBuf) {
    use std::io::Write;
    std::fs::create_dir(dir.join("sub")).expect("mkdir on ext4");
    for (name, len, seed) in FILES {
        let mut f = std::fs::File::create(dir.join("sub").join(name)).expect("create on ext4");
        f.write_all(&pattern(len, seed)).expect("write on ext4");
        f.sync_all().expect("fsync on ext4");
    }
}

fn verify_files(dir: &Path) {
    for (name, len, seed) in FILES {
        let got = std::fs::read(dir.join("sub").join(name)).expect("read back from ext4");
        assert_eq!(got.len(), len, "{name}: length");
        assert!(got == pattern(len, seed), "{name}: content differs after remount");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ext4_on_a_loop_device_on_the_block_file_survives_fsck_and_remount() {
    require_fuse_and_loop();
    let dev = mem("vol", SIZE);
    let h = Harness::start(&[("vol", dev.clone())]).await;
    let fuse_dir = tempfile::tempdir().unwrap();
    let mnt_dir = tempfile::tempdir().unwrap();

    // Guards in this order drop in reverse: ext4 unmount, loop detach, FUSE unmount.
    let (_client, fuse) = mount_export(&h.unix_uri("vol"), fuse_dir.path(), ClientOptions::default()).await;
    let file = fuse.file_path().to_path_buf();
    assert_eq!(std::fs::metadata(&file).unwrap().len(), SIZE);
    let lo = LoopDevice::attach(&file).await;
    run_ok(tool("mkfs.ext4", "e2fsprogs").args(["-F", "-q"]).arg(&lo.path)).await;

    let flushes_before = dev.flush_count();
    let m = Mounted::mount(&lo.path, mnt_dir.path()).await;
    let dir = mnt_dir.path().to_path_buf();
    blocking(move || write_files(dir)).await;
    m.unmount().await;
    assert!(dev.flush_count() > flushes_before, "ext4's cache flushes reached the export as NBD FLUSH");

    let fsck = run(tool("fsck.ext4", "e2fsprogs").args(["-n", "-f"]).arg(&lo.path)).await;
    assert!(
        fsck.status.success(),
        "fsck.ext4 -n -f found problems ({}):\n{}{}",
        fsck.status,
        String::from_utf8_lossy(&fsck.stdout),
        String::from_utf8_lossy(&fsck.stderr)
    );

    let m = Mounted::mount(&lo.path, mnt_dir.path()).await;
    let dir = mnt_dir.path().to_path_buf();
    blocking(move || verify_files(&dir)).await;
    m.unmount().await;

    lo.detach().await;
    fuse.unmount().await.expect("unmount the block file");
    assert!(!is_mounted(fuse_dir.path()), "FUSE mount gone");

    // The filesystem lives on the export itself: ext4's superblock magic at 1024 + 56.
    assert_eq!(dev.read_bytes(1024 + 56, 2), vec![0x53, 0xef], "ext4 superblock on the device");
    assert!(dev.allocated_blocks() > 1000, "data reached the device ({} blocks)", dev.allocated_blocks());
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_busy_block_file_is_detached_from_the_tree_not_leaked() {
    use std::os::unix::fs::FileExt;
    require_fuse_and_loop();
    let dev = mem("vol", 16 * MIB);
    let h = Harness::start(&[("vol", dev.clone())]).await;
    let fuse_dir = tempfile::tempdir().unwrap();
    let (_client, fuse) = mount_export(&h.unix_uri("vol"), fuse_dir.path(), ClientOptions::default()).await;
    let lo = LoopDevice::attach(fuse.file_path()).await;

    let start = std::time::Instant::now();
    let err = fuse.unmount().await.expect_err("a loop device keeps the block file busy");
    assert!(err.to_string().contains("busy"), "{err}");
    assert!(start.elapsed() >= hlstore_nbd_client::fuse::mount::UNMOUNT_RETRY, "retried before detaching");
    assert!(!is_mounted(fuse_dir.path()), "lazily detached: nothing left in the mount tree");

    // The loop device keeps working on the detached file until it lets go.
    let path = lo.path.clone();
    blocking(move || {
        let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
        f.write_all_at(b"still served", 8192).unwrap();
        f.sync_all().unwrap();
    })
    .await;
    assert_eq!(dev.read_bytes(8192, 12), b"still served");
    lo.detach().await;
    h.shutdown().await;
}

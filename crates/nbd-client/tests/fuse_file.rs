//! The FUSE block file's own operations against an in-process `NbdServer<MemDevice>`: data
//! written through the file is on the export, fsync is an NBD FLUSH, fallocate punches
//! holes and zeroes ranges on the device, the size is fixed, and a dead or hung server turns
//! into `EIO` within the request timeout. Needs root and `/dev/fuse`; fails clearly without.

mod fuse_support;
#[path = "../../nbd/tests/nbd_support/mod.rs"]
mod nbd_support;

use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fuse_support::*;
use hlstore_nbd::MemDevice;
use hlstore_nbd_client::{ClientOptions, ReconnectPolicy};
use nbd_support::*;

const SIZE: u64 = 16 * MIB;

fn open_rw(path: &std::path::Path) -> std::fs::File {
    std::fs::OpenOptions::new().read(true).write(true).open(path).expect("open the block file")
}

fn fallocate(f: &std::fs::File, mode: i32, offset: u64, len: u64) -> std::io::Result<()> {
    // SAFETY: plain syscall on an open descriptor; no memory is passed.
    let rc = unsafe { libc::fallocate(f.as_raw_fd(), mode, offset as libc::off_t, len as libc::off_t) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn file_operations_reach_the_export() {
    require_fuse_and_loop();
    let dev = mem("vol", SIZE);
    let h = Harness::start(&[("vol", dev.clone())]).await;
    let dir = tempfile::tempdir().unwrap();
    let (_client, fuse) = mount_export(&h.uri("vol"), dir.path(), ClientOptions::default()).await;
    let path = fuse.file_path().to_path_buf();
    assert_eq!(path, std::fs::canonicalize(dir.path()).unwrap().join("disk"));

    let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(names, vec![std::ffi::OsString::from("disk")]);
    assert_eq!(std::fs::metadata(&path).unwrap().len(), SIZE);

    // Unaligned write through the file: on the device; read back through the file.
    let data = pattern(300_000, 5);
    let p = path.clone();
    let d = data.clone();
    blocking(move || open_rw(&p).write_all_at(&d, 12_345).unwrap()).await;
    assert!(dev.read_bytes(12_345, data.len()) == data, "written bytes are on the export");
    // And the other way: what the device holds is what the file reads (no stale cache).
    let p = path.clone();
    let read = blocking(move || {
        let mut buf = vec![0u8; 300_000];
        std::fs::File::open(&p).unwrap().read_exact_at(&mut buf, 12_345).unwrap();
        buf
    })
    .await;
    assert!(read == data);

    // fsync → FLUSH.
    let flushes = dev.flush_count();
    let p = path.clone();
    blocking(move || open_rw(&p).sync_all().unwrap()).await;
    assert!(dev.flush_count() > flushes, "fsync reached the export as FLUSH");

    // Punch a hole: the blocks are deallocated on the device and read as zeroes.
    let f = Arc::new(open_rw(&path));
    let g = f.clone();
    blocking(move || g.write_all_at(&vec![0xAB; 1 << 20], 4 * MIB).unwrap()).await;
    let allocated = dev.allocated_blocks();
    let zeroes_before = h.stat(|s| &s.write_zeroes);
    let g = f.clone();
    blocking(move || fallocate(&g, libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE, 4 * MIB, 512 * 1024))
        .await
        .expect("punch a hole");
    assert!(h.stat(|s| &s.write_zeroes) > zeroes_before, "punch-hole reached the export");
    assert_eq!(dev.allocated_blocks(), allocated - 128, "punched blocks are deallocated");
    assert_eq!(dev.read_bytes(4 * MIB, 512 * 1024), vec![0u8; 512 * 1024]);
    assert_eq!(dev.read_bytes(4 * MIB + 512 * 1024, 4), vec![0xAB; 4], "data after the hole is kept");

    // Zero a range: zeroes, blocks stay allocated.
    let g = f.clone();
    blocking(move || fallocate(&g, libc::FALLOC_FL_ZERO_RANGE, 4 * MIB + 512 * 1024, 100_000)).await.expect("zero");
    assert_eq!(dev.allocated_blocks(), allocated - 128);
    assert_eq!(dev.read_bytes(4 * MIB + 512 * 1024, 100_000), vec![0u8; 100_000]);
    assert_eq!(dev.read_bytes(4 * MIB + 512 * 1024 + 100_000, 1), vec![0xAB]);

    // The size is fixed.
    let g = f.clone();
    let (past_end, straddle, truncate) = blocking(move || {
        let past = g.write_at(&[1, 2, 3], SIZE).unwrap_err();
        let straddle = g.write_at(&[7u8; 8192], SIZE - 100).unwrap();
        let truncate = g.set_len(0).unwrap_err();
        (past, straddle, truncate)
    })
    .await;
    assert_eq!(past_end.raw_os_error(), Some(libc::ENOSPC));
    assert_eq!(straddle, 100, "a write across the end is short");
    assert_eq!(dev.read_bytes(SIZE - 100, 100), vec![7u8; 100]);
    assert_eq!(truncate.raw_os_error(), Some(libc::EPERM));
    assert_eq!(std::fs::metadata(&path).unwrap().len(), SIZE);
    drop(f);

    // Dropping the mount unmounts it.
    drop(fuse);
    assert!(!is_mounted(dir.path()), "drop unmounted the block file");
    h.shutdown().await;
}

/// What an engine restart or a re-attach looks like to the client: the export goes away
/// (its connections are closed by the server), then comes back under the same name. I/O
/// issued meanwhile waits and then succeeds on a new connection; nothing reaches the file
/// as an error.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_reexported_volume_is_reconnected_and_io_retried() {
    require_fuse_and_loop();
    let dev = mem("vol", SIZE);
    let h = Harness::start(&[("vol", dev.clone())]).await;
    let dir = tempfile::tempdir().unwrap();
    let policy = ReconnectPolicy::within(Duration::from_secs(20));
    let (client, fuse) = mount_reconnecting(&h.unix_uri("vol"), dir.path(), ClientOptions::default(), policy).await;
    let f = Arc::new(open_rw(fuse.file_path()));
    let g = f.clone();
    blocking(move || g.write_all_at(b"before", 0).unwrap()).await;

    // Detach: the server closes the connection of a removed export.
    h.server.registry().remove("vol");
    let deadline = Instant::now() + Duration::from_secs(5);
    while !client.is_dead() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(client.is_dead(), "removing the export closed its connection");

    // I/O while nothing is exported waits...
    let g = f.clone();
    let io = tokio::task::spawn_blocking(move || {
        g.write_all_at(b"after!", 4096)?;
        g.sync_all()?;
        let mut buf = [0u8; 6];
        g.read_exact_at(&mut buf, 0)?;
        std::io::Result::Ok(buf)
    });
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(!io.is_finished(), "I/O waited for the export to come back instead of failing");
    // ...and completes once the volume is exported again (a re-attach).
    h.server.registry().insert("vol", dev.clone());
    let read = tokio::time::timeout(Duration::from_secs(15), io).await.expect("I/O finished").unwrap().unwrap();
    assert_eq!(&read, b"before");
    assert_eq!(dev.read_bytes(4096, 6), b"after!".to_vec(), "the retried write is on the export");
    assert!(client.stats().reconnects.load(std::sync::atomic::Ordering::Relaxed) >= 1);
    drop(f);
    drop(fuse);
    h.shutdown().await;
}

/// Past the reconnect window, I/O fails with EIO (the export is gone for good).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_reconnect_that_never_succeeds_ends_in_eio() {
    require_fuse_and_loop();
    let h = Harness::start(&[("vol", mem("vol", SIZE))]).await;
    let dir = tempfile::tempdir().unwrap();
    let policy = ReconnectPolicy::within(Duration::from_secs(2));
    let (_client, fuse) = mount_reconnecting(&h.unix_uri("vol"), dir.path(), ClientOptions::default(), policy).await;
    let f = Arc::new(open_rw(fuse.file_path()));
    h.server.registry().remove("vol");
    let start = Instant::now();
    let g = f.clone();
    let err = blocking(move || g.write_at(b"lost", 0).unwrap_err()).await;
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    assert!(start.elapsed() >= Duration::from_millis(1500), "failed only after the window: {:?}", start.elapsed());
    drop(f);
    drop(fuse);
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dead_connection_gives_eio_not_a_hang() {
    require_fuse_and_loop();
    let h = Harness::start(&[("vol", mem("vol", SIZE))]).await;
    let dir = tempfile::tempdir().unwrap();
    let (client, fuse) = mount_export(&h.unix_uri("vol"), dir.path(), ClientOptions::default()).await;
    let f = Arc::new(open_rw(fuse.file_path()));
    let g = f.clone();
    blocking(move || g.write_all_at(b"before", 0).unwrap()).await;

    h.shutdown().await;
    let deadline = Instant::now() + Duration::from_secs(5);
    while !client.is_dead() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let g = f.clone();
    let start = Instant::now();
    let (read, write, sync) = blocking(move || {
        let mut buf = [0u8; 4096];
        (g.read_at(&mut buf, 0).unwrap_err(), g.write_at(b"after", 0).unwrap_err(), g.sync_all().unwrap_err())
    })
    .await;
    assert!(start.elapsed() < Duration::from_secs(2), "failed in {:?}", start.elapsed());
    for e in [read, write, sync] {
        assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}");
    }
    drop(f);
    fuse.unmount().await.expect("a dead export still unmounts cleanly");
    assert!(!is_mounted(dir.path()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hung_server_gives_eio_within_the_request_timeout() {
    require_fuse_and_loop();
    let slow = Arc::new(MemDevice::new("slow", SIZE).unwrap().with_delay(Duration::from_secs(3)));
    let h = Harness::start(&[("slow", slow)]).await;
    let dir = tempfile::tempdir().unwrap();
    let opts = ClientOptions { request_timeout: Duration::from_millis(400), ..ClientOptions::default() };
    let (_client, fuse) = mount_export(&h.uri("slow"), dir.path(), opts).await;
    let p = fuse.file_path().to_path_buf();
    let start = Instant::now();
    let err = blocking(move || {
        let mut buf = [0u8; 4096];
        std::fs::File::open(&p).unwrap().read_at(&mut buf, 0).unwrap_err()
    })
    .await;
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    assert!(start.elapsed() < Duration::from_millis(2500), "took {:?}", start.elapsed());
    fuse.unmount().await.expect("unmount");
    drop(h);
}

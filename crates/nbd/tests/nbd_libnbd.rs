//! nbdcopy and nbdsh (libnbd-bin, python3-libnbd) against the server: copies in and out,
//! multi-conn, and protocol edge cases driven by a real client library.

mod nbd_support;

use std::sync::Arc;

use hlstore_nbd::MemDevice;
use nbd_support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdcopy_in_and_out_with_multi_conn() {
    let size = 32 * MIB;
    let dev = mem("vol", size);
    let single = Arc::new(MemDevice::new("single", size).unwrap().with_multi_conn(false));
    let h = Harness::start(&[("vol", dev.clone()), ("single", single.clone())]).await;
    let mut image = pattern(size as usize, 11);
    image[MIB as usize..3 * MIB as usize].fill(0);
    let src = write_file(h.dir.path(), "src.raw", &image);

    let sessions = h.stat(|s| &s.sessions_total);
    run_ok(
        tool("nbdcopy", "libnbd-bin")
            .args(["--connections=4", "--threads=4", "--requests=16"])
            .arg(&src)
            .arg(h.uri("vol")),
    )
    .await;
    assert!(dev.read_bytes(0, size as usize) == image, "copied-in content differs");
    let used = h.stat(|s| &s.sessions_total) - sessions;
    assert!(used >= 4, "nbdcopy used {used} connections on a multi-conn export");

    let out = h.dir.path().join("out.raw");
    run_ok(tool("nbdcopy", "libnbd-bin").args(["--connections=4", "--threads=4"]).arg(h.unix_uri("vol")).arg(&out))
        .await;
    assert!(std::fs::read(&out).unwrap() == image, "copied-out content differs");

    // Without CAN_MULTI_CONN the client must stay on one connection.
    let sessions = h.stat(|s| &s.sessions_total);
    run_ok(tool("nbdcopy", "libnbd-bin").args(["--connections=4", "--threads=4"]).arg(&src).arg(h.uri("single"))).await;
    assert_eq!(h.stat(|s| &s.sessions_total) - sessions, 1, "one connection without CAN_MULTI_CONN");
    assert!(single.read_bytes(0, size as usize) == image);
    h.shutdown().await;
}

/// Protocol edge cases through libnbd with its client-side checks off, so the server's
/// answers are what is tested.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdsh_edge_cases_keep_the_export_serving() {
    let size = 4 * MIB;
    let dev = mem("vol", size);
    let h = Harness::start(&[("vol", dev.clone())]).await;
    let script = format!(
        r#"
import errno
h.set_strict_mode(0)
h.connect_uri("{uri}")
size = h.get_size()
assert size == {size}, size
assert h.can_flush() and h.can_fua() and h.can_trim() and h.can_zero() and h.can_multi_conn()

def expect_errno(code, fn, *args):
    try:
        fn(*args)
    except nbd.Error as e:
        assert e.errnum == code, (fn.__name__, args, e)
        return
    raise AssertionError("%s%r succeeded" % (fn.__name__, args))

expect_errno(errno.EINVAL, h.pread, 512, size - 100)
expect_errno(errno.ENOSPC, h.pwrite, b"y" * 10, size - 5)
expect_errno(errno.ENOSPC, h.zero, 8192, size - 4096)
expect_errno(errno.EINVAL, h.trim, 8192, size)
assert h.pread(4, 0) == bytes(4)

h.pwrite(b"fua!" * 1024, 4096, nbd.CMD_FLAG_FUA)
h.flush()
assert h.pread(4096, 4096) == b"fua!" * 1024
h.zero(4096, 8192, nbd.CMD_FLAG_NO_HOLE)
h.trim(4096, 4096)
assert h.pread(8192, 4096) == bytes(8192)
h.pwrite(b"abc", 12287, 0)
assert h.pread(5, 12286) == b"\0abc\0"

# Pipelined: many commands in flight at once, completed in any order.
pending = set()
for i in range(64):
    pending.add(h.aio_pwrite(bytes([i]) * 3000, 100000 + i * 3000))
assert h.aio_in_flight() > 1
while pending:
    h.poll(-1)
    for c in list(pending):
        if h.aio_command_completed(c):
            pending.remove(c)
for i in range(64):
    assert h.pread(3000, 100000 + i * 3000) == bytes([i]) * 3000, i
h.shutdown()
print("ok")
"#,
        uri = h.uri("vol"),
        size = size
    );
    let out = run_ok(tool("nbdsh", "python3-libnbd").args(["-c", &script])).await;
    assert_eq!(out.trim(), "ok");
    assert!(dev.flush_count() >= 1, "FLUSH reached the device");
    assert!(dev.fua_count() >= 1, "FUA reached the device");
    assert!(h.stat(|s| &s.errors) >= 4);
    // Blocks: 1 trimmed, 2 zeroed without hole, 3 holds "c"+zeroes, plus the pipelined range.
    assert_eq!(dev.read_bytes(12286, 5), b"\0abc\0");
    let pipelined_blocks = (100000 / 4096..=(100000 + 64 * 3000 - 1) / 4096).count();
    assert_eq!(dev.allocated_blocks(), 2 + pipelined_blocks);
    h.shutdown().await;
}

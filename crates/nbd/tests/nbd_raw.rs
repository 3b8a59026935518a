//! Raw-socket protocol tests: handshake options, malformed and out-of-range requests,
//! pipelining, device error mapping, cross-connection read-modify-write and shutdown.

mod nbd_support;

use std::sync::Arc;
use std::time::Duration;

use hlstore_core::ErrorKind;
use hlstore_nbd::proto::*;
use hlstore_nbd::request::{MAX_DRAIN, MAX_PAYLOAD};
use nbd_support::*;
use tokio::io::AsyncWriteExt;

const SIZE: u64 = 4 * MIB;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn option_haggling_answers_every_option() {
    let h = Harness::start(&[("vol", mem("vol", SIZE)), ("other", mem("other", 2 * MIB))]).await;
    let mut c = RawClient::connect(h.tcp, FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).await;

    let list = c.option(OPT_LIST, &[]).await;
    let names: Vec<String> = list
        .iter()
        .filter(|r| r.kind == REP_SERVER)
        .map(|r| String::from_utf8(r.data[4..].to_vec()).unwrap())
        .collect();
    assert_eq!(names, vec!["other", "vol"]);
    assert_eq!(list.last().unwrap().kind, REP_ACK);

    assert_eq!(c.option(OPT_LIST, &[1]).await.last().unwrap().kind, REP_ERR_INVALID);
    assert_eq!(c.option(OPT_STRUCTURED_REPLY, &[]).await.last().unwrap().kind, REP_ERR_UNSUP);
    assert_eq!(c.option(OPT_STARTTLS, &[]).await.last().unwrap().kind, REP_ERR_UNSUP);
    assert_eq!(c.option(0x7777, &[1, 2, 3]).await.last().unwrap().kind, REP_ERR_UNSUP);
    assert_eq!(c.option(OPT_GO, &[0, 0, 0, 50, 1]).await.last().unwrap().kind, REP_ERR_INVALID);
    let unknown = c.option(OPT_GO, &RawClient::go_payload("nope", &[])).await;
    assert_eq!(unknown.last().unwrap().kind, REP_ERR_UNKNOWN);
    assert_eq!(
        c.option(OPT_GO, &RawClient::go_payload("VOL", &[])).await.last().unwrap().kind,
        REP_ERR_UNKNOWN,
        "names match exactly"
    );

    // Oversized option: drained and refused, the handshake goes on.
    let big = vec![0u8; 100 * 1024];
    assert_eq!(c.option(OPT_INFO, &big).await.last().unwrap().kind, REP_ERR_TOO_BIG);

    let info = c.option(OPT_INFO, &RawClient::go_payload("other", &[INFO_NAME, INFO_BLOCK_SIZE])).await;
    let export = info.iter().find(|r| r.kind == REP_INFO && r.data[..2] == INFO_EXPORT.to_be_bytes()).unwrap();
    assert_eq!(u64::from_be_bytes(export.data[2..10].try_into().unwrap()), 2 * MIB);
    let flags = u16::from_be_bytes(export.data[10..12].try_into().unwrap());
    let want = FLAG_HAS_FLAGS
        | FLAG_SEND_FLUSH
        | FLAG_SEND_FUA
        | FLAG_SEND_TRIM
        | FLAG_SEND_WRITE_ZEROES
        | FLAG_CAN_MULTI_CONN;
    assert_eq!(flags, want);
    let sizes = info.iter().find(|r| r.kind == REP_INFO && r.data[..2] == INFO_BLOCK_SIZE.to_be_bytes()).unwrap();
    let u32_at = |i: usize| u32::from_be_bytes(sizes.data[i..i + 4].try_into().unwrap());
    assert_eq!((u32_at(2), u32_at(6), u32_at(10)), (1, 4096, 32 * 1024 * 1024));
    let name = info.iter().find(|r| r.kind == REP_INFO && r.data[..2] == INFO_NAME.to_be_bytes()).unwrap();
    assert_eq!(&name.data[2..], b"other");

    // GO into transmission and read.
    let go = c.option(OPT_GO, &RawClient::go_payload("vol", &[])).await;
    assert_eq!(go.last().unwrap().kind, REP_ACK);
    let (errno, data) = c.call(CMD_READ, 0, 0, 4096, &[]).await;
    assert_eq!((errno, data), (0, vec![0u8; 4096]));
    c.send_request(CMD_DISC, 0, 1, 0, 0, &[]).await;
    assert!(c.closed_by_server().await, "NBD_CMD_DISC closes the connection");

    // NBD_OPT_ABORT gets an ACK.
    let mut c = RawClient::connect(h.tcp, FLAG_C_FIXED_NEWSTYLE).await;
    assert_eq!(c.option(OPT_ABORT, &[]).await.last().unwrap().kind, REP_ACK);
    assert!(c.closed_by_server().await);
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_name_option_enters_transmission_or_closes() {
    let dev = mem("vol", SIZE);
    let h = Harness::start(&[("vol", dev.clone())]).await;
    for no_zeroes in [false, true] {
        let flags = FLAG_C_FIXED_NEWSTYLE | if no_zeroes { FLAG_C_NO_ZEROES } else { 0 };
        let mut c = RawClient::connect(h.tcp, flags).await;
        c.send_option(OPT_EXPORT_NAME, b"vol").await;
        let reply = c.read_data(10 + if no_zeroes { 0 } else { 124 }).await;
        assert_eq!(u64::from_be_bytes(reply[..8].try_into().unwrap()), SIZE);
        assert!(reply[10..].iter().all(|&b| b == 0));
        let (errno, _) = c.call(CMD_WRITE, 0, 8192, 4, b"abcd").await;
        assert_eq!(errno, 0);
        let (errno, data) = c.call(CMD_READ, 0, 8190, 8, &[]).await;
        assert_eq!((errno, data.as_slice()), (0, &b"\0\0abcd\0\0"[..]));
    }
    // Unknown export name: the server must close (no error reply exists for this option).
    let mut c = RawClient::connect(h.tcp, FLAG_C_FIXED_NEWSTYLE).await;
    c.send_option(OPT_EXPORT_NAME, b"missing").await;
    assert!(c.closed_by_server().await);
    // Unknown client flags: closed.
    let mut c = RawClient::connect(h.tcp, 0x80).await;
    assert!(c.closed_by_server().await);
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_get_errors_and_the_export_keeps_serving() {
    let dev = mem("vol", SIZE);
    let h = Harness::start(&[("vol", dev.clone())]).await;
    let mut c = RawClient::go(h.tcp, "vol").await;

    assert_eq!(c.call(CMD_READ, 0, SIZE - 100, 512, &[]).await.0, EINVAL, "read past end");
    assert_eq!(c.call(CMD_READ, 0, u64::MAX - 10, 512, &[]).await.0, EINVAL, "offset overflow");
    assert_eq!(c.call(CMD_WRITE, 0, SIZE - 2, 4, b"wxyz").await.0, ENOSPC, "write past end");
    assert_eq!(c.call(CMD_WRITE_ZEROES, 0, SIZE, 4096, &[]).await.0, ENOSPC, "zero past end");
    assert_eq!(c.call(CMD_TRIM, 0, SIZE, 4096, &[]).await.0, EINVAL, "trim past end");
    assert_eq!(c.call(99, 0, 0, 0, &[]).await.0, EINVAL, "unknown command");
    assert_eq!(c.call(CMD_BLOCK_STATUS, 0, 0, 4096, &[]).await.0, EINVAL, "block status not negotiated");
    assert_eq!(c.call(CMD_CACHE, 0, 0, 4096, &[]).await.0, EINVAL, "cache not advertised");
    assert_eq!(c.call(CMD_READ, CMD_FLAG_DF, 0, 4096, &[]).await.0, EINVAL, "DF without structured replies");
    assert_eq!(c.call(CMD_WRITE, CMD_FLAG_NO_HOLE, 0, 3, b"abc").await.0, EINVAL, "NO_HOLE on a write");
    assert_eq!(c.call(CMD_READ, 0, 0, MAX_PAYLOAD + 1, &[]).await.0, EOVERFLOW, "read too large");
    // A too-large write whose payload is sent: drained, EINVAL, and the stream stays in sync.
    let big = vec![0xee_u8; MAX_PAYLOAD as usize + 4096];
    assert_eq!(c.call(CMD_WRITE, 0, 0, big.len() as u32, &big).await.0, EINVAL, "write too large");
    assert_eq!(dev.allocated_blocks(), 0, "nothing of the rejected writes reached the device");

    // Still serving on this connection.
    assert_eq!(c.call(CMD_WRITE, CMD_FLAG_FUA, SIZE - 4, 4, b"tail").await.0, 0);
    assert_eq!(c.call(CMD_READ, 0, SIZE - 4, 4, &[]).await, (0, b"tail".to_vec()));
    assert_eq!(c.call(CMD_FLUSH, 0, 0, 0, &[]).await.0, 0);
    assert!(h.stat(|s| &s.errors) >= 12);

    // Bad magic: unrecoverable for that connection, which is closed cleanly.
    c.s.write_all(&[0xde, 0xad, 0xbe, 0xef]).await.unwrap();
    c.s.write_all(&[0u8; 24]).await.unwrap();
    assert!(c.closed_by_server().await, "bad magic closes the connection");

    // A write too large to drain: closed as well.
    let mut c = RawClient::go(h.tcp, "vol").await;
    c.send_request(CMD_WRITE, 0, 5, 0, MAX_DRAIN + 1, &[]).await;
    assert!(c.closed_by_server().await, "undrainable write closes the connection");
    assert_eq!(wait_for_stat(&h, |s| &s.protocol_violations, 2).await, 2);

    // The export serves a new connection.
    let mut c = RawClient::go(h.tcp, "vol").await;
    assert_eq!(c.call(CMD_READ, 0, SIZE - 4, 4, &[]).await, (0, b"tail".to_vec()));
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_errors_map_to_errno() {
    let dev = mem("vol", SIZE);
    let h = Harness::start(&[("vol", dev.clone())]).await;
    let mut c = RawClient::go(h.tcp, "vol").await;
    for (kind, errno) in [
        (ErrorKind::Corruption, EIO),
        (ErrorKind::Unavailable, EIO),
        (ErrorKind::Io, EIO),
        (ErrorKind::InvalidArgument, EINVAL),
    ] {
        dev.fail_at(Some((8192, kind)));
        assert_eq!(c.call(CMD_READ, 0, 8000, 400, &[]).await.0, errno, "{kind:?} on read");
        assert_eq!(c.call(CMD_WRITE, 0, 8192, 1, b"x").await.0, errno, "{kind:?} on write");
    }
    dev.fail_at(Some((8192, ErrorKind::OutOfRange)));
    assert_eq!(c.call(CMD_WRITE, 0, 8192, 4096, &[1u8; 4096]).await.0, ENOSPC);
    assert_eq!(c.call(CMD_READ, 0, 8192, 4096, &[]).await.0, EINVAL);
    dev.fail_at(None);
    assert_eq!(c.call(CMD_READ, 0, 8000, 400, &[]).await, (0, vec![0u8; 400]));
    // A fenced device answers ESHUTDOWN and the server then closes the connection, so the
    // client reconnects to whichever engine holds the volume now.
    dev.fail_at(Some((8192, ErrorKind::StaleEpoch)));
    assert_eq!(c.call(CMD_WRITE, 0, 8192, 1, b"x").await.0, ESHUTDOWN);
    assert!(c.closed_by_server().await, "a fenced device's connection is closed");
    dev.fail_at(None);
    let mut c = RawClient::go(h.tcp, "vol").await;
    assert_eq!(c.call(CMD_READ, 0, 8000, 400, &[]).await, (0, vec![0u8; 400]));
    h.shutdown().await;
}

/// Many requests in flight on one connection; replies matched by cookie.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_requests_all_get_their_reply() {
    let dev = mem("vol", SIZE);
    let h = Harness::start(&[("vol", dev.clone())]).await;
    let mut c = RawClient::go(h.tcp, "vol").await;
    let n = 200u64;
    let mut out = Vec::new();
    for i in 0..n {
        let payload = pattern(3000, i);
        let header = hlstore_nbd::request::RequestHeader {
            flags: 0,
            command: CMD_WRITE,
            cookie: 1000 + i,
            offset: i * 3000,
            length: 3000,
        };
        out.extend_from_slice(&header.encode());
        out.extend_from_slice(&payload);
    }
    c.s.write_all(&out).await.unwrap();
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..n {
        let (errno, cookie) = c.read_reply().await;
        assert_eq!(errno, 0);
        assert!(seen.insert(cookie), "cookie {cookie} answered twice");
    }
    assert_eq!(seen, (1000..1000 + n).collect());
    for i in 0..n {
        assert_eq!(dev.read_bytes(i * 3000, 3000), pattern(3000, i), "piece {i}");
    }
    h.shutdown().await;
}

/// Four connections write interleaved 512-byte pieces into the same 4 KiB blocks, all
/// pipelined: every piece needs a read-modify-write of a block other connections are
/// modifying at the same time. Nothing may be lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_read_modify_writes_across_connections_lose_nothing() {
    let dev = mem("vol", SIZE);
    let h = Harness::start(&[("vol", dev.clone())]).await;
    let conns = 4u64;
    let piece = 512u64;
    let blocks = 64u64;
    let mut tasks = Vec::new();
    for k in 0..conns {
        let addr = h.tcp;
        tasks.push(tokio::spawn(async move {
            let mut c = RawClient::go(addr, "vol").await;
            let mut out = Vec::new();
            let mut count = 0;
            // Connection k writes pieces k, k+4 of every block.
            for b in 0..blocks {
                for p in [k, k + conns] {
                    let off = b * 4096 + p * piece;
                    let h = hlstore_nbd::request::RequestHeader {
                        flags: 0,
                        command: CMD_WRITE,
                        cookie: off,
                        offset: off,
                        length: piece as u32,
                    };
                    out.extend_from_slice(&h.encode());
                    out.extend_from_slice(&pattern(piece as usize, off));
                    count += 1;
                }
            }
            c.s.write_all(&out).await.unwrap();
            for _ in 0..count {
                assert_eq!(c.read_reply().await.0, 0);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    for b in 0..blocks {
        for p in 0..8 {
            let off = b * 4096 + p * piece;
            assert_eq!(dev.read_bytes(off, piece as usize), pattern(piece as usize, off), "piece at {off} lost");
        }
    }
    assert!(h.stat(|s| &s.read_modify_writes) >= conns * blocks * 2);
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_closes_connections_and_returns() {
    let dev = mem("vol", SIZE);
    let h = Harness::start(&[("vol", dev.clone())]).await;
    let mut c = RawClient::go(h.tcp, "vol").await;
    assert_eq!(c.call(CMD_WRITE, 0, 0, 4096, &[3u8; 4096]).await.0, 0);
    let mut idle = RawClient::connect(h.tcp, FLAG_C_FIXED_NEWSTYLE).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(h.stat(|s| &s.connections_active), 2);
    let stats = h.server.stats();
    h.shutdown().await;
    assert!(c.closed_by_server().await);
    assert!(idle.closed_by_server().await);
    assert_eq!(stats.connections_active.load(std::sync::atomic::Ordering::Relaxed), 0);
    assert_eq!(stats.writes.load(std::sync::atomic::Ordering::Relaxed), 1);
    let _ = Arc::clone(&dev);
}

/// Requests in flight when shutdown starts still complete and get their replies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_lets_in_flight_requests_finish() {
    let slow = Arc::new(hlstore_nbd::MemDevice::new("slow", SIZE).unwrap().with_delay(Duration::from_millis(300)));
    let h = Harness::start(&[("slow", slow.clone())]).await;
    let mut c = RawClient::go(h.tcp, "slow").await;
    c.send_request(CMD_WRITE, CMD_FLAG_FUA, 7, 4096, 4, b"late").await;
    c.send_request(CMD_READ, 0, 8, 0, 4, &[]).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let server = h.server.clone();
    let shutdown = tokio::spawn(async move { h.shutdown().await });
    let mut got = Vec::new();
    for _ in 0..2 {
        let (errno, cookie) = c.read_reply().await;
        assert_eq!(errno, 0, "cookie {cookie}");
        if cookie == 8 {
            assert_eq!(c.read_data(4).await, vec![0u8; 4]);
        }
        got.push(cookie);
    }
    got.sort();
    assert_eq!(got, vec![7, 8]);
    assert!(c.closed_by_server().await);
    shutdown.await.unwrap();
    assert_eq!(slow.read_bytes(4096, 4), b"late");
    assert_eq!(slow.fua_count(), 1);
    assert!(server.shutdown_handle().is_shutdown());
}

#[test]
#[should_panic(expected = "Debian package `no-such-package`")]
fn a_missing_tool_fails_naming_its_package() {
    let _ = tool("hlstore-no-such-tool", "no-such-package");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_only_exports_refuse_writes_with_eperm() {
    let dev = mem("snap", SIZE);
    let h = Harness::start(&[]).await;
    h.server.registry().insert_read_only("snap", dev.clone());
    let mut c = RawClient::connect(h.tcp, FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).await;
    let go = c.option(OPT_GO, &RawClient::go_payload("snap", &[])).await;
    let export = go.iter().find(|r| r.kind == REP_INFO && r.data[..2] == INFO_EXPORT.to_be_bytes()).unwrap();
    let flags = u16::from_be_bytes(export.data[10..12].try_into().unwrap());
    assert_ne!(flags & FLAG_READ_ONLY, 0);
    assert_eq!(go.last().unwrap().kind, REP_ACK);
    assert_eq!(c.call(CMD_WRITE, 0, 0, 4096, &[1u8; 4096]).await.0, EPERM);
    assert_eq!(c.call(CMD_WRITE_ZEROES, CMD_FLAG_NO_HOLE, 0, 4096, &[]).await.0, EPERM);
    assert_eq!(c.call(CMD_TRIM, 0, 0, 4096, &[]).await.0, EPERM);
    assert_eq!(c.call(CMD_READ, 0, 0, 4096, &[]).await, (0, vec![0u8; 4096]));
    assert_eq!(c.call(CMD_FLUSH, 0, 0, 0, &[]).await.0, 0);
    assert_eq!(dev.allocated_blocks(), 0);
    h.shutdown().await;
}

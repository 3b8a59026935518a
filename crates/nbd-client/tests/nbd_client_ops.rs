//! `NbdClient` against the in-process `NbdServer<MemDevice>`: every command, splitting,
//! pipelining, error mapping, timeouts and a dying connection.

#[path = "../../nbd/tests/nbd_support/mod.rs"]
mod nbd_support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use hlstore_core::ErrorKind;
use hlstore_nbd::proto::*;
use hlstore_nbd::MemDevice;
use hlstore_nbd_client::{ClientOptions, NbdClient, NbdUri};
use nbd_support::*;

const SIZE: u64 = 8 * MIB;

async fn connect(uri: &str) -> NbdClient {
    NbdClient::connect(&NbdUri::parse(uri).unwrap(), ClientOptions::default()).await.expect("connect")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_command_reaches_the_device_over_tcp_and_unix() {
    let dev = mem("vol", SIZE);
    let h = Harness::start(&[("vol", dev.clone())]).await;
    for uri in [h.uri("vol"), h.unix_uri("vol")] {
        let c = connect(&uri).await;
        let info = c.info();
        assert_eq!(c.size(), SIZE);
        assert!(info.has(FLAG_SEND_FLUSH) && info.has(FLAG_SEND_FUA) && info.has(FLAG_SEND_TRIM));
        assert!(info.has(FLAG_SEND_WRITE_ZEROES) && !info.read_only());
        assert_eq!(info.max_block, hlstore_nbd::request::MAX_PAYLOAD);

        // Unaligned write and read back, through the client and straight from the device.
        let data = pattern(10_000, 1);
        c.write(4000, &data, false).await.unwrap();
        assert_eq!(c.read(4000, data.len()).await.unwrap(), data);
        assert_eq!(dev.read_bytes(4000, data.len()), data);

        let fua_before = dev.fua_count();
        c.write(0, &[9u8; 4096], true).await.unwrap();
        assert_eq!(dev.fua_count(), fua_before + 1, "FUA flag reaches the device");
        let flushes = dev.flush_count();
        c.flush().await.unwrap();
        assert_eq!(dev.flush_count(), flushes + 1);

        // WRITE_ZEROES with NO_HOLE keeps blocks allocated, without it they may go; TRIM
        // deallocates whole blocks.
        c.write(MIB, &vec![7u8; 64 * 1024], false).await.unwrap();
        let allocated = dev.allocated_blocks();
        c.write_zeroes(MIB, 16 * 1024, false).await.unwrap();
        assert_eq!(dev.allocated_blocks(), allocated);
        assert_eq!(dev.read_bytes(MIB, 16 * 1024), vec![0u8; 16 * 1024]);
        c.write_zeroes(MIB + 16 * 1024, 16 * 1024, true).await.unwrap();
        assert_eq!(dev.allocated_blocks(), allocated - 4);
        c.trim(MIB + 32 * 1024, 32 * 1024).await.unwrap();
        assert_eq!(dev.allocated_blocks(), allocated - 12);
        assert_eq!(c.read(MIB, 64 * 1024).await.unwrap(), vec![0u8; 64 * 1024]);

        // Clean up for the next transport, then disconnect.
        c.trim(0, SIZE).await.unwrap();
        assert_eq!(dev.allocated_blocks(), 0);
        c.disconnect().await.unwrap();
        assert_eq!(c.read(0, 1).await.unwrap_err().kind(), ErrorKind::Unavailable);
    }
    assert_eq!(wait_for_stat_eq_zero(&h).await, 0, "server saw both connections close");
    assert_eq!(h.stat(|s| &s.protocol_violations), 0);
    h.shutdown().await;
}

async fn wait_for_stat_eq_zero(h: &Harness) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let v = h.stat(|s| &s.connections_active);
        if v == 0 || Instant::now() > deadline {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_larger_than_the_max_block_are_split() {
    let size = 80 * MIB;
    let dev = mem("big", size);
    let h = Harness::start(&[("big", dev.clone())]).await;
    let c = connect(&h.unix_uri("big")).await;
    let data = pattern(70 * MIB as usize + 123, 2);
    let writes = h.stat(|s| &s.writes);
    c.write(5, &data, false).await.unwrap();
    assert_eq!(h.stat(|s| &s.writes) - writes, 3, "70 MiB in 32 MiB chunks");
    let reads = h.stat(|s| &s.reads);
    assert!(c.read(5, data.len()).await.unwrap() == data, "split read returns the data in order");
    assert_eq!(h.stat(|s| &s.reads) - reads, 3);
    assert!(dev.read_bytes(5, data.len()) == data);
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_requests_are_in_flight_at_once() {
    let delay = Duration::from_millis(200);
    let dev = Arc::new(MemDevice::new("slow", SIZE).unwrap().with_delay(delay));
    let h = Harness::start(&[("slow", dev.clone())]).await;
    let c = Arc::new(connect(&h.uri("slow")).await);
    let start = Instant::now();
    let tasks: Vec<_> = (0..32u64)
        .map(|i| {
            let c = c.clone();
            tokio::spawn(async move {
                let data = pattern(4096, i);
                c.write(i * 4096, &data, false).await.unwrap();
                assert_eq!(c.read(i * 4096, 4096).await.unwrap(), data);
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    // 64 requests of 200 ms each: serially that is 12.8 s.
    assert!(start.elapsed() < Duration::from_secs(3), "took {:?}: requests were not pipelined", start.elapsed());
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_map_to_engine_kinds() {
    let dev = mem("vol", SIZE);
    let ro = mem("ro", SIZE);
    let h = Harness::start(&[("vol", dev.clone())]).await;
    h.server.registry().insert_read_only("ro", ro);
    let c = connect(&h.uri("vol")).await;

    for (kind, want) in [
        (ErrorKind::Io, ErrorKind::Io),
        (ErrorKind::Corruption, ErrorKind::Io),
        (ErrorKind::InvalidArgument, ErrorKind::InvalidArgument),
    ] {
        dev.fail_at(Some((8192, kind)));
        let err = c.read(8192, 10).await.unwrap_err();
        assert_eq!(err.kind(), want, "device {kind:?} → {err}");
    }
    dev.fail_at(None);
    assert_eq!(c.read(8192, 10).await.unwrap(), vec![0u8; 10], "the connection survives errors");
    // Fenced: ESHUTDOWN, then the server closes the connection (a new one works).
    dev.fail_at(Some((8192, ErrorKind::StaleEpoch)));
    assert_eq!(c.read(8192, 10).await.unwrap_err().kind(), ErrorKind::StaleEpoch);
    dev.fail_at(None);
    assert!(c.read(8192, 10).await.is_err(), "the fenced connection was closed");
    let c = connect(&h.uri("vol")).await;
    assert_eq!(c.read(8192, 10).await.unwrap(), vec![0u8; 10]);

    // Checked before sending: outside the export.
    assert_eq!(c.read(SIZE - 1, 2).await.unwrap_err().kind(), ErrorKind::OutOfRange);
    assert_eq!(c.write(SIZE, &[1], false).await.unwrap_err().kind(), ErrorKind::OutOfRange);
    assert_eq!(c.trim(u64::MAX, 2).await.unwrap_err().kind(), ErrorKind::OutOfRange);

    let ro = connect(&h.uri("ro")).await;
    assert!(ro.info().read_only());
    assert_eq!(ro.write(0, &[1], false).await.unwrap_err().kind(), ErrorKind::InvalidArgument);
    assert_eq!(ro.read(0, 4).await.unwrap(), vec![0u8; 4]);

    let missing = NbdClient::connect(&NbdUri::parse(&h.uri("nope")).unwrap(), ClientOptions::default()).await;
    assert_eq!(missing.unwrap_err().kind(), ErrorKind::NotFound);
    let refused = NbdClient::connect(
        &NbdUri::parse(&format!("nbd+unix:///vol?socket={}", h.dir.path().join("absent.sock").display())).unwrap(),
        ClientOptions::default(),
    )
    .await;
    assert_eq!(refused.unwrap_err().kind(), ErrorKind::Io);
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_server_times_out_and_kills_the_connection() {
    let dev = Arc::new(MemDevice::new("hung", SIZE).unwrap().with_delay(Duration::from_secs(4)));
    let h = Harness::start(&[("hung", dev)]).await;
    let opts = ClientOptions { request_timeout: Duration::from_millis(300), ..ClientOptions::default() };
    let c = NbdClient::connect(&NbdUri::parse(&h.uri("hung")).unwrap(), opts).await.unwrap();
    let start = Instant::now();
    let (a, b) = tokio::join!(c.read(0, 4096), c.write(4096, &[1u8; 4096], false));
    assert!(start.elapsed() < Duration::from_secs(2), "timed out after {:?}", start.elapsed());
    assert_eq!(a.unwrap_err().kind(), ErrorKind::Unavailable);
    assert_eq!(b.unwrap_err().kind(), ErrorKind::Unavailable);
    assert!(c.is_dead());
    let start = Instant::now();
    assert_eq!(c.flush().await.unwrap_err().kind(), ErrorKind::Unavailable);
    assert!(start.elapsed() < Duration::from_millis(100), "a dead connection fails fast");
    drop(h);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_shutdown_fails_requests_instead_of_hanging() {
    let dev = mem("vol", SIZE);
    let h = Harness::start(&[("vol", dev)]).await;
    let c = connect(&h.unix_uri("vol")).await;
    c.write(0, b"hello", true).await.unwrap();
    h.shutdown().await;
    let deadline = Instant::now() + Duration::from_secs(5);
    while !c.is_dead() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(c.is_dead(), "the reader noticed the closed connection");
    let err = c.read(0, 5).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unavailable);
    assert!(err.to_string().contains("closed"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_name_fallback_and_a_non_nbd_server_are_handled() {
    // A server that refuses NBD_OPT_GO with ERR_UNSUP, then answers EXPORT_NAME.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (mut s, _) = listener.accept().await.unwrap();
        s.write_u64(NBD_MAGIC).await.unwrap();
        s.write_u64(IHAVEOPT).await.unwrap();
        s.write_u16(FLAG_FIXED_NEWSTYLE).await.unwrap();
        assert_eq!(s.read_u32().await.unwrap(), FLAG_C_FIXED_NEWSTYLE, "NO_ZEROES not offered, not sent");
        assert_eq!(s.read_u64().await.unwrap(), IHAVEOPT);
        assert_eq!(s.read_u32().await.unwrap(), OPT_GO);
        let len = s.read_u32().await.unwrap();
        let mut skip = vec![0u8; len as usize];
        s.read_exact(&mut skip).await.unwrap();
        s.write_u64(OPTION_REPLY_MAGIC).await.unwrap();
        s.write_u32(OPT_GO).await.unwrap();
        s.write_u32(REP_ERR_UNSUP).await.unwrap();
        s.write_u32(0).await.unwrap();
        assert_eq!(s.read_u64().await.unwrap(), IHAVEOPT);
        assert_eq!(s.read_u32().await.unwrap(), OPT_EXPORT_NAME);
        let len = s.read_u32().await.unwrap();
        let mut name = vec![0u8; len as usize];
        s.read_exact(&mut name).await.unwrap();
        assert_eq!(name, b"old");
        s.write_u64(12345 * 512).await.unwrap();
        s.write_u16(FLAG_HAS_FLAGS | FLAG_READ_ONLY).await.unwrap();
        s.write_all(&[0u8; EXPORT_NAME_PADDING]).await.unwrap();
        // Keep the socket open until the client is done.
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest).await;
    });
    let c = NbdClient::connect(&NbdUri::parse(&format!("nbd://{addr}/old")).unwrap(), ClientOptions::default())
        .await
        .unwrap();
    assert_eq!(c.size(), 12345 * 512);
    assert!(c.info().read_only());
    drop(c);
    server.await.unwrap();

    // Something that is not an NBD server at all.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let junk = tokio::spawn(async move {
        use tokio::io::AsyncWriteExt;
        let (mut s, _) = listener.accept().await.unwrap();
        let _ = s.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n").await;
    });
    let err = NbdClient::connect(&NbdUri::parse(&format!("nbd://{addr}/x")).unwrap(), ClientOptions::default())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("not an NBD server"), "{err}");
    junk.await.unwrap();
}

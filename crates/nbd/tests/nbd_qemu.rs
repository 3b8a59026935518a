//! qemu-io and qemu-img (qemu-utils) against the server: patterns, unaligned
//! read-modify-write, TRIM and WRITE_ZEROES with and without holes, image conversion.

mod nbd_support;

use nbd_support::*;

/// Runs qemu-io commands against `uri`; fails on a non-zero exit or a failed verification.
async fn qemu_io(uri: &str, commands: &[&str]) -> String {
    let mut cmd = tool("qemu-io", "qemu-utils");
    cmd.args(["-f", "raw"]);
    for c in commands {
        cmd.args(["-c", c]);
    }
    cmd.arg(uri);
    let out = run_ok(&mut cmd).await;
    let lower = out.to_lowercase();
    assert!(
        !lower.contains("fail") && !lower.contains("error"),
        "qemu-io {commands:?} on {uri} reported a failure:\n{out}"
    );
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_io_patterns_round_trip_over_tcp_and_unix() {
    let dev = mem("vol", 16 * MIB);
    let h = Harness::start(&[("vol", dev.clone())]).await;
    qemu_io(&h.uri("vol"), &["write -P 0xab 0 64k", "read -P 0xab 0 64k", "write -f -P 0x11 1M 128k"]).await;
    assert_eq!(dev.read_bytes(0, 64 * 1024), vec![0xab; 64 * 1024]);
    assert!(dev.fua_count() >= 1, "write -f sends FUA");
    qemu_io(&h.unix_uri("vol"), &["read -P 0xab 0 64k", "read -P 0x11 1M 128k", "read -P 0 64k 64k", "flush"]).await;
    assert!(dev.flush_count() >= 1);
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_io_unaligned_requests_use_read_modify_write() {
    let dev = mem("vol", 16 * MIB);
    let h = Harness::start(&[("vol", dev.clone())]).await;
    let uri = h.uri("vol");
    qemu_io(&uri, &["write -P 0x55 0 16k"]).await;
    let before = h.stat(|s| &s.read_modify_writes);
    qemu_io(
        &uri,
        &[
            "write -P 0xcd 1000 3000",
            "read -P 0xcd 1000 3000",
            "read -P 0x55 0 1000",
            "read -P 0x55 4000 12384",
            "write -P 0xee 4095 2",
            "read -P 0xee 4095 2",
            "read -P 0xcd 1000 3000",
            "write -P 0x77 10001 1",
            "read -P 0x77 10001 1",
            "read -P 0x55 10002 6382",
        ],
    )
    .await;
    assert!(h.stat(|s| &s.read_modify_writes) >= before + 3, "unaligned writes went through read-modify-write");
    let mut model = vec![0x55u8; 16 * 1024];
    model[1000..4000].fill(0xcd);
    model[4095..4097].fill(0xee);
    model[10001] = 0x77;
    assert_eq!(dev.read_bytes(0, 16 * 1024), model);
    // Unaligned zeroing: partial blocks by read-modify-write.
    qemu_io(
        &h.unix_uri("vol"),
        &["write -z 100 5000", "read -P 0 100 5000", "read -P 0x55 0 100", "read -P 0x55 5100 4900"],
    )
    .await;
    model[100..5100].fill(0);
    assert_eq!(dev.read_bytes(0, 16 * 1024), model);
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trim_and_write_zeroes_are_observable() {
    let dev = mem("vol", 16 * MIB);
    let h = Harness::start(&[("vol", dev.clone())]).await;
    let uri = h.uri("vol");
    qemu_io(&uri, &["write -P 0x3c 0 4M"]).await;
    assert_eq!(dev.allocated_blocks(), 1024);

    qemu_io(&uri, &["discard 0 1M", "read -P 0 0 1M", "read -P 0x3c 1M 3M"]).await;
    assert_eq!(dev.allocated_blocks(), 768, "TRIM deallocates");
    assert!(h.stat(|s| &s.trims) >= 1);

    // write -z without -u: NBD_CMD_FLAG_NO_HOLE, the range stays allocated.
    qemu_io(&uri, &["write -z 1M 1M", "read -P 0 1M 1M"]).await;
    assert_eq!(dev.allocated_blocks(), 768, "WRITE_ZEROES with NO_HOLE keeps blocks allocated");

    // write -z -u: may punch holes.
    qemu_io(&uri, &["write -z -u 2M 1M", "read -P 0 2M 1M", "read -P 0x3c 3M 1M"]).await;
    assert_eq!(dev.allocated_blocks(), 512, "WRITE_ZEROES without NO_HOLE deallocates");
    assert!(h.stat(|s| &s.write_zeroes) >= 2);

    // Zeroing previously unallocated space with NO_HOLE allocates it.
    qemu_io(&uri, &["write -z 8M 1M"]).await;
    assert_eq!(dev.allocated_blocks(), 768);
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_img_convert_in_and_out_is_byte_identical() {
    let size = 24 * MIB;
    let dev = mem("vol", size);
    let h = Harness::start(&[("vol", dev.clone())]).await;
    // Data with holes and an unaligned tail of data so zero detection and RMW both happen.
    let mut image = pattern(size as usize, 7);
    image[4 * MIB as usize..9 * MIB as usize].fill(0);
    image[(20 * MIB + 100) as usize..(21 * MIB) as usize].fill(0);
    let src = write_file(h.dir.path(), "src.raw", &image);
    let dst = h.dir.path().join("dst.raw");

    run_ok(
        tool("qemu-img", "qemu-utils").args(["convert", "-n", "-f", "raw", "-O", "raw"]).arg(&src).arg(h.uri("vol")),
    )
    .await;
    assert!(dev.read_bytes(0, size as usize) == image, "device content differs from the source image");
    run_ok(tool("qemu-img", "qemu-utils").args(["convert", "-f", "raw", "-O", "raw"]).arg(h.unix_uri("vol")).arg(&dst))
        .await;
    let out = std::fs::read(&dst).expect("read converted image");
    assert!(out == image, "image read back over NBD differs");
    run_ok(tool("qemu-img", "qemu-utils").args(["compare", "-f", "raw", "-F", "raw"]).arg(&src).arg(h.uri("vol")))
        .await;
    h.shutdown().await;
}

//! fio's nbd engine (package fio) against the server, with crc32c verification: random
//! and sequential writes, several connections at once, unaligned block sizes.

mod nbd_support;

use nbd_support::*;

async fn fio(h: &Harness, uri: &str, name: &str, args: &[&str]) -> String {
    let mut cmd = tool("fio", "fio");
    // fio writes its verify state next to where it runs: keep it in the test's temp dir.
    cmd.current_dir(h.dir.path());
    cmd.args([
        &format!("--name={name}"),
        "--ioengine=nbd",
        &format!("--uri={uri}"),
        "--verify=crc32c",
        "--do_verify=1",
        "--verify_fatal=1",
        "--verify_state_save=0",
        "--runtime=60",
        "--output-format=terse",
    ]);
    cmd.args(args);
    let out = run_ok(&mut cmd).await;
    // Terse format: field 5 is the job's error code.
    for line in out.lines().filter(|l| l.starts_with("3;")) {
        assert_eq!(line.split(';').nth(4), Some("0"), "fio job {name} reported an error: {line}");
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fio_random_and_sequential_writes_verify() {
    let dev = mem("vol", 64 * MIB);
    let h = Harness::start(&[("vol", dev.clone())]).await;
    fio(&h, &h.uri("vol"), "rand4k", &["--rw=randwrite", "--bs=4k", "--size=24m", "--iodepth=16"]).await;
    fio(&h, &h.unix_uri("vol"), "seq1m", &["--rw=write", "--bs=1m", "--size=48m", "--iodepth=4"]).await;
    assert!(h.stat(|s| &s.writes) >= 6144 + 48);
    assert!(h.stat(|s| &s.reads) >= 6144 + 48, "verification read everything back");
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fio_multi_connection_and_unaligned_writes_verify() {
    let dev = mem("vol", 64 * MIB);
    let h = Harness::start(&[("vol", dev.clone())]).await;
    let sessions = h.stat(|s| &s.sessions_total);
    fio(
        &h,
        &h.uri("vol"),
        "multi",
        &["--rw=randwrite", "--bs=8k", "--size=8m", "--numjobs=4", "--offset_increment=8m", "--iodepth=8"],
    )
    .await;
    assert!(h.stat(|s| &s.sessions_total) - sessions >= 4, "one connection per job");
    // Unaligned block size: every write is a read-modify-write.
    let rmw = h.stat(|s| &s.read_modify_writes);
    fio(&h, &h.uri("vol"), "unaligned", &["--rw=randwrite", "--bs=3000", "--size=6m", "--offset=40m", "--iodepth=8"])
        .await;
    assert!(h.stat(|s| &s.read_modify_writes) - rmw >= 1000);
    h.shutdown().await;
}

/// Throughput report (not a pass/fail test): `cargo test --release --test nbd_fio -- --ignored
/// --nocapture`. Prints fio's numbers for a `MemDevice` export, i.e. the frontend's overhead.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "benchmark: run explicitly"]
async fn fio_throughput_report() {
    let dev = mem("vol", 1024 * MIB);
    let h = Harness::start(&[("vol", dev.clone())]).await;
    for (uri, transport) in [(h.uri("vol"), "tcp"), (h.unix_uri("vol"), "unix")] {
        let jobs: [(&str, &[&str]); 4] = [
            ("randwrite-4k-qd32", &["--rw=randwrite", "--bs=4k", "--iodepth=32", "--size=256m"]),
            ("randread-4k-qd32", &["--rw=randread", "--bs=4k", "--iodepth=32", "--size=256m"]),
            ("write-1m-qd8", &["--rw=write", "--bs=1m", "--iodepth=8", "--size=1g"]),
            ("read-1m-qd8", &["--rw=read", "--bs=1m", "--iodepth=8", "--size=1g"]),
        ];
        for (name, args) in jobs {
            let out = run_ok(
                tool("fio", "fio")
                    .current_dir(h.dir.path())
                    .args([&format!("--name={name}"), "--ioengine=nbd", &format!("--uri={uri}")])
                    .args(["--runtime=10", "--time_based=0", "--output-format=terse"])
                    .args(args),
            )
            .await;
            // Terse v3: read bw KiB/s = field 7, read IOPS = 8; write bw = 48, write IOPS = 49.
            let f: Vec<&str> = out.lines().find(|l| l.starts_with("3;")).unwrap_or("").split(';').collect();
            let (bw, iops) = if name.contains("read") { (f[6], f[7]) } else { (f[47], f[48]) };
            let mib_s = bw.parse::<f64>().unwrap_or(0.0) / 1024.0;
            println!("nbd {transport:4} {name:18} {mib_s:9.1} MiB/s {iops:>8} IOPS");
        }
    }
    h.shutdown().await;
}

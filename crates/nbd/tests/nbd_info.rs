//! nbdinfo (libnbd-bin) against the server: handshake, flags, block sizes, export list.

mod nbd_support;

use std::sync::Arc;

use hlstore_nbd::MemDevice;
use nbd_support::*;
use serde_json::Value;

async fn nbdinfo_json(args: &[&str]) -> Value {
    let out = run_ok(tool("nbdinfo", "libnbd-bin").arg("--json").arg("--no-content").args(args)).await;
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("nbdinfo printed invalid JSON ({e}):\n{out}"))
}

fn only_export(v: &Value) -> &Value {
    let exports = v["exports"].as_array().expect("exports array");
    assert_eq!(exports.len(), 1, "{v}");
    &exports[0]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdinfo_sees_size_flags_and_block_sizes_over_tcp_and_unix() {
    let h = Harness::start(&[("vol1", mem("vol1", 64 * MIB))]).await;
    for uri in [h.uri("vol1"), h.unix_uri("vol1")] {
        let v = nbdinfo_json(&[&uri]).await;
        assert_eq!(v["protocol"], "newstyle-fixed", "{uri}");
        let e = only_export(&v);
        assert_eq!(e["export-name"], "vol1");
        assert_eq!(e["export-size"], 64 * MIB, "{uri}");
        for flag in ["can_flush", "can_fua", "can_trim", "can_zero", "can_multi_conn"] {
            assert_eq!(e[flag], true, "{flag} over {uri}");
        }
        for flag in ["is_read_only", "can_cache", "can_df", "can_fast_zero"] {
            assert_eq!(e[flag], false, "{flag} over {uri}");
        }
        assert_eq!(e["block_size_minimum"], 1);
        assert_eq!(e["block_size_preferred"], 4096);
        assert_eq!(e["block_size_maximum"], 32 * MIB);
    }
    assert!(h.stat(|s| &s.connections_total) >= 2);
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdinfo_lists_every_export_and_refuses_unknown_names() {
    let single = Arc::new(MemDevice::new("single", 8 * MIB).unwrap().with_multi_conn(false));
    let h =
        Harness::start(&[("alpha", mem("alpha", 4 * MIB)), ("beta", mem("beta", 8 * MIB)), ("single", single)]).await;

    let v = nbdinfo_json(&["--list", &h.uri("")]).await;
    let mut names: Vec<&str> =
        v["exports"].as_array().unwrap().iter().map(|e| e["export-name"].as_str().unwrap()).collect();
    names.sort();
    assert_eq!(names, ["alpha", "beta", "single"]);

    let beta = nbdinfo_json(&[&h.unix_uri("beta")]).await;
    assert_eq!(only_export(&beta)["export-size"], 8 * MIB);
    let single = nbdinfo_json(&[&h.uri("single")]).await;
    assert_eq!(only_export(&single)["can_multi_conn"], false, "device without multi_conn");

    // Unknown names (and the empty default name, which is not exported) are refused...
    for name in ["gamma", "", "Alpha"] {
        let out = run(tool("nbdinfo", "libnbd-bin").arg(h.uri(name))).await;
        assert!(!out.status.success(), "export {name:?} should not exist");
        let err = String::from_utf8_lossy(&out.stderr);
        // libnbd reports NBD_REP_ERR_UNKNOWN as ENOENT.
        assert!(err.contains("opt_go") && err.contains("No such file or directory"), "{name:?}: {err}");
    }
    // ...and the server goes on serving.
    let alpha = nbdinfo_json(&[&h.uri("alpha")]).await;
    assert_eq!(only_export(&alpha)["export-size"], 4 * MIB);

    // A read-only export says so, and real clients cannot write to it.
    h.server.registry().insert_read_only("ro", mem("ro", 2 * MIB));
    assert_eq!(only_export(&nbdinfo_json(&[&h.uri("ro")]).await)["is_read_only"], true);
    let write = run(tool("qemu-io", "qemu-utils").args(["-f", "raw", "-c", "write -P 1 0 4k"]).arg(h.uri("ro"))).await;
    let err = String::from_utf8_lossy(&write.stderr);
    assert!(!write.status.success(), "qemu-io opened a read-only export for writing");
    assert!(err.contains("Permission denied"), "qemu-io: {err}");

    // An export added or removed at run time is seen by new connections.
    h.server.registry().insert("late", mem("late", 2 * MIB));
    assert_eq!(only_export(&nbdinfo_json(&[&h.uri("late")]).await)["export-size"], 2 * MIB);
    h.server.registry().remove("late");
    assert!(!run(tool("nbdinfo", "libnbd-bin").arg(h.uri("late"))).await.status.success());
    h.shutdown().await;
}

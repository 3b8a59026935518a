//! The crate layering ARCHITECTURE.md draws, checked against `cargo tree`:
//! - each crate depends only on the hlstore crates below it (an upward import cannot
//!   compile, and this test keeps a new `Cargo.toml` line from making one possible);
//! - the lower layers stay free of what they must not pull in (the replica store knows
//!   neither gRPC nor FUSE; the NBD server knows neither gRPC nor RocksDB);
//! - the binary is built without test doubles (no `testing` feature in its normal graph).

use std::collections::BTreeSet;
use std::process::Command;

fn cargo() -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(env!("CARGO_MANIFEST_DIR"));
    c
}

/// `cargo tree` lines (no prefix) for `package`'s normal dependencies.
fn tree(package: &str, extra: &[&str]) -> Vec<String> {
    let out = cargo()
        .args(["tree", "--locked", "-p", package, "-e", "normal", "--prefix", "none"])
        .args(extra)
        .output()
        .expect("running cargo tree");
    assert!(out.status.success(), "cargo tree -p {package} failed:\n{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap().lines().map(str::to_string).collect()
}

/// Names of every package in `package`'s normal dependency graph (itself included).
fn closure(package: &str) -> BTreeSet<String> {
    tree(package, &[]).iter().filter_map(|l| l.split_whitespace().next()).map(str::to_string).collect()
}

/// The hlstore crates `package` depends on directly.
fn direct_hlstore(package: &str) -> BTreeSet<String> {
    tree(package, &["--depth", "1"])
        .iter()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with("hlstore") && *n != package)
        .map(str::to_string)
        .collect()
}

fn set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|s| s.to_string()).collect()
}

#[test]
fn each_crate_depends_only_on_the_layers_below_it() {
    let layers: &[(&str, &[&str])] = &[
        ("hlstore-core", &[]),
        ("hlstore-proto", &[]),
        ("hlstore-store", &["hlstore-core"]),
        ("hlstore-replication", &["hlstore-core", "hlstore-store", "hlstore-proto"]),
        ("hlstore-nbd", &["hlstore-core"]),
        ("hlstore-nbd-client", &["hlstore-core", "hlstore-nbd"]),
        ("hlstore-tls", &["hlstore-core"]),
        (
            "hlstore-node",
            &["hlstore-core", "hlstore-store", "hlstore-replication", "hlstore-nbd", "hlstore-proto", "hlstore-tls"],
        ),
        ("hlstore-csi", &["hlstore-core", "hlstore-nbd-client", "hlstore-proto", "hlstore-tls"]),
        ("hlstore-backup", &[]),
        ("hlstore-faultfs", &[]),
    ];
    for (package, allowed) in layers {
        let got = direct_hlstore(package);
        let allowed_set = set(allowed);
        let extra: Vec<_> = got.difference(&allowed_set).collect();
        assert!(extra.is_empty(), "{package} depends on {extra:?}, above or beside its layer (allowed: {allowed:?})");
    }
}

#[test]
fn lower_layers_do_not_pull_in_transport_or_fuse() {
    let forbidden: &[(&str, &[&str])] = &[
        ("hlstore-core", &["tonic", "prost", "fuser", "rocksdb"]),
        ("hlstore-store", &["tonic", "prost", "fuser", "hyper"]),
        ("hlstore-nbd", &["tonic", "prost", "fuser", "rocksdb"]),
        ("hlstore-replication", &["fuser"]),
        ("hlstore-node", &["fuser"]),
        ("hlstore-tls", &["rocksdb", "fuser", "prost"]),
    ];
    for (package, names) in forbidden {
        let all = closure(package);
        assert!(all.contains(*package), "cargo tree output for {package} does not list it: {all:?}");
        let found: Vec<_> = names.iter().filter(|n| all.contains(**n)).collect();
        assert!(found.is_empty(), "{package} pulls in {found:?}");
    }
}

#[test]
fn the_binary_is_built_without_test_doubles() {
    let lines = tree("hlstore", &["-e", "features"]);
    assert!(lines.iter().any(|l| l.starts_with("hlstore-store")), "the binary's graph lists the store");
    let testing: Vec<_> = lines.iter().filter(|l| l.contains("feature \"testing\"")).collect();
    assert!(testing.is_empty(), "the binary's normal graph enables test doubles: {testing:?}");
    // The check above can fail: the replication crate's own tests do enable them.
    let dev = cargo()
        .args(["tree", "--locked", "-p", "hlstore-replication", "-e", "features", "--prefix", "none"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&dev.stdout).contains("feature \"testing\""));
}

//! `--json` on every command that prints a result (scripts and the CronJob read it): the
//! whole command tree is walked through `--help`, and every leaf command takes `--json`
//! unless it is in [`NO_RESULT`], each entry with its reason. The replica commands'
//! output is checked against a real node agent.

mod support;

use std::process::Command;

use serde_json::Value;
use support::help::{has_option, walk};
use support::NodeProc;

/// Leaf commands that print no result to format, and why.
const NO_RESULT: &[(&str, &str)] = &[
    ("node", "a daemon: runs until stopped and logs (--log-json)"),
    ("csi", "a daemon: serves the CSI driver until stopped and logs (--log-json)"),
    ("fuse-attach", "a daemon: serves the FUSE file until unmounted"),
    ("replica read", "prints the replica's bytes themselves (or writes them to --output)"),
];

fn help_of(path: &[String]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_hlstore")).args(path).arg("--help").output().expect("hlstore --help");
    assert!(out.status.success(), "hlstore {} --help failed", path.join(" "));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn every_command_that_prints_a_result_takes_json() {
    let pages = walk(help_of);
    let leaves: Vec<(String, &String)> =
        pages.iter().filter(|(_, _, leaf)| *leaf).map(|(p, h, _)| (p.join(" "), h)).collect();
    assert!(leaves.len() > 30, "only {} leaf commands found: the help parser is broken", leaves.len());
    let mut missing = Vec::new();
    for (cmd, help) in &leaves {
        let exempt = NO_RESULT.iter().any(|(c, _)| c == cmd);
        match (has_option(help, "--json"), exempt) {
            (false, false) => missing.push(cmd.clone()),
            (true, true) => panic!("`hlstore {cmd}` takes --json now: take it off NO_RESULT"),
            _ => {}
        }
    }
    assert!(missing.is_empty(), "commands that print a result without --json: {missing:?}");
    for (cmd, _) in NO_RESULT {
        assert!(leaves.iter().any(|(c, _)| c == cmd), "NO_RESULT names `hlstore {cmd}`, which does not exist");
    }
    // The list, by name (a renamed command must not slip out of the walk).
    for cmd in [
        "volume create",
        "volume attach",
        "volume detach",
        "volume delete",
        "volume clone",
        "volume expand",
        "volume replace-replica",
        "snapshot delete",
        "snapshot revert",
        "backup init",
        "backup forget",
    ] {
        let (_, help) = leaves.iter().find(|(c, _)| c == cmd).unwrap_or_else(|| panic!("no `hlstore {cmd}`"));
        assert!(has_option(help, "--json"), "hlstore {cmd}");
    }
}

#[test]
fn the_option_parser_reads_options_not_prose() {
    assert!(has_option("Options:\n      --json\n          Print JSON", "--json"));
    assert!(has_option("      --size <SIZE>  Size", "--size"));
    assert!(!has_option("  list  List volumes (see backup list --json)", "--json"));
    assert!(!has_option("      --json-lines  Other", "--json"));
}

/// Runs `hlstore --insecure replica ARGS --endpoint EP --json`; the parsed output.
fn replica_json(ep: &str, args: &[&str]) -> Value {
    let out = Command::new(env!("CARGO_BIN_EXE_hlstore"))
        .arg("--insecure")
        .arg("replica")
        .args(args)
        .args(["--endpoint", ep, "--json"])
        .output()
        .expect("hlstore replica");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "replica {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("replica {args:?} printed invalid JSON ({e}):\n{text}"))
}

#[test]
fn replica_commands_print_json() {
    let dir = tempfile::tempdir().unwrap();
    let node = NodeProc::start("n1", &dir.path().join("data"));
    let ep = node.grpc.as_str();
    let created = replica_json(ep, &["create", "r1", "--size", "1MiB"]);
    assert_eq!((created["replica"].as_str(), created["size"].as_u64()), (Some("r1"), Some(1 << 20)), "{created}");
    let input = dir.path().join("data.bin");
    std::fs::write(&input, [7u8; 5000]).unwrap();
    let wrote = replica_json(ep, &["write", "r1", "--offset", "8KiB", "--input", input.to_str().unwrap()]);
    assert_eq!((wrote["offset"].as_u64(), wrote["bytes"].as_u64()), (Some(8192), Some(5000)), "{wrote}");
    assert!(wrote["seq"].as_u64().unwrap_or(0) > 0 && wrote["durable_seq"] == wrote["seq"], "{wrote}");
    let deleted = replica_json(ep, &["delete", "r1"]);
    assert_eq!(deleted, serde_json::json!({"replica": "r1", "existed": true}));
    let again = replica_json(ep, &["delete", "r1"]);
    assert_eq!(again["existed"], false);
}

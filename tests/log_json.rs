//! `--log-json` / `HLSTORE_LOG_JSON`: the node agent logs one JSON object per line (for
//! Loki), with level, message and structured fields; without it, plain text.

use std::io::{BufRead, BufReader, Read};
use std::process::{Command, Stdio};

/// Starts a node agent, waits until it is ready, stops it, returns its stderr.
fn node_stderr(json_flag: bool, json_env: bool) -> String {
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_hlstore"));
    cmd.args([
        "--insecure",
        "node",
        "--id",
        "n1",
        "--listen",
        "127.0.0.1:0",
        "--nbd-listen",
        "127.0.0.1:0",
        "--data-dir",
    ])
    .arg(dir.path())
    .env("HLSTORE_LOG", "info")
    .env_remove("HLSTORE_LOG_JSON")
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    if json_flag {
        cmd.arg("--log-json");
    }
    if json_env {
        cmd.env("HLSTORE_LOG_JSON", "1");
    }
    let mut child = cmd.spawn().unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    assert!(line.starts_with("listening"), "unexpected first line {line:?}");
    // SAFETY: plain kill(2) of our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let mut err = String::new();
    child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    child.wait().unwrap();
    err
}

fn ready_line(err: &str) -> serde_json::Value {
    let mut ready = None;
    for l in err.lines().filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"));
        assert!(v["level"].is_string() && v["timestamp"].is_string(), "{l}");
        if v["fields"]["message"] == "node agent ready" {
            ready = Some(v);
        }
    }
    ready.unwrap_or_else(|| panic!("no ready line in\n{err}"))
}

#[test]
fn node_agent_logs_json_lines_with_flag_or_env() {
    for (flag, env) in [(true, false), (false, true)] {
        let v = ready_line(&node_stderr(flag, env));
        assert_eq!(v["level"], "INFO");
        assert_eq!(v["fields"]["node.id"], "n1");
        assert!(v["fields"]["grpc"].as_str().unwrap().starts_with("127.0.0.1:"));
    }
    let text = node_stderr(false, false);
    assert!(
        text.contains("node agent ready")
            && serde_json::from_str::<serde_json::Value>(text.lines().next().unwrap()).is_err()
    );
}

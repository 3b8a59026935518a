//! Unit tests of the history checker (`tests/scripts/history_check.py`) on hand-made
//! histories: every violation kind (stale read, never-written value, lost write, lost
//! flushed write, double writer, divergent replicas) is caught, and legal histories pass.

mod support;

use std::process::Command;
use std::time::Duration;

use support::cluster::{run_tool, script, PYTHON};

#[test]
fn history_checker_catches_every_violation_kind() {
    let dir = script("");
    let out = run_tool(
        Command::new(PYTHON).args(["-W", "error", "-m", "unittest", "-v", "test_history_check"]).current_dir(&dir),
        Duration::from_secs(60),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    eprintln!("{err}");
    assert!(out.status.success(), "history checker unit tests failed:\n{err}");
    assert!(err.contains("Ran ") && err.contains("OK"), "unexpected unittest output:\n{err}");
}

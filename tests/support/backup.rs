//! The backup CLI tests' setup: `hlstore` with a repository password and fast key
//! derivation, a fresh directory repository, and the checks every such test makes.

use std::path::Path;
use std::process::{Command, Output};

/// The password of every test repository ([`hl`] passes it).
pub const PW: &str = "backup test password";

/// `hlstore ARGS` with the repository password, cheap key derivation and no repository
/// or S3 endpoint from the caller's environment.
pub fn hl(args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_hlstore"));
    c.args(args)
        .env("HLSTORE_REPO_PASSWORD", PW)
        .env("HLSTORE_KDF_PARAMS", "64,1,1")
        .env_remove("HLSTORE_REPO")
        .env_remove("AWS_ENDPOINT_URL");
    c
}

/// Runs `c`; panics with its output unless it succeeded; returns stdout.
pub fn ok(mut c: Command) -> String {
    let out = c.output().unwrap();
    assert!(
        out.status.success(),
        "{c:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Runs `c`; panics unless it failed.
pub fn fail(mut c: Command) -> Output {
    let out = c.output().unwrap();
    assert!(!out.status.success(), "{c:?} unexpectedly succeeded");
    out
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

pub fn json(s: &str) -> serde_json::Value {
    serde_json::from_str(s).unwrap_or_else(|e| panic!("bad JSON {s:?}: {e}"))
}

pub fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// A directory repository in a fresh temporary directory (deleted on drop), initialised
/// with 1 MiB packs so small tests fill several.
pub struct TestRepo {
    pub dir: tempfile::TempDir,
    /// `file://DIR/repo`, for `--repo`.
    pub url: String,
}

impl TestRepo {
    pub fn init() -> Self {
        let r = Self::uninitialised();
        ok(hl(&["backup", "init", "--repo", &r.url, "--pack-size", "1M"]));
        r
    }

    /// The temporary directory and the URL, without `backup init`.
    pub fn uninitialised() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("file://{}", dir.path().join("repo").display());
        Self { dir, url }
    }

    /// The temporary directory (the repository is its `repo`; room for sources beside it).
    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

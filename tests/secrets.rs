//! Secrets stay secret: repository passwords, S3 keys and private keys never appear in
//! `--help` (clap would print the value of an `env` default), in error messages or in
//! debug logs, even when the operation fails because of them. (The logs of a whole test
//! run are scanned by `tests/scripts/scan_secrets.sh`.)

mod support;

use std::process::{Command, Output};

const PASSWORD: &str = "secrets test password 7f3a";
const S3_SECRET: &str = "secrets-test-s3-key-91c2";
const KEY_MARKER: &str = "tlskeymarker5e1d";

fn hl(args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_hlstore"));
    c.args(args)
        .env("HLSTORE_REPO_PASSWORD", PASSWORD)
        .env("HLSTORE_NEW_PASSWORD", PASSWORD)
        .env("AWS_ACCESS_KEY_ID", "secrets-test-id")
        .env("AWS_SECRET_ACCESS_KEY", S3_SECRET)
        .env("HLSTORE_KDF_PARAMS", "64,1,1")
        .env("HLSTORE_LOG", "debug")
        .env_remove("HLSTORE_REPO")
        .env_remove("AWS_ENDPOINT_URL");
    c
}

fn run(mut c: Command) -> (Output, String) {
    let out = c.output().unwrap();
    support::keep_log("cli.log", &out.stderr);
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out, text)
}

fn assert_clean(what: &str, text: &str) {
    for secret in [PASSWORD, S3_SECRET, KEY_MARKER, "PRIVATE KEY"] {
        assert!(!text.contains(secret), "{what} shows a secret ({secret:?}):\n{text}");
    }
}

/// The subcommand paths below `path` (`["backup", "create"]`, ...), from `--help`.
fn subcommands(path: &[String]) -> Vec<Vec<String>> {
    let mut c = hl(&[]);
    c.args(path).arg("--help");
    let (_, help) = run(c);
    support::help::subcommands(path, &help)
}

#[test]
fn help_never_shows_secret_values() {
    let mut todo = vec![Vec::new()];
    let mut seen = 0;
    while let Some(path) = todo.pop() {
        for h in ["--help", "-h"] {
            let mut c = hl(&[]);
            c.args(&path).arg(h);
            let (out, text) = run(c);
            assert!(out.status.success(), "hlstore {path:?} {h} failed:\n{text}");
            assert_clean(&format!("hlstore {} {h}", path.join(" ")), &text);
        }
        seen += 1;
        todo.extend(subcommands(&path));
    }
    assert!(seen > 30, "only {seen} help pages found: the subcommand parser is broken");
}

#[test]
fn failures_caused_by_secrets_do_not_print_them() {
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo");
    let repo = repo.to_str().unwrap();
    let (out, text) = run(hl(&["backup", "init", "--repo", repo]));
    assert!(out.status.success(), "{text}");
    assert_clean("backup init", &text);
    // A wrong password.
    let mut c = hl(&["backup", "list", "--repo", repo]);
    c.env("HLSTORE_REPO_PASSWORD", format!("{PASSWORD}-wrong"));
    let (out, text) = run(c);
    assert!(!out.status.success());
    assert_clean("backup list with a wrong password", &text);
    // An unreachable S3 endpoint with credentials, at debug level.
    let mut c = hl(&["backup", "list", "--repo", "s3://bucket/repo"]);
    c.env("AWS_ENDPOINT_URL", "http://127.0.0.1:1").env("AWS_MAX_ATTEMPTS", "1");
    let (out, text) = run(c);
    assert!(!out.status.success());
    assert_clean("backup list on an unreachable S3 endpoint", &text);
    // A private key that does not parse: the error names the file, not its contents.
    let tls = dir.path().join("tls");
    let (out, text) = run(hl(&["cert", "init", "--dir", tls.to_str().unwrap()]));
    assert!(out.status.success(), "{text}");
    let admin = tls.join("admin");
    let (out, text) = run(hl(&[
        "cert",
        "issue",
        "--ca-dir",
        tls.to_str().unwrap(),
        "--role",
        "admin",
        "--out",
        admin.to_str().unwrap(),
    ]));
    assert!(out.status.success(), "{text}");
    assert_clean("cert issue", &text);
    let (out, text) = run(hl(&["cert", "show", admin.to_str().unwrap(), "--json"]));
    assert!(out.status.success() && text.contains("\"role\":\"admin\""), "{text}");
    assert_clean("cert show", &text);
    std::fs::write(
        admin.join("tls.key"),
        format!("-----BEGIN PRIVATE KEY-----\n{KEY_MARKER}\n-----END PRIVATE KEY-----\n"),
    )
    .unwrap();
    let mut c = hl(&["volume", "list", "--endpoint", "127.0.0.1:1"]);
    c.env("HLSTORE_TLS_DIR", &admin);
    let (out, text) = run(c);
    assert!(!out.status.success() && text.contains("tls.key"), "{text}");
    assert_clean("a client with a broken key", &text);
}

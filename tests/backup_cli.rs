//! `hlstore backup` / `hlstore restore` end to end through the real binary: the JSON
//! contract, clear errors, SIGKILL during a backup, and an S3 repository on SeaweedFS.

mod support;
#[path = "../crates/backup/tests/support/weed.rs"]
mod weed;

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use rand::{RngCore, SeedableRng};
use support::backup::{fail, hl, json, ok, p, stderr, TestRepo, PW};

/// Random, zero and text quarters.
fn image(path: &Path, size: usize, seed: u64) -> Vec<u8> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut v = vec![0u8; size];
    let q = size / 4;
    rng.fill_bytes(&mut v[..q]);
    let line = b"repeated text line for the cli test\n";
    for (i, b) in v[2 * q..3 * q].iter_mut().enumerate() {
        *b = line[i % line.len()];
    }
    rng.fill_bytes(&mut v[3 * q..]);
    std::fs::write(path, &v).unwrap();
    v
}

#[test]
fn cli_backup_list_show_restore_verify_forget_prune() {
    let t = TestRepo::init();
    let repo = t.url.clone();
    let src = t.path().join("disk.img");
    let img = image(&src, 5 << 20, 1);

    let out = ok(hl(&[
        "backup",
        "create",
        "--repo",
        &repo,
        "--source",
        p(&src),
        "--label",
        "app=db",
        "--label",
        "tier=gold",
        "--json",
    ]));
    let id = json(&out)["id"].as_str().unwrap().to_string();
    assert_eq!(id.len(), 32);

    // HLSTORE_REPO fallback, plain-path form.
    let mut c = hl(&["backup", "list", "--json"]);
    c.env("HLSTORE_REPO", t.path().join("repo"));
    let list = json(&ok(c));
    let arr = list.as_array().unwrap();
    assert_eq!(arr.len(), 1);
    assert_eq!(arr[0]["id"], id.as_str());
    assert_eq!(arr[0]["size"], img.len() as u64);
    assert_eq!(arr[0]["labels"]["app"], "db");
    assert!(ok(hl(&["backup", "list", "--repo", &repo])).contains(&id));

    let show = json(&ok(hl(&["backup", "show", &id[..8], "--repo", &repo, "--json"])));
    assert_eq!(show["id"], id.as_str());
    assert_eq!(show["labels"]["tier"], "gold");
    assert!(ok(hl(&["backup", "show", &id, "--repo", &repo])).contains("app=db"));

    let restored = t.path().join("restored.img");
    ok(hl(&["restore", &id, "--repo", &repo, "--to-file", p(&restored)]));
    assert!(std::fs::read(&restored).unwrap() == img, "restore is byte-identical");

    let v = ok(hl(&["backup", "verify", "--repo", &repo, "--read-data", "--json"]));
    assert_eq!(json(&v)["ok"], true);

    // Unchanged source: nothing new.
    let out = ok(hl(&["backup", "create", "--repo", &repo, "--source", p(&src), "--json"]));
    let j = json(&out);
    assert_eq!(j["stats"]["new_chunks"], 0);
    assert_eq!(j["parent"], id.as_str());
    let id2 = j["id"].as_str().unwrap().to_string();

    ok(hl(&["backup", "forget", &id, "--repo", &repo]));
    let pr = json(&ok(hl(&[
        "backup",
        "prune",
        "--repo",
        &repo,
        "--keep-last",
        "1",
        "--keep-daily",
        "7",
        "--grace-secs",
        "0",
        "--json",
    ])));
    assert_eq!(pr["kept"].as_array().unwrap().len(), 1);
    let list = json(&ok(hl(&["backup", "list", "--repo", &repo, "--json"])));
    assert_eq!(list.as_array().unwrap()[0]["id"], id2.as_str());
    let e = fail(hl(&["backup", "show", &id, "--repo", &repo]));
    assert!(stderr(&e).contains("no backup matches"), "{e:?}");
}

/// `backup list --volume/--label/--latest` narrow the list (JSON and text), and a
/// `latest` / `latest:KEY=VALUE` selector works wherever a backup id does (show, restore,
/// forget).
#[test]
fn cli_backup_list_filters_and_latest_selector() {
    let t = TestRepo::init();
    let repo = t.url.clone();
    let backup = |seed: u64, labels: &[&str]| -> (String, Vec<u8>) {
        let src = t.path().join(format!("disk-{seed}.img"));
        let img = image(&src, 1 << 20, seed);
        let mut args = vec!["backup", "create", "--repo", &repo, "--source", p(&src), "--json"];
        for l in labels {
            args.extend(["--label", l]);
        }
        (json(&ok(hl(&args)))["id"].as_str().unwrap().to_string(), img)
    };
    let (a, _) = backup(1, &["volume=pg", "pvc=apps/db"]);
    let (b, img_b) = backup(2, &["volume=media"]);
    let (c, _) = backup(3, &["volume=pg"]);
    let list = |extra: &[&str]| -> Vec<String> {
        let mut args = vec!["backup", "list", "--repo", &repo, "--json"];
        args.extend_from_slice(extra);
        let v = json(&ok(hl(&args)));
        v.as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap().to_string()).collect()
    };
    assert_eq!(list(&[]), [a.as_str(), b.as_str(), c.as_str()]);
    assert_eq!(list(&["--volume", "pg"]), [a.as_str(), c.as_str()], "oldest first");
    assert_eq!(list(&["--volume", "pg", "--latest"]), [c.as_str()]);
    assert_eq!(list(&["--latest"]), [c.as_str()]);
    assert_eq!(list(&["--label", "pvc=apps/db"]), [a.as_str()]);
    assert_eq!(list(&["--volume", "pg", "--label", "pvc=apps/db", "--latest"]), [a.as_str()]);
    assert_eq!(list(&["--volume", "media", "--label", "pvc=apps/db"]), Vec::<String>::new());
    assert_eq!(list(&["--volume", "nope", "--latest"]), Vec::<String>::new());
    let text = ok(hl(&["backup", "list", "--repo", &repo, "--volume", "media"]));
    assert!(text.contains(&b) && !text.contains(&a) && !text.contains(&c), "{text}");
    let e = fail(hl(&["backup", "list", "--repo", &repo, "--label", "novalue"]));
    assert!(stderr(&e).contains("is not key=value"), "{e:?}");

    // The selector, wherever an id goes.
    let show = |sel: &str| json(&ok(hl(&["backup", "show", sel, "--repo", &repo, "--json"])))["id"].clone();
    assert_eq!(show("latest"), c.as_str());
    assert_eq!(show("latest:volume=pg"), c.as_str());
    assert_eq!(show("latest:volume=pg,pvc=apps/db"), a.as_str());
    let restored = t.path().join("restored.img");
    ok(hl(&["restore", "latest:volume=media", "--repo", &repo, "--to-file", p(&restored)]));
    assert!(std::fs::read(&restored).unwrap() == img_b, "restored the newest backup of volume media");
    let out = json(&ok(hl(&["backup", "forget", "latest:volume=pg", "--repo", &repo, "--json"])));
    assert_eq!(out["forgotten"], serde_json::json!([c]));
    assert_eq!(show("latest:volume=pg"), a.as_str(), "the newest left");
    let e = fail(hl(&["backup", "show", "latest:volume=nope", "--repo", &repo]));
    assert!(stderr(&e).contains("no backup is labelled volume=nope"), "{e:?}");
    let e = fail(hl(&["backup", "show", "latest:bad", "--repo", &repo]));
    assert!(stderr(&e).contains("expected latest or latest:KEY=VALUE"), "{e:?}");
}

/// Progress lines when stderr is not a terminal (as in CronJob and Job logs): bytes, rate,
/// ETA, then a closing line, for backup, restore and prune.
#[test]
fn cli_progress_lines_in_logs() {
    let t = TestRepo::init();
    let repo = t.url.clone();
    let (a, b) = (t.path().join("a.img"), t.path().join("b.img"));
    // b is a with 256 KiB of every MiB of its random first quarter replaced: once a is
    // forgotten, a's packs there are partly used and prune repacks them.
    let mut img = image(&a, 24 << 20, 5);
    for k in (0..6 << 20).step_by(1 << 20) {
        img[k..k + (256 << 10)].fill(7);
    }
    std::fs::write(&b, &img).unwrap();
    let with_lines = |args: &[&str]| {
        let mut c = hl(args);
        c.env("HLSTORE_PROGRESS_INTERVAL_SECS", "0.02").stderr(Stdio::piped()).stdout(Stdio::piped());
        let out = c.output().unwrap();
        assert!(out.status.success(), "{c:?}: {}", stderr(&out));
        stderr(&out)
    };
    let err = with_lines(&["backup", "create", "--repo", &repo, "--source", p(&a), "--json"]);
    let line = err.lines().find(|l| l.starts_with("backup: ") && l.contains(" of 24.0 MiB (")).unwrap_or_else(|| {
        panic!("no progress line in {err:?}");
    });
    assert!(line.contains(" MiB/s, eta "), "{line}");
    assert!(err.lines().any(|l| l.starts_with("backup: done, 24.0 MiB in ")), "{err}");
    let first = json(&ok(hl(&["backup", "list", "--repo", &repo, "--json"])))[0]["id"].as_str().unwrap().to_string();
    let id = json(&ok(hl(&["backup", "create", "--repo", &repo, "--source", p(&b), "--json"])))["id"]
        .as_str()
        .unwrap()
        .to_string();

    let err = with_lines(&["restore", &id, "--repo", &repo, "--to-file", p(&t.path().join("out.img"))]);
    assert!(err.lines().any(|l| l.starts_with("restore: ") && l.contains(" MiB/s, eta ")), "{err}");
    assert!(err.lines().any(|l| l.starts_with("restore: done, 24.0 MiB in ")), "{err}");

    ok(hl(&["backup", "forget", &first, "--repo", &repo]));
    let err = with_lines(&["backup", "prune", "--repo", &repo, "--keep-last", "1", "--grace-secs", "0"]);
    assert!(err.lines().any(|l| l.starts_with("prune: ") && l.contains(" MiB/s, eta ")), "{err}");
    // The closing line counts the bytes of the packs the repack read.
    let done = err.lines().find(|l| l.starts_with("prune: done, ")).unwrap_or_else(|| panic!("{err}"));
    assert!(!done.starts_with("prune: done, 0.0 MiB"), "{done}");

    // Off with 0; a bad value is reported, not fatal.
    let mut c = hl(&["backup", "create", "--repo", &repo, "--source", p(&a)]);
    c.env("HLSTORE_PROGRESS_INTERVAL_SECS", "0");
    let out = c.output().unwrap();
    assert!(out.status.success() && !stderr(&out).contains("MiB/s, eta"), "{}", stderr(&out));
}

#[test]
fn cli_errors_are_clear() {
    let t = tempfile::tempdir().unwrap();
    let repo = t.path().join("repo");
    let repo = p(&repo);
    let e = fail(hl(&["backup", "list", "--repo", repo]));
    assert!(stderr(&e).contains("no repository at"), "{e:?}");
    ok(hl(&["backup", "init", "--repo", repo]));
    let e = fail(hl(&["backup", "init", "--repo", repo]));
    assert!(stderr(&e).contains("already exists"), "{e:?}");

    let mut c = hl(&["backup", "list", "--repo", repo]);
    c.env("HLSTORE_REPO_PASSWORD", "wrong");
    let e = fail(c);
    assert!(stderr(&e).contains("wrong repository password"), "{e:?}");

    let pwfile = t.path().join("pw");
    std::fs::write(&pwfile, format!("{PW}\n")).unwrap();
    let mut c = hl(&["backup", "list", "--repo", repo, "--password-file", p(&pwfile)]);
    c.env_remove("HLSTORE_REPO_PASSWORD");
    ok(c);
    let mut c = hl(&["backup", "list", "--repo", repo]);
    c.env_remove("HLSTORE_REPO_PASSWORD");
    let e = fail(c);
    assert!(stderr(&e).contains("HLSTORE_REPO_PASSWORD"), "{e:?}");

    let e = fail(hl(&["backup", "create", "--repo", repo, "--source", "/nonexistent/disk"]));
    assert!(stderr(&e).contains("/nonexistent/disk"), "{e:?}");
    let e = fail(hl(&["backup", "prune", "--repo", repo]));
    assert!(stderr(&e).contains("--keep-"), "{e:?}");
}

fn count_files(d: &Path) -> usize {
    let Ok(rd) = std::fs::read_dir(d) else {
        return 0;
    };
    rd.flatten()
        .map(|e| {
            let path = e.path();
            if path.is_dir() {
                count_files(&path)
            } else if e.file_name().to_string_lossy().starts_with(".tmp") {
                0
            } else {
                1
            }
        })
        .sum()
}

#[test]
fn sigkill_during_backup_leaves_a_valid_repo_and_the_next_run_reuses_uploads() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("repo");
    let repo = p(&dir).to_string();
    let src = t.path().join("big.img");
    let mut rng = rand::rngs::StdRng::seed_from_u64(9);
    let mut img = vec![0u8; 96 << 20];
    rng.fill_bytes(&mut img);
    std::fs::write(&src, &img).unwrap();
    ok(hl(&["backup", "init", "--repo", &repo, "--pack-size", "1M"]));
    let mut child = hl(&["backup", "create", "--repo", &repo, "--source", p(&src)])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    while count_files(&dir.join("data")) < 4 {
        assert!(Instant::now() < deadline, "backup made no progress");
        let finished = child.try_wait().unwrap();
        assert!(finished.is_none(), "backup finished before it could be killed");
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert_eq!(count_files(&dir.join("snapshots")), 0, "no snapshot from the killed run");

    let v = json(&ok(hl(&["backup", "verify", "--repo", &repo, "--read-data", "--json"])));
    assert_eq!(v["ok"], true, "{v}");
    let out = json(&ok(hl(&["backup", "create", "--repo", &repo, "--source", p(&src), "--json"])));
    let new_bytes = out["stats"]["new_bytes"].as_u64().unwrap();
    assert!(new_bytes < img.len() as u64, "rerun stored {new_bytes}, should reuse uploaded packs");
    let id = out["id"].as_str().unwrap();
    let restored = t.path().join("r.img");
    ok(hl(&["restore", id, "--repo", &repo, "--to-file", p(&restored)]));
    assert!(std::fs::read(&restored).unwrap() == img);
}

#[test]
fn cli_s3_repository() {
    let Some(w) = weed::weed() else { return };
    let s3 = |args: &[&str]| {
        let mut c = hl(args);
        c.env("AWS_ACCESS_KEY_ID", weed::ACCESS_KEY)
            .env("AWS_SECRET_ACCESS_KEY", weed::SECRET_KEY)
            .env("AWS_REGION", "us-east-1");
        c
    };
    let t = tempfile::tempdir().unwrap();
    let repo = format!("s3://{}/cli-{}", weed::BUCKETS[3], rand::random::<u32>());
    let src = t.path().join("disk.img");
    let img = image(&src, 3 << 20, 2);
    let ep = w.endpoint.as_str();
    ok(s3(&["backup", "init", "--repo", &repo, "--s3-endpoint", ep]));
    // Endpoint from AWS_ENDPOINT_URL.
    let mut c = s3(&["backup", "create", "--repo", &repo, "--source", p(&src), "--json"]);
    c.env("AWS_ENDPOINT_URL", ep);
    let id = json(&ok(c))["id"].as_str().unwrap().to_string();
    let restored = t.path().join("r.img");
    ok(s3(&["restore", &id, "--repo", &repo, "--s3-endpoint", ep, "--to-file", p(&restored)]));
    assert!(std::fs::read(&restored).unwrap() == img);

    let mut c = s3(&["backup", "list", "--repo", &repo, "--s3-endpoint", ep]);
    c.env("AWS_SECRET_ACCESS_KEY", "not-the-secret");
    let e = fail(c);
    assert!(stderr(&e).contains("rejected the credentials"), "{e:?}");
    let e = fail(s3(&["backup", "list", "--repo", "s3://no-such-bucket/x", "--s3-endpoint", ep]));
    assert!(stderr(&e).contains("does not exist"), "{e:?}");
}

#[test]
fn cli_key_add_list_remove_passwd() {
    let t = tempfile::tempdir().unwrap();
    let repo = t.path().join("repo");
    let repo = p(&repo);
    let init = json(&ok(hl(&["backup", "init", "--repo", repo, "--json"])));
    assert_eq!(init["config"]["version"], 2);
    let src = t.path().join("img");
    image(&src, 1 << 20, 5);
    let id = json(&ok(hl(&["backup", "create", "--repo", repo, "--source", p(&src), "--json"])))["id"]
        .as_str()
        .unwrap()
        .to_string();
    let with = |pw: &str, args: &[&str]| {
        let mut c = hl(args);
        c.env("HLSTORE_REPO_PASSWORD", pw);
        c
    };

    let mut c = hl(&["backup", "key", "add", "--repo", repo, "--json"]);
    c.env("HLSTORE_NEW_PASSWORD", "second");
    let second = json(&ok(c))["added"].as_str().unwrap().to_string();
    let keys = json(&ok(with("second", &["backup", "key", "list", "--repo", repo, "--json"])));
    let keys = keys.as_array().unwrap();
    assert_eq!(keys.len(), 2);
    let first = keys.iter().find(|k| k["current"] == false).unwrap()["id"].as_str().unwrap().to_string();
    assert!(keys.iter().any(|k| k["id"] == second.as_str() && k["current"] == true));

    // The second password removes the first; the first is refused from then on.
    let e = fail(with("second", &["backup", "key", "remove", &second, "--repo", repo]));
    assert!(stderr(&e).contains("passwd"), "{e:?}");
    ok(with("second", &["backup", "key", "remove", &first, "--repo", repo]));
    let e = fail(hl(&["backup", "list", "--repo", repo]));
    assert!(stderr(&e).contains("wrong repository password"), "{e:?}");

    // passwd from a file; the old password is refused, the backup still restores.
    let pwfile = t.path().join("newpw");
    std::fs::write(&pwfile, "third\n").unwrap();
    let mut c =
        with("second", &["backup", "key", "passwd", "--repo", repo, "--new-password-file", p(&pwfile), "--json"]);
    c.env_remove("HLSTORE_NEW_PASSWORD");
    let changed = json(&ok(c));
    assert_eq!(changed["removed"], second.as_str());
    let e = fail(with("second", &["backup", "list", "--repo", repo]));
    assert!(stderr(&e).contains("wrong repository password"), "{e:?}");
    let out = t.path().join("out");
    ok(with("third", &["restore", &id, "--repo", repo, "--to-file", p(&out)]));
    assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(&src).unwrap());
    let mut c = with("third", &["backup", "key", "add", "--repo", repo]);
    c.env_remove("HLSTORE_NEW_PASSWORD");
    let e = fail(c);
    assert!(stderr(&e).contains("HLSTORE_NEW_PASSWORD"), "{e:?}");
}

//! `hlstore backup create --metrics-textfile`: the Prometheus page the backup CronJob
//! pushes. Values match what the backup did (bytes read, new, uploaded, deduplicated), a
//! second backup of the same data is all deduplicated, and a failed run leaves the previous
//! page (and its last-success time) untouched.

use std::path::Path;
use std::process::Command;

use rand::RngCore;

const PW: &str = "metrics test password";
const SIZE: usize = 4 << 20;

fn hl(args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_hlstore"));
    c.args(args).env("HLSTORE_REPO_PASSWORD", PW).env("HLSTORE_KDF_PARAMS", "64,1,1").env_remove("HLSTORE_REPO");
    c
}

fn ok(c: &mut Command) {
    let out = c.output().unwrap();
    assert!(out.status.success(), "{c:?}: {}", String::from_utf8_lossy(&out.stderr));
}

fn value(page: &str, name: &str) -> f64 {
    let line =
        page.lines().find(|l| l.starts_with(&format!("{name}{{"))).unwrap_or_else(|| panic!("no {name} in\n{page}"));
    assert!(page.contains(&format!("# TYPE {name} gauge")), "{name} has no TYPE line");
    line.rsplit(' ').next().unwrap().parse().unwrap()
}

fn backup(repo: &str, src: &Path, metrics: &Path) {
    ok(hl(&["backup", "create", "--repo", repo, "--source", src.to_str().unwrap(), "--metrics-textfile"]).arg(metrics));
}

#[test]
fn textfile_reports_the_backup_and_survives_a_failed_run() {
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo");
    let repo = repo.to_str().unwrap();
    ok(&mut hl(&["backup", "init", "--repo", repo]));
    // Half random, half zeros (written out, not a hole).
    let mut data = vec![0u8; SIZE];
    rand::thread_rng().fill_bytes(&mut data[..SIZE / 2]);
    let src = dir.path().join("disk.img");
    std::fs::write(&src, &data).unwrap();
    let metrics = dir.path().join("backup.prom");

    let before = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as f64;
    backup(repo, &src, &metrics);
    let page = std::fs::read_to_string(&metrics).unwrap();
    assert!(page.contains(&format!("source=\"{}\"", src.display())), "{page}");
    assert_eq!(value(&page, "hlstore_backup_read_bytes"), SIZE as f64);
    let new = value(&page, "hlstore_backup_new_bytes");
    assert!(new >= (SIZE / 2) as f64 && new < SIZE as f64, "new bytes {new}: the random half, not the zeros");
    let uploaded = value(&page, "hlstore_backup_uploaded_bytes");
    assert!(uploaded >= (SIZE / 2) as f64 * 0.99, "random data does not compress: uploaded {uploaded}");
    assert_eq!(value(&page, "hlstore_backup_deduplicated_bytes"), SIZE as f64 - new);
    assert!(value(&page, "hlstore_backup_duration_seconds") > 0.0);
    let first_success = value(&page, "hlstore_backup_last_success_timestamp_seconds");
    assert!(first_success >= before, "{first_success} < {before}");

    // Same data again: nothing new, nothing uploaded, all deduplicated.
    backup(repo, &src, &metrics);
    let page = std::fs::read_to_string(&metrics).unwrap();
    assert_eq!(value(&page, "hlstore_backup_new_bytes"), 0.0);
    assert_eq!(value(&page, "hlstore_backup_uploaded_bytes"), 0.0);
    let read = value(&page, "hlstore_backup_read_bytes") + value(&page, "hlstore_backup_skipped_bytes");
    assert_eq!(read, SIZE as f64, "every byte read or taken over from the parent");
    assert_eq!(value(&page, "hlstore_backup_deduplicated_bytes"), value(&page, "hlstore_backup_read_bytes"));

    // A failed backup (wrong password) changes nothing in the file.
    let out = hl(&["backup", "create", "--repo", repo, "--source", src.to_str().unwrap(), "--metrics-textfile"])
        .arg(&metrics)
        .env("HLSTORE_REPO_PASSWORD", "wrong")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert_eq!(std::fs::read_to_string(&metrics).unwrap(), page);
    assert!(!dir.path().join("backup.prom.tmp").exists());
}

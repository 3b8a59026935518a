//! Backup freshness on the CSI controller's `/metrics`: `hlstore csi --mode controller
//! --backup-repo` lists the repository every `--backup-metrics-interval` and shows the
//! newest backup of each volume with its claim, the number of backups, and its listing
//! errors; a repository it cannot reach keeps the last values and counts errors (logged
//! once), and it picks up again when the repository is back.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use support::cluster::Cluster;

const PW: &str = "csi backup metrics test";

/// The controller process, killed on drop.
struct Controller {
    child: Child,
    log: PathBuf,
    metrics: String,
}

impl Drop for Controller {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Controller {
    fn start(c: &Cluster, repo: &Path) -> Controller {
        let metrics = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("free port");
            l.local_addr().expect("port").to_string()
        };
        let log_path = c.path().join("csi-controller.log");
        let log = std::fs::File::create(&log_path).unwrap();
        let endpoint = format!("unix://{}", c.path().join("csi.sock").display());
        let child = c
            .command()
            .args(["csi", "--mode", "controller", "--csi-endpoint", &endpoint, "--node-id", "ctrl"])
            .args(["--agent", &c.endpoint("n1"), "--metrics-listen", &metrics])
            .arg("--backup-repo")
            .arg(format!("file://{}", repo.display()))
            .args(["--backup-metrics-interval", "1"])
            .env("HLSTORE_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start hlstore csi");
        Controller { child, log: log_path, metrics }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn page(&self) -> Option<String> {
        std::net::TcpStream::connect(&self.metrics).ok()?;
        Some(support::http_get(&self.metrics, "/metrics"))
    }

    /// Waits until the page satisfies `f`; returns what `f` returned.
    fn wait_for<T>(&mut self, what: &str, mut f: impl FnMut(&str) -> Option<T>) -> T {
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut last = String::new();
        loop {
            if let Some(page) = self.page() {
                if let Some(v) = f(&page) {
                    return v;
                }
                last = page;
            }
            if let Ok(Some(st)) = self.child.try_wait() {
                panic!("hlstore csi exited with {st}; log:\n{}", self.log());
            }
            assert!(Instant::now() < deadline, "{what}: not seen; page:\n{last}\nlog:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

/// The value of the sample `series` (name and labels, exactly as rendered).
fn value(page: &str, series: &str) -> Option<f64> {
    page.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

#[test]
fn the_controller_shows_the_newest_backup_of_each_volume() {
    let mut c = Cluster::new();
    c.env.push(("HLSTORE_REPO_PASSWORD".into(), PW.into()));
    c.env.push(("HLSTORE_KDF_PARAMS".into(), "64,1,1".into()));
    c.up(&["--nodes", "3"]);
    let ep = c.endpoint("n1");
    let repo_dir = c.path().join("repo");
    let repo = repo_dir.to_str().unwrap().to_string();
    c.cli(&["backup", "init", "--repo", &repo]);
    c.cli(&["volume", "create", "app-data", "--size", "8MiB", "--endpoint", &ep]);
    let first = make_backup(&c, &repo, "app-data");

    let mut ctl = Controller::start(&c, &repo_dir);
    let series = r#"hlstore_backup_newest_timestamp_seconds{volume="app-data",pvc_namespace="apps",pvc_name="db"}"#;
    let seen = ctl.wait_for("the first backup's time", |p| value(p, series));
    assert_eq!(seen, first, "the backup's creation time");
    let page = ctl.page().unwrap();
    assert_eq!(value(&page, "hlstore_backup_repository_backups"), Some(1.0), "{page}");
    assert_eq!(value(&page, "hlstore_backup_repository_scrape_errors_total"), Some(0.0), "{page}");
    let scraped = value(&page, "hlstore_backup_repository_last_scrape_timestamp_seconds").expect("scrape time");
    assert!(scraped >= first, "{page}");
    assert!(page.contains("# TYPE hlstore_backup_newest_timestamp_seconds gauge"), "{page}");
    assert!(page.contains("hlstore_csi_up 1"), "the CSI metrics are still there:\n{page}");

    // A second backup: the newest time moves, the count follows.
    let second = make_backup(&c, &repo, "app-data");
    assert!(second > first);
    ctl.wait_for("the second backup's time", |p| (value(p, series) == Some(second)).then_some(()));
    let page = ctl.page().unwrap();
    assert_eq!(value(&page, "hlstore_backup_repository_backups"), Some(2.0), "{page}");
    assert_eq!(page.matches("hlstore_backup_newest_timestamp_seconds{").count(), 1, "one volume:\n{page}");

    // The repository out of reach: errors counted, last values kept, logged once.
    let moved = c.path().join("repo-away");
    std::fs::rename(&repo_dir, &moved).unwrap();
    ctl.wait_for("listing errors", |p| {
        (value(p, "hlstore_backup_repository_scrape_errors_total").unwrap_or(0.0) >= 3.0).then_some(())
    });
    let page = ctl.page().unwrap();
    assert_eq!(value(&page, series), Some(second), "last value kept:\n{page}");
    assert_eq!(value(&page, "hlstore_backup_repository_backups"), Some(2.0), "{page}");
    let warned = |log: &str| log.matches("listing the backup repository for its metrics failed").count();
    assert_eq!(warned(&ctl.log()), 1, "one warning for one error:\n{}", ctl.log());

    // Back again: listed anew.
    std::fs::rename(&moved, &repo_dir).unwrap();
    ctl.wait_for("a fresh listing", |p| {
        (value(p, "hlstore_backup_repository_last_scrape_timestamp_seconds").unwrap_or(0.0) > scraped + 1.0)
            .then_some(())
    });
    // The line is logged just after the values are recorded: give it a moment.
    let start = std::time::Instant::now();
    while !ctl.log().contains("listing the backup repository works again") {
        assert!(start.elapsed() < std::time::Duration::from_secs(10), "{}", ctl.log());
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    drop(ctl);
    c.down();
}

/// A labelled backup of `volume`, as the CronJob makes it; returns its creation time.
fn make_backup(c: &Cluster, repo: &str, volume: &str) -> f64 {
    let ep = c.endpoint("n1");
    let out = c.cli(&[
        "backup",
        "create",
        "--repo",
        repo,
        "--volume",
        volume,
        "--endpoint",
        &ep,
        "--json",
        "--label",
        &format!("volume={volume}"),
        "--label",
        "pvc=apps/db",
        "--label",
        "pvc-namespace=apps",
        "--label",
        "pvc-name=db",
    ]);
    let id = serde_json::from_str::<serde_json::Value>(&out).unwrap()["id"].as_str().unwrap().to_string();
    let shown = c.cli(&["backup", "show", &id, "--repo", repo, "--json"]);
    let m: serde_json::Value = serde_json::from_str(&shown).unwrap();
    m["time"].as_f64().unwrap() + m["nanos"].as_f64().unwrap_or(0.0) / 1e9
}

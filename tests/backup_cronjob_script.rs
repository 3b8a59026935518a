//! The backup CronJob's script (deploy/base/backup/backup-volumes.sh) run for real with
//! /bin/sh, curl and jq against a local stand-in for the Kubernetes API (and a Pushgateway)
//! on 127.0.0.1, and a stand-in `hlstore` that records its arguments: the right volumes are
//! selected (by StorageClass or PVC label, this driver only), every one is tried even after
//! a failure, prune runs with the retention flags, metrics are pushed, and the job fails if
//! any volume failed.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::process::Command;
use std::sync::{Arc, Mutex};

use serde_json::json;

fn pv(name: &str, driver: &str, class: &str, claim: (&str, &str)) -> serde_json::Value {
    json!({"metadata": {"name": name}, "spec": {
        "storageClassName": class,
        "csi": {"driver": driver, "volumeHandle": format!("vol-{name}")},
        "claimRef": {"namespace": claim.0, "name": claim.1}}})
}

/// Request lines and bodies the server saw: (method path, authorization, body).
type Seen = Arc<Mutex<Vec<(String, String, String)>>>;

fn serve(listener: TcpListener, seen: Seen) {
    let pvs = json!({"items": [
        pv("a", "csi.hlstore.io", "hlstore", ("db", "a")),          // by class
        pv("b", "csi.hlstore.io", "local-path", ("media", "b")),    // by label
        pv("c", "other.csi.io", "hlstore", ("db", "c")),            // other driver
        pv("d", "csi.hlstore.io", "local-path", ("db", "d")),       // neither
        pv("bad", "csi.hlstore.io", "hlstore", ("db", "bad")),      // by class, backup fails
        pv("e", "csi.hlstore.io", "hlstore", ("db", "e")),          // by class, not due
    ]});
    let pvcs = json!({"items": [{"metadata": {"namespace": "media", "name": "b"}}]});
    for stream in listener.incoming() {
        let Ok(mut s) = stream else { return };
        let mut r = BufReader::new(s.try_clone().unwrap());
        let mut request = String::new();
        r.read_line(&mut request).unwrap();
        let (mut auth, mut len) = (String::new(), 0usize);
        loop {
            let mut h = String::new();
            r.read_line(&mut h).unwrap();
            if h.trim().is_empty() {
                break;
            }
            let (k, v) = h.split_once(':').unwrap();
            match k.to_ascii_lowercase().as_str() {
                "authorization" => auth = v.trim().to_string(),
                "content-length" => len = v.trim().parse().unwrap(),
                _ => {}
            }
        }
        let mut body = vec![0; len];
        r.read_exact(&mut body).unwrap();
        let line: Vec<&str> = request.split_whitespace().collect();
        let (method, path) = (line[0], line[1]);
        seen.lock().unwrap().push((format!("{method} {path}"), auth, String::from_utf8_lossy(&body).into()));
        let reply = match path.split('?').next().unwrap() {
            "/api/v1/persistentvolumes" => pvs.to_string(),
            "/api/v1/persistentvolumeclaims" => pvcs.to_string(),
            p if p.starts_with("/metrics/job/") => String::new(),
            _ => "{}".into(),
        };
        let _ = write!(s, "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{reply}", reply.len());
    }
}

#[test]
fn script_selects_backs_up_prunes_and_reports_failures() {
    let dir = tempfile::tempdir().unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let seen: Seen = Arc::default();
    let s2 = seen.clone();
    std::thread::spawn(move || serve(listener, s2));

    let sa = dir.path().join("sa");
    std::fs::create_dir(&sa).unwrap();
    std::fs::write(sa.join("token"), "test-token").unwrap();
    std::fs::write(sa.join("ca.crt"), "").unwrap();
    // Stand-in hlstore: logs its arguments; `backup create` writes the metrics file and
    // fails for vol-bad; vol-e is not due (exit 0, no metrics).
    let bin = dir.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    let log = dir.path().join("hlstore.log");
    let stub = format!(
        r#"#!/bin/sh
echo "$*" >> {log}
prev=""
for a in "$@"; do
  if [ "$prev" = "--volume" ] && [ "$a" = vol-bad ]; then exit 1; fi
  if [ "$prev" = "--volume" ] && [ "$a" = vol-e ]; then skip=1; fi
  if [ "$prev" = "--metrics-textfile" ]; then metrics=$a; fi
  prev=$a
done
# A backup that ran writes its metrics; one that was not due writes nothing.
if [ -n "${{metrics:-}}" ] && [ -z "${{skip:-}}" ]; then echo "hlstore_backup_read_bytes 1" > "$metrics"; fi
"#,
        log = log.display()
    );
    let stub_path = bin.join("hlstore");
    std::fs::write(&stub_path, stub).unwrap();
    Command::new("chmod").arg("+x").arg(&stub_path).status().unwrap();

    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/base/backup/backup-volumes.sh");
    let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap_or_default());
    let out = Command::new("/bin/sh")
        .arg(&script)
        .env("PATH", path)
        .env("KUBERNETES_API", &base)
        .env("SERVICEACCOUNT_DIR", &sa)
        .env("METRICS_DIR", dir.path().join("metrics"))
        .env("HLSTORE_REPO", "s3://bucket/repo")
        .env("BACKUP_STORAGE_CLASSES", "hlstore,unused")
        .env("BACKUP_PVC_SELECTOR", "backup.hlstore.io/enabled=true")
        .env("KEEP_DAILY", "3")
        .env("KEEP_WEEKLY", "2")
        .env("KEEP_MONTHLY", "1")
        .env("PUSHGATEWAY_URL", &base)
        .env("DEFAULT_BACKUP_SCHEDULE", "weekly")
        .env("AWS_ENDPOINT_URL", "")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "one volume failed, so must the job:\n{stdout}\n{stderr}");
    assert!(stdout.contains("failed volumes: vol-bad"), "{stdout}");

    let calls: Vec<String> = std::fs::read_to_string(&log).unwrap().lines().map(str::to_string).collect();
    let creates: Vec<&String> = calls.iter().filter(|c| c.starts_with("backup create")).collect();
    let volumes: Vec<&str> =
        creates.iter().map(|c| c.split("--volume ").nth(1).unwrap().split(' ').next().unwrap()).collect();
    assert_eq!(volumes, ["vol-a", "vol-b", "vol-bad", "vol-e"], "{calls:?}");
    for c in &creates {
        assert!(c.starts_with("backup create --repo s3://bucket/repo --volume "), "{c}");
        assert!(c.contains("--metrics-textfile "), "{c}");
        assert!(c.ends_with("--if-due --default-schedule weekly"), "{c}");
    }
    assert!(stdout.contains("not due: 1"), "{stdout}");
    // Each backup names the claim it was taken for (a rebuilt cluster finds it by name).
    assert!(
        creates[1].contains("--label pvc=media/b --label pvc-namespace=media --label pvc-name=b"),
        "{}",
        creates[1]
    );
    assert_eq!(
        calls.last().unwrap(),
        "backup prune --repo s3://bucket/repo --keep-daily 3 --keep-weekly 2 --keep-monthly 1"
    );

    let seen = seen.lock().unwrap();
    let api: Vec<&(String, String, String)> = seen.iter().filter(|(r, _, _)| r.starts_with("GET /api/")).collect();
    assert_eq!(api.len(), 2, "{seen:?}");
    assert!(api.iter().all(|(_, auth, _)| auth == "Bearer test-token"));
    assert!(api
        .iter()
        .any(|(r, _, _)| r == "GET /api/v1/persistentvolumeclaims?labelSelector=backup.hlstore.io%2Fenabled%3Dtrue"));
    let pushes: Vec<&(String, String, String)> =
        seen.iter().filter(|(r, _, _)| r.starts_with("POST /metrics/job/")).collect();
    let pushed: Vec<&str> = pushes.iter().map(|(r, _, _)| r.as_str()).collect();
    assert_eq!(
        pushed,
        ["POST /metrics/job/hlstore-backup/volume/vol-a", "POST /metrics/job/hlstore-backup/volume/vol-b"]
    );
    assert!(pushes.iter().all(|(_, _, body)| body.contains("hlstore_backup_read_bytes 1")));
}

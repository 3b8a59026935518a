//! Mutual TLS and authorisation on a dev cluster (`hlstore dev up` makes the CA and the
//! certificates under DIR/tls/): a client without certificates, with another CA's, with a
//! role that may not do what it asks, a node certificate claiming replicas for another
//! node, plaintext, and certificates rotated while a volume takes writes.

mod support;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use hlstore_proto::replica as pb;
use hlstore_proto::replica::replica_client::ReplicaClient;
use hlstore_tls::client::{channel_lazy, ClientTls};
use hlstore_tls::{Expect, TlsState};
use support::cluster::{run_ok, run_tool, verify_load, Cluster, Load, Op};

const VOLUME: &str = "sec";
const WAIT: Duration = Duration::from_secs(90);

fn cluster() -> (Cluster, String) {
    let c = Cluster::new();
    let uri = c.up(&["--volume", VOLUME, "--size", "64MiB"]);
    (c, uri)
}

fn tls(c: &Cluster, name: &str) -> PathBuf {
    c.path().join("tls").join(name)
}

/// `hlstore ... --endpoint <n1>` with HLSTORE_TLS_DIR set to `dir`; (ok, stdout, stderr).
fn cli_as(c: &Cluster, dir: &Path, args: &[&str]) -> (bool, String, String) {
    let ep = c.endpoint("n1");
    let out =
        run_tool(c.command().env("HLSTORE_TLS_DIR", dir).args(args).args(["--endpoint", &ep]), Duration::from_secs(60));
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn hlstore(args: &[&str]) -> String {
    run_ok(Command::new(env!("CARGO_BIN_EXE_hlstore")).args(args), Duration::from_secs(30))
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

#[test]
fn clients_without_the_clusters_certificates_are_refused_with_the_reason() {
    let (c, _) = cluster();
    let (ok, out, err) = cli_as(&c, &tls(&c, "admin"), &["volume", "list", "--json"]);
    assert!(ok && out.contains(VOLUME), "the admin certificate works: {err}");

    // No certificates at all: the missing file is named.
    let empty = tempfile::tempdir().unwrap();
    let (ok, _, err) = cli_as(&c, empty.path(), &["volume", "list"]);
    assert!(!ok);
    let want = empty.path().join("ca.crt");
    assert!(err.contains(s(&want)) && err.contains("does not exist"), "{err}");
    // Only the key missing: that file is named.
    let partial = tempfile::tempdir().unwrap();
    for f in ["ca.crt", "tls.crt"] {
        std::fs::copy(tls(&c, "admin").join(f), partial.path().join(f)).unwrap();
    }
    let (ok, _, err) = cli_as(&c, partial.path(), &["volume", "list"]);
    assert!(!ok && err.contains(s(&partial.path().join("tls.key"))), "{err}");

    // Another cluster's CA and certificate: the agent's certificate is not trusted, and
    // the agent does not answer.
    let other = tempfile::tempdir().unwrap();
    let oca = other.path().join("ca");
    hlstore(&["cert", "init", "--dir", s(&oca)]);
    hlstore(&["cert", "issue", "--ca-dir", s(&oca), "--role", "admin", "--out", s(&other.path().join("admin"))]);
    let (ok, _, err) = cli_as(&c, &other.path().join("admin"), &["volume", "delete", VOLUME]);
    assert!(!ok && err.contains("not issued by the CA"), "{err}");
    // The other CA's certificate with this cluster's ca.crt next to it: refused before
    // connecting (the pair cannot work), with the reason.
    let mixed = other.path().join("mixed");
    std::fs::create_dir_all(&mixed).unwrap();
    std::fs::copy(tls(&c, "admin").join("ca.crt"), mixed.join("ca.crt")).unwrap();
    for f in ["tls.crt", "tls.key"] {
        std::fs::copy(other.path().join("admin").join(f), mixed.join(f)).unwrap();
    }
    let (ok, _, err) = cli_as(&c, &mixed, &["volume", "list"]);
    assert!(!ok && err.contains("not issued by the CA"), "{err}");
    // The agent's side, with a client that does not check itself (curl): a certificate
    // from another CA gets no answer; the cluster's admin certificate gets gRPC.
    let port = c.endpoint("n1").rsplit(':').next().unwrap().to_string();
    let url = format!("https://127.0.0.1:{port}/hlstore.volume.v1.Volumes/ListVolumes");
    let curl = |dir: &Path| {
        run_tool(
            Command::new("curl")
                .args(["-sS", "--http2", "-o", "/dev/null", "-w", "%{http_code}", "-X", "POST"])
                .args(["-H", "content-type: application/grpc", "--data-binary", "@/dev/null"])
                .args(["--cacert", s(&tls(&c, "admin").join("ca.crt"))])
                .args(["--cert", s(&dir.join("tls.crt")), "--key", s(&dir.join("tls.key")), &url]),
            Duration::from_secs(30),
        )
    };
    let good = curl(&tls(&c, "admin"));
    assert_eq!(String::from_utf8_lossy(&good.stdout), "200", "{}", String::from_utf8_lossy(&good.stderr));
    let bad = curl(&other.path().join("admin"));
    assert!(
        !bad.status.success(),
        "a certificate of another CA got an answer: {:?}",
        String::from_utf8_lossy(&bad.stdout)
    );
    c.wait_until("the agent to log the refused handshake", WAIT, || c.log("n1").contains("UnknownCA").then_some(()));
    // The volume is untouched.
    c.wait_all_healthy(VOLUME, WAIT);
}

#[test]
fn plaintext_gets_nothing() {
    let (c, _) = cluster();
    // The CLI in plaintext: refused, with what to do about it.
    let (ok, _, err) = {
        let ep = c.endpoint("n1");
        let out = run_tool(
            c.command().env("HLSTORE_INSECURE", "1").args(["volume", "delete", VOLUME, "--endpoint", &ep]),
            WAIT,
        );
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    assert!(!ok && err.contains("--insecure"), "{err}");
    // A raw HTTP/2 client: the agent answers with a TLS alert at most, never HTTP/2.
    let addr = c.endpoint("n1").split("://").nth(1).unwrap().to_string();
    let mut sock = std::net::TcpStream::connect(&addr).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    sock.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00").unwrap();
    let mut got = Vec::new();
    let _ = sock.read_to_end(&mut got);
    assert!(got.is_empty() || got[0] == 0x15, "plaintext got an answer that is not a TLS alert: {got:?}");
    // And the volume is still there.
    let (ok, out, err) = cli_as(&c, &tls(&c, "admin"), &["volume", "list", "--json"]);
    assert!(ok && out.contains(VOLUME), "{err}");
}

#[test]
fn roles_limit_what_a_certificate_may_do() {
    let (c, _) = cluster();
    let backup = tls(&c, "backup");
    // A backup certificate reads and snapshots, and may not delete or create volumes.
    let (ok, out, err) = cli_as(&c, &backup, &["volume", "list", "--json"]);
    assert!(ok && out.contains(VOLUME), "{err}");
    let (ok, _, err) = cli_as(&c, &backup, &["volume", "delete", VOLUME]);
    assert!(!ok && err.contains("may not call DeleteVolume"), "{err}");
    let (ok, _, err) = cli_as(&c, &backup, &["volume", "create", "x", "--size", "16MiB"]);
    assert!(!ok && err.contains("may not call CreateVolume"), "{err}");
    let (ok, _, err) = cli_as(&c, &backup, &["snapshot", "create", VOLUME, "backup-1-0000abcd"]);
    assert!(ok, "{err}");
    let (ok, _, err) = cli_as(&c, &tls(&c, "admin"), &["snapshot", "create", VOLUME, "before-upgrade"]);
    assert!(ok, "{err}");
    let (ok, _, err) = cli_as(&c, &backup, &["snapshot", "delete", VOLUME, "before-upgrade"]);
    assert!(!ok && err.contains("only the snapshots backups take"), "{err}");
    let (ok, _, err) = cli_as(&c, &backup, &["snapshot", "delete", VOLUME, "backup-1-0000abcd"]);
    assert!(ok, "{err}");
    // A node certificate (the agents', the CSI node plugin's) may not delete volumes.
    let (ok, _, err) = cli_as(&c, &tls(&c, "n2"), &["volume", "delete", VOLUME]);
    assert!(!ok && err.contains("may not call DeleteVolume"), "{err}");
    // Everything refused above is still there.
    let (ok, out, err) = cli_as(&c, &tls(&c, "admin"), &["snapshot", "list", VOLUME, "--json"]);
    assert!(ok && out.contains("before-upgrade"), "{err}");
    c.wait_all_healthy(VOLUME, WAIT);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_certificate_cannot_claim_replicas_for_another_node() {
    let (c, _) = tokio::task::spawn_blocking(cluster).await.unwrap();
    let n1 = c.endpoint("n1");
    let replica = |dir: &str, expect: &str| {
        let t = ClientTls::Tls(TlsState::load(&tls(&c, dir)).unwrap());
        let ch = channel_lazy(&n1, &t, Expect::Node(expect.into()), Duration::from_secs(5)).unwrap();
        ReplicaClient::new(ch)
    };
    // n2's certificate reaches n1's replica service (agents talk to each other)...
    let mut as_n2 = replica("n2", "n1");
    let reps = as_n2.list_replicas(pb::ListReplicasRequest {}).await.unwrap().into_inner().replicas;
    let id = reps[0].record.as_ref().unwrap().volume_id.clone();
    let before = as_n2.state(pb::StateRequest { volume_id: id.clone() }).await.unwrap().into_inner();
    // ...but cannot claim n1's replica in n1's name (the attached engine is on n1).
    let claim = pb::OpenRequest {
        volume_id: id.clone(),
        epoch: before.epoch + 100,
        owner: 0xbad,
        owner_node: "n1".into(),
        mode: pb::open_request::Mode::Join as i32,
        expect_epoch: 0,
    };
    let err = as_n2.open(claim).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
    assert!(err.message().contains("cannot claim replicas for node \"n1\""), "{err:?}");
    let after = as_n2.state(pb::StateRequest { volume_id: id.clone() }).await.unwrap().into_inner();
    assert_eq!((after.epoch, after.owner), (before.epoch, before.owner), "the refused claim changed nothing");
    // The replica service takes node certificates only.
    let mut as_admin = {
        let t = ClientTls::Tls(TlsState::load(&tls(&c, "admin")).unwrap());
        ReplicaClient::new(channel_lazy(&n1, &t, Expect::AnyNode, Duration::from_secs(5)).unwrap())
    };
    let err = as_admin.list_replicas(pb::ListReplicasRequest {}).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
    let err =
        as_admin.delete_replica(pb::DeleteReplicaRequest { volume_id: id.clone(), epoch: u64::MAX }).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
    let after = as_n2.state(pb::StateRequest { volume_id: id.clone() }).await.unwrap().into_inner();
    assert_eq!(after.epoch, before.epoch, "the replica is still there, unchanged");
    // A client expecting node n2 at n1's address (a wrong --peers) refuses n1's agent.
    let mut wrong = replica("n2", "n2");
    let err = wrong.list_replicas(pb::ListReplicasRequest {}).await.unwrap_err();
    let msg = err.message();
    assert!(msg.contains("certificate of node \"n1\", but node \"n2\" was expected"), "{msg}");
    tokio::task::spawn_blocking(move || drop(c)).await.unwrap();
}

#[test]
fn certificates_rotate_under_load_without_a_restart() {
    let (c, uri) = cluster();
    let work = tempfile::tempdir().unwrap();
    let mut load = Load::start(&uri, work.path(), "rot", 1024, 0, 16);
    let acked = |ops: &[Op]| ops.iter().filter(|o| matches!(o, Op::Write { errno: None, .. })).count();
    load.wait_for("100 acknowledged writes", WAIT, |ops| acked(ops) >= 100);

    // Renew every certificate in place (what cert-manager does), with new names so the
    // new ones can be told apart.
    let ca = tls(&c, "");
    let ca = s(&ca).trim_end_matches('/').to_string();
    for n in ["n1", "n2", "n3"] {
        hlstore(&[
            "cert",
            "issue",
            "--ca-dir",
            &ca,
            "--role",
            "node",
            "--node",
            n,
            "--name",
            &format!("{n}-renewed"),
            "--ip",
            "127.0.0.1",
            "--out",
            s(&tls(&c, n)),
        ]);
    }
    hlstore(&[
        "cert",
        "issue",
        "--ca-dir",
        &ca,
        "--role",
        "admin",
        "--name",
        "admin-renewed",
        "--out",
        s(&tls(&c, "admin")),
    ]);
    for n in ["n1", "n2", "n3"] {
        c.wait_until(&format!("{n} to reload its certificate"), WAIT, || {
            c.log(n).contains("TLS certificates reloaded").then_some(())
        });
    }
    let done = acked(&load.ops());
    load.wait_for("100 more acknowledged writes after the renewal", WAIT, |ops| acked(ops) >= done + 100);

    // New connections get the new certificate.
    let port = c.endpoint("n1").rsplit(':').next().unwrap().to_string();
    let admin = tls(&c, "admin");
    let out = run_tool(
        Command::new("curl")
            .args(["-sv", "--http2", "-o", "/dev/null", "--cacert", s(&admin.join("ca.crt"))])
            .args(["--cert", s(&admin.join("tls.crt")), "--key", s(&admin.join("tls.key"))])
            .arg(format!("https://127.0.0.1:{port}/")),
        Duration::from_secs(30),
    );
    let verbose = String::from_utf8_lossy(&out.stderr);
    assert!(verbose.contains("CN=n1-renewed"), "n1 still presents its old certificate:\n{verbose}");
    // A node restarted now joins with its renewed certificate, and the volume heals.
    c.kill9("n3");
    c.up(&[]);
    c.wait_all_healthy(VOLUME, WAIT);
    let done = acked(&load.ops());
    load.wait_for("100 more acknowledged writes with n3 back", WAIT, |ops| acked(ops) >= done + 100);
    let ops = load.stop();
    let failed =
        ops.iter().filter(|o| matches!(o, Op::Write { errno: Some(_), .. } | Op::Flush { errno: Some(_), .. })).count();
    assert_eq!(failed, 0, "writes failed during the rotation");
    verify_load(&uri, 1024, 0, &[&load.log]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restores_write_through_the_authenticated_api_not_nbd() {
    use hlstore_proto::volume as vpb;
    let (c, uri) = tokio::task::spawn_blocking(cluster).await.unwrap();
    let mut admin = c.volumes("n1").await;
    // Unaligned, as a file restore writes: read-modify-write through the engine.
    let data: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
    let req = vpb::WriteVolumeRequest { name: VOLUME.into(), offset: 1000, data: data.clone(), fua: false };
    admin.write_volume(req).await.unwrap();
    admin.flush_volume(vpb::FlushVolumeRequest { name: VOLUME.into() }).await.unwrap();
    let out = tempfile::NamedTempFile::new().unwrap();
    let path = out.path().to_str().unwrap().to_string();
    let uri2 = uri.clone();
    tokio::task::spawn_blocking(move || run_ok(Command::new("nbdcopy").args([&uri2, &path]), WAIT)).await.unwrap();
    let back = std::fs::read(out.path()).unwrap();
    assert_eq!(&back[1000..11_000], &data[..], "the bytes written over gRPC read back over NBD");
    assert!(back[..1000].iter().all(|&b| b == 0) && back[11_000..12_288].iter().all(|&b| b == 0));
    // Past the end: refused, nothing written.
    let req = vpb::WriteVolumeRequest { name: VOLUME.into(), offset: 64 << 20, data: vec![1; 4096], fua: false };
    assert_eq!(admin.write_volume(req).await.unwrap_err().code(), tonic::Code::OutOfRange);
    // Not attached on the agent asked: refused (the engine is on n1).
    let mut n2 = c.volumes("n2").await;
    let req = vpb::WriteVolumeRequest { name: VOLUME.into(), offset: 0, data: vec![1; 4096], fua: false };
    let err = n2.write_volume(req).await.unwrap_err();
    assert!(err.message().contains("not attached on node n2"), "{err:?}");
    // A backup certificate may not write.
    let mut backup = support::cluster::volumes_client(&tls(&c, "backup"), &c.endpoint("n1")).await;
    let req = vpb::WriteVolumeRequest { name: VOLUME.into(), offset: 0, data: vec![1; 4096], fua: false };
    assert_eq!(backup.write_volume(req).await.unwrap_err().code(), tonic::Code::PermissionDenied);
    tokio::task::spawn_blocking(move || drop(c)).await.unwrap();
}

//! The CA, issuing and loading: identities come out as issued, and every wrong file is
//! refused at load with its path named.

use std::path::Path;

use hlstore_tls::issue::{init_ca, issue, CertSpec};
use hlstore_tls::{files, Role, TlsState};

fn spec(role: Role, node: Option<&str>) -> CertSpec {
    CertSpec { role, node: node.map(str::to_string), name: None, dns: vec![], ips: vec![], days: 30 }
}

fn ca(dir: &Path) {
    init_ca(dir, "test CA", 365).unwrap();
}

#[test]
fn issued_certificates_carry_their_role_and_node() {
    let d = tempfile::tempdir().unwrap();
    ca(&d.path().join("ca"));
    issue(&d.path().join("ca"), &spec(Role::Node, Some("n2")), &d.path().join("n2")).unwrap();
    issue(&d.path().join("ca"), &spec(Role::Admin, None), &d.path().join("admin")).unwrap();
    issue(&d.path().join("ca"), &spec(Role::Backup, None), &d.path().join("backup")).unwrap();
    let n2 = files::load(&d.path().join("n2")).unwrap().identity;
    assert_eq!((n2.role, n2.node.as_deref()), (Role::Node, Some("n2")));
    let admin = files::load(&d.path().join("admin")).unwrap().identity;
    assert_eq!((admin.role, admin.node), (Role::Admin, None));
    assert_eq!(files::load(&d.path().join("backup")).unwrap().identity.role, Role::Backup);
    // The private key is readable by its owner only.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(d.path().join("n2/tls.key")).unwrap().permissions().mode();
    assert_eq!(mode & 0o077, 0, "key mode {mode:o}");
    // A second init over the same CA is refused (it would orphan every certificate).
    assert!(init_ca(&d.path().join("ca"), "again", 1).unwrap_err().to_string().contains("already holds a CA"));
    // Role and node must agree.
    assert!(issue(&d.path().join("ca"), &spec(Role::Node, None), &d.path().join("x")).is_err());
    assert!(issue(&d.path().join("ca"), &spec(Role::Admin, Some("n1")), &d.path().join("x")).is_err());
    assert!(issue(&d.path().join("ca"), &spec(Role::Node, Some("N 1")), &d.path().join("x")).is_err());
}

#[test]
fn wrong_files_are_named() {
    let d = tempfile::tempdir().unwrap();
    ca(&d.path().join("ca"));
    ca(&d.path().join("other-ca"));
    let c = d.path().join("c");
    issue(&d.path().join("ca"), &spec(Role::Admin, None), &c).unwrap();

    // A missing directory and a missing file: the path is in the message.
    let e = TlsState::load(&d.path().join("nope")).unwrap_err().to_string();
    assert!(e.contains("nope/ca.crt") && e.contains("does not exist"), "{e}");
    std::fs::remove_file(c.join("tls.key")).unwrap();
    let e = TlsState::load(&c).unwrap_err().to_string();
    assert!(e.contains("c/tls.key") && e.contains("does not exist"), "{e}");

    // Another certificate's key.
    issue(&d.path().join("ca"), &spec(Role::Admin, None), &c).unwrap();
    let other = d.path().join("o");
    issue(&d.path().join("ca"), &spec(Role::Backup, None), &other).unwrap();
    std::fs::copy(other.join("tls.key"), c.join("tls.key")).unwrap();
    let e = TlsState::load(&c).unwrap_err().to_string();
    assert!(e.contains("does not belong"), "{e}");

    // A certificate from another CA than ca.crt.
    issue(&d.path().join("other-ca"), &spec(Role::Admin, None), &c).unwrap();
    std::fs::copy(d.path().join("ca/ca.crt"), c.join("ca.crt")).unwrap();
    let e = TlsState::load(&c).unwrap_err().to_string();
    assert!(e.contains("not issued by the CA"), "{e}");

    // Garbage.
    std::fs::write(c.join("tls.crt"), "hello").unwrap();
    let e = TlsState::load(&c).unwrap_err().to_string();
    assert!(e.contains("tls.crt") && e.contains("no PEM certificate"), "{e}");
}

#[tokio::test]
async fn reload_swaps_in_new_files_and_keeps_the_old_ones_when_broken() {
    let d = tempfile::tempdir().unwrap();
    ca(&d.path().join("ca"));
    let n = d.path().join("n1");
    issue(&d.path().join("ca"), &spec(Role::Node, Some("n1")), &n).unwrap();
    let st = TlsState::load(&n).unwrap();
    assert!(!st.reload().unwrap(), "unchanged files are no change");
    issue(&d.path().join("ca"), &spec(Role::Node, Some("n1")), &n).unwrap();
    assert!(st.reload().unwrap(), "a renewed certificate is swapped in");
    // Another node's certificate is not a renewal.
    issue(&d.path().join("ca"), &spec(Role::Node, Some("n2")), &n).unwrap();
    assert!(st.reload().is_err());
    assert_eq!(st.identity().node.as_deref(), Some("n1"));
    // A half-written key: refused, the previous configuration stays.
    issue(&d.path().join("ca"), &spec(Role::Node, Some("n1")), &n).unwrap();
    std::fs::write(n.join("tls.key"), "-----BEGIN PRIVATE KEY-----\nAAAA").unwrap();
    assert!(st.reload().is_err());
    assert_eq!(st.identity().node.as_deref(), Some("n1"));
}

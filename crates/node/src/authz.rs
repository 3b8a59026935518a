//! Who may call what on a node agent (the policy [`hlstore_tls::server::AuthLayer`]
//! applies to every request of a TLS connection).
//!
//! | service / method | admin | node | backup |
//! |---|---|---|---|
//! | replica service (every method; `hlstore replica` takes a node's certificate) | – | yes | – |
//! | volumes: read (list, get, list snapshots, changed blocks, read snapshot, attachments) | yes | yes | yes |
//! | volumes: create / delete snapshot | yes | yes | yes (delete: `backup-` snapshots only) |
//! | volumes: attach, detach, expand, scrub, write / flush (restores) | yes | yes | – |
//! | volumes: create, delete, clone, revert, replace replica, set labels | yes | – | – |
//!
//! `node` certificates are the agents' own (calls one agent forwards to another) and the
//! CSI node plugin's on that node: everything a node does to volumes attached on it, but
//! not creating or destroying volumes. The replica service additionally checks that a
//! node claims replicas only for itself (`rpc::service`). Unknown methods: admin only
//! (they answer "unimplemented").

use hlstore_core::identity::{PeerIdentity, Role};

const REPLICA: &str = "/hlstore.replica.v1.Replica/";
const VOLUMES: &str = "/hlstore.volume.v1.Volumes/";

/// Snapshot names backups take (`hlstore_backup::volume::plan::SNAPSHOT_PREFIX`): the only
/// ones a `backup` certificate may delete.
pub const BACKUP_SNAPSHOT_PREFIX: &str = "backup-";

const READ: &[&str] =
    &["ListNodes", "ListVolumes", "GetVolume", "ListAttachments", "ListSnapshots", "ChangedBlocks", "ReadSnapshot"];
const SNAPSHOT: &[&str] = &["CreateSnapshot", "DeleteSnapshot"];
const NODE_OPS: &[&str] =
    &["AttachVolume", "DetachVolume", "ExpandVolume", "ScrubVolume", "WriteVolume", "FlushVolume"];

fn allowed(role: Role, path: &str) -> bool {
    if path.starts_with(REPLICA) {
        return role == Role::Node;
    }
    if let Some(m) = path.strip_prefix(VOLUMES) {
        return match role {
            Role::Admin => true,
            Role::Node => READ.contains(&m) || SNAPSHOT.contains(&m) || NODE_OPS.contains(&m),
            Role::Backup => READ.contains(&m) || SNAPSHOT.contains(&m),
        };
    }
    role == Role::Admin
}

/// The policy: `Ok` or the refusal's message (it names the certificate, the method and
/// the roles that may call it).
pub fn authorize(path: &str, who: &PeerIdentity) -> Result<(), String> {
    if allowed(who.role, path) {
        return Ok(());
    }
    let method = path.rsplit('/').next().unwrap_or(path);
    let may: Vec<&str> = Role::ALL.into_iter().filter(|r| allowed(*r, path)).map(Role::as_str).collect();
    Err(format!(
        "permission denied: a {who} may not call {method} (allowed: {})",
        if may.is_empty() { "nobody".to_string() } else { format!("{} certificates", may.join(", ")) }
    ))
}

/// The extra rule for `DeleteSnapshot`: a `backup` certificate deletes only backups'
/// snapshots. `None` (plaintext, `--insecure`) and other roles pass.
pub fn may_delete_snapshot(who: Option<&PeerIdentity>, name: &str) -> Result<(), String> {
    match who {
        Some(id) if id.role == Role::Backup && !name.starts_with(BACKUP_SNAPSHOT_PREFIX) => Err(format!(
            "permission denied: a {id} may delete only the snapshots backups take ({BACKUP_SNAPSHOT_PREFIX}*), not {name:?}"
        )),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(role: Role) -> PeerIdentity {
        PeerIdentity { role, node: (role == Role::Node).then(|| "n1".into()), name: "t".into() }
    }

    #[test]
    fn roles_get_what_the_table_says() {
        let v = |m: &str| format!("{VOLUMES}{m}");
        let r = |m: &str| format!("{REPLICA}{m}");
        assert!(authorize(&r("Open"), &id(Role::Node)).is_ok());
        assert!(authorize(&r("Open"), &id(Role::Admin)).is_err());
        assert!(authorize(&r("Write"), &id(Role::Admin)).is_err());
        assert!(authorize(&r("DeleteReplica"), &id(Role::Admin)).is_err());
        assert!(authorize(&r("ListReplicas"), &id(Role::Admin)).is_err());
        assert!(authorize(&r("Write"), &id(Role::Backup)).is_err());
        for m in ["DeleteVolume", "CreateVolume", "CloneVolume", "RevertSnapshot", "ReplaceReplica"] {
            assert!(authorize(&v(m), &id(Role::Admin)).is_ok());
            assert!(authorize(&v(m), &id(Role::Node)).is_err(), "{m}");
            let e = authorize(&v(m), &id(Role::Backup)).unwrap_err();
            assert!(e.contains(m) && e.contains("allowed: admin certificates"), "{e}");
        }
        for m in ["ReadSnapshot", "CreateSnapshot", "ChangedBlocks", "ListVolumes"] {
            assert!(authorize(&v(m), &id(Role::Backup)).is_ok(), "{m}");
        }
        assert!(authorize(&v("AttachVolume"), &id(Role::Backup)).is_err());
        assert!(authorize(&v("AttachVolume"), &id(Role::Node)).is_ok());
        assert!(authorize("/grpc.reflection.v1.ServerReflection/Info", &id(Role::Node)).is_err());
        assert!(may_delete_snapshot(Some(&id(Role::Backup)), "before-upgrade").is_err());
        assert!(may_delete_snapshot(Some(&id(Role::Backup)), "backup-1700000000-0000abcd").is_ok());
        assert!(may_delete_snapshot(Some(&id(Role::Admin)), "before-upgrade").is_ok());
    }
}

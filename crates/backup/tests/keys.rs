//! Several passwords per repository: add, list, remove, change. The master key never
//! changes (old backups stay readable); a removed or replaced password is refused.

mod support;

use std::sync::Arc;

use hlstore_backup::backend::Backend;
use hlstore_backup::{backup, BackupOptions, Error, FileSource, FsBackend, Repository};
use support::*;

#[test]
fn add_remove_and_change_passwords() {
    let t = tempfile::tempdir().unwrap();
    let b: Arc<dyn Backend> = Arc::new(FsBackend::new(t.path().join("repo")));
    let repo = init_repo(b.clone(), test_config());
    let src = t.path().join("img");
    write(&src, &mixed_image(1 << 20, 90));
    let snap = backup(&repo, &FileSource::open(&src).unwrap(), BackupOptions::default()).unwrap();

    let second = repo.add_key(b"second password", test_kdf()).unwrap();
    let keys = repo.list_keys().unwrap();
    assert_eq!(keys.len(), 2);
    assert_eq!(keys.iter().filter(|k| k.current).count(), 1);
    assert!(keys.iter().any(|k| k.id == second && !k.current));
    assert!(repo.add_key(b"", test_kdf()).is_err(), "empty password refused");

    // Both passwords open the same repository (same master key: the backup reads back).
    let r2 = Repository::open(b.clone(), b"second password").unwrap();
    assert_eq!(r2.key_id(), second);
    assert_eq!(r2.load_snapshot(&snap.meta.id).unwrap().meta.id, snap.meta.id);
    // Neither can remove the key it was opened with; the last key never goes.
    assert!(r2.remove_key(&second).is_err());
    let first = repo.key_id().to_string();
    assert_eq!(r2.remove_key(&first[..6]).unwrap(), first);
    assert!(matches!(Repository::open(b.clone(), PASSWORD), Err(Error::WrongPassword)));
    assert!(r2.remove_key(&second).is_err(), "last key");

    // passwd: the new password opens, the old is refused, data unchanged.
    let mut r2 = r2;
    let third = r2.change_password(b"third password", test_kdf()).unwrap();
    assert_eq!(r2.key_id(), third);
    assert!(matches!(Repository::open(b.clone(), b"second password"), Err(Error::WrongPassword)));
    let r3 = Repository::open(b.clone(), b"third password").unwrap();
    assert_eq!(r3.list_keys().unwrap().len(), 1);
    assert_eq!(r3.load_snapshot(&snap.meta.id).unwrap().chunks, snap.chunks);
    assert!(r3.remove_key("ffffffffffffffff0").is_err(), "unknown id");
}

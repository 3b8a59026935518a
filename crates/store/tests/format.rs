//! The data directory's format version: recorded on first open, older (unrecorded)
//! directories are taken as version 1, and a directory of a newer format is refused with
//! an error that names both versions instead of being read by guesswork.

use hlstore_store::STORE_FORMAT_VERSION as FORMAT_VERSION;
use hlstore_store::{DiskStore, ReplicaStore, VolumeRecord};

#[test]
fn format_is_recorded_kept_and_a_newer_one_refused() {
    let dir = tempfile::tempdir().unwrap();
    {
        let s = DiskStore::open(dir.path()).unwrap();
        s.create(VolumeRecord::new("v", 1 << 20)).unwrap();
    }
    let recorded = std::fs::read_to_string(dir.path().join("FORMAT")).unwrap();
    assert_eq!(recorded, format!("hlstore-store {FORMAT_VERSION}\n"));

    // A directory from before the file existed (version 1) opens and gets it.
    std::fs::remove_file(dir.path().join("FORMAT")).unwrap();
    let s = DiskStore::open(dir.path()).unwrap();
    assert_eq!(s.list().unwrap().len(), 1, "the replica is still there");
    drop(s);
    assert!(dir.path().join("FORMAT").exists());

    // A newer format: refused, nothing touched.
    std::fs::write(dir.path().join("FORMAT"), format!("hlstore-store {}\n", FORMAT_VERSION + 1)).unwrap();
    let err = DiskStore::open(dir.path()).err().expect("a newer format is refused").to_string();
    assert!(err.contains("newer hlstore") && err.contains(&format!("format {}", FORMAT_VERSION + 1)), "{err}");
    assert_eq!(
        std::fs::read_to_string(dir.path().join("FORMAT")).unwrap(),
        format!("hlstore-store {}\n", FORMAT_VERSION + 1)
    );
    std::fs::write(dir.path().join("FORMAT"), "garbage").unwrap();
    assert!(DiskStore::open(dir.path()).is_err());
}

//! One conformance suite for every backend (filesystem and S3 on a real SeaweedFS server),
//! plus the S3 failure modes users hit first: wrong credentials and a missing bucket.

mod support;

use std::sync::Arc;

use hlstore_backup::backend::{Backend, FsBackend, S3Backend, S3Options};
use hlstore_backup::{Error, Repository};
use support::weed::{weed, ACCESS_KEY, BUCKETS, SECRET_KEY};

fn suite(b: &dyn Backend) {
    // Missing objects.
    assert!(matches!(b.get("nope"), Err(Error::NotFound(_))), "get missing");
    assert!(b.list("").unwrap().is_empty(), "fresh backend lists nothing");
    b.delete("nope").expect("deleting a missing object succeeds");

    // Put / get / overwrite.
    b.put("config", b"one").unwrap();
    assert_eq!(b.get("config").unwrap(), b"one");
    b.put("config", b"two!").unwrap();
    assert_eq!(b.get("config").unwrap(), b"two!");

    // Ranged reads, including short and past-the-end reads.
    let data: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
    b.put("data/ab/abcd", &data).unwrap();
    assert_eq!(b.get_range("data/ab/abcd", 100, 50).unwrap(), &data[100..150]);
    assert_eq!(b.get_range("data/ab/abcd", 9_990, 50).unwrap(), &data[9_990..]);
    assert!(b.get_range("data/ab/abcd", 20_000, 10).unwrap().is_empty());
    assert!(matches!(b.get_range("data/zz/missing", 0, 10), Err(Error::NotFound(_))));

    // Prefix listing with sizes, across "directories" and past one list page (1000).
    for i in 0..1003 {
        b.put(&format!("index/{i:05}"), &[7u8; 3]).unwrap();
    }
    b.put("data/cd/cdef", b"xyz").unwrap();
    let mut data_keys = b.list("data/").unwrap();
    data_keys.sort_by(|a, b| a.key.cmp(&b.key));
    let got: Vec<(&str, u64)> = data_keys.iter().map(|o| (o.key.as_str(), o.size)).collect();
    assert_eq!(got, vec![("data/ab/abcd", 10_000), ("data/cd/cdef", 3)]);
    let idx = b.list("index/").unwrap();
    assert_eq!(idx.len(), 1003);
    assert!(idx.iter().all(|o| o.size == 3 && o.key.starts_with("index/")));
    assert_eq!(b.list("index/001").unwrap().len(), 100);
    assert_eq!(b.list("index/0100").unwrap().len(), 3);
    assert_eq!(b.list("").unwrap().len(), 1003 + 3);

    // Large objects (multipart on S3).
    let big: Vec<u8> = (0..(17u32 << 20)).map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8).collect();
    b.put("data/ee/big", &big).unwrap();
    assert_eq!(b.get("data/ee/big").unwrap(), big);
    assert_eq!(b.get_range("data/ee/big", (9 << 20) - 5, 10).unwrap(), &big[(9 << 20) - 5..(9 << 20) + 5]);

    // Delete.
    b.delete("data/ab/abcd").unwrap();
    assert!(matches!(b.get("data/ab/abcd"), Err(Error::NotFound(_))));
    assert_eq!(b.list("data/").unwrap().len(), 2);
}

#[test]
fn fs_backend_conformance() {
    let dir = tempfile::tempdir().unwrap();
    suite(&FsBackend::new(dir.path()));
}

#[test]
fn s3_backend_conformance() {
    let Some(w) = weed() else { return };
    suite(&w.backend(BUCKETS[0]));
}

#[test]
fn s3_wrong_credentials_are_reported_clearly() {
    let Some(w) = weed() else { return };
    let opts = S3Options { credentials: Some((ACCESS_KEY.into(), format!("{SECRET_KEY}-wrong"))), ..w.options() };
    let b = S3Backend::new(BUCKETS[1], "x", &opts).unwrap();
    let e = b.check_bucket().unwrap_err();
    assert!(matches!(e, Error::AccessDenied { .. }), "{e:?}");
    let e = b.put("config", b"x").unwrap_err();
    assert!(matches!(e, Error::AccessDenied { .. }), "{e:?}");
    let unknown = S3Options { credentials: Some(("nobody".into(), "nothing".into())), ..w.options() };
    let b: Arc<dyn Backend> = Arc::new(S3Backend::new(BUCKETS[1], "x", &unknown).unwrap());
    let e = Repository::open(b, b"pw").unwrap_err();
    assert!(matches!(e, Error::AccessDenied { .. }), "{e:?}");
    assert!(e.to_string().contains("credentials"), "{e}");
}

#[test]
fn s3_missing_bucket_is_reported_clearly() {
    let Some(w) = weed() else { return };
    let b = S3Backend::new("no-such-bucket-here", "p", &w.options()).unwrap();
    let e = b.check_bucket().unwrap_err();
    assert!(matches!(e, Error::BucketNotFound { .. }), "{e:?}");
    let b: Arc<dyn Backend> = Arc::new(b);
    let e = Repository::open(b.clone(), b"pw").unwrap_err();
    assert!(matches!(e, Error::BucketNotFound { .. }), "{e:?}");
    assert!(e.to_string().contains("does not exist"), "{e}");
    let e = b.put("config", b"x").unwrap_err();
    assert!(matches!(e, Error::BucketNotFound { .. }), "{e:?}");
}

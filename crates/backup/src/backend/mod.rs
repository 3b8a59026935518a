//! Storage backends: a flat key → object store. The repository needs only whole-object
//! put/get, ranged get, prefix list, and delete.
//!
//! Contract every backend keeps (checked by one conformance suite for all backends):
//! `put` is atomic (a reader sees the whole old object, the whole new one, or nothing);
//! `get` of a missing key is `Error::NotFound`; `delete` of a missing key succeeds; `list`
//! returns every key under a prefix with its size, in no particular order.

mod fs;
#[cfg(feature = "s3")]
mod s3;

pub use fs::FsBackend;
#[cfg(feature = "s3")]
pub use s3::S3Backend;

use crate::error::{Error, Result};

/// S3 connection settings not carried by the URL.
#[derive(Debug, Clone, Default)]
pub struct S3Options {
    /// Endpoint URL (`--s3-endpoint`); falls back to `AWS_ENDPOINT_URL`.
    pub endpoint: Option<String>,
    /// Region; falls back to `AWS_REGION` / `AWS_DEFAULT_REGION`, then `us-east-1`.
    pub region: Option<String>,
    /// Explicit (access key, secret key); default: the standard AWS variables.
    pub credentials: Option<(String, String)>,
}

/// One listed object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectInfo {
    pub key: String,
    pub size: u64,
}

/// A repository storage backend.
pub trait Backend: Send + Sync {
    /// Human-readable location (for messages).
    fn location(&self) -> String;
    /// Stores an object atomically, replacing any previous one.
    fn put(&self, key: &str, data: &[u8]) -> Result<()>;
    /// Reads a whole object.
    fn get(&self, key: &str) -> Result<Vec<u8>>;
    /// Reads `len` bytes at `offset`; short only if the object is shorter.
    fn get_range(&self, key: &str, offset: u64, len: u64) -> Result<Vec<u8>>;
    /// Lists every object whose key starts with `prefix`.
    fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>>;
    /// Removes an object; missing objects are not an error.
    fn delete(&self, key: &str) -> Result<()>;
}

/// Opens the backend a repository URL names: `file:///path`, a plain path, or
/// `s3://bucket/prefix`.
pub fn open_url(url: &str, s3: &S3Options) -> Result<Box<dyn Backend>> {
    if let Some(rest) = url.strip_prefix("s3://") {
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(Error::BadUrl { url: url.into(), detail: "no bucket name".into() });
        }
        #[cfg(feature = "s3")]
        return Ok(Box::new(S3Backend::new(bucket, prefix, s3)?));
        #[cfg(not(feature = "s3"))]
        {
            let _ = (prefix, s3);
            return Err(Error::BadUrl { url: url.into(), detail: "built without S3 support (feature `s3`)".into() });
        }
    }
    let path = url.strip_prefix("file://").unwrap_or(url);
    if path.is_empty() || url.contains("://") && !url.starts_with("file://") {
        return Err(Error::BadUrl {
            url: url.into(),
            detail: "use file:///path, a plain path, or s3://bucket/prefix".into(),
        });
    }
    Ok(Box::new(FsBackend::new(path)))
}

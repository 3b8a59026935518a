//! The crate's one error type.
//!
//! Rules: every variant says what failed and on which object, in words an operator can act
//! on; wrong passwords, missing buckets and rejected credentials have their own variants so
//! the CLI prints them plainly. Decoding damaged repository data is `Corrupt`, never a panic.

use std::io;

/// Result alias for the backup crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in the backup engine.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("wrong repository password (no key file could be opened with it)")]
    WrongPassword,
    #[error("no repository password: set HLSTORE_REPO_PASSWORD or pass --password-file")]
    NoPassword,
    #[error("no repository at {0} (run `hlstore backup init` first)")]
    NoRepository(String),
    #[error("a repository already exists at {0}")]
    RepositoryExists(String),
    #[error("S3 bucket {bucket:?} does not exist at {endpoint}")]
    BucketNotFound { bucket: String, endpoint: String },
    #[error(
        "S3 rejected the credentials for bucket {bucket:?} ({detail}); check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY"
    )]
    AccessDenied { bucket: String, detail: String },
    #[error("object {0} not found")]
    NotFound(String),
    #[error("corrupt object {object}: {detail}")]
    Corrupt { object: String, detail: String },
    #[error("unsupported repository format version {0} (this build reads version {1})")]
    UnsupportedVersion(u32, u32),
    #[error("invalid repository URL {url:?}: {detail}")]
    BadUrl { url: String, detail: String },
    #[error("no backup matches id {0:?}")]
    UnknownSnapshot(String),
    #[error("backup id prefix {0:?} is ambiguous")]
    AmbiguousSnapshot(String),
    #[error("chunk {chunk} of backup {snapshot} is not in any pack (repository damaged; run `hlstore backup verify`)")]
    MissingChunk { snapshot: String, chunk: String },
    #[error("storage backend error on {op} {object}: {detail}")]
    Backend { op: &'static str, object: String, detail: String },
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    #[error("node agent: {0}")]
    Agent(String),
    #[error("repository busy: {0}")]
    Busy(String),
    #[error("writer lease lapsed: {0}; nothing was saved, run the backup again (it reuses what was uploaded)")]
    LeaseLapsed(String),
    #[error("invalid argument: {0}")]
    Invalid(String),
}

impl Error {
    /// Wraps an IO error with what was being done.
    pub fn io(context: impl Into<String>, source: io::Error) -> Self {
        Error::Io { context: context.into(), source }
    }

    /// A corrupt-object error.
    pub fn corrupt(object: impl Into<String>, detail: impl Into<String>) -> Self {
        Error::Corrupt { object: object.into(), detail: detail.into() }
    }

    /// True when the error means "the object does not exist".
    pub fn is_not_found(&self) -> bool {
        matches!(self, Error::NotFound(_))
    }
}

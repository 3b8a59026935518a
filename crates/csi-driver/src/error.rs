//! The crate's one error type, and its mapping to gRPC status codes (only here).
//!
//! Rules: each variant says what the CO should do (retry, fix the request, give up); the
//! message names the volume/path/tool involved; errors from the node agent keep the
//! agent's code where CSI gives it the same meaning.

use tonic::{Code, Status};

pub type Result<T> = std::result::Result<T, CsiError>;

#[derive(Debug, thiserror::Error)]
pub enum CsiError {
    /// A required field is missing or a value is malformed.
    #[error("{0}")]
    InvalidArgument(String),
    /// The volume, snapshot, node or path does not exist.
    #[error("{0}")]
    NotFound(String),
    /// Exists with incompatible properties (same name, other size or source).
    #[error("{0}")]
    AlreadyExists(String),
    /// The request is fine but the state is not (not staged, published elsewhere...).
    #[error("{0}")]
    FailedPrecondition(String),
    /// Another operation on the same volume is in progress, or a paging token is stale.
    #[error("{0}")]
    Aborted(String),
    /// The capacity asked for cannot be provided.
    #[error("{0}")]
    OutOfRange(String),
    /// Not enough nodes or devices.
    #[error("{0}")]
    ResourceExhausted(String),
    /// Not supported by this driver or by the agents it talks to.
    #[error("{0}")]
    Unimplemented(String),
    /// A node agent (or the nodes it asks) cannot be reached now; retry.
    #[error("{0}")]
    Unavailable(String),
    /// A node agent answered with an error.
    #[error("{context}: {}", status.message())]
    Agent { context: String, status: Status },
    /// A system call or file operation failed.
    #[error("{context}: {source}")]
    Io { context: String, source: std::io::Error },
    /// An external tool (mount, mkfs, losetup...) failed.
    #[error("{0}")]
    Tool(String),
    #[error("{0}")]
    Internal(String),
}

impl CsiError {
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        CsiError::Io { context: context.into(), source }
    }

    pub fn agent(context: impl Into<String>, status: Status) -> Self {
        CsiError::Agent { context: context.into(), status }
    }

    /// The gRPC code this error is reported with.
    pub fn code(&self) -> Code {
        match self {
            CsiError::InvalidArgument(_) => Code::InvalidArgument,
            CsiError::NotFound(_) => Code::NotFound,
            CsiError::AlreadyExists(_) => Code::AlreadyExists,
            CsiError::FailedPrecondition(_) => Code::FailedPrecondition,
            CsiError::Aborted(_) => Code::Aborted,
            CsiError::OutOfRange(_) => Code::OutOfRange,
            CsiError::ResourceExhausted(_) => Code::ResourceExhausted,
            CsiError::Unimplemented(_) => Code::Unimplemented,
            CsiError::Unavailable(_) => Code::Unavailable,
            CsiError::Agent { status, .. } => agent_code(status.code()),
            CsiError::Io { .. } | CsiError::Tool(_) | CsiError::Internal(_) => Code::Internal,
        }
    }

    /// True when the node agent said the object does not exist.
    pub fn is_not_found(&self) -> bool {
        self.code() == Code::NotFound
    }
}

/// Agent codes → CSI codes. Exhaustive on purpose: a new code must choose.
fn agent_code(c: Code) -> Code {
    match c {
        Code::InvalidArgument | Code::OutOfRange => Code::InvalidArgument,
        Code::NotFound => Code::NotFound,
        Code::AlreadyExists => Code::AlreadyExists,
        Code::FailedPrecondition => Code::FailedPrecondition,
        Code::Unimplemented => Code::Unimplemented,
        Code::ResourceExhausted => Code::ResourceExhausted,
        Code::Aborted => Code::Aborted,
        Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled => Code::Unavailable,
        Code::Ok | Code::Unknown | Code::PermissionDenied | Code::Unauthenticated => Code::Internal,
        Code::Internal | Code::DataLoss => Code::Internal,
    }
}

impl From<CsiError> for Status {
    fn from(e: CsiError) -> Status {
        let code = e.code();
        if matches!(code, Code::Internal | Code::Unavailable) {
            tracing::warn!(error = %e, "request failed");
        }
        Status::new(code, e.to_string())
    }
}

/// A required request field: empty is INVALID_ARGUMENT, before any work is done.
pub(crate) fn required(value: &str, field: &str) -> Result<()> {
    if value.is_empty() {
        Err(CsiError::InvalidArgument(format!("{field} is required")))
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_codes_keep_their_csi_meaning() {
        let e = CsiError::agent("get volume", Status::not_found("no such volume"));
        assert_eq!(e.code(), Code::NotFound);
        assert!(e.is_not_found());
        let e = CsiError::agent("expand", Status::unimplemented("later"));
        assert_eq!(Status::from(e).code(), Code::Unimplemented);
        let e = CsiError::agent("attach", Status::deadline_exceeded("slow"));
        assert_eq!(e.code(), Code::Unavailable);
        let s = Status::from(CsiError::agent("create volume a", Status::already_exists("size differs")));
        assert_eq!(s.code(), Code::AlreadyExists);
        assert_eq!(s.message(), "create volume a: size differs");
    }
}

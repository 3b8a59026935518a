//! The replica gRPC service (tonic) over any [`hlstore_store::ReplicaStore`].
//!
//! Boundary: protobuf types exist only in this module and in the replication transport.
//! Requests are validated and converted to domain types on entry ([`convert`]); errors are
//! mapped to `tonic::Status` in exactly one place ([`status`]).

pub mod convert;
mod service;
pub mod snapshots;
pub mod status;

pub use service::{ReplicaService, ServiceStats};

/// Largest gRPC message (a 32 MiB NBD request plus framing).
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

//! The `hlstore.replica.v1` gRPC boundary: the replica service (tonic) over any
//! [`hlstore_store::ReplicaStore`], and what its clients share.
//!
//! Boundary: generated protobuf types of this package are converted to domain types in
//! exactly one module, [`convert`] (requests are validated there on entry); engine errors
//! and `tonic::Status` are mapped in exactly one module, [`status`], for the servers and
//! the clients of every hlstore service. The clients (the engine's transport,
//! `grpc_replica.rs`, and the node agent) build requests and convert replies with them.

pub mod convert;
mod service;
pub mod status;

pub use service::{ReplicaService, ServiceStats};

/// Largest gRPC message (a 32 MiB NBD request plus framing).
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

/// Largest snapshot read in one call.
pub const MAX_SNAPSHOT_READ: u64 = 4 << 20;

//! The replica gRPC service (tonic) over any [`crate::replica::ReplicaStore`].
//!
//! Boundary: protobuf types exist only in this module and in the replication transport.
//! Requests are validated and converted to domain types on entry ([`convert`]); errors are
//! mapped to `tonic::Status` in exactly one place ([`status`]).

pub mod convert;
mod service;
pub mod snapshots;
pub mod status;
mod volume_service;

pub use service::{ReplicaService, ServiceStats};
pub use volume_service::VolumeService;

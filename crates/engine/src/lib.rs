//! hlstore engine: everything on the data path of a node.
//!
//! Module map (dependency order; new code goes in the module that owns the concern):
//! - [`error`]: the crate's one error type, with stable kinds.
//! - [`device`]: `BlockDevice`, the boundary between frontends and volumes.
//! - [`durable_file`]: small state files written atomically and durably (tmp, fsync,
//!   rename, fsync dir); every state file goes through it.
//! - [`replica`]: the per-node replica store (block files + RocksDB metadata). Owns
//!   checksums, the allocation map, sequence numbers, epochs and crash recovery.
//! - [`grpc`]: the replica gRPC service (tonic) over a `ReplicaStore`; converts protobuf
//!   types to domain types on entry and maps errors to `tonic::Status` in one place.
//! - [`replication`]: the quorum replicator: a pure state machine (events in, commands out)
//!   and the runtime that drives it over gRPC.
//! - [`nbd`]: the NBD protocol server serving any `BlockDevice`.
//! - [`node`]: the node agent process: store + gRPC service + metrics endpoint.
//! - [`metrics`]: Prometheus text-format metrics.

pub mod device;
pub mod durable_file;
pub mod error;
pub mod fuse;
pub mod grpc;
pub mod metrics;
pub mod nbd;
pub mod nbd_client;
pub mod node;
pub mod replica;
pub mod replication;

pub use device::BlockDevice;
pub use error::{Error, ErrorKind, Result};
pub use replica::Change;

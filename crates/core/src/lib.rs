//! hlstore foundations shared by every layer above (store, replication, NBD, node agent).
//!
//! - [`error`]: the one error type of the data path, with stable kinds.
//! - [`device`]: `BlockDevice`, the boundary between frontends and volumes.
//! - [`durable_file`]: small state files written atomically and durably (tmp, fsync,
//!   rename, fsync dir); every state file goes through it.
//! - [`identity`]: the role and node a verified client certificate carries.
//! - [`ids`]: `Epoch`, `Seq`, `Offset` newtypes for the store and replication APIs.
//! - [`metrics`]: Prometheus text-format pages and their HTTP endpoint.
//!
//! This crate depends on no other hlstore crate.

pub mod device;
pub mod durable_file;
pub mod error;
pub mod identity;
pub mod ids;
pub mod metrics;
pub mod schedule;
pub mod space;

pub use device::BlockDevice;
pub use error::{Error, ErrorKind, Result};
pub use ids::{Epoch, Offset, Seq};

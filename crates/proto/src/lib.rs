//! Generated protobuf and gRPC code. Nothing else lives here: generated types stay at the
//! edge of the other crates, which convert them to domain types on entry, in one module
//! per package (`hlstore_replication::rpc::convert` for the replica service, the node
//! agent's `convert.rs` for the volume service).

#![allow(clippy::all, clippy::pedantic, missing_docs)]

/// The replica service (`proto/replica.proto`).
pub mod replica {
    tonic::include_proto!("hlstore.replica.v1");
}

/// The volume service (`proto/volume.proto`).
pub mod volume {
    tonic::include_proto!("hlstore.volume.v1");
}

/// The Container Storage Interface v1 (`proto/csi.proto`), package `csi.v1`.
pub mod csi {
    tonic::include_proto!("csi.v1");
}

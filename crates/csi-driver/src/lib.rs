//! The hlstore CSI driver: Identity, Controller and Node services that turn Kubernetes
//! PersistentVolumeClaims into hlstore volumes.
//!
//! Module map (where new code goes):
//! - [`identity`]: GetPluginInfo, GetPluginCapabilities, Probe.
//! - [`controller`]: volume and snapshot lifecycle; talks to any node agent over
//!   `hlstore.volume.v1.Volumes` (the agent knows its peers). Publish = start the volume's
//!   engine on the node; the NBD URI travels to the node plugin in `publish_context`.
//! - [`node`]: stage (attach + mkfs if blank + mount), publish (bind mount), stats, expand.
//! - [`backups`]: volumes restored from the backup repository (VolumeSnapshotContent
//!   handles `backup:...`), over the `BackupSource` trait the hlstore binary implements.
//! - [`attach`]: the block-device backends behind one trait: kernel NBD over netlink, and a
//!   FUSE block file + loop device for kernels without the NBD module.
//! - [`mount`]: mount table, mount/unmount, filesystem probing, mkfs, resize, statvfs.
//! - [`agent`]: which optional RPCs the node agent implements (capabilities follow it).
//! - [`capability`], [`ids`], [`inflight`], [`error`]: request validation, id mapping,
//!   the per-volume operation lock and the one error type (mapped to gRPC codes in one place).
//! - [`server`]: serves the selected services on a unix socket; [`client`] connects to one.
//!
//! Invariants:
//! - Requests are validated before any work: a missing field is INVALID_ARGUMENT and
//!   nothing has been touched.
//! - At most one operation per volume runs at a time; a second one gets ABORTED (the CO
//!   retries), see [`inflight`].
//! - Every RPC is idempotent: repeating it with the same arguments is OK and changes
//!   nothing. A filesystem is never created on a device that has any signature.
//! - The driver holds no state of its own: volumes live on the replicas, attachments in
//!   the agents, mounts in the mount table, and attached devices carry the volume id
//!   (NBD backend identifier, loop backing-file path), so a restarted plugin finds them.

pub mod agent;
pub mod attach;
pub mod backup_metrics;
pub mod backups;
pub mod capability;
pub mod client;
pub mod controller;
pub mod error;
pub mod identity;
pub mod ids;
pub mod inflight;
pub mod metrics;
pub mod mount;
pub mod node;
pub mod server;

pub use error::{CsiError, Result};
pub use server::{serve, DriverConfig, Mode};

/// The CSI driver name, as registered in the CSIDriver object and returned by GetPluginInfo.
pub const DRIVER_NAME: &str = "csi.hlstore.io";

/// Topology key of the node a plugin runs on (NodeGetInfo) and that `dataLocality` reads.
pub const TOPOLOGY_NODE_KEY: &str = "topology.hlstore.io/node";

/// Key of the NBD URI in `publish_context` (ControllerPublishVolume → NodeStageVolume).
pub const PUBLISH_NBD_URI: &str = "nbdUri";

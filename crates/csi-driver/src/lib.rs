//! The hlstore CSI driver: Identity, Controller and Node services that turn Kubernetes
//! PersistentVolumeClaims into hlstore volumes.
//!
//! Status: the driver is not built yet; this crate reserves its place in the workspace.
//! The CSI v1 bindings will be generated from `proto/csi.proto` by `hlstore-proto`.

/// The CSI driver name, as registered in the CSIDriver object and returned by GetPluginInfo.
pub const DRIVER_NAME: &str = "csi.hlstore.io";

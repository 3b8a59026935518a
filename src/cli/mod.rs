//! Command-line subcommands. One module per command family.

pub mod backup;
pub mod backup_metrics;
pub mod csi;
pub mod csi_backups;
pub mod debug;
pub mod dev;
pub mod fuse;
pub mod node;
pub mod recover;
pub mod replica;
pub mod size;
pub mod snapshot;
pub mod tls;
pub mod volume;
pub mod volume_agent;
pub mod volume_backup;

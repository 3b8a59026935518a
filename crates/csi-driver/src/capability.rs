//! Validation of CSI volume capabilities, shared by the controller and the node.
//!
//! hlstore volumes are served by one engine on one node at a time, so only single-node
//! access modes are supported; access is a raw block device or an ext4/xfs filesystem.

use hlstore_proto::csi::volume_capability::access_mode::Mode;
use hlstore_proto::csi::volume_capability::AccessType;
use hlstore_proto::csi::VolumeCapability;

use crate::error::{CsiError, Result};

/// Filesystems the node plugin creates and grows.
pub const FILESYSTEMS: [&str; 2] = ["ext4", "xfs"];
/// Filesystem when the capability names none.
pub const DEFAULT_FS: &str = "ext4";

/// How a volume is accessed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Access {
    Block,
    /// `fs_type` is empty when the CO left it to the driver.
    Mount {
        fs_type: String,
        flags: Vec<String>,
    },
}

/// A capability with its required parts checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Capability {
    pub access: Access,
    pub mode: Mode,
}

impl Capability {
    /// Checks that access type and access mode are present (INVALID_ARGUMENT otherwise).
    pub fn parse(cap: &VolumeCapability) -> Result<Capability> {
        let access = match &cap.access_type {
            Some(AccessType::Block(_)) => Access::Block,
            Some(AccessType::Mount(m)) => Access::Mount { fs_type: m.fs_type.clone(), flags: m.mount_flags.clone() },
            None => {
                return Err(CsiError::InvalidArgument(
                    "volume capability: access_type (block or mount) is required".into(),
                ))
            }
        };
        let mode = cap
            .access_mode
            .as_ref()
            .and_then(|m| Mode::try_from(m.mode).ok())
            .filter(|m| *m != Mode::Unknown)
            .ok_or_else(|| CsiError::InvalidArgument("volume capability: access_mode is required".into()))?;
        Ok(Capability { access, mode })
    }

    /// Why this capability cannot be served, if it cannot.
    pub fn unsupported_reason(&self) -> Option<String> {
        match self.mode {
            Mode::SingleNodeWriter
            | Mode::SingleNodeReaderOnly
            | Mode::SingleNodeSingleWriter
            | Mode::SingleNodeMultiWriter => {}
            m => {
                return Some(format!(
                    "access mode {} is not supported: a volume is used on one node at a time",
                    m.as_str_name()
                ))
            }
        }
        if let Access::Mount { fs_type, .. } = &self.access {
            if !fs_type.is_empty() && !FILESYSTEMS.contains(&fs_type.as_str()) {
                return Some(format!("filesystem {fs_type:?} is not supported (use one of {FILESYSTEMS:?})"));
            }
        }
        None
    }

    /// Parse + supported, for the node RPCs: a capability this plugin does not support is
    /// FAILED_PRECONDITION there ("Exceeds capabilities"), a malformed one INVALID_ARGUMENT.
    pub fn require_on_node(cap: Option<&VolumeCapability>) -> Result<Capability> {
        let cap = cap.ok_or_else(|| CsiError::InvalidArgument("volume_capability is required".into()))?;
        let c = Capability::parse(cap)?;
        match c.unsupported_reason() {
            Some(why) => Err(CsiError::FailedPrecondition(why)),
            None => Ok(c),
        }
    }

    /// Parse + supported, for requests that must be served (INVALID_ARGUMENT otherwise).
    pub fn require(cap: Option<&VolumeCapability>) -> Result<Capability> {
        let cap = cap.ok_or_else(|| CsiError::InvalidArgument("volume_capability is required".into()))?;
        let c = Capability::parse(cap)?;
        match c.unsupported_reason() {
            Some(why) => Err(CsiError::InvalidArgument(why)),
            None => Ok(c),
        }
    }

    /// Read-only access modes.
    pub fn read_only(&self) -> bool {
        matches!(self.mode, Mode::SingleNodeReaderOnly | Mode::MultiNodeReaderOnly)
    }
}

/// Parses every capability of a list that must not be empty.
pub fn parse_all(caps: &[VolumeCapability]) -> Result<Vec<Capability>> {
    if caps.is_empty() {
        return Err(CsiError::InvalidArgument("volume_capabilities is required".into()));
    }
    caps.iter().map(Capability::parse).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use hlstore_proto::csi::volume_capability::{AccessMode, BlockVolume, MountVolume};

    fn cap(access: Option<AccessType>, mode: Option<Mode>) -> VolumeCapability {
        VolumeCapability { access_type: access, access_mode: mode.map(|m| AccessMode { mode: m as i32 }) }
    }

    fn mount(fs: &str) -> Option<AccessType> {
        Some(AccessType::Mount(MountVolume { fs_type: fs.into(), ..Default::default() }))
    }

    #[test]
    fn missing_parts_are_invalid_arguments() {
        let e = Capability::parse(&cap(None, Some(Mode::SingleNodeWriter))).unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        let e = Capability::parse(&cap(mount("ext4"), None)).unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(parse_all(&[]).is_err());
        assert!(Capability::require(None).is_err());
    }

    #[test]
    fn single_node_block_and_ext4_xfs_are_supported() {
        for c in [
            cap(Some(AccessType::Block(BlockVolume {})), Some(Mode::SingleNodeWriter)),
            cap(mount(""), Some(Mode::SingleNodeWriter)),
            cap(mount("xfs"), Some(Mode::SingleNodeReaderOnly)),
        ] {
            let p = Capability::parse(&c).unwrap();
            assert_eq!(p.unsupported_reason(), None, "{p:?}");
        }
        let multi = Capability::parse(&cap(mount("ext4"), Some(Mode::MultiNodeMultiWriter))).unwrap();
        assert!(multi.unsupported_reason().is_some());
        let btrfs = Capability::parse(&cap(mount("btrfs"), Some(Mode::SingleNodeWriter))).unwrap();
        assert!(btrfs.unsupported_reason().unwrap().contains("btrfs"));
    }
}

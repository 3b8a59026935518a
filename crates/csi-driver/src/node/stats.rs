//! NodeGetVolumeStats and NodeExpandVolume.

use std::os::unix::fs::FileTypeExt;
use std::path::PathBuf;

use hlstore_proto::csi;
use hlstore_proto::csi::volume_usage::Unit;

use super::NodeService;
use crate::capability::{Access, Capability};
use crate::error::{required, CsiError, Result};
use crate::mount;

impl NodeService {
    pub(super) async fn stats(&self, r: csi::NodeGetVolumeStatsRequest) -> Result<csi::NodeGetVolumeStatsResponse> {
        required(&r.volume_id, "volume_id")?;
        required(&r.volume_path, "volume_path")?;
        let path = PathBuf::from(&r.volume_path);
        let md = std::fs::metadata(&path)
            .map_err(|_| CsiError::NotFound(format!("volume path {} does not exist", path.display())))?;
        if mount::mount_at(&path)?.is_none() {
            return Err(CsiError::NotFound(format!(
                "{} is not a mount of volume {} on this node",
                path.display(),
                r.volume_id
            )));
        }
        let usage = if md.file_type().is_block_device() {
            let total = mount::device_size(&path)? as i64;
            vec![csi::VolumeUsage { available: 0, total, used: 0, unit: Unit::Bytes as i32 }]
        } else {
            let u = mount::statvfs(&path)?;
            vec![
                csi::VolumeUsage {
                    available: u.available_bytes as i64,
                    total: u.total_bytes as i64,
                    used: u.used_bytes as i64,
                    unit: Unit::Bytes as i32,
                },
                csi::VolumeUsage {
                    available: u.free_inodes as i64,
                    total: u.total_inodes as i64,
                    used: u.total_inodes.saturating_sub(u.free_inodes) as i64,
                    unit: Unit::Inodes as i32,
                },
            ]
        };
        let volume_condition = Some(match self.attacher.problem(&r.volume_id).await? {
            Some(message) => csi::VolumeCondition { abnormal: true, message },
            None => csi::VolumeCondition { abnormal: false, message: "attached and serving".into() },
        });
        Ok(csi::NodeGetVolumeStatsResponse { usage, volume_condition })
    }

    pub(super) async fn expand(&self, r: csi::NodeExpandVolumeRequest) -> Result<csi::NodeExpandVolumeResponse> {
        required(&r.volume_id, "volume_id")?;
        required(&r.volume_path, "volume_path")?;
        let cap = r.volume_capability.as_ref().map(Capability::parse).transpose()?;
        let want = match &r.capacity_range {
            Some(c) if c.required_bytes < 0 || c.limit_bytes < 0 => {
                return Err(CsiError::InvalidArgument("capacity_range: byte counts must not be negative".into()))
            }
            Some(c) => c.required_bytes as u64,
            None => 0,
        };
        let id = r.volume_id.as_str();
        let path = PathBuf::from(&r.volume_path);
        let _g = self.locks.try_lock(id, "NodeExpandVolume")?;
        let md = std::fs::metadata(&path)
            .map_err(|_| CsiError::NotFound(format!("volume path {} does not exist", path.display())))?;
        let Some(dev) = self.attacher.find(id).await? else {
            return Err(CsiError::NotFound(format!("volume {id} is not staged on this node")));
        };
        let uri = self.volume(id).await.ok().flatten().map(|v| v.nbd_uri).unwrap_or_default();
        let size = self.attacher.refresh_size(id, &uri, want).await?;
        let block = md.file_type().is_block_device() || matches!(cap.map(|c| c.access), Some(Access::Block));
        if !block {
            let m = mount::mount_at(&path)?
                .ok_or_else(|| CsiError::NotFound(format!("{} is not a mount of volume {id}", path.display())))?;
            mount::grow(&m.fs_type, &dev, &path).await?;
            tracing::info!(volume.id = id, size, fs = %m.fs_type, "filesystem grown");
        }
        Ok(csi::NodeExpandVolumeResponse { capacity_bytes: size as i64 })
    }
}

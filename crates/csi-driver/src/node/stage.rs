//! NodeStageVolume / NodeUnstageVolume.

use std::path::{Path, PathBuf};

use hlstore_proto::csi;

use super::NodeService;
use crate::capability::{self, Access, Capability};
use crate::error::{required, CsiError, Result};
use crate::mount::{self, Probe};

impl NodeService {
    pub(super) async fn stage(&self, r: csi::NodeStageVolumeRequest) -> Result<csi::NodeStageVolumeResponse> {
        required(&r.volume_id, "volume_id")?;
        required(&r.staging_target_path, "staging_target_path")?;
        let cap = Capability::require_on_node(r.volume_capability.as_ref())?;
        let id = r.volume_id.as_str();
        let staging = PathBuf::from(&r.staging_target_path);
        let _g = self.locks.try_lock(id, "NodeStageVolume")?;

        // Already staged? Same path and capability: done. Same path, other filesystem or
        // access type: ALREADY_EXISTS. Staged at another path: FAILED_PRECONDITION.
        let existing = self.attacher.find(id).await?;
        let here = mount::mount_at(&staging)?;
        if let Some(m) = &here {
            let ours = match &existing {
                Some(dev) => mount::dev_numbers(dev)? == m.dev,
                None => false,
            };
            let compatible = match &cap.access {
                Access::Mount { fs_type, .. } => fs_type.is_empty() || *fs_type == m.fs_type,
                Access::Block => false,
            };
            return if ours && compatible {
                Ok(csi::NodeStageVolumeResponse {})
            } else {
                Err(CsiError::AlreadyExists(format!(
                    "{} already has a mount ({} from {}) that does not match this request",
                    staging.display(),
                    m.fs_type,
                    m.source
                )))
            };
        }
        if let Some(dev) = &existing {
            let canonical = mount::canonical(&staging);
            let elsewhere: Vec<String> = mount::users_of(dev)?
                .into_iter()
                .filter(|m| m.mount_point != canonical && m.fs_type != "devtmpfs")
                .map(|m| m.mount_point.display().to_string())
                .collect();
            if let (Access::Mount { .. }, false) = (&cap.access, elsewhere.is_empty()) {
                return Err(CsiError::FailedPrecondition(format!(
                    "volume {id} is already staged at {}",
                    elsewhere.join(", ")
                )));
            }
        }

        let v = self.volume(id).await?.ok_or_else(|| CsiError::NotFound(format!("volume {id} does not exist")))?;
        if !v.attached_node.is_empty() && v.attached_node != self.node_id {
            return Err(CsiError::FailedPrecondition(format!(
                "volume {id} is published to node {}, not to this node ({})",
                v.attached_node, self.node_id
            )));
        }
        let uri = match r.publish_context.get(crate::PUBLISH_NBD_URI).filter(|u| !u.is_empty()) {
            Some(u) => u.clone(),
            None if v.attached_node == self.node_id && !v.nbd_uri.is_empty() => v.nbd_uri.clone(),
            None => {
                return Err(CsiError::FailedPrecondition(format!(
                    "volume {id} is not published to node {} (ControllerPublishVolume first)",
                    self.node_id
                )))
            }
        };
        let dev = match existing {
            Some(d) => d,
            None => self.attacher.attach(id, &uri).await?,
        };
        let Access::Mount { fs_type, flags } = &cap.access else {
            tracing::info!(volume.id = id, device = %dev.display(), "staged as a raw block device");
            return Ok(csi::NodeStageVolumeResponse {});
        };
        let fs = format_if_blank(id, &dev, fs_type).await?;
        if !cap.read_only() && mount::grow_offline(&fs, &dev).await? {
            tracing::info!(volume.id = id, device = %dev.display(), fs, "grew the filesystem to the volume size");
        }
        std::fs::create_dir_all(&staging).map_err(|e| CsiError::io(format!("creating {}", staging.display()), e))?;
        let mut opts = flags.clone();
        if cap.read_only() {
            opts.push("ro".into());
        }
        mount::mount_fs(&dev, &staging, &fs, &opts).await?;
        // xfs grows only mounted: a volume created larger than its source (a clone, a
        // restore) must show its whole size at publish (ext* grew offline above).
        if fs == "xfs" && !cap.read_only() {
            mount::grow("xfs", &dev, &staging).await?;
        }
        tracing::info!(volume.id = id, device = %dev.display(), fs, staging = %staging.display(), "staged");
        Ok(csi::NodeStageVolumeResponse {})
    }

    pub(super) async fn unstage(&self, r: csi::NodeUnstageVolumeRequest) -> Result<csi::NodeUnstageVolumeResponse> {
        required(&r.volume_id, "volume_id")?;
        required(&r.staging_target_path, "staging_target_path")?;
        let id = r.volume_id.as_str();
        let staging = mount::canonical(Path::new(&r.staging_target_path));
        let _g = self.locks.try_lock(id, "NodeUnstageVolume")?;
        let dev = self.attacher.find(id).await?;
        let staged_mount = mount::mount_at(&staging)?;
        if let Some(dev) = &dev {
            let others: Vec<String> = mount::users_of(dev)?
                .into_iter()
                .filter(|m| m.mount_point != staging)
                .map(|m| m.mount_point.display().to_string())
                .collect();
            if !others.is_empty() {
                return Err(CsiError::FailedPrecondition(format!(
                    "volume {id} is still published at {} (NodeUnpublishVolume first)",
                    others.join(", ")
                )));
            }
        }
        // Not staged here: OK, as the spec asks, whether or not the agent knows the volume.
        if dev.is_none() && staged_mount.is_none() {
            return Ok(csi::NodeUnstageVolumeResponse {});
        }
        mount::unmount(&staging).await?;
        self.attacher.detach(id).await?;
        tracing::info!(volume.id = id, staging = %staging.display(), "unstaged");
        Ok(csi::NodeUnstageVolumeResponse {})
    }
}

/// Returns the filesystem to mount, creating one only when the device has no signature at
/// all. A device holding anything else is never formatted.
async fn format_if_blank(id: &str, dev: &Path, asked: &str) -> Result<String> {
    let want = if asked.is_empty() { capability::DEFAULT_FS } else { asked };
    match mount::probe(dev).await? {
        Probe::Empty => {
            mount::mkfs(dev, want).await?;
            tracing::info!(volume.id = id, device = %dev.display(), fs = want, "created a filesystem on a blank volume");
            Ok(want.to_string())
        }
        Probe::Filesystem(t) if asked.is_empty() || t == want => Ok(t),
        Probe::Filesystem(t) => Err(CsiError::FailedPrecondition(format!(
            "volume {id} holds a {t} filesystem but {want} was asked for; it is not reformatted"
        ))),
        Probe::Other(what) => Err(CsiError::FailedPrecondition(format!(
            "volume {id} holds {what}, not a filesystem; it is not formatted"
        ))),
    }
}

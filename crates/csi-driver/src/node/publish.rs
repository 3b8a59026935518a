//! NodePublishVolume / NodeUnpublishVolume: bind mounts of the staged filesystem, or of
//! the device node onto a file for raw block volumes.

use std::path::{Path, PathBuf};

use hlstore_proto::csi;
use hlstore_proto::csi::volume_capability::access_mode::Mode;

use super::NodeService;
use crate::capability::{Access, Capability};
use crate::error::{required, CsiError, Result};
use crate::mount;

impl NodeService {
    pub(super) async fn publish(&self, r: csi::NodePublishVolumeRequest) -> Result<csi::NodePublishVolumeResponse> {
        required(&r.volume_id, "volume_id")?;
        required(&r.target_path, "target_path")?;
        if r.staging_target_path.is_empty() {
            // The spec's "Staging target path not set" (this plugin stages every volume).
            return Err(CsiError::FailedPrecondition(
                "staging_target_path is not set: this plugin stages volumes (NodeStageVolume first)".into(),
            ));
        }
        let cap = Capability::require_on_node(r.volume_capability.as_ref())?;
        let id = r.volume_id.as_str();
        let target = PathBuf::from(&r.target_path);
        let read_only = r.readonly || cap.read_only();
        let _g = self.locks.try_lock(id, "NodePublishVolume")?;

        let (source, wanted_dev) = match cap.access {
            Access::Mount { .. } => {
                let staging = Path::new(&r.staging_target_path);
                let Some(m) = mount::mount_at(staging)? else {
                    let e = CsiError::FailedPrecondition(format!(
                        "volume {id} is not staged at {} (NodeStageVolume first)",
                        staging.display()
                    ));
                    return Err(self.not_found_or(id, e).await);
                };
                (staging.to_path_buf(), m.dev)
            }
            Access::Block => {
                let Some(dev) = self.attacher.find(id).await? else {
                    let e = CsiError::FailedPrecondition(format!("volume {id} is not staged on this node"));
                    return Err(self.not_found_or(id, e).await);
                };
                let numbers = mount::dev_numbers(&dev)?;
                (dev, numbers)
            }
        };
        let same = |m: &mount::MountEntry| {
            m.dev == wanted_dev
                || (m.fs_type == "devtmpfs"
                    && source.file_name().is_some_and(|n| m.root == format!("/{}", n.to_string_lossy())))
        };
        if let Some(m) = mount::mount_at(&target)? {
            let same = same(&m);
            return if same && m.read_only == read_only {
                Ok(csi::NodePublishVolumeResponse {})
            } else if same {
                Err(CsiError::AlreadyExists(format!(
                    "{} is already published {}",
                    target.display(),
                    if m.read_only { "read-only" } else { "read-write" }
                )))
            } else {
                Err(CsiError::AlreadyExists(format!("{} already has another mount ({})", target.display(), m.source)))
            };
        }
        if cap.mode == Mode::SingleNodeSingleWriter {
            // One workload at a time: published anywhere else (but the staging path) is
            // the spec's "exceeds capabilities".
            let (staging, target) = (mount::canonical(Path::new(&r.staging_target_path)), mount::canonical(&target));
            let others: Vec<String> = mount::mounts()?
                .into_iter()
                .filter(|m| same(m) && m.mount_point != staging && m.mount_point != target)
                .map(|m| m.mount_point.display().to_string())
                .collect();
            if !others.is_empty() {
                return Err(CsiError::FailedPrecondition(format!(
                    "volume {id} is already published at {} and its access mode SINGLE_NODE_SINGLE_WRITER allows one \
                     workload at a time",
                    others.join(", ")
                )));
            }
        }
        match cap.access {
            Access::Mount { .. } => std::fs::create_dir_all(&target)
                .map_err(|e| CsiError::io(format!("creating {}", target.display()), e))?,
            Access::Block => {
                if let Some(parent) = target.parent() {
                    std::fs::create_dir_all(parent)
                        .map_err(|e| CsiError::io(format!("creating {}", parent.display()), e))?;
                }
                if !target.exists() {
                    std::fs::File::create(&target)
                        .map_err(|e| CsiError::io(format!("creating {}", target.display()), e))?;
                }
            }
        }
        mount::bind(&source, &target, read_only).await?;
        tracing::info!(volume.id = id, target = %target.display(), read_only, "published");
        Ok(csi::NodePublishVolumeResponse {})
    }

    pub(super) async fn unpublish(
        &self,
        r: csi::NodeUnpublishVolumeRequest,
    ) -> Result<csi::NodeUnpublishVolumeResponse> {
        required(&r.volume_id, "volume_id")?;
        required(&r.target_path, "target_path")?;
        let id = r.volume_id.as_str();
        let target = PathBuf::from(&r.target_path);
        let _g = self.locks.try_lock(id, "NodeUnpublishVolume")?;
        let mounted = mount::mount_at(&target)?.is_some();
        // Nothing there: done (idempotent), whether or not the agent still knows the volume
        // (it may be cut off from its replicas; kubelet would retry a NOT_FOUND forever).
        if !mounted && std::fs::symlink_metadata(&target).is_err() {
            return Ok(csi::NodeUnpublishVolumeResponse {});
        }
        mount::unmount(&target).await?;
        remove_target(&target)?;
        tracing::info!(volume.id = id, target = %target.display(), "unpublished");
        Ok(csi::NodeUnpublishVolumeResponse {})
    }
}

/// Removes the (unmounted) target: the directory or the device file the publish created.
fn remove_target(target: &Path) -> Result<()> {
    let res = match std::fs::symlink_metadata(target) {
        Ok(md) if md.is_dir() => std::fs::remove_dir(target),
        Ok(_) => std::fs::remove_file(target),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    };
    res.map_err(|e| CsiError::io(format!("removing {}", target.display()), e))
}

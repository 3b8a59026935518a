//! StorageClass parameters, capacity ranges and paging tokens of the controller.

use std::collections::{BTreeMap, HashMap};

use hlstore_proto::csi::CapacityRange;

use crate::error::{CsiError, Result};

/// Size of a volume created without a capacity range.
pub const DEFAULT_SIZE: u64 = 1 << 30;
/// Volumes are whole blocks.
pub const BLOCK: u64 = 4096;
/// Most replicas a StorageClass may ask for.
pub const MAX_REPLICAS: u32 = 16;

/// Label recording the StorageClass backup schedule (read by the backup CronJob).
pub const LABEL_BACKUP_SCHEDULE: &str = hlstore_core::schedule::LABEL;
/// Label recording what a volume was created from (`snapshot:<id>` / `volume:<id>`).
pub const LABEL_SOURCE: &str = "csi.hlstore.io/source";
/// Label recording the CSI name a volume or snapshot was created with.
pub const LABEL_CSI_NAME: &str = "csi.hlstore.io/name";
/// Labels recording the claim a volume was provisioned for (the external-provisioner's
/// `--extra-create-metadata` parameters), so backups and a rebuilt cluster can tell which
/// volume belongs to which app.
pub const LABEL_PVC_NAMESPACE: &str = "csi.hlstore.io/pvc-namespace";
pub const LABEL_PVC_NAME: &str = "csi.hlstore.io/pvc-name";
pub const LABEL_PV_NAME: &str = "csi.hlstore.io/pv-name";
/// Label recording the backup id a volume is restored from (`backup:` content sources).
pub const LABEL_RESTORED_FROM: &str = "csi.hlstore.io/restored-from";
/// Label on clones made by earlier controllers: the snapshot that marks the clone
/// complete. A volume with this label and neither that snapshot nor a done label is an
/// unfinished copy and is never handed out. New clones are marked by the agent
/// ([`LABEL_AGENT_CLONE_STATE`]); a marker snapshot found on a complete volume is replaced
/// by [`LABEL_FILLED`] and deleted, since a snapshot keeps alive every block it sees.
pub const LABEL_DONE_MARKER: &str = "csi.hlstore.io/done-marker";
/// Label set once a volume filled in the background (a restore from a backup, or a clone
/// that earlier controllers marked with a snapshot) is complete; its value names what it
/// was filled from. Set after the data is durable, so a volume with it is complete.
pub const LABEL_FILLED: &str = "csi.hlstore.io/filled";
/// The agent's label on a clone (`hlstore.io/clone-state`, see CloneVolume in
/// `proto/volume.proto`): `done` once its copy is complete, `copying:<token>` until then.
pub const LABEL_AGENT_CLONE_STATE: &str = "hlstore.io/clone-state";
/// [`LABEL_AGENT_CLONE_STATE`] of a complete clone.
pub const AGENT_CLONE_DONE: &str = "done";
/// Label of the snapshots the agent takes for its own use (a clone's temporary snapshot).
pub const LABEL_AGENT_TEMPORARY: &str = "hlstore.io/temporary";
/// Name prefix of a clone's temporary snapshot (older agents did not label it).
pub const AGENT_TEMP_CLONE_PREFIX: &str = "clone-";

/// Where replicas go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataLocality {
    /// The least-used nodes (the agent's choice).
    Disabled,
    /// One replica on the node the pod is scheduled to (topology `preferred`), if it is
    /// a cluster node; the others on the least-used nodes.
    BestEffort,
}

/// Parsed `CreateVolume` parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Params {
    /// 0 = the agent's default (min(3, nodes)).
    pub replicas: u32,
    pub data_locality: DataLocality,
    pub labels: BTreeMap<String, String>,
}

/// Parses StorageClass parameters. Keys the external provisioner adds
/// (`csi.storage.k8s.io/...`) are ignored; any other unknown key is an error, so a typo
/// does not silently give a volume other than the one asked for.
pub fn parse_params(p: &HashMap<String, String>) -> Result<Params> {
    let mut out = Params { replicas: 0, data_locality: DataLocality::Disabled, labels: BTreeMap::new() };
    let mut keys: Vec<&String> = p.keys().collect();
    keys.sort();
    for k in keys {
        let v = &p[k];
        match k.as_str() {
            "replicas" => {
                out.replicas = v.parse().ok().filter(|n| (1..=MAX_REPLICAS).contains(n)).ok_or_else(|| {
                    CsiError::InvalidArgument(format!("parameter replicas={v:?}: expected 1..={MAX_REPLICAS}"))
                })?
            }
            "dataLocality" => {
                out.data_locality = match v.as_str() {
                    "disabled" | "" => DataLocality::Disabled,
                    "best-effort" => DataLocality::BestEffort,
                    _ => {
                        return Err(CsiError::InvalidArgument(format!(
                            "parameter dataLocality={v:?}: expected disabled or best-effort"
                        )))
                    }
                }
            }
            "backupSchedule" => {
                hlstore_core::schedule::Schedule::parse(v)
                    .map_err(|e| CsiError::InvalidArgument(format!("parameter backupSchedule: {e}")))?;
                out.labels.insert(LABEL_BACKUP_SCHEDULE.to_string(), v.clone());
            }
            "csi.storage.k8s.io/pvc/namespace" => {
                out.labels.insert(LABEL_PVC_NAMESPACE.to_string(), v.clone());
            }
            "csi.storage.k8s.io/pvc/name" => {
                out.labels.insert(LABEL_PVC_NAME.to_string(), v.clone());
            }
            "csi.storage.k8s.io/pv/name" => {
                out.labels.insert(LABEL_PV_NAME.to_string(), v.clone());
            }
            k if k.starts_with("csi.storage.k8s.io/") => {}
            other => {
                return Err(CsiError::InvalidArgument(format!(
                    "unknown parameter {other:?} (known: replicas, dataLocality, backupSchedule)"
                )))
            }
        }
    }
    Ok(out)
}

fn bounds(range: &CapacityRange) -> Result<(u64, u64)> {
    if range.required_bytes < 0 || range.limit_bytes < 0 {
        return Err(CsiError::InvalidArgument("capacity_range: byte counts must not be negative".into()));
    }
    let (req, lim) = (range.required_bytes as u64, range.limit_bytes as u64);
    if lim > 0 && req > lim {
        return Err(CsiError::InvalidArgument(format!(
            "capacity_range: required_bytes {req} is larger than limit_bytes {lim}"
        )));
    }
    Ok((req, lim))
}

/// The size to create for a capacity range: `required` rounded up to whole blocks, or
/// [`DEFAULT_SIZE`] (capped by `limit`) when only a limit or nothing is given.
pub fn size_for(range: Option<&CapacityRange>) -> Result<u64> {
    let (req, lim) = match range {
        Some(r) => bounds(r)?,
        None => (0, 0),
    };
    let size = if req > 0 {
        req.div_ceil(BLOCK) * BLOCK
    } else if lim > 0 {
        DEFAULT_SIZE.min(lim) / BLOCK * BLOCK
    } else {
        DEFAULT_SIZE
    };
    if size == 0 || (lim > 0 && size > lim) {
        return Err(CsiError::OutOfRange(format!(
            "no whole number of {BLOCK}-byte blocks fits the capacity range {req}..={lim}"
        )));
    }
    Ok(size)
}

/// Whether an existing volume of `size` bytes satisfies `range`.
pub fn fits(size: u64, range: Option<&CapacityRange>) -> Result<bool> {
    let (req, lim) = match range {
        Some(r) => bounds(r)?,
        None => (0, 0),
    };
    Ok(size >= req && (lim == 0 || size <= lim))
}

/// One page of `items`: the token is the opaque decimal offset of the next entry.
/// A token that does not parse or points past the end is ABORTED (the spec's code for a
/// token the plugin cannot use); negative `max_entries` is INVALID_ARGUMENT.
pub fn page<T: Clone>(items: &[T], max_entries: i32, token: &str) -> Result<(Vec<T>, String)> {
    if max_entries < 0 {
        return Err(CsiError::InvalidArgument(format!("max_entries {max_entries} must not be negative")));
    }
    let start = if token.is_empty() {
        0
    } else {
        token
            .parse::<usize>()
            .ok()
            .filter(|s| *s <= items.len())
            .ok_or_else(|| CsiError::Aborted(format!("starting_token {token:?} is not valid (anymore)")))?
    };
    let n = if max_entries == 0 { items.len() - start } else { (max_entries as usize).min(items.len() - start) };
    let next = if start + n < items.len() { (start + n).to_string() } else { String::new() };
    Ok((items[start..start + n].to_vec(), next))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(req: i64, lim: i64) -> CapacityRange {
        CapacityRange { required_bytes: req, limit_bytes: lim }
    }

    #[test]
    fn sizes_round_up_to_blocks_and_respect_limits() {
        assert_eq!(size_for(None).unwrap(), DEFAULT_SIZE);
        assert_eq!(size_for(Some(&range(1, 0))).unwrap(), 4096);
        assert_eq!(size_for(Some(&range(10 << 20, 0))).unwrap(), 10 << 20);
        assert_eq!(size_for(Some(&range(0, 5000))).unwrap(), 4096);
        assert_eq!(size_for(Some(&range(0, 100))).unwrap_err().code(), tonic::Code::OutOfRange);
        assert_eq!(size_for(Some(&range(4097, 5000))).unwrap_err().code(), tonic::Code::OutOfRange);
        assert_eq!(size_for(Some(&range(10, 5))).unwrap_err().code(), tonic::Code::InvalidArgument);
        assert_eq!(size_for(Some(&range(-1, 0))).unwrap_err().code(), tonic::Code::InvalidArgument);
        assert!(fits(8192, Some(&range(4096, 8192))).unwrap());
        assert!(!fits(8192, Some(&range(4096 * 3, 0))).unwrap());
        assert!(!fits(8192, Some(&range(0, 4096))).unwrap());
    }

    #[test]
    fn params_are_checked() {
        let m = |kv: &[(&str, &str)]| kv.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let p = parse_params(&m(&[
            ("replicas", "2"),
            ("dataLocality", "best-effort"),
            ("backupSchedule", "nightly"),
            ("csi.storage.k8s.io/pvc/name", "x"),
            ("csi.storage.k8s.io/pvc/namespace", "apps"),
            ("csi.storage.k8s.io/pv/name", "pvc-1"),
            ("csi.storage.k8s.io/provisioner-secret-name", "ignored"),
        ]))
        .unwrap();
        assert_eq!((p.replicas, p.data_locality), (2, DataLocality::BestEffort));
        assert_eq!(p.labels[LABEL_BACKUP_SCHEDULE], "nightly");
        assert_eq!((p.labels[LABEL_PVC_NAMESPACE].as_str(), p.labels[LABEL_PVC_NAME].as_str()), ("apps", "x"));
        assert_eq!(p.labels[LABEL_PV_NAME], "pvc-1");
        assert_eq!(p.labels.len(), 4, "{:?}", p.labels);
        for bad in [
            &[("replicas", "0")][..],
            &[("replicas", "x")],
            &[("dataLocality", "strict")],
            &[("replica", "3")],
            &[("backupSchedule", "30 2 * * *")],
        ] {
            assert_eq!(parse_params(&m(bad)).unwrap_err().code(), tonic::Code::InvalidArgument, "{bad:?}");
        }
    }

    #[test]
    fn paging_walks_every_item_once_and_rejects_bad_tokens() {
        let items: Vec<u32> = (0..7).collect();
        let (mut got, mut token) = (Vec::new(), String::new());
        loop {
            let (p, next) = page(&items, 3, &token).unwrap();
            got.extend(p);
            if next.is_empty() {
                break;
            }
            token = next;
        }
        assert_eq!(got, items);
        assert_eq!(page(&items, 0, "").unwrap(), (items.clone(), String::new()));
        assert_eq!(page(&items, 0, "x").unwrap_err().code(), tonic::Code::Aborted);
        assert_eq!(page(&items, 0, "8").unwrap_err().code(), tonic::Code::Aborted);
        assert_eq!(page(&items, -1, "").unwrap_err().code(), tonic::Code::InvalidArgument);
    }
}

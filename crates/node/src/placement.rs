//! Placement: which nodes get the replicas of a new volume, or the replacement of a lost one.
//!
//! Free bytes decide, not replica counts. A node's *headroom* is what its data directory's
//! filesystem has available (less `--storage-reserved`) minus what its thin replicas may
//! still claim (provisioned size − allocated bytes, summed): a replica of `size` fits when
//! the headroom is at least `size`, so every replica placed can be filled completely.
//! Nodes are taken by headroom, largest first (in whole GiB; then fewest replicas, then
//! id); one replica
//! per node, never two. A node whose agent does not report its space (an older version)
//! is taken only after every node that does.

use hlstore_core::error::{Error, Result};
use hlstore_core::space::FsSpace;

/// One reachable node as placement sees it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeRoom {
    pub id: String,
    /// `None`: the agent did not say.
    pub space: Option<FsSpace>,
    /// Bytes its replicas may still allocate (Σ provisioned − allocated).
    pub promised: u64,
    pub replicas: usize,
}

impl NodeRoom {
    /// Bytes a new replica may take here (`None`: unknown).
    pub fn headroom(&self) -> Option<u64> {
        self.space.map(|s| s.available.saturating_sub(self.promised))
    }

    fn fits(&self, size: u64) -> bool {
        self.headroom().is_none_or(|h| h >= size)
    }

    fn describe(&self) -> String {
        match self.space {
            None => format!("{} (space unknown)", self.id),
            Some(s) => format!(
                "{} ({} free, {} promised to its thin replicas)",
                self.id,
                fmt_bytes(s.available),
                fmt_bytes(self.promised)
            ),
        }
    }
}

/// `n` distinct nodes for replicas of `size` bytes among `nodes`, skipping `exclude`.
/// Fails with `NoSpace` naming every node's room when fewer than `n` fit, and with
/// `InvalidArgument` when fewer than `n` nodes are there at all.
pub fn pick(nodes: &[NodeRoom], size: u64, n: usize, exclude: &[String], what: &str) -> Result<Vec<String>> {
    let candidates: Vec<&NodeRoom> = nodes.iter().filter(|r| !exclude.contains(&r.id)).collect();
    if candidates.len() < n {
        return Err(Error::InvalidArgument(format!(
            "{what} needs {n} node(s) but only {} reachable node(s) can take it ({}); start more nodes or ask for fewer replicas",
            candidates.len(),
            candidates.iter().map(|r| r.id.as_str()).collect::<Vec<_>>().join(", ")
        )));
    }
    let mut fit: Vec<&NodeRoom> = candidates.iter().copied().filter(|r| r.fits(size)).collect();
    if fit.len() < n {
        return Err(Error::NoSpace(format!(
            "{what} needs {n} node(s) with {} of room each, but {} of the reachable nodes have it: {}",
            fmt_bytes(size),
            fit.len(),
            candidates.iter().map(|r| r.describe()).collect::<Vec<_>>().join("; ")
        )));
    }
    fit.sort_by(|a, b| {
        // Headroom in whole GiB: nodes within a GiB of each other (e.g. sharing one
        // filesystem, measured a moment apart) count as equal, and fewer replicas decide.
        let key = |r: &NodeRoom| (r.headroom().is_none(), std::cmp::Reverse(r.headroom().unwrap_or(0) >> 30));
        key(a).cmp(&key(b)).then(a.replicas.cmp(&b.replicas)).then(a.id.cmp(&b.id))
    });
    Ok(fit.into_iter().take(n).map(|r| r.id.clone()).collect())
}

/// Checks that every node of `chosen` (named by the operator) has room for `size`.
pub fn check_room(nodes: &[NodeRoom], size: u64, chosen: &[String], what: &str) -> Result<()> {
    let short: Vec<String> =
        nodes.iter().filter(|r| chosen.contains(&r.id) && !r.fits(size)).map(NodeRoom::describe).collect();
    if short.is_empty() {
        return Ok(());
    }
    Err(Error::NoSpace(format!(
        "{what} needs {} of room on each node, and these lack it: {}",
        fmt_bytes(size),
        short.join("; ")
    )))
}

/// The largest replica `n` distinct nodes can each take (CSI `GetCapacity`): the `n`-th
/// largest headroom. `None` when some node does not report its space.
pub fn largest_volume(nodes: &[NodeRoom], n: usize) -> Option<u64> {
    let mut rooms: Vec<u64> = nodes.iter().map(NodeRoom::headroom).collect::<Option<Vec<_>>>()?;
    if n == 0 || rooms.len() < n {
        return Some(0);
    }
    rooms.sort_unstable_by(|a, b| b.cmp(a));
    Some(rooms[n - 1])
}

/// Bytes for people: `12.3 GiB`.
pub fn fmt_bytes(b: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const G: u64 = 1 << 30;

    fn room(id: &str, available: u64, promised: u64, replicas: usize) -> NodeRoom {
        NodeRoom { id: id.into(), space: Some(FsSpace { total: 100 * G, available }), promised, replicas }
    }

    #[test]
    fn most_headroom_first_and_thin_promises_count() {
        let nodes =
            [room("a", 50 * G, 45 * G, 1), room("b", 20 * G, 0, 9), room("c", 30 * G, 0, 3), room("d", 30 * G, 0, 2)];
        // a has 50 GiB free but promised 45 to its thin replicas: 5 GiB of headroom.
        assert_eq!(pick(&nodes, 10 * G, 3, &[], "v").unwrap(), vec!["d", "c", "b"]);
        assert_eq!(pick(&nodes, G, 2, &["d".into()], "v").unwrap(), vec!["c", "b"]);
        let e = pick(&nodes, 25 * G, 3, &[], "volume v").unwrap_err();
        assert_eq!(e.kind(), hlstore_core::ErrorKind::NoSpace, "{e}");
        assert!(e.to_string().contains("a (50.0 GiB free, 45.0 GiB promised"), "{e}");
        let e = pick(&nodes, G, 5, &[], "volume v").unwrap_err();
        assert_eq!(e.kind(), hlstore_core::ErrorKind::InvalidArgument, "{e}");
    }

    #[test]
    fn unknown_space_comes_last_and_capacity_is_the_nth_headroom() {
        let mut nodes = vec![room("a", 10 * G, 0, 0), room("b", 40 * G, 0, 0), room("c", 20 * G, 5 * G, 0)];
        assert_eq!(largest_volume(&nodes, 3), Some(10 * G));
        assert_eq!(largest_volume(&nodes, 2), Some(15 * G));
        assert_eq!(largest_volume(&nodes, 4), Some(0));
        nodes.push(NodeRoom { id: "old".into(), space: None, promised: 0, replicas: 0 });
        assert_eq!(pick(&nodes, G, 4, &[], "v").unwrap().last().map(String::as_str), Some("old"));
        assert_eq!(largest_volume(&nodes, 3), None);
        assert!(check_room(&nodes, 12 * G, &["a".into()], "v").is_err());
        assert!(check_room(&nodes, 12 * G, &["b".into(), "old".into()], "v").is_ok());
    }
}

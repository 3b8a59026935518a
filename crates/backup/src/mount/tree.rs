//! `Tree`: the directory layout of a mounted repository, built once from the backups'
//! metadata. Pure data (no FUSE, no IO), so the naming rules are unit-tested.
//!
//! ```text
//! by-time/<2026-12-06T02:30:00Z>/{image, backup.json}
//! by-label/<key>=<value>/<2026-12-06T02:30:00Z>/{image, backup.json}
//! by-id/<32 hex>/{image, backup.json}
//! ```
//! Backups taken within the same second get `_<first 8 hex of the id>` after the time in
//! every view. Label keys and values are escaped (`%` → `%25`, `/` → `%2F`, NUL → `%00`).
//! A backup's `image` and `backup.json` are one inode each, linked from every view.

use std::collections::{BTreeMap, HashMap};

use crate::snapshot::SnapshotMeta;

/// Name of a backup's image file (what `restore --to-file` would write).
pub const IMAGE_FILE: &str = "image";
/// Name of a backup's metadata file (`hlstore backup show --json`).
pub const META_FILE: &str = "backup.json";
/// Longest file name the kernel accepts.
const NAME_MAX: usize = 255;

/// Inode number of the root directory.
pub const ROOT: u64 = 1;

/// What an inode is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeKind {
    /// A directory: its entries by name (sorted).
    Dir(Vec<(String, u64)>),
    /// The image of backup `n` (an index into [`Tree::metas`]).
    Image(usize),
    /// The metadata file of backup `n`.
    Meta(usize),
}

/// One inode.
#[derive(Debug, Clone)]
pub struct Node {
    pub parent: u64,
    pub kind: NodeKind,
    /// Unix seconds shown as its times: the backup's time, or the newest backup's for the
    /// directories above backups.
    pub time: u64,
    /// Hard links (directories: 2 + subdirectories).
    pub nlink: u32,
}

/// The whole view.
#[derive(Debug)]
pub struct Tree {
    nodes: Vec<Node>,
    metas: Vec<SnapshotMeta>,
    meta_json: Vec<Vec<u8>>,
    children: HashMap<u64, HashMap<String, u64>>,
}

/// `2026-12-06T02:30:00Z`.
pub fn time_name(t: u64) -> String {
    let (y, m, d) = crate::prune::civil_date((t / 86_400) as i64);
    let s = t % 86_400;
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", s / 3600, s / 60 % 60, s % 60)
}

/// A label as a file name: `key=value`, escaped.
pub fn label_name(key: &str, value: &str) -> String {
    let esc = |s: &str| s.replace('%', "%25").replace('/', "%2F").replace('\0', "%00");
    format!("{}={}", esc(key), esc(value))
}

impl Tree {
    /// Builds the view of `metas` (any order; shown oldest first).
    pub fn build(mut metas: Vec<SnapshotMeta>) -> Tree {
        crate::select::sort_oldest_first(&mut metas);
        let newest = metas.last().map_or(0, |m| m.time);
        let mut t = Tree { nodes: Vec::new(), metas: Vec::new(), meta_json: Vec::new(), children: HashMap::new() };
        let dir = |parent, time| Node { parent, kind: NodeKind::Dir(Vec::new()), time, nlink: 2 };
        let root = t.push(dir(ROOT, newest));
        debug_assert_eq!(root, ROOT);
        let by_time = t.add_dir(ROOT, "by-time", newest);
        let by_label = t.add_dir(ROOT, "by-label", newest);
        let by_id = t.add_dir(ROOT, "by-id", newest);

        // Time names, made unique by the id where two backups share a second.
        let mut count: HashMap<u64, usize> = HashMap::new();
        for m in &metas {
            *count.entry(m.time).or_default() += 1;
        }
        let names: Vec<String> = metas
            .iter()
            .map(|m| {
                let n = time_name(m.time);
                if count[&m.time] > 1 {
                    format!("{n}_{}", &m.id[..8.min(m.id.len())])
                } else {
                    n
                }
            })
            .collect();
        let mut label_dirs: BTreeMap<String, u64> = BTreeMap::new();
        for (i, m) in metas.iter().enumerate() {
            let image = t.push(Node { parent: 0, kind: NodeKind::Image(i), time: m.time, nlink: 0 });
            let meta = t.push(Node { parent: 0, kind: NodeKind::Meta(i), time: m.time, nlink: 0 });
            let mut json = serde_json::to_vec_pretty(m).unwrap_or_default();
            json.push(b'\n');
            t.meta_json.push(json);
            let mut homes = vec![(by_time, names[i].clone()), (by_id, m.id.clone())];
            for (k, v) in &m.labels {
                let name = label_name(k, v);
                if name.len() > NAME_MAX {
                    tracing::warn!(backup = %m.id, label = %k, "label too long for a directory name; not shown");
                    continue;
                }
                let d = match label_dirs.get(&name) {
                    Some(&d) => d,
                    None => {
                        let d = t.add_dir(by_label, &name, m.time);
                        label_dirs.insert(name, d);
                        d
                    }
                };
                t.nodes[(d - 1) as usize].time = m.time;
                homes.push((d, names[i].clone()));
            }
            for (parent, name) in homes {
                let d = t.add_dir(parent, &name, m.time);
                t.link(d, IMAGE_FILE, image);
                t.link(d, META_FILE, meta);
            }
        }
        t.metas = metas;
        for n in &mut t.nodes {
            if let NodeKind::Dir(entries) = &mut n.kind {
                entries.sort();
            }
        }
        t
    }

    fn push(&mut self, n: Node) -> u64 {
        self.nodes.push(n);
        self.nodes.len() as u64
    }

    fn add_dir(&mut self, parent: u64, name: &str, time: u64) -> u64 {
        let d = self.push(Node { parent, kind: NodeKind::Dir(Vec::new()), time, nlink: 2 });
        self.link(parent, name, d);
        self.nodes[(parent - 1) as usize].nlink += 1;
        d
    }

    fn link(&mut self, dir: u64, name: &str, ino: u64) {
        if let NodeKind::Dir(entries) = &mut self.nodes[(dir - 1) as usize].kind {
            entries.push((name.to_string(), ino));
        }
        self.children.entry(dir).or_default().insert(name.to_string(), ino);
        let n = &mut self.nodes[(ino - 1) as usize];
        if !matches!(n.kind, NodeKind::Dir(_)) {
            n.nlink += 1;
            n.parent = dir;
        }
    }

    /// The inode `ino`.
    pub fn node(&self, ino: u64) -> Option<&Node> {
        ino.checked_sub(1).and_then(|i| self.nodes.get(i as usize))
    }

    /// The entry `name` of directory `dir`.
    pub fn lookup(&self, dir: u64, name: &str) -> Option<u64> {
        self.children.get(&dir)?.get(name).copied()
    }

    /// The inode at a `/`-separated path below the root (for tests and tools).
    pub fn resolve(&self, path: &str) -> Option<u64> {
        path.split('/').filter(|p| !p.is_empty()).try_fold(ROOT, |d, name| self.lookup(d, name))
    }

    /// The backups, oldest first.
    pub fn metas(&self) -> &[SnapshotMeta] {
        &self.metas
    }

    /// The bytes of backup `n`'s `backup.json`.
    pub fn meta_json(&self, n: usize) -> &[u8] {
        self.meta_json.get(n).map_or(&[], Vec::as_slice)
    }

    /// Number of inodes.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Never: the root and the three views always exist.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chunk::ChunkerConfig;

    fn meta(id: &str, time: u64, labels: &[(&str, &str)]) -> SnapshotMeta {
        SnapshotMeta {
            id: id.into(),
            time,
            nanos: 0,
            source: "/dev/x".into(),
            size: 4096,
            host: "h".into(),
            labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            parent: None,
            chunker: ChunkerConfig::default(),
            stats: Default::default(),
        }
    }

    fn names(t: &Tree, path: &str) -> Vec<String> {
        match &t.node(t.resolve(path).unwrap()).unwrap().kind {
            NodeKind::Dir(e) => e.iter().map(|(n, _)| n.clone()).collect(),
            k => panic!("{path} is {k:?}"),
        }
    }

    #[test]
    fn backups_by_time_label_and_id() {
        let t0 = 1_765_000_000; // 2025-12-06T05:46:40Z
        let t = Tree::build(vec![
            meta("bbbbbbbb00000000000000000000000b", t0 + 60, &[("volume", "pg/data")]),
            meta("aaaaaaaa00000000000000000000000a", t0, &[("volume", "pg/data"), ("app", "db")]),
            meta("cccccccc00000000000000000000000c", t0 + 60, &[]),
        ]);
        assert_eq!(names(&t, ""), ["by-id", "by-label", "by-time"]);
        assert_eq!(
            names(&t, "by-time"),
            ["2025-12-06T05:46:40Z", "2025-12-06T05:47:40Z_bbbbbbbb", "2025-12-06T05:47:40Z_cccccccc"]
        );
        assert_eq!(names(&t, "by-label"), ["app=db", "volume=pg%2Fdata"]);
        assert_eq!(names(&t, "by-label/volume=pg%2Fdata"), ["2025-12-06T05:46:40Z", "2025-12-06T05:47:40Z_bbbbbbbb"]);
        assert_eq!(names(&t, "by-time/2025-12-06T05:46:40Z"), [META_FILE, IMAGE_FILE]);
        // One image inode per backup, linked from each view.
        let a = t.resolve("by-time/2025-12-06T05:46:40Z/image").unwrap();
        assert_eq!(t.resolve("by-id/aaaaaaaa00000000000000000000000a/image"), Some(a));
        assert_eq!(t.resolve("by-label/app=db/2025-12-06T05:46:40Z/image"), Some(a));
        let n = t.node(a).unwrap();
        assert_eq!(n.kind, NodeKind::Image(0));
        assert_eq!(n.nlink, 4);
        assert_eq!(n.time, t0);
        let json: SnapshotMeta = serde_json::from_slice(t.meta_json(0)).unwrap();
        assert_eq!(json.id, "aaaaaaaa00000000000000000000000a");
        assert_eq!(t.node(ROOT).unwrap().nlink, 5);
        assert_eq!(t.node(t.resolve("by-time").unwrap()).unwrap().nlink, 5);
        assert!(t.resolve("by-time/nope").is_none());
        assert!(t.node(0).is_none() && t.node(t.len() as u64 + 1).is_none());
    }

    #[test]
    fn an_empty_repository_has_empty_views() {
        let t = Tree::build(Vec::new());
        assert_eq!(names(&t, "by-time"), Vec::<String>::new());
        assert_eq!(t.len(), 4);
    }

    #[test]
    fn label_names_are_escaped() {
        assert_eq!(label_name("a/b", "50%"), "a%2Fb=50%25");
        assert_eq!(label_name("k", ""), "k=");
    }
}

//! Choosing backups by label, for `hlstore backup list --volume/--label/--latest` and for
//! the `latest` selector, accepted wherever a backup id is (show, forget, restore,
//! `create --parent`): `latest` is the newest backup of the repository,
//! `latest:volume=pgdata` the newest backup labelled `volume=pgdata`,
//! `latest:pvc=apps/db,host=pi-1` the newest with both labels. "Newest" is by creation
//! time (sub-second part included), then id.

use crate::error::{Error, Result};
use crate::snapshot::SnapshotMeta;

/// The word that starts a selector; backup ids are hex, so no id prefix can be it.
pub const LATEST: &str = "latest";

/// Label the backups of a volume carry (its name); `--volume NAME` selects on it.
pub const VOLUME_LABEL: &str = "volume";

/// Labels every selected backup must carry (all of them; none: every backup).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter {
    pub labels: Vec<(String, String)>,
}

impl Filter {
    /// Backups of volume `name` (label `volume=<name>`) with `labels`.
    pub fn new(volume: Option<&str>, labels: &[(String, String)]) -> Filter {
        let mut f = Filter { labels: labels.to_vec() };
        if let Some(v) = volume {
            f.labels.insert(0, (VOLUME_LABEL.to_string(), v.to_string()));
        }
        f
    }

    pub fn matches(&self, m: &SnapshotMeta) -> bool {
        self.labels.iter().all(|(k, v)| m.labels.get(k) == Some(v))
    }

    /// The matching backups, in the order given.
    pub fn apply(&self, metas: Vec<SnapshotMeta>) -> Vec<SnapshotMeta> {
        metas.into_iter().filter(|m| self.matches(m)).collect()
    }

    /// The newest matching backup.
    pub fn newest<'a>(&self, metas: &'a [SnapshotMeta]) -> Option<&'a SnapshotMeta> {
        metas.iter().filter(|m| self.matches(m)).max_by(|a, b| newer(a, b))
    }
}

fn newer(a: &SnapshotMeta, b: &SnapshotMeta) -> std::cmp::Ordering {
    (a.time, a.nanos, &a.id).cmp(&(b.time, b.nanos, &b.id))
}

impl std::fmt::Display for Filter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let l: Vec<String> = self.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        write!(f, "{}", l.join(","))
    }
}

/// `latest` or `latest:KEY=VALUE[,KEY=VALUE...]` as a filter; `None` when `s` is not a
/// selector (an id or id prefix).
pub fn parse_latest(s: &str) -> Option<Result<Filter>> {
    let rest = s.strip_prefix(LATEST)?;
    if rest.is_empty() {
        return Some(Ok(Filter::default()));
    }
    let labels = rest.strip_prefix(':')?;
    let bad = || Error::Invalid(format!("backup selector {s:?}: expected latest or latest:KEY=VALUE[,KEY=VALUE...]"));
    let parsed: Option<Vec<(String, String)>> = labels
        .split(',')
        .map(|kv| kv.split_once('=').filter(|(k, _)| !k.is_empty()).map(|(k, v)| (k.to_string(), v.to_string())))
        .collect();
    Some(parsed.filter(|p| !p.is_empty()).map(|labels| Filter { labels }).ok_or_else(bad))
}

/// The id of the backup a `latest` selector names among `metas`.
pub fn resolve_latest(selector: &str, filter: &Filter, metas: &[SnapshotMeta]) -> Result<String> {
    filter.newest(metas).map(|m| m.id.clone()).ok_or_else(|| {
        if filter.labels.is_empty() {
            Error::UnknownSnapshot(format!("{selector} (the repository has no backups)"))
        } else {
            Error::UnknownSnapshot(format!("{selector} (no backup is labelled {filter})"))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(id: &str, time: u64, nanos: u32, labels: &[(&str, &str)]) -> SnapshotMeta {
        SnapshotMeta {
            id: id.into(),
            time,
            nanos,
            source: "s".into(),
            size: 0,
            host: "h".into(),
            labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            parent: None,
            chunker: Default::default(),
            stats: Default::default(),
        }
    }

    #[test]
    fn selectors_parse() {
        assert!(parse_latest("3fa9").is_none());
        assert!(parse_latest("latestx").is_none(), "not a selector (and not hex either)");
        assert_eq!(parse_latest("latest").unwrap().unwrap(), Filter::default());
        let f = parse_latest("latest:volume=pg,pvc=apps/db").unwrap().unwrap();
        let want = [("volume", "pg"), ("pvc", "apps/db")].map(|(k, v)| (k.to_string(), v.to_string()));
        assert_eq!(f.labels, want);
        assert_eq!(parse_latest("latest:a=").unwrap().unwrap().labels, [("a".to_string(), String::new())]);
        for bad in ["latest:", "latest:novalue", "latest:=x", "latest:a=1,"] {
            assert!(matches!(parse_latest(bad), Some(Err(Error::Invalid(_)))), "{bad}");
        }
    }

    #[test]
    fn newest_matching_backup_by_time_then_nanos() {
        let metas = [
            meta("a1", 10, 0, &[("volume", "pg")]),
            meta("b2", 10, 5, &[("volume", "pg"), ("pvc", "apps/db")]),
            meta("c3", 20, 0, &[("volume", "media")]),
        ];
        let pg = Filter::new(Some("pg"), &[]);
        assert_eq!(pg.newest(&metas).unwrap().id, "b2", "same second: the sub-second part decides");
        assert_eq!(Filter::default().newest(&metas).unwrap().id, "c3");
        assert_eq!(pg.apply(metas.to_vec()).len(), 2);
        let both = Filter::new(Some("pg"), &[("pvc".into(), "apps/db".into())]);
        assert_eq!(both.apply(metas.to_vec()).iter().map(|m| m.id.as_str()).collect::<Vec<_>>(), ["b2"]);
        let none = Filter::new(Some("nope"), &[]);
        let e = resolve_latest("latest:volume=nope", &none, &metas).unwrap_err();
        assert!(e.to_string().contains("no backup is labelled volume=nope"), "{e}");
        assert_eq!(resolve_latest("latest", &Filter::default(), &metas).unwrap(), "c3");
    }
}

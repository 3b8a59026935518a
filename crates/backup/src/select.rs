//! Choosing backups by label, for `hlstore backup list --volume/--label/--latest` and for
//! the `latest` selector, accepted wherever a backup id is (show, forget, restore,
//! `create --parent`): `latest` is the newest backup of the repository,
//! `latest:volume=pgdata` the newest backup labelled `volume=pgdata`,
//! `latest:pvc=apps/db,host=pi-1` the newest with both labels. "Newest" is by creation
//! time (sub-second part included), then id ([`by_age`]).
//!
//! Every choice of backups by label goes through here: `backup list`, the `latest`
//! selectors, `hlstore recover` (the newest backup per volume, [`newest_per`]), the CSI
//! driver's `backup:latest:<namespace>/<claim>` handles ([`newest_of_claim`]) and the
//! order of `backup mount`'s directories ([`sort_oldest_first`]).

use std::collections::BTreeMap;

use crate::error::{Error, Result};
use crate::snapshot::SnapshotMeta;

/// The word that starts a selector; backup ids are hex, so no id prefix can be it.
pub const LATEST: &str = "latest";

/// Label the backups of a volume carry (its name); `--volume NAME` selects on it.
pub const VOLUME_LABEL: &str = "volume";
/// Label naming the claim a backup was taken of, `NAMESPACE/NAME`.
pub const PVC_LABEL: &str = "pvc";
/// Labels naming the claim's namespace and name separately (the backup CronJob sets them
/// with [`PVC_LABEL`]).
pub const PVC_NAMESPACE_LABEL: &str = "pvc-namespace";
pub const PVC_NAME_LABEL: &str = "pvc-name";

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

/// Age order: older first, by creation time, sub-second part, then id.
pub fn by_age(a: &SnapshotMeta, b: &SnapshotMeta) -> std::cmp::Ordering {
    (a.time, a.nanos, &a.id).cmp(&(b.time, b.nanos, &b.id))
}

fn newer(a: &SnapshotMeta, b: &SnapshotMeta) -> std::cmp::Ordering {
    by_age(a, b)
}

/// Sorts `metas` oldest first ([`by_age`]).
pub fn sort_oldest_first(metas: &mut [SnapshotMeta]) {
    metas.sort_by(by_age);
}

/// The newest backup for each value of label `key` (backups without it left out).
pub fn newest_per(metas: Vec<SnapshotMeta>, key: &str) -> BTreeMap<String, SnapshotMeta> {
    let mut out: BTreeMap<String, SnapshotMeta> = BTreeMap::new();
    for m in metas {
        let Some(value) = m.labels.get(key).cloned() else { continue };
        if out.get(&value).is_none_or(|o| newer(&m, o).is_gt()) {
            out.insert(value, m);
        }
    }
    out
}

/// The claim a backup names, `(namespace, name)`: its [`PVC_NAMESPACE_LABEL`] and
/// [`PVC_NAME_LABEL`], else its [`PVC_LABEL`]; `None` if neither names one (`-` is the
/// CronJob's "unknown").
pub fn claim_of(m: &SnapshotMeta) -> Option<(String, String)> {
    let known = |s: &str| !s.is_empty() && s != "-";
    match (m.labels.get(PVC_NAMESPACE_LABEL), m.labels.get(PVC_NAME_LABEL)) {
        (Some(ns), Some(n)) if known(ns) && known(n) => Some((ns.clone(), n.clone())),
        _ => {
            let (ns, n) = m.labels.get(PVC_LABEL)?.split_once('/')?;
            (known(ns) && known(n)).then(|| (ns.to_string(), n.to_string()))
        }
    }
}

/// The newest backup of the claim `namespace/name` ([`claim_of`]).
pub fn newest_of_claim<'a>(metas: &'a [SnapshotMeta], namespace: &str, name: &str) -> Option<&'a SnapshotMeta> {
    metas.iter().filter(|m| claim_of(m).is_some_and(|(ns, n)| ns == namespace && n == name)).max_by(|a, b| newer(a, b))
}

/// The one backup whose id starts with `prefix` (`None`: none, or several).
pub fn by_id_prefix<'a>(metas: &'a [SnapshotMeta], prefix: &str) -> Option<&'a SnapshotMeta> {
    if prefix.is_empty() {
        return None;
    }
    let mut m = metas.iter().filter(|m| m.id.starts_with(prefix));
    let first = m.next()?;
    m.next().is_none().then_some(first)
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

    #[test]
    fn newest_per_volume_and_of_a_claim() {
        let metas = vec![
            meta("a1", 10, 0, &[("volume", "pvc-a"), ("pvc", "apps/db")]),
            meta("a2", 20, 0, &[("volume", "pvc-a"), ("pvc", "apps/db")]),
            meta("a3", 20, 0, &[("volume", "pvc-a")]),
            meta("b1", 30, 0, &[("volume", "pvc-b"), ("pvc-namespace", "media"), ("pvc-name", "lib")]),
            meta("c1", 40, 0, &[("host", "pi")]),
        ];
        let per = newest_per(metas.clone(), VOLUME_LABEL);
        let ids: Vec<(&str, &str)> = per.iter().map(|(v, m)| (v.as_str(), m.id.as_str())).collect();
        assert_eq!(ids, [("pvc-a", "a3"), ("pvc-b", "b1")], "same time: the id decides, as everywhere");
        assert_eq!(newest_of_claim(&metas, "apps", "db").unwrap().id, "a2");
        assert_eq!(newest_of_claim(&metas, "media", "lib").unwrap().id, "b1");
        assert!(newest_of_claim(&metas, "apps", "nope").is_none());
        assert_eq!(claim_of(&meta("x", 1, 0, &[("pvc", "-/-")])), None);
        assert_eq!(claim_of(&metas[3]), Some(("media".into(), "lib".into())));
        assert_eq!(by_id_prefix(&metas, "b").unwrap().id, "b1");
        assert!(by_id_prefix(&metas, "a").is_none(), "ambiguous");
        assert!(by_id_prefix(&metas, "").is_none());
        let mut sorted = metas.clone();
        sorted.reverse();
        sort_oldest_first(&mut sorted);
        assert_eq!(sorted.iter().map(|m| m.id.as_str()).collect::<Vec<_>>(), ["a1", "a2", "a3", "b1", "c1"]);
    }
}

//! [`History`]: the activations a replica's data descends from, and where two histories
//! fork.
//!
//! Every activation of a volume engine (an attach, or a re-attach of the same engine after
//! it lost every in-sync replica) adopts the history of its source up to a seq (its
//! *base*) and then appends writes with seqs of its own, all at least its *start* (which is
//! above the base). An activation is named by `(epoch, start, base)`; it adopts exactly one
//! history, so two histories holding the same activation agree on everything before it.
//!
//! A replica stores the history its data belongs to, recorded before any write of that
//! activation reaches it (see the replication crate, "Epoch history"). The history of
//! activations `a_1..a_n` is `H(a_1..a_{n-1})` cut at `a_n.base`, plus the writes of `a_n`
//! (all at seqs `>= a_n.start > a_n.base`). Hence, with `a_k` the last activation two
//! histories share, both agree on every seq up to the lowest base either of them recorded
//! after `a_k` ([`History::fork_point`]).

use serde::{Deserialize, Serialize};

use hlstore_core::error::{Error, Result};

/// Activations a history keeps, at most; older ones are dropped (a replica whose last
/// shared activation was dropped is then resynced in full, as without a history).
pub const HISTORY_LEN: usize = 16;

/// One activation: its epoch, the first seq it may issue, and the seq up to which it
/// adopted the history before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HistoryEntry {
    pub epoch: u64,
    pub start: u64,
    pub base: u64,
}

/// A bounded list of activations, oldest first, with strictly increasing starts and each
/// base below its start. Empty: unknown (a replica written before histories were kept).
#[derive(Clone, Copy, PartialEq, Eq, Default)]
pub struct History {
    len: u8,
    entries: [HistoryEntry; HISTORY_LEN],
}

impl History {
    /// Checks and builds a history (from the wire or disk). Longer lists keep their newest
    /// [`HISTORY_LEN`] entries.
    pub fn from_entries(entries: &[HistoryEntry]) -> Result<Self> {
        let mut h = History::default();
        for (i, e) in entries.iter().enumerate() {
            if e.base >= e.start || (i > 0 && e.start <= entries[i - 1].start) {
                return Err(Error::InvalidArgument(format!(
                    "history entry {i} ({e:?}) must start above its base and above the entry before it"
                )));
            }
            h.push(*e);
        }
        Ok(h)
    }

    pub fn entries(&self) -> &[HistoryEntry] {
        &self.entries[..usize::from(self.len)]
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn last(&self) -> Option<HistoryEntry> {
        self.entries().last().copied()
    }

    /// Appends an activation, dropping the oldest one when full.
    pub fn push(&mut self, e: HistoryEntry) {
        let n = usize::from(self.len);
        if n == HISTORY_LEN {
            self.entries.copy_within(1.., 0);
            self.entries[HISTORY_LEN - 1] = e;
        } else {
            self.entries[n] = e;
            self.len += 1;
        }
    }

    /// The highest seq up to which this history and `other` certainly agree: with `a` the
    /// last activation both hold, the lowest base either recorded after `a` (`u64::MAX`
    /// if neither recorded one). `None` if they share no activation (unrelated, or the
    /// shared part was dropped): nothing is known in common.
    pub fn fork_point(&self, other: &History) -> Option<u64> {
        let mine = self.entries();
        let theirs = other.entries();
        let (i, j) =
            mine.iter().enumerate().rev().find_map(|(i, e)| theirs.iter().position(|x| x == e).map(|j| (i, j)))?;
        let later = mine[i + 1..].iter().chain(&theirs[j + 1..]);
        Some(later.map(|e| e.base).min().unwrap_or(u64::MAX))
    }
}

impl std::fmt::Debug for History {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.entries().iter().map(|e| (e.epoch, e.start, e.base))).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(epoch: u64, start: u64, base: u64) -> HistoryEntry {
        HistoryEntry { epoch, start, base }
    }

    fn h(entries: &[HistoryEntry]) -> History {
        History::from_entries(entries).unwrap()
    }

    #[test]
    fn fork_points() {
        let (a1, a2, a3) = (e(1, 100, 0), e(2, 200, 150), e(3, 300, 250));
        // A replica that missed a2 and a3: agrees up to the first later base.
        assert_eq!(h(&[a1, a2, a3]).fork_point(&h(&[a1])), Some(150));
        assert_eq!(h(&[a1]).fork_point(&h(&[a1, a2, a3])), Some(150));
        assert_eq!(h(&[a1, a2]).fork_point(&h(&[a1, a2])), Some(u64::MAX));
        // A replica of an abandoned branch (x2 adopted a1 up to 120 only).
        let x2 = e(2, 200, 120);
        assert_eq!(h(&[a1, a2, a3]).fork_point(&h(&[a1, x2])), Some(120));
        // Nothing shared: unknown.
        assert_eq!(h(&[a2, a3]).fork_point(&h(&[a1])), None);
        assert_eq!(h(&[]).fork_point(&h(&[a1])), None);
    }

    #[test]
    fn bad_histories_are_refused_and_long_ones_keep_the_newest() {
        assert!(History::from_entries(&[e(1, 100, 100)]).is_err());
        assert!(History::from_entries(&[e(1, 100, 0), e(2, 100, 50)]).is_err());
        let all: Vec<_> = (1..=20).map(|i| e(i, i * 100, i * 100 - 1)).collect();
        let got = h(&all);
        assert_eq!(got.entries(), &all[4..]);
    }
}

//! Self-healing: read repair, the background scrub, and bad blocks met by a resync.
//!
//! All three use one mechanism, a *check* of a block range (run by the actor):
//!
//! 1. The actor queues a read of the range on the link of every in-sync replica in the
//!    same step (call that point of the write stream T). Every read sees every write to
//!    the range sequenced before T; a block that a write sequenced after T touches is
//!    *dirty* (the actor records it, [`Checks::touch`]) and left out of the verdict. So
//!    on every block judged, healthy replicas answer the same bytes. Two kinds of read:
//!    - the scrub's ([`super::link::LinkOp::RangeRead`]) is ordered only against the
//!      writes to its range: the link waits for the acks of the overlapping writes in
//!      flight, then reads beside its pipeline. It never waits for other writes and
//!      never holds back a write queued after it, so **a scrub check never stalls
//!      foreground writes** (`the_scrub_never_stalls_writes_in_flight`); it may or may
//!      not see writes sequenced after T, which are dirty;
//!    - a check after a corrupt client read or resync source
//!      ([`super::link::LinkOp::Read`]) reads after every write queued before it (the
//!      link drains its pipeline): the range is exactly at T, which a resync fetch needs
//!      for the content it hands the target. These are rare (one per corrupt block met).
//! 2. A replica whose read fails its checksum is probed block by block (plain reads) to
//!    find which blocks are bad.
//! 3. The answers are judged per block ([`judge`]): the good content is what the replicas
//!    that read fine agree on; replicas that read fine but disagree are *divergent* (they
//!    should never exist: reported loudly, never "repaired" by guessing); a block bad on
//!    every replica is *unrecoverable* (reads of it fail with EIO, never bad data).
//! 4. Each bad block is rewritten on its replica through that replica's ordered link
//!    ([`super::link::LinkOp::Repair`], an `apply_resync` chunk) unless a client write
//!    touched the block after T (then the write, queued before the repair, replaces it
//!    anyway, and the content read at T is stale). The chunk carries a seq reserved from
//!    the machine ([`super::Machine::reserve_seq`]): above every version the replica may
//!    hold, below every later write, so the replica's own "never replace a newer block"
//!    guard holds too. A repair is sent only on the link generation the reads went to.
//!
//! Read repair: a client read answered `Corruption` goes to another replica (the machine
//! keeps the bad one in service, see `Event::ReadCorrupt`), then the read's range is
//! checked. Scrub: the actor checks the volume range after range at `scrub_rate` bytes per
//! second ([`SCRUB_CHUNK`] at a time, one check in flight); over each pass every block
//! not written during its check is compared across the in-sync replicas, a copy failing
//! its checksum is rewritten from the agreeing ones, and a block that was written during
//! its check was rewritten on every replica anyway (its next pass compares it). Resync: a source whose stream hits a bad block makes the resync task ask the
//! actor to check that block; the good copy (if any) is both handed to the target and
//! written back to the source; with no good copy the block is skipped and counted as
//! unrecoverable, and the resync goes on past it (never a loop).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use tokio::sync::oneshot;

use super::types::{ReplicaId, Seq};
use hlstore_core::error::Error;

/// Bytes the scrub checks at once.
pub(super) const SCRUB_CHUNK: u64 = 1 << 20;

/// Counters of the self-healing paths of one volume (node `/metrics`).
#[derive(Debug, Default)]
pub struct HealStats {
    /// Blocks rewritten after a client read or a resync found them corrupt.
    pub read_repairs: AtomicU64,
    /// Blocks rewritten after the scrub found them corrupt.
    pub scrub_repairs: AtomicU64,
    /// Blocks the scrub compared across the in-sync replicas.
    pub scrub_blocks: AtomicU64,
    /// Complete scrub passes over the volume.
    pub scrub_passes: AtomicU64,
    /// Blocks whose replicas read fine but differ.
    pub divergent_blocks: AtomicU64,
    /// Blocks corrupt on every in-sync replica (no good copy to repair from).
    pub unrecoverable_blocks: AtomicU64,
    /// Milliseconds the engine held client requests back while a replica's write queue
    /// was over its mark (flow control rather than healing, counted here with the
    /// engine's other counters).
    pub held_ms: AtomicU64,
}

impl HealStats {
    pub fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }
    fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }
}

/// Why a range is checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Cause {
    /// A client read met a corrupt block.
    Read,
    Scrub,
    /// A scrub pass asked for by an operator (`hlstore volume scrub`).
    ScrubNow,
    /// A resync source met a corrupt block.
    Resync,
}

impl Cause {
    pub fn label(self) -> &'static str {
        match self {
            Cause::Read => "read",
            Cause::Scrub => "scrub",
            Cause::ScrubNow => "scrub-now",
            Cause::Resync => "resync",
        }
    }
}

/// What one replica answered to a check.
#[derive(Debug)]
pub(super) enum Answer {
    Data(Vec<u8>),
    /// These blocks (volume block indexes) failed their checksum.
    Corrupt(Vec<u64>),
    /// Any other failure: the replica takes no part in the verdict.
    Failed(Error),
}

/// The good content of a checked block for a resync target: (data, seq for the chunk).
pub(super) type Fetched = Option<(Bytes, Seq)>;

/// A check in flight.
pub(super) struct Check {
    pub offset: u64,
    pub len: u64,
    pub cause: Cause,
    /// Blocks a client write or trim touched since the reads were queued.
    pub dirty: HashSet<u64>,
    /// The link generation each replica's read went to.
    pub gens: Vec<(ReplicaId, u64)>,
    /// A resync waiting for the good copy of this (one-block) range.
    pub fetch: Option<oneshot::Sender<Fetched>>,
}

/// The checks in flight of one volume.
#[derive(Default)]
pub(super) struct Checks {
    next: u64,
    pending: HashMap<u64, Check>,
}

impl Checks {
    pub fn start(&mut self, check: Check) -> u64 {
        self.next += 1;
        self.pending.insert(self.next, check);
        self.next
    }

    pub fn take(&mut self, id: u64) -> Option<Check> {
        self.pending.remove(&id)
    }

    /// A client write or trim of `[offset, offset + len)` was sequenced.
    pub fn touch(&mut self, offset: u64, len: u64, bs: u64) {
        for c in self.pending.values_mut() {
            let (start, end) = (offset.max(c.offset), (offset + len).min(c.offset + c.len));
            if start < end {
                c.dirty.extend(start / bs..end.div_ceil(bs));
            }
        }
    }

    pub fn scrubbing(&self) -> bool {
        self.running(Cause::Scrub)
    }

    pub fn running(&self, cause: Cause) -> bool {
        self.pending.values().any(|c| c.cause == cause)
    }

    /// Whether a read-repair check of exactly this range is in flight.
    pub fn checking(&self, offset: u64, len: u64) -> bool {
        self.pending.values().any(|c| c.cause == Cause::Read && c.offset == offset && c.len == len)
    }
}

/// The verdict on one check.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct Verdict {
    /// Per replica: (block, good content) to rewrite.
    pub repairs: Vec<(ReplicaId, Vec<(u64, Bytes)>)>,
    /// Blocks whose replicas read fine but differ.
    pub divergent: Vec<u64>,
    /// Blocks bad on every replica that answered.
    pub unrecoverable: Vec<u64>,
    /// Blocks compared.
    pub blocks: u64,
    /// The good content of the first block (for a resync fetch).
    pub first: Option<Bytes>,
}

/// Judges the answers to a check of `[offset, offset + len)` (see the module docs).
pub(super) fn judge(offset: u64, len: u64, bs: u64, answers: &[(ReplicaId, Answer)], dirty: &HashSet<u64>) -> Verdict {
    let mut v = Verdict::default();
    let first = offset / bs;
    let mut repairs: HashMap<ReplicaId, Vec<(u64, Bytes)>> = HashMap::new();
    for b in first..first + len / bs {
        let at = ((b - first) * bs) as usize;
        let copies: Vec<&[u8]> = answers
            .iter()
            .filter_map(|(_, a)| match a {
                Answer::Data(d) if d.len() >= at + bs as usize => Some(&d[at..at + bs as usize]),
                _ => None,
            })
            .collect();
        let bad: Vec<ReplicaId> = answers
            .iter()
            .filter(|(_, a)| matches!(a, Answer::Corrupt(blocks) if blocks.contains(&b)))
            .map(|&(r, _)| r)
            .collect();
        if copies.is_empty() && bad.is_empty() {
            continue;
        }
        let agreed = match copies.split_first() {
            Some((one, rest)) if rest.iter().all(|c| c == one) => Some(Bytes::copy_from_slice(one)),
            _ => None,
        };
        if b == first {
            v.first = agreed.clone();
        }
        // Written since the reads were queued: a range read may have seen that write on
        // one replica and not on another, and the write replaces the block anyway. Left
        // to the next check (never repaired, never called divergent or lost).
        if dirty.contains(&b) {
            continue;
        }
        v.blocks += 1;
        let Some(good) = agreed else {
            if copies.is_empty() {
                v.unrecoverable.push(b);
            } else {
                v.divergent.push(b);
            }
            continue;
        };
        for r in bad {
            repairs.entry(r).or_default().push((b, good.clone()));
        }
    }
    let mut repairs: Vec<_> = repairs.into_iter().collect();
    repairs.sort_by_key(|(r, _)| *r);
    v.repairs = repairs;
    v
}

/// Records a verdict in the counters and the log.
pub(super) fn report(volume: &str, cause: Cause, v: &Verdict, stats: &HealStats) {
    if matches!(cause, Cause::Scrub | Cause::ScrubNow) {
        HealStats::add(&stats.scrub_blocks, v.blocks);
    }
    if !v.divergent.is_empty() {
        HealStats::add(&stats.divergent_blocks, v.divergent.len() as u64);
        tracing::error!(volume.id = %volume, cause = cause.label(), blocks = ?v.divergent, "replicas diverge: blocks read fine on every replica but differ");
    }
    if !v.unrecoverable.is_empty() {
        HealStats::add(&stats.unrecoverable_blocks, v.unrecoverable.len() as u64);
        tracing::error!(volume.id = %volume, cause = cause.label(), blocks = ?v.unrecoverable, "blocks corrupt on every in-sync replica: reads of them fail with EIO");
    }
}

/// Counts `n` repaired blocks.
pub(super) fn repaired(cause: Cause, n: u64, stats: &HealStats) {
    match cause {
        Cause::Scrub | Cause::ScrubNow => HealStats::add(&stats.scrub_repairs, n),
        Cause::Read | Cause::Resync => HealStats::add(&stats.read_repairs, n),
    }
}

/// What one scrub pass found.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ScrubReport {
    pub blocks: u64,
    /// Block copies that failed their checksum.
    pub corrupt: u64,
    /// Of those, rewritten from a good copy.
    pub repaired: u64,
    pub divergent: u64,
    pub unrecoverable: u64,
    /// In-sync replicas compared (at the start of the pass).
    pub replicas: u32,
}

/// A scrub pass asked for now: checks range after range, unthrottled, then answers once
/// every repair it queued was applied.
pub(super) struct ScrubNow {
    pub cursor: u64,
    pub size: u64,
    pub report: ScrubReport,
    /// Repairs queued and not answered yet.
    pub outstanding: u64,
    pub reply: oneshot::Sender<hlstore_core::error::Result<ScrubReport>>,
}

/// The scrub's position and pace.
pub(super) struct Scrub {
    /// Bytes per second (0: off).
    pub rate: u64,
    pub cursor: u64,
    pub next_at: tokio::time::Instant,
}

impl Scrub {
    pub fn new(rate: u64) -> Self {
        Self { rate, cursor: 0, next_at: tokio::time::Instant::now() }
    }

    /// The next range to check at `now`, if it is due; advances the cursor and the pace.
    /// Returns `(offset, len, pass_done)`.
    pub fn next(&mut self, now: tokio::time::Instant, size: u64) -> Option<(u64, u64, bool)> {
        if self.rate == 0 || size == 0 || now < self.next_at {
            return None;
        }
        if self.cursor >= size {
            self.cursor = 0;
        }
        let len = SCRUB_CHUNK.min(size - self.cursor);
        let offset = self.cursor;
        self.cursor += len;
        self.next_at = now + std::time::Duration::from_secs_f64(len as f64 / self.rate as f64);
        Some((offset, len, self.cursor >= size))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BS: u64 = 4;

    #[test]
    fn judge_repairs_bad_blocks_from_the_agreeing_copies() {
        let answers = vec![
            (0, Answer::Corrupt(vec![1])),
            (1, Answer::Data(b"aaaabbbb".to_vec())),
            (2, Answer::Data(b"aaaabbbb".to_vec())),
        ];
        let v = judge(0, 8, BS, &answers, &HashSet::new());
        assert_eq!(v.repairs, vec![(0, vec![(1, Bytes::from_static(b"bbbb"))])]);
        assert!(v.divergent.is_empty() && v.unrecoverable.is_empty());
        assert_eq!((v.blocks, v.first), (2, Some(Bytes::from_static(b"aaaa"))));
    }

    #[test]
    fn judge_skips_blocks_written_since_and_reports_divergence_and_loss() {
        let answers = vec![
            (0, Answer::Corrupt(vec![0, 1])),
            (1, Answer::Corrupt(vec![1])),
            (2, Answer::Data(b"aaaaxxxxcccc".to_vec())),
            (3, Answer::Data(b"aaaaxxxxdddd".to_vec())),
        ];
        // Block 0 was rewritten by a client after the reads: no repair.
        let v = judge(0, 12, BS, &answers, &HashSet::from([0]));
        assert!(v.repairs.iter().all(|(_, blocks)| blocks.iter().all(|(b, _)| *b == 1)));
        assert_eq!(v.repairs.len(), 2);
        assert_eq!(v.divergent, vec![2]);
        let lost = judge(
            0,
            4,
            BS,
            &[(0, Answer::Corrupt(vec![0])), (1, Answer::Failed(Error::Internal("x".into())))],
            &HashSet::new(),
        );
        assert_eq!(lost.unrecoverable, vec![0]);
        assert!(lost.repairs.is_empty() && lost.first.is_none());
    }

    #[test]
    fn judge_leaves_blocks_written_since_to_the_next_check() {
        // A range read saw the newer write on replica 1 only: neither divergent nor lost.
        let answers = vec![
            (0, Answer::Data(b"aaaabbbb".to_vec())),
            (1, Answer::Data(b"aaaaBBBB".to_vec())),
            (2, Answer::Corrupt(vec![1])),
        ];
        let v = judge(0, 8, BS, &answers, &HashSet::from([1]));
        assert!(v.divergent.is_empty() && v.unrecoverable.is_empty() && v.repairs.is_empty());
        assert_eq!(v.blocks, 1);
    }
}

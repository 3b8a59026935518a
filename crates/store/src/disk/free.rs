//! A volume's free slots, kept as runs of consecutive slots.
//!
//! Memory is proportional to the number of runs, not of free slots (a trimmed terabyte is
//! one run; as single slots it was tens of bytes per 4 KiB), and the allocator takes a
//! run at a time. Which free slot a write gets is the allocator's choice alone: nothing
//! durable depends on it.

use std::collections::BTreeMap;

#[derive(Debug, Default)]
pub struct FreeSlots {
    /// start → length.
    runs: BTreeMap<u64, u64>,
    count: u64,
}

impl FreeSlots {
    /// Free slots in all.
    #[cfg(test)]
    pub fn len(&self) -> u64 {
        self.count
    }

    /// The run holding `slot`, if any.
    fn run_of(&self, slot: u64) -> Option<(u64, u64)> {
        self.runs.range(..=slot).next_back().map(|(&s, &l)| (s, l)).filter(|&(s, l)| slot < s + l)
    }

    pub fn contains(&self, slot: u64) -> bool {
        self.run_of(slot).is_some()
    }

    /// Marks `slot` free, joining it to the runs beside it; false if it already was.
    pub fn insert(&mut self, slot: u64) -> bool {
        if self.contains(slot) {
            return false;
        }
        let (mut start, mut len) = (slot, 1);
        if let Some((s, l)) = slot.checked_sub(1).and_then(|p| self.run_of(p)) {
            self.runs.remove(&s);
            (start, len) = (s, l + 1);
        }
        if let Some(l) = slot.checked_add(1).and_then(|n| self.runs.get(&n).copied()) {
            self.runs.remove(&(slot + 1));
            len += l;
        }
        self.runs.insert(start, len);
        self.count += 1;
        true
    }

    /// Marks `slot` used, splitting its run; false if it was not free.
    pub fn remove(&mut self, slot: u64) -> bool {
        let Some((s, l)) = self.run_of(slot) else { return false };
        self.runs.remove(&s);
        if slot > s {
            self.runs.insert(s, slot - s);
        }
        if slot + 1 < s + l {
            self.runs.insert(slot + 1, s + l - slot - 1);
        }
        self.count -= 1;
        true
    }

    /// Takes `len` slots from the front of the run starting at `start` (of length `run`).
    fn take_front(&mut self, start: u64, run: u64, len: u64) -> (u64, u64) {
        self.runs.remove(&start);
        if run > len {
            self.runs.insert(start + len, run - len);
        }
        self.count -= len;
        (start, len)
    }

    /// Up to `max` consecutive slots from the front of the lowest run: (first slot, count).
    pub fn take_first(&mut self, max: u64) -> Option<(u64, u64)> {
        let (&start, &run) = self.runs.iter().next()?;
        Some(self.take_front(start, run, run.min(max)))
    }

    /// The runs, in slot order: (first slot, count).
    pub fn runs(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.runs.iter().map(|(&s, &l)| (s, l))
    }

    /// Every free slot, in order.
    #[cfg(test)]
    pub fn iter(&self) -> impl Iterator<Item = u64> + '_ {
        self.runs().flat_map(|(s, l)| s..s + l)
    }
}

impl Extend<u64> for FreeSlots {
    fn extend<I: IntoIterator<Item = u64>>(&mut self, iter: I) {
        for s in iter {
            self.insert(s);
        }
    }
}

impl FromIterator<u64> for FreeSlots {
    fn from_iter<I: IntoIterator<Item = u64>>(iter: I) -> Self {
        let mut f = FreeSlots::default();
        f.extend(iter);
        f
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    fn check(f: &FreeSlots, model: &BTreeSet<u64>) {
        assert_eq!(f.iter().collect::<BTreeSet<_>>(), *model);
        assert_eq!(f.len(), model.len() as u64);
        // Runs are maximal.
        let runs: Vec<_> = f.runs().collect();
        for w in runs.windows(2) {
            assert!(w[0].0 + w[0].1 < w[1].0, "runs {w:?} touch or overlap");
        }
    }

    #[derive(Debug, Clone)]
    enum Op {
        Insert(u64),
        Remove(u64),
        TakeFirst(u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0u64..200).prop_map(Op::Insert),
            2 => (0u64..200).prop_map(Op::Remove),
            2 => (1u64..20).prop_map(Op::TakeFirst),
        ]
    }

    proptest! {
        #[test]
        fn runs_match_a_set_of_slots(ops in proptest::collection::vec(op(), 1..300)) {
            let mut f = FreeSlots::default();
            let mut model = BTreeSet::new();
            for op in ops {
                match op {
                    Op::Insert(s) => assert_eq!(f.insert(s), model.insert(s)),
                    Op::Remove(s) => assert_eq!(f.remove(s), model.remove(&s)),
                    Op::TakeFirst(n) => match f.take_first(n) {
                        Some((start, len)) => {
                            assert_eq!(Some(start), model.first().copied());
                            let first_run = f.runs().next().map_or(0, |r| if r.0 == start + len { r.1 } else { 0 });
                            assert!(len == n || first_run == 0, "took {len} of {n} with the run going on");
                            for x in start..start + len {
                                assert!(model.remove(&x));
                            }
                        }
                        None => assert!(model.is_empty()),
                    },
                }
                check(&f, &model);
            }
        }
    }

    #[test]
    fn a_freed_range_is_one_run() {
        let f: FreeSlots = (1000..5000u64).rev().chain([7, 9, 8]).collect();
        assert_eq!(f.runs().collect::<Vec<_>>(), vec![(7, 3), (1000, 4000)]);
        assert_eq!(f.len(), 4003);
    }
}

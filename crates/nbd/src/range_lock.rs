//! `RangeLock`: exclusive locks on block ranges of one device, shared by every connection.
//!
//! Invariant: two held guards never overlap. Every mutating request takes the lock on the
//! block-aligned range it touches before reading (for read-modify-write) or writing, so an
//! unaligned write can never write back a stale copy of a block another request changed
//! between its read and its write — whichever connection that request came from.
//! Waiters are woken whenever any guard is released and re-check; ranges are short-lived,
//! so the simple scheme is enough.

use std::collections::BTreeMap;
use std::sync::Mutex;

use tokio::sync::Notify;

/// Exclusive locks on half-open byte ranges `[start, end)`.
#[derive(Debug, Default)]
pub struct RangeLock {
    held: Mutex<BTreeMap<u64, (u64, u64)>>,
    next_id: std::sync::atomic::AtomicU64,
    released: Notify,
}

/// A held range; released on drop.
#[derive(Debug)]
pub struct RangeGuard<'a> {
    lock: &'a RangeLock,
    id: u64,
}

impl RangeLock {
    pub fn new() -> Self {
        Self::default()
    }

    /// Waits until `[start, end)` overlaps no held range, then holds it.
    pub async fn lock(&self, start: u64, end: u64) -> RangeGuard<'_> {
        let id = self.next_id.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        loop {
            let notified = self.released.notified();
            tokio::pin!(notified);
            // Register for wake-ups before checking, so a release between the check and
            // the await is not missed.
            notified.as_mut().enable();
            {
                let mut held = self.lock_map();
                if !held.values().any(|&(s, e)| s < end && start < e) {
                    held.insert(id, (start, end));
                    return RangeGuard { lock: self, id };
                }
            }
            notified.await;
        }
    }

    /// Number of ranges held now (for tests).
    pub fn held(&self) -> usize {
        self.lock_map().len()
    }

    fn lock_map(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, (u64, u64)>> {
        // Entries are inserted/removed whole; a poisoned map is still consistent.
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for RangeGuard<'_> {
    fn drop(&mut self) {
        self.lock.lock_map().remove(&self.id);
        self.lock.released.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    #[tokio::test]
    async fn overlapping_ranges_wait_disjoint_do_not() {
        let lock = Arc::new(RangeLock::new());
        let g1 = lock.lock(0, 4096).await;
        let _g2 = lock.lock(4096, 8192).await; // disjoint: immediate
        let l2 = lock.clone();
        let waiter = tokio::spawn(async move {
            let _g = l2.lock(4000, 4100).await;
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiter.is_finished());
        drop(g1);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiter.is_finished(), "still overlaps the second range");
        drop(_g2);
        tokio::time::timeout(Duration::from_secs(5), waiter).await.unwrap().unwrap();
        assert_eq!(lock.held(), 0);
    }
}

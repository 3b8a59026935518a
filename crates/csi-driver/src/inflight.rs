//! The per-volume operation lock behind the spec's "operation pending for volume" rule:
//! while one operation on a volume runs, a second one on it is answered ABORTED at once
//! (the CO retries with backoff) instead of queueing behind it.
//!
//! Invariant: a key is held exactly as long as its [`InFlightGuard`] lives (also when the
//! handler's future is dropped because the client went away).

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use crate::error::{CsiError, Result};

#[derive(Debug, Default, Clone)]
pub struct InFlight {
    keys: Arc<Mutex<HashSet<String>>>,
}

/// Releases its key on drop.
#[derive(Debug)]
pub struct InFlightGuard {
    keys: Arc<Mutex<HashSet<String>>>,
    key: String,
}

impl InFlight {
    /// Takes `key`, or fails with ABORTED naming `op` if an operation already holds it.
    pub fn try_lock(&self, key: &str, op: &str) -> Result<InFlightGuard> {
        let mut keys = self.keys.lock().unwrap_or_else(|p| p.into_inner());
        if !keys.insert(key.to_string()) {
            return Err(CsiError::Aborted(format!(
                "an operation on {key} is already in progress; {op} not started (retry later)"
            )));
        }
        Ok(InFlightGuard { keys: self.keys.clone(), key: key.to_string() })
    }
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        self.keys.lock().unwrap_or_else(|p| p.into_inner()).remove(&self.key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_holder_is_aborted_until_the_first_drops() {
        let f = InFlight::default();
        let g = f.try_lock("vol-a", "stage").expect("first");
        let e = f.try_lock("vol-a", "publish").expect_err("second must be refused");
        assert_eq!(e.code(), tonic::Code::Aborted);
        let other = f.try_lock("vol-b", "stage").expect("another volume is independent");
        drop(g);
        f.try_lock("vol-a", "publish").expect("free again after drop");
        drop(other);
    }
}

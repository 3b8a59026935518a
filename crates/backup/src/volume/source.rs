//! `VolumeSource`: one hlstore volume snapshot as a backup source.
//!
//! Reads go to the agent's `ReadSnapshot`, but only for ranges the snapshot may hold data
//! in (its allocation map, when known); everything else reads as zeros without a request.
//! Every byte fetched from the agent is counted ([`VolumeSource::bytes_read`]).

use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};

use super::agent::VolumeAgent;
use super::plan::merge_ranges;
use crate::error::{Error, Result};
use crate::source::Source;

/// Allocated ranges closer than this are fetched in one request (fewer round trips for a
/// few zero bytes more).
pub const READ_GAP: u64 = 64 * 1024;

/// Snapshot reads in flight at once: each is a round trip to a replica, so a few at once
/// keep the replicas and the link busy.
pub const PARALLEL_READS: usize = 8;

/// A volume snapshot read through a [`VolumeAgent`].
pub struct VolumeSource<'a> {
    agent: &'a dyn VolumeAgent,
    volume: String,
    snapshot: String,
    size: u64,
    /// Sorted, merged ranges that may hold data; `None`: any byte may.
    allocated: Option<Vec<Range<u64>>>,
    /// Ranges that changed since the base backup's snapshot; `None`: unknown.
    changed: Option<Vec<Range<u64>>>,
    /// Ranges already read (offset, bytes), in offset order: a read inside one is served
    /// from it.
    prefetched: Vec<(u64, Vec<u8>)>,
    read: AtomicU64,
}

impl<'a> VolumeSource<'a> {
    pub fn new(
        agent: &'a dyn VolumeAgent,
        volume: &str,
        snapshot: &str,
        size: u64,
        allocated: Option<Vec<Range<u64>>>,
        changed: Option<Vec<Range<u64>>>,
    ) -> Self {
        VolumeSource {
            agent,
            volume: volume.into(),
            snapshot: snapshot.into(),
            size,
            allocated: allocated.map(|a| merge_ranges(&a, READ_GAP, size)),
            changed: changed.map(|c| merge_ranges(&c, 0, size)),
            prefetched: Vec::new(),
            read: AtomicU64::new(0),
        }
    }

    /// Serves reads inside `pieces` (offset, bytes; in offset order, not overlapping) from
    /// them; `already_read` bytes were fetched from the agent for them (or in vain).
    pub fn with_prefetched(mut self, pieces: Vec<(u64, Vec<u8>)>, already_read: u64) -> Self {
        self.prefetched = pieces;
        self.read.fetch_add(already_read, Ordering::Relaxed);
        self
    }

    /// Bytes fetched from the agent so far.
    pub fn bytes_read(&self) -> u64 {
        self.read.load(Ordering::Relaxed)
    }

    fn fetch(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let i = self.prefetched.partition_point(|p| p.0 <= offset);
        if let Some((at, data)) = i.checked_sub(1).map(|i| &self.prefetched[i]) {
            let from = (offset - at) as usize;
            if let Some(piece) = data.get(from..from + buf.len()) {
                buf.copy_from_slice(piece);
                return Ok(());
            }
        }
        self.agent.read_snapshot(&self.volume, &self.snapshot, offset, buf)?;
        self.read.fetch_add(buf.len() as u64, Ordering::Relaxed);
        Ok(())
    }
}

impl Source for VolumeSource<'_> {
    fn name(&self) -> String {
        format!("volume:{}", self.volume)
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let end = offset.checked_add(buf.len() as u64).filter(|&e| e <= self.size).ok_or_else(|| {
            Error::Invalid(format!("read of {} bytes at {offset} is past the end of volume {}", buf.len(), self.volume))
        })?;
        let Some(alloc) = &self.allocated else {
            return self.fetch(offset, buf);
        };
        buf.fill(0);
        // First allocated range that ends after `offset`.
        let first = alloc.partition_point(|r| r.end <= offset);
        for r in alloc[first..].iter().take_while(|r| r.start < end) {
            let (a, b) = (r.start.max(offset), r.end.min(end));
            self.fetch(a, &mut buf[(a - offset) as usize..(b - offset) as usize])?;
        }
        Ok(())
    }

    fn changed_ranges(&self) -> Option<Vec<Range<u64>>> {
        self.changed.clone()
    }

    fn changed_block_tracking(&self) -> bool {
        true
    }

    fn parallel_reads(&self) -> usize {
        PARALLEL_READS
    }
}

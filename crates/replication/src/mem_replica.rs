//! [`MemReplica`]: one replica of one volume in memory, for replication tests.
//!
//! Keeps the replica service's semantics: epoch fencing (older epoch: `StaleEpoch`; newer
//! without `open`: `InvalidArgument`), per-block seqs, `last_seq`/`durable_seq`, resync
//! lists (trims in seq order, then blocks in offset order), resync writes that never
//! replace a newer block. Knobs: delay every request, make writes fail, take it down
//! (every call fails, open streams break), crash it (down + lose what was not durable),
//! corrupt a block (its reads fail their checksum until the block is rewritten).
//! Clones share the same replica, so two engines can talk to one replica.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use futures::stream::{self, BoxStream, StreamExt};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::transport::{
    ChunkData, Claim, ReplicaTransport, ResyncChunk, SnapshotInfo, WriteAck, WriteReq, WriteStream,
};
use super::types::{History, ReplicaSeqs, Seq};
use hlstore_core::error::{Error, Result};

const BLOCK: u64 = 4096;

#[derive(Debug, Clone, Default)]
struct Data {
    /// Block index -> (content, seq that wrote it).
    blocks: BTreeMap<u64, (Bytes, Seq)>,
    /// (seq, offset, len) of every trim.
    trims: Vec<(Seq, u64, u64)>,
    last_seq: Seq,
    /// Blocks whose stored content no longer matches its checksum.
    corrupt: BTreeSet<u64>,
}

#[derive(Debug, Default)]
struct State {
    epoch: u64,
    owner: u64,
    data: Data,
    durable: Data,
    durable_seq: Seq,
    resync_from: Option<Seq>,
    /// Durable at once, like the resync mark.
    history: History,
    resync_done: Option<(u64, Seq)>,
    resync_done_epoch: u64,
    /// Snapshots: the record and a copy of the data it saw.
    snapshots: BTreeMap<String, (SnapshotInfo, Data)>,
    down: bool,
    fail_writes: bool,
    naive_resync: bool,
    fail_resync_source: bool,
    delay: Duration,
    mark_delay: Duration,
    writes: u64,
    resync_writes: u64,
    checkpoints: u64,
}

/// Counters of what a [`MemReplica`] applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemStats {
    /// Client writes and trims applied (not resync).
    pub writes: u64,
    /// Resync blocks and trims received (applied or skipped as older).
    pub resync_writes: u64,
    /// Resync checkpoints recorded.
    pub checkpoints: u64,
}

/// An in-memory replica. Cheap to clone; clones are the same replica.
#[derive(Debug, Clone)]
pub struct MemReplica {
    name: String,
    size: u64,
    state: Arc<Mutex<State>>,
}

impl MemReplica {
    pub fn new(name: impl Into<String>, size: u64) -> Self {
        Self { name: name.into(), size, state: Arc::new(Mutex::new(State::default())) }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Makes every call fail (and open streams break) until `set_down(false)`.
    pub fn set_down(&self, down: bool) {
        self.lock().down = down;
    }
    /// Kill -9: down, and everything not durable is lost.
    pub fn crash(&self) {
        let mut s = self.lock();
        s.down = true;
        s.data = s.durable.clone();
    }
    /// Every write fails with an I/O error.
    pub fn set_fail_writes(&self, fail: bool) {
        self.lock().fail_writes = fail;
    }
    /// Every request waits this long before it is served.
    pub fn set_delay(&self, delay: Duration) {
        self.lock().delay = delay;
    }
    /// Resync chunks replace blocks whatever their seq (models a replica without the seq
    /// guard, to test the runtime's own ordering guard).
    pub fn set_naive_resync(&self, naive: bool) {
        self.lock().naive_resync = naive;
    }
    /// Every `resync_stream` call fails (a source that breaks during a resync).
    pub fn set_fail_resync_source(&self, fail: bool) {
        self.lock().fail_resync_source = fail;
    }
    /// `begin_resync` waits this long before it takes effect (a slow resync mark, to
    /// test that no write overtakes it).
    pub fn set_mark_delay(&self, delay: Duration) {
        self.lock().mark_delay = delay;
    }
    /// Damages block `block` the way bit rot would: its content stays, its checksum no
    /// longer matches, so reads (and resync streams) covering it fail with `Corruption`
    /// until a write, trim or resync chunk replaces it.
    pub fn corrupt_block(&self, block: u64) {
        self.lock().data.corrupt.insert(block);
    }
    /// Whether block `block` is corrupt.
    pub fn is_corrupt(&self, block: u64) -> bool {
        self.lock().data.corrupt.contains(&block)
    }
    /// The seq that wrote block `block` (None: unallocated).
    pub fn block_seq(&self, block: u64) -> Option<Seq> {
        self.lock().data.blocks.get(&block).map(|(_, seq)| *seq)
    }
    pub fn stats(&self) -> MemStats {
        let s = self.lock();
        MemStats { writes: s.writes, resync_writes: s.resync_writes, checkpoints: s.checkpoints }
    }
    pub fn epoch(&self) -> u64 {
        self.lock().epoch
    }
    /// The replica's content (zeroes where unallocated), bypassing epochs and knobs.
    pub fn contents(&self) -> Vec<u8> {
        let s = self.lock();
        let mut out = vec![0u8; self.size as usize];
        for (&b, (d, _)) in &s.data.blocks {
            let at = (b * BLOCK) as usize;
            out[at..at + d.len()].copy_from_slice(d);
        }
        out
    }

    fn seqs(s: &State) -> ReplicaSeqs {
        ReplicaSeqs {
            epoch: s.epoch,
            owner: s.owner,
            last_seq: s.data.last_seq,
            durable_seq: s.durable_seq,
            resync_from: s.resync_from,
            history: s.history,
        }
    }

    fn delay(&self) -> Duration {
        self.lock().delay
    }

    /// Checks liveness and the epoch of an I/O request.
    fn check(&self, s: &State, epoch: u64) -> Result<()> {
        if s.down {
            return Err(Error::Unavailable(format!("replica {} is down", self.name)));
        }
        if epoch < s.epoch {
            return Err(Error::StaleEpoch { volume: self.name.clone(), got: epoch, current: s.epoch });
        }
        if epoch > s.epoch {
            return Err(Error::InvalidArgument(format!("replica {}: epoch {epoch} was not opened", self.name)));
        }
        Ok(())
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<()> {
        if !offset.is_multiple_of(BLOCK) || !len.is_multiple_of(BLOCK) {
            return Err(Error::InvalidArgument(format!("replica {}: unaligned {offset}+{len}", self.name)));
        }
        if offset.checked_add(len).is_none_or(|end| end > self.size) {
            return Err(Error::OutOfRange { volume: self.name.clone(), offset, length: len, size: self.size });
        }
        Ok(())
    }

    fn apply_write(&self, epoch: u64, req: &WriteReq) -> Result<WriteAck> {
        let mut s = self.lock();
        self.check(&s, epoch)?;
        if s.fail_writes {
            return Err(Error::io(format!("replica {}", self.name), std::io::Error::other("injected write failure")));
        }
        self.check_range(req.offset, req.data.len() as u64)?;
        s.writes += 1;
        Self::put(&mut s, req.offset, &req.data, req.seq, false);
        if req.fua {
            Self::make_durable(&mut s);
        }
        Ok(WriteAck { seq: req.seq, durable_seq: s.durable_seq })
    }

    /// Stores whole blocks; with `guard`, blocks written at a newer (or the same) seq stay.
    fn put(s: &mut State, offset: u64, data: &[u8], seq: Seq, guard: bool) -> u64 {
        let mut applied = 0;
        for (i, chunk) in data.chunks(BLOCK as usize).enumerate() {
            let b = offset / BLOCK + i as u64;
            if guard && s.data.blocks.get(&b).is_some_and(|(_, bs)| *bs >= seq) {
                continue;
            }
            s.data.blocks.insert(b, (Bytes::copy_from_slice(chunk), seq));
            s.data.corrupt.remove(&b);
            applied += 1;
        }
        s.data.last_seq = s.data.last_seq.max(seq);
        applied
    }

    /// Deallocates whole blocks; with `guard`, blocks written at a newer seq stay.
    fn punch(s: &mut State, offset: u64, len: u64, seq: Seq, guard: bool) {
        let range: Vec<u64> = s.data.blocks.range(offset / BLOCK..(offset + len) / BLOCK).map(|(&b, _)| b).collect();
        for b in range {
            if !(guard && s.data.blocks.get(&b).is_some_and(|(_, bs)| *bs >= seq)) {
                s.data.blocks.remove(&b);
                s.data.corrupt.remove(&b);
            }
        }
        s.data.trims.push((seq, offset, len));
        s.data.last_seq = s.data.last_seq.max(seq);
    }

    fn corruption(&self, block: u64) -> Error {
        Error::Corruption { volume: self.name.clone(), offset: block * BLOCK, expected: 0, actual: 1 }
    }

    fn make_durable(s: &mut State) -> Seq {
        s.durable = s.data.clone();
        s.durable_seq = s.data.last_seq;
        s.durable_seq
    }
}

impl ReplicaTransport for MemReplica {
    fn name(&self) -> &str {
        &self.name
    }

    async fn state(&self) -> Result<ReplicaSeqs> {
        tokio::time::sleep(self.delay()).await;
        let s = self.lock();
        if s.down {
            return Err(Error::Unavailable(format!("replica {} is down", self.name)));
        }
        Ok(Self::seqs(&s))
    }

    async fn open(&self, claim: Claim) -> Result<ReplicaSeqs> {
        tokio::time::sleep(self.delay()).await;
        let mut s = self.lock();
        if s.down {
            return Err(Error::Unavailable(format!("replica {} is down", self.name)));
        }
        if let Some((epoch, owner)) = hlstore_store::check_claim(&self.name, s.epoch, s.owner, &claim)? {
            s.epoch = epoch;
            s.owner = owner;
        }
        Ok(Self::seqs(&s))
    }

    async fn ping(&self, epoch: u64) -> Result<ReplicaSeqs> {
        tokio::time::sleep(self.delay()).await;
        let s = self.lock();
        self.check(&s, epoch)?;
        Ok(Self::seqs(&s))
    }

    async fn write_stream(&self, epoch: u64) -> Result<WriteStream> {
        {
            let s = self.lock();
            self.check(&s, epoch)?;
        }
        // Deeper than the link's in-flight limit: sending never waits for unread acks.
        let depth = 2 * super::link::MAX_IN_FLIGHT;
        let (tx, mut rx) = mpsc::channel::<WriteReq>(depth);
        let (atx, arx) = mpsc::channel::<Result<WriteAck>>(depth);
        let me = self.clone();
        tokio::spawn(async move {
            while let Some(req) = rx.recv().await {
                let delay = me.delay();
                if !delay.is_zero() {
                    tokio::time::sleep(delay).await;
                }
                let res = me.apply_write(epoch, &req);
                let failed = res.is_err();
                if atx.send(res).await.is_err() || failed {
                    break;
                }
            }
        });
        Ok(WriteStream { requests: tx, acks: ReceiverStream::new(arx).boxed() })
    }

    async fn read(&self, epoch: u64, offset: u64, len: u64) -> Result<Vec<u8>> {
        tokio::time::sleep(self.delay()).await;
        let s = self.lock();
        self.check(&s, epoch)?;
        self.check_range(offset, len)?;
        if let Some(&b) = s.data.corrupt.range(offset / BLOCK..(offset + len) / BLOCK).next() {
            return Err(self.corruption(b));
        }
        let mut out = vec![0u8; len as usize];
        for (&b, (d, _)) in s.data.blocks.range(offset / BLOCK..(offset + len) / BLOCK) {
            let at = (b * BLOCK - offset) as usize;
            out[at..at + d.len()].copy_from_slice(d);
        }
        Ok(out)
    }

    async fn flush(&self, epoch: u64) -> Result<Seq> {
        tokio::time::sleep(self.delay()).await;
        let mut s = self.lock();
        self.check(&s, epoch)?;
        Ok(Self::make_durable(&mut s))
    }

    async fn trim(&self, epoch: u64, seq: Seq, offset: u64, len: u64) -> Result<()> {
        tokio::time::sleep(self.delay()).await;
        let mut s = self.lock();
        self.check(&s, epoch)?;
        if s.fail_writes {
            return Err(Error::io(format!("replica {}", self.name), std::io::Error::other("injected write failure")));
        }
        self.check_range(offset, len)?;
        s.writes += 1;
        Self::punch(&mut s, offset, len, seq, false);
        Ok(())
    }

    async fn resync_stream(
        &self,
        epoch: u64,
        since: Seq,
        resume: Option<(u64, Seq)>,
    ) -> Result<BoxStream<'static, Result<ResyncChunk>>> {
        let (below, after) = resume.unwrap_or((0, 0));
        let s = self.lock();
        self.check(&s, epoch)?;
        if s.fail_resync_source {
            return Err(Error::io(format!("replica {}", self.name), std::io::Error::other("injected resync failure")));
        }
        let mut trims: Vec<_> = s.data.trims.iter().filter(|t| t.0 > since).copied().collect();
        trims.sort_unstable();
        let mut chunks: Vec<Result<ResyncChunk>> = trims
            .into_iter()
            .map(|(seq, offset, len)| Ok(ResyncChunk { offset, seq, data: ChunkData::Trim(len) }))
            .collect();
        // Like the replica service: blocks are read in order and the stream ends with the
        // first one that fails its checksum.
        for (&b, (d, seq)) in
            s.data.blocks.iter().filter(|(&b, (_, seq))| *seq > since && (b * BLOCK >= below || *seq > after))
        {
            if s.data.corrupt.contains(&b) {
                chunks.push(Err(self.corruption(b)));
                break;
            }
            chunks.push(Ok(ResyncChunk { offset: b * BLOCK, seq: *seq, data: ChunkData::Data(d.clone()) }));
        }
        Ok(stream::iter(chunks).boxed())
    }

    async fn begin_resync(
        &self,
        epoch: u64,
        from_seq: Seq,
        resume: bool,
        history: History,
    ) -> Result<Option<(u64, Seq)>> {
        let mark_delay = self.lock().mark_delay;
        tokio::time::sleep(mark_delay).await;
        let mut s = self.lock();
        self.check(&s, epoch)?;
        if !history.is_empty() {
            s.history = history;
        }
        if !resume || s.resync_from != Some(from_seq) || s.resync_done_epoch != epoch {
            s.resync_done = None;
        }
        s.resync_from = Some(s.resync_from.map_or(from_seq, |f| f.min(from_seq)));
        Ok(s.resync_done)
    }

    async fn set_history(&self, epoch: u64, history: History) -> Result<()> {
        let mut s = self.lock();
        self.check(&s, epoch)?;
        s.history = history;
        Ok(())
    }

    async fn checkpoint_resync(&self, epoch: u64, offset: u64) -> Result<()> {
        let mut s = self.lock();
        self.check(&s, epoch)?;
        if s.resync_from.is_none() {
            return Err(Error::InvalidArgument(format!("replica {}: no resync in progress", self.name)));
        }
        let durable = Self::make_durable(&mut s);
        s.resync_done = Some((offset, durable));
        s.resync_done_epoch = epoch;
        s.checkpoints += 1;
        Ok(())
    }

    async fn apply_resync(&self, epoch: u64, chunks: Vec<ResyncChunk>) -> Result<u64> {
        tokio::time::sleep(self.delay()).await;
        let mut s = self.lock();
        self.check(&s, epoch)?;
        if s.fail_writes {
            return Err(Error::io(format!("replica {}", self.name), std::io::Error::other("injected write failure")));
        }
        let guard = !s.naive_resync;
        let mut applied = 0;
        for c in chunks {
            s.resync_writes += 1;
            match c.data {
                ChunkData::Data(d) => {
                    self.check_range(c.offset, d.len() as u64)?;
                    applied += Self::put(&mut s, c.offset, &d, c.seq, guard);
                }
                ChunkData::Zero => {
                    self.check_range(c.offset, BLOCK)?;
                    Self::punch(&mut s, c.offset, BLOCK, c.seq, guard);
                    applied += 1;
                }
                ChunkData::Trim(len) => {
                    self.check_range(c.offset, len)?;
                    Self::punch(&mut s, c.offset, len, c.seq, guard);
                    applied += 1;
                }
            }
        }
        Ok(applied)
    }

    async fn end_resync(&self, epoch: u64) -> Result<Seq> {
        let mut s = self.lock();
        self.check(&s, epoch)?;
        s.resync_from = None;
        s.resync_done = None;
        Ok(Self::make_durable(&mut s))
    }

    async fn create_snapshot(&self, epoch: u64, snap: SnapshotInfo) -> Result<SnapshotInfo> {
        let mut s = self.lock();
        self.check(&s, epoch)?;
        if let Some((got, _)) = s.snapshots.get(&snap.name) {
            return Ok(got.clone());
        }
        if s.data.last_seq > snap.seq {
            return Err(Error::Unavailable(format!("replica {}: already past seq {}", self.name, snap.seq)));
        }
        Self::make_durable(&mut s);
        let snap = SnapshotInfo { size: self.size, ..snap };
        let data = s.data.clone();
        s.snapshots.insert(snap.name.clone(), (snap.clone(), data));
        Ok(snap)
    }

    async fn delete_snapshot(&self, epoch: u64, name: &str) -> Result<bool> {
        let mut s = self.lock();
        self.check(&s, epoch)?;
        Ok(s.snapshots.remove(name).is_some())
    }

    async fn install_snapshot(
        &self,
        epoch: u64,
        snap: SnapshotInfo,
        blocks: Vec<(u64, Option<Vec<u8>>)>,
        last: bool,
    ) -> Result<()> {
        let mut s = self.lock();
        self.check(&s, epoch)?;
        // The snapshot is the current data with the given blocks as the snapshot saw them.
        let mut data = match s.snapshots.get(&snap.name) {
            Some((_, d)) => d.clone(),
            None => s.data.clone(),
        };
        for (b, d) in blocks {
            match d {
                Some(d) => data.blocks.insert(b, (d.into(), snap.seq)),
                None => data.blocks.remove(&b),
            };
        }
        s.snapshots.insert(snap.name.clone(), (SnapshotInfo { partial: !last, ..snap }, data));
        Ok(())
    }

    async fn expand(&self, _epoch: u64, _new_size: u64) -> Result<()> {
        Err(Error::Unsupported(format!("replica {}: in-memory replicas have a fixed size", self.name)))
    }

    async fn list_snapshots(&self) -> Result<Vec<SnapshotInfo>> {
        let s = self.lock();
        if s.down {
            return Err(Error::Unavailable(format!("replica {} is down", self.name)));
        }
        let mut out: Vec<SnapshotInfo> = s.snapshots.values().map(|(i, _)| i.clone()).collect();
        out.sort_by(|a, b| (a.seq, &a.name).cmp(&(b.seq, &b.name)));
        Ok(out)
    }

    async fn read_snapshot(&self, name: &str, offset: u64, len: u64) -> Result<Vec<u8>> {
        let s = self.lock();
        if s.down {
            return Err(Error::Unavailable(format!("replica {} is down", self.name)));
        }
        self.check_range(offset, len)?;
        let (_, data) = s
            .snapshots
            .get(name)
            .ok_or_else(|| Error::NotFound(format!("replica {}: no snapshot {name}", self.name)))?;
        let mut out = vec![0u8; len as usize];
        for (&b, (d, _)) in data.blocks.range(offset / BLOCK..(offset + len) / BLOCK) {
            let at = (b * BLOCK - offset) as usize;
            out[at..at + d.len()].copy_from_slice(d);
        }
        Ok(out)
    }

    async fn changed_blocks(&self, from: Option<&str>, to: Option<&str>) -> Result<Vec<(u64, u64)>> {
        let s = self.lock();
        let get = |n: Option<&str>| -> Result<Data> {
            match n {
                None => Ok(Data::default()),
                Some(n) => s
                    .snapshots
                    .get(n)
                    .map(|(_, d)| d.clone())
                    .ok_or_else(|| Error::NotFound(format!("replica {}: no snapshot {n}", self.name))),
            }
        };
        let a = get(from)?;
        let b = if to.is_none() { s.data.clone() } else { get(to)? };
        let mut blocks: Vec<u64> = a.blocks.keys().chain(b.blocks.keys()).copied().collect();
        blocks.sort_unstable();
        blocks.dedup();
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for blk in blocks.into_iter().filter(|k| a.blocks.get(k).map(|x| &x.0) != b.blocks.get(k).map(|x| &x.0)) {
            match runs.last_mut() {
                Some((start, count)) if *start + *count == blk => *count += 1,
                _ => runs.push((blk, 1)),
            }
        }
        Ok(runs)
    }
}

//! [`Batch`]: a RocksDB write batch staged in memory and handed over in key order.
//!
//! A write stages several keys per block (map, seq index, free list) interleaved; RocksDB
//! inserts each into its memtable skip list with a search from the top. Sorted, the
//! inserts of one batch walk forward from the previous one (with the per-batch insert hint
//! the commit sets), which is most of the metadata cost of a large write. Operations on
//! the same key keep their order (stable sort), so the batch means the same thing. A batch
//! with a range delete is handed over as staged.

use rocksdb::WriteBatch;

enum Op {
    Put(Box<[u8]>, Box<[u8]>),
    Delete(Box<[u8]>),
    DeleteRange(Box<[u8]>, Box<[u8]>),
}

impl Op {
    fn key(&self) -> &[u8] {
        match self {
            Op::Put(k, _) | Op::Delete(k) | Op::DeleteRange(k, _) => k,
        }
    }
}

#[derive(Default)]
pub struct Batch {
    ops: Vec<Op>,
    ranged: bool,
}

impl Batch {
    pub fn put(&mut self, key: impl AsRef<[u8]>, value: impl AsRef<[u8]>) {
        self.ops.push(Op::Put(key.as_ref().into(), value.as_ref().into()));
    }

    pub fn delete(&mut self, key: impl AsRef<[u8]>) {
        self.ops.push(Op::Delete(key.as_ref().into()));
    }

    pub fn delete_range(&mut self, from: impl AsRef<[u8]>, to: impl AsRef<[u8]>) {
        self.ranged = true;
        self.ops.push(Op::DeleteRange(from.as_ref().into(), to.as_ref().into()));
    }

    /// The RocksDB batch, in key order unless it holds a range delete.
    pub fn into_write_batch(mut self) -> WriteBatch {
        if !self.ranged {
            self.ops.sort_by(|a, b| a.key().cmp(b.key()));
        }
        let mut wb = WriteBatch::default();
        for op in self.ops {
            match op {
                Op::Put(k, v) => wb.put(k, v),
                Op::Delete(k) => wb.delete(k),
                Op::DeleteRange(a, b) => wb.delete_range(a, b),
            }
        }
        wb
    }
}

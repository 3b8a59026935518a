//! The durability rules of [`Model`], one test each, without FUSE.

use super::*;

fn n(s: &str) -> &OsStr {
    OsStr::new(s)
}

fn model() -> Model {
    Model::new(1 << 30, 0, 0)
}

fn file(m: &mut Model, parent: Ino, name: &str) -> Ino {
    m.create(parent, n(name), Kind::File, 0o644, (0, 0), None).unwrap().ino
}

fn mkdir(m: &mut Model, parent: Ino, name: &str) -> Ino {
    m.create(parent, n(name), Kind::Dir, 0o755, (0, 0), None).unwrap().ino
}

fn names(m: &Model, dir: Ino) -> Vec<String> {
    m.readdir(dir).unwrap().into_iter().skip(2).map(|(_, _, s)| s.to_string_lossy().into_owned()).collect()
}

fn content(m: &mut Model, dir: Ino, name: &str) -> Option<Vec<u8>> {
    let a = m.lookup(dir, n(name)).ok()?;
    Some(m.read(a.ino, 0, a.size).unwrap())
}

#[test]
fn unsynced_file_and_entry_are_gone() {
    let mut m = model();
    let f = file(&mut m, ROOT, "a");
    m.write(f, 0, b"hello").unwrap();
    let r = m.cut(CutMode::Drop);
    assert_eq!(names(&m, ROOT), Vec::<String>::new());
    assert_eq!(r.dropped_inodes, 1);
    assert_eq!(m.getattr(f), Err(libc::ENOENT), "an inode dropped by a cut is gone for good");
}

#[test]
fn file_fsync_without_dir_fsync_loses_the_name() {
    let mut m = model();
    let f = file(&mut m, ROOT, "a");
    m.write(f, 0, b"hello").unwrap();
    m.fsync(f).unwrap();
    m.cut(CutMode::Drop);
    assert!(names(&m, ROOT).is_empty(), "the entry needs an fsync of the directory");
}

#[test]
fn dir_fsync_without_file_fsync_leaves_an_empty_file() {
    let mut m = model();
    let f = file(&mut m, ROOT, "node.json");
    m.write(f, 0, b"{\"node_id\":\"n1\"}").unwrap();
    m.fsyncdir(ROOT).unwrap();
    m.cut(CutMode::Drop);
    assert_eq!(content(&mut m, ROOT, "node.json"), Some(Vec::new()), "the name survives, the data does not");
}

#[test]
fn both_fsyncs_keep_it_and_later_writes_revert() {
    let mut m = model();
    let f = file(&mut m, ROOT, "a");
    m.write(f, 0, b"hello").unwrap();
    m.fsync(f).unwrap();
    m.fsyncdir(ROOT).unwrap();
    m.write(f, 0, b"J").unwrap();
    m.write(f, 5, b" world").unwrap();
    assert_eq!(m.stats().bytes_unsynced, 7);
    m.cut(CutMode::Drop);
    assert_eq!(content(&mut m, ROOT, "a").unwrap(), b"hello");
    assert_eq!(m.stats().cuts, 1);
}

#[test]
fn truncate_and_punch_are_undone_unless_synced() {
    let mut m = model();
    let f = file(&mut m, ROOT, "a");
    m.write(f, 0, &[1u8; 3 * 4096]).unwrap();
    m.fsync(f).unwrap();
    m.fsyncdir(ROOT).unwrap();
    m.setattr(f, &SetAttr { size: Some(100), ..Default::default() }).unwrap();
    m.fallocate(f, 0, 50, libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE).unwrap();
    assert_eq!(m.getattr(f).unwrap().size, 100);
    m.cut(CutMode::Drop);
    let a = m.getattr(f).unwrap();
    assert_eq!(a.size, 3 * 4096);
    assert!(m.read(f, 0, a.size).unwrap().iter().all(|&b| b == 1));
    m.fallocate(f, 4096, 4096, libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE).unwrap();
    m.fsync(f).unwrap();
    m.cut(CutMode::Drop);
    assert_eq!(m.getattr(f).unwrap().allocated, 2 * 4096, "a synced punch stays punched");
    assert_eq!(m.read(f, 4096, 4).unwrap(), [0, 0, 0, 0]);
    assert_eq!(m.seek(f, 0, false).unwrap(), 4096);
}

#[test]
fn atomic_replace_by_rename_needs_the_dir_fsync() {
    let mut m = model();
    let f = file(&mut m, ROOT, "state");
    m.write(f, 0, b"old").unwrap();
    m.fsync(f).unwrap();
    m.fsyncdir(ROOT).unwrap();
    let t = file(&mut m, ROOT, "state.tmp");
    m.write(t, 0, b"new").unwrap();
    m.fsync(t).unwrap();
    m.rename(ROOT, n("state.tmp"), ROOT, n("state"), RenameMode::Replace).unwrap();
    assert_eq!(content(&mut m, ROOT, "state").unwrap(), b"new");
    // The old inode is kept while the durable entry names it.
    m.forget(f, 1);
    assert!(m.getattr(f).is_ok());
    m.cut(CutMode::Drop);
    assert_eq!(content(&mut m, ROOT, "state").unwrap(), b"old", "rename not durable: old content");
    assert_eq!(names(&m, ROOT), ["state"]);

    let t = file(&mut m, ROOT, "state.tmp");
    m.write(t, 0, b"new").unwrap();
    m.fsync(t).unwrap();
    m.rename(ROOT, n("state.tmp"), ROOT, n("state"), RenameMode::Replace).unwrap();
    m.fsyncdir(ROOT).unwrap();
    m.cut(CutMode::Drop);
    assert_eq!(content(&mut m, ROOT, "state").unwrap(), b"new");
    assert_eq!(names(&m, ROOT), ["state"]);
}

#[test]
fn rename_across_directories_needs_both() {
    let mut m = model();
    let a = mkdir(&mut m, ROOT, "a");
    let b = mkdir(&mut m, ROOT, "b");
    let f = file(&mut m, a, "f");
    m.write(f, 0, b"x").unwrap();
    m.fsync(f).unwrap();
    for d in [ROOT, a, b] {
        m.fsyncdir(d).unwrap();
    }
    m.rename(a, n("f"), b, n("g"), RenameMode::Replace).unwrap();
    m.fsyncdir(b).unwrap();
    m.cut(CutMode::Drop);
    assert_eq!(names(&m, a), ["f"], "the source directory was not synced: the old name is back");
    assert_eq!(names(&m, b), ["g"]);
    assert_eq!(m.getattr(f).unwrap().nlink, 2, "one inode, two names");
    m.rename(a, n("f"), b, n("h"), RenameMode::Replace).unwrap();
    m.fsyncdir(a).unwrap();
    m.fsyncdir(b).unwrap();
    m.cut(CutMode::Drop);
    assert!(names(&m, a).is_empty());
    assert_eq!(names(&m, b), ["g", "h"]);
}

#[test]
fn rename_flags() {
    let mut m = model();
    file(&mut m, ROOT, "x");
    file(&mut m, ROOT, "y");
    assert_eq!(m.rename(ROOT, n("x"), ROOT, n("y"), RenameMode::NoReplace), Err(libc::EEXIST));
    let x = m.lookup(ROOT, n("x")).unwrap().ino;
    m.rename(ROOT, n("x"), ROOT, n("y"), RenameMode::Exchange).unwrap();
    assert_eq!(m.lookup(ROOT, n("y")).unwrap().ino, x);
    let d = mkdir(&mut m, ROOT, "d");
    let sub = mkdir(&mut m, d, "sub");
    assert_eq!(m.rename(ROOT, n("d"), sub, n("loop"), RenameMode::Replace), Err(libc::EINVAL));
    assert_eq!(m.rmdir(ROOT, n("d")), Err(libc::ENOTEMPTY));
}

#[test]
fn unlinked_open_file_keeps_its_content_until_released() {
    let mut m = model();
    let f = file(&mut m, ROOT, "a");
    m.open(f).unwrap();
    m.write(f, 0, b"abc").unwrap();
    m.unlink(ROOT, n("a")).unwrap();
    m.forget(f, 1);
    assert_eq!(m.read(f, 0, 3).unwrap(), b"abc");
    m.release(f);
    assert!(m.getattr(f).is_ok(), "unsynced ops of the directory still name it (a torn cut may keep them)");
    m.fsyncdir(ROOT).unwrap();
    assert_eq!(m.getattr(f), Err(libc::ENOENT));
}

#[test]
fn unlink_is_undone_unless_the_dir_is_synced() {
    let mut m = model();
    let d = mkdir(&mut m, ROOT, "d");
    let f = file(&mut m, d, "f");
    m.write(f, 0, b"keep").unwrap();
    m.fsync(f).unwrap();
    m.fsyncdir(d).unwrap();
    m.fsyncdir(ROOT).unwrap();
    m.unlink(d, n("f")).unwrap();
    m.rmdir(ROOT, n("d")).unwrap();
    m.forget(f, 1);
    m.forget(d, 1);
    m.cut(CutMode::Drop);
    assert_eq!(content(&mut m, d, "f").unwrap(), b"keep", "both removals were lost");

    m.unlink(d, n("f")).unwrap();
    m.fsyncdir(d).unwrap();
    m.forget(f, 2);
    assert_eq!(m.getattr(f), Err(libc::ENOENT), "no name, no reference: freed");
    m.cut(CutMode::Drop);
    assert!(names(&m, d).is_empty());
}

#[test]
fn torn_cut_keeps_a_prefix_of_each_log() {
    // For every seed, the surviving content is the durable content plus a prefix of the
    // ops, the last write possibly cut at a sector boundary.
    let mut saw = (false, false, false);
    for seed in 0..200 {
        let mut m = model();
        let f = file(&mut m, ROOT, "f");
        m.fsyncdir(ROOT).unwrap();
        let writes: Vec<(u64, Vec<u8>)> = (0..4u8).map(|i| (u64::from(i) * 1000, vec![i + 1; 2000])).collect();
        for (off, data) in &writes {
            m.write(f, *off, data).unwrap();
        }
        m.cut(CutMode::Torn { seed });
        let size = m.getattr(f).unwrap().size;
        let got = m.read(f, 0, size).unwrap();
        let mut matched = false;
        for k in 0..=writes.len() {
            let mut p = Pages::default();
            for (off, data) in &writes[..k.saturating_sub(1)] {
                p.write(*off, data);
            }
            if k == 0 {
                matched |= got.is_empty();
                continue;
            }
            let (off, data) = &writes[k - 1];
            for len in (0..=data.len()).filter(|l| *l == data.len() || (off + *l as u64) % SECTOR == 0) {
                let mut q = p.clone();
                q.write(*off, &data[..len]);
                if q.read(0, q.size()) == got {
                    matched = true;
                    saw.0 |= k == writes.len() && len == data.len();
                    saw.1 |= len < data.len() && len > 0;
                }
            }
        }
        saw.2 |= got.is_empty();
        assert!(matched, "seed {seed}: surviving content is not a (torn) prefix of the writes");
    }
    assert!(saw.0 && saw.1 && saw.2, "200 seeds cover all kept, torn and nothing kept: {saw:?}");
}

#[test]
fn torn_cut_is_deterministic_per_seed() {
    let run = |seed| {
        let mut m = model();
        let d = mkdir(&mut m, ROOT, "d");
        for i in 0..10 {
            let f = file(&mut m, d, &format!("f{i}"));
            m.write(f, 0, &[i as u8; 3000]).unwrap();
        }
        m.cut(CutMode::Torn { seed });
        let mut out = Vec::new();
        for name in names(&m, ROOT).into_iter().chain(names(&m, d)) {
            out.push(name);
        }
        (out, m.stats())
    };
    assert_eq!(run(7), run(7));
}

#[test]
fn directory_reached_twice_after_a_torn_cut_keeps_one_entry() {
    // Force the case directly: a durable entry in two directories naming one directory.
    let mut m = model();
    let a = mkdir(&mut m, ROOT, "a");
    let b = mkdir(&mut m, ROOT, "b");
    let c = mkdir(&mut m, a, "c");
    for d in [ROOT, a, b] {
        m.fsyncdir(d).unwrap();
    }
    m.rename(a, n("c"), b, n("c"), RenameMode::Replace).unwrap();
    m.fsyncdir(b).unwrap();
    m.cut(CutMode::Drop);
    assert_eq!(names(&m, a), ["c"]);
    assert!(names(&m, b).is_empty(), "the second entry of directory {c} was removed");
    assert_eq!(m.getattr(c).unwrap().kind, Kind::Dir);
}

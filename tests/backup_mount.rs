//! `hlstore backup mount` through the real binary: the FUSE view lists backups by time,
//! label and id; each `image` reads back byte-identical (`cmp`); writes are refused; as
//! root, an ext4 image opens with `mount -o loop,ro` and its files match; SIGTERM
//! unmounts. Needs `/dev/fuse` (and for the loop mount root, mkfs.ext4 and loop devices);
//! fails with a clear message without FUSE.

mod support;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rand::{RngCore, SeedableRng};
use support::backup::{hl, json, ok, p, TestRepo};

fn is_mounted(dir: &Path) -> bool {
    let dir = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    let info = std::fs::read_to_string("/proc/self/mountinfo").expect("read /proc/self/mountinfo");
    info.lines().any(|l| l.split(' ').nth(4).is_some_and(|m| Path::new(m) == dir))
}

fn cmp(a: &Path, b: &Path) {
    let st = Command::new("cmp").arg(a).arg(b).status().expect("run cmp");
    assert!(st.success(), "cmp {} {} differ", a.display(), b.display());
}

fn is_root() -> bool {
    // SAFETY: geteuid cannot fail and touches no memory.
    unsafe { libc::geteuid() == 0 }
}

/// A running `hlstore backup mount`: SIGTERM on drop, then SIGKILL and a lazy unmount.
struct Mounted {
    child: Child,
    dir: PathBuf,
    loop_mnt: Option<PathBuf>,
}

impl Mounted {
    fn stop(&mut self) -> std::process::ExitStatus {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st;
            }
            assert!(Instant::now() < deadline, "backup mount did not stop after SIGTERM");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if let Some(m) = self.loop_mnt.take() {
            let _ = Command::new("umount").arg(&m).status();
        }
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if is_mounted(&self.dir) {
            let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
        }
    }
}

/// A small tree of files (text and random) packed into an ext4 image with `mkfs.ext4 -d`.
fn ext4_image(dir: &Path, img: &Path) -> Option<PathBuf> {
    let files = dir.join("files");
    std::fs::create_dir_all(files.join("sub")).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(42);
    let mut big = vec![0u8; 3 << 20];
    rng.fill_bytes(&mut big);
    std::fs::write(files.join("sub/random.bin"), &big).unwrap();
    let text: String = (0..20_000).map(|i| format!("line {i} of a text file\n")).collect();
    std::fs::write(files.join("notes.txt"), text).unwrap();
    let st = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-d"])
        .arg(&files)
        .arg(img)
        .arg("24M")
        .stderr(Stdio::null())
        .status();
    match st {
        Ok(s) if s.success() => Some(files.join("sub/random.bin")),
        _ => None,
    }
}

#[test]
fn backup_mount_shows_images_by_time_label_and_id() {
    assert!(Path::new("/dev/fuse").exists(), "/dev/fuse is missing: the kernel needs FUSE (modprobe fuse)");
    let t = TestRepo::init();
    let repo = t.url.clone();

    // An ext4 image (a plain file with random and zero runs if mkfs.ext4 is missing) and
    // a raw file.
    let fs_img = t.path().join("fs.img");
    let inner = ext4_image(t.path(), &fs_img);
    if inner.is_none() {
        let mut v = vec![0u8; 8 << 20];
        rand::rngs::StdRng::seed_from_u64(1).fill_bytes(&mut v[..3 << 20]);
        std::fs::write(&fs_img, v).unwrap();
    }
    let raw = t.path().join("raw.bin");
    let mut v = vec![7u8; 5 << 20];
    rand::rngs::StdRng::seed_from_u64(2).fill_bytes(&mut v[1 << 20..]);
    std::fs::write(&raw, v).unwrap();
    let create = |src: &Path, label: &str| {
        let out = ok(hl(&["backup", "create", "--repo", &repo, "--source", p(src), "--label", label, "--json"]));
        json(&out)["id"].as_str().unwrap().to_string()
    };
    let fs_id = create(&fs_img, "app=web/site");
    let raw_id = create(&raw, "kind=raw");

    let dir = t.path().join("mnt");
    let mut child = hl(&["backup", "mount", p(&dir), "--repo", &repo, "--json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let mut m = Mounted { child, dir: dir.clone(), loop_mnt: None };
    if line.is_empty() {
        let mut err = String::new();
        std::io::Read::read_to_string(m.child.stderr.as_mut().unwrap(), &mut err).unwrap();
        panic!("backup mount did not start: {err}");
    }
    let ready = json(&line);
    assert_eq!(ready["backups"], 2);
    assert!(is_mounted(&dir));

    let names = |d: &Path| -> Vec<String> {
        let mut v: Vec<String> =
            std::fs::read_dir(d).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        v.sort();
        v
    };
    assert_eq!(names(&dir), ["by-id", "by-label", "by-time"]);
    assert_eq!(names(&dir.join("by-time")).len(), 2);
    assert_eq!(names(&dir.join("by-label")), ["app=web%2Fsite", "kind=raw"]);
    let mut ids = names(&dir.join("by-id"));
    let mut want = vec![fs_id.clone(), raw_id.clone()];
    want.sort();
    ids.sort();
    assert_eq!(ids, want);

    let in_label = |label: &str| {
        let d = dir.join("by-label").join(label);
        let entries = names(&d);
        assert_eq!(entries.len(), 1, "{entries:?}");
        d.join(&entries[0])
    };
    let fs_dir = in_label("app=web%2Fsite");
    assert_eq!(names(&fs_dir), ["backup.json", "image"]);
    cmp(&fs_dir.join("image"), &fs_img);
    cmp(&dir.join("by-id").join(&raw_id).join("image"), &raw);
    cmp(&in_label("kind=raw").join("image"), &raw);
    assert_eq!(std::fs::metadata(fs_dir.join("image")).unwrap().len(), std::fs::metadata(&fs_img).unwrap().len());
    let meta = json(&std::fs::read_to_string(fs_dir.join("backup.json")).unwrap());
    assert_eq!(meta["id"], fs_id.as_str());
    assert_eq!(meta["labels"]["app"], "web/site");

    // Read-only.
    let w = std::fs::OpenOptions::new().write(true).open(fs_dir.join("image"));
    assert!(w.is_err(), "write access must be refused");
    assert!(std::fs::write(dir.join("by-time/new"), b"x").is_err());

    // As root: the ext4 image opens with a read-only loop mount and its files match.
    if let (true, Some(inner)) = (is_root(), &inner) {
        let lm = t.path().join("loop");
        std::fs::create_dir_all(&lm).unwrap();
        let st = Command::new("mount").args(["-o", "loop,ro"]).arg(fs_dir.join("image")).arg(&lm).status().unwrap();
        assert!(st.success(), "mount -o loop,ro of the backup's image failed");
        m.loop_mnt = Some(lm.clone());
        cmp(&lm.join("sub/random.bin"), inner);
        cmp(&lm.join("notes.txt"), &t.path().join("files/notes.txt"));
        let st = Command::new("umount").arg(&lm).status().unwrap();
        assert!(st.success());
        m.loop_mnt = None;
    } else {
        eprintln!("not root or no mkfs.ext4: the loop mount part is skipped");
    }

    let st = m.stop();
    assert!(st.success(), "backup mount exited with {st}");
    assert!(!is_mounted(&dir), "unmounted on SIGTERM");
}

#[test]
fn backup_mount_errors_are_clear() {
    let t = TestRepo::uninitialised();
    let repo = t.url.clone();
    let out = hl(&["backup", "mount", p(&t.path().join("mnt")), "--repo", &repo]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no repository at"), "{out:?}");
    ok(hl(&["backup", "init", "--repo", &repo]));
    let mut c = hl(&["backup", "mount", p(&t.path().join("mnt")), "--repo", &repo]);
    c.env("HLSTORE_REPO_PASSWORD", "wrong");
    let out = c.output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("wrong repository password"), "{out:?}");
}

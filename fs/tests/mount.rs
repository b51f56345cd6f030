//! Real FUSE mounts of a temporary store, exercised through std::fs and libc.
//! Needs root and /dev/fuse; skips (with a message) otherwise.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

mod common;
use common::can_mount;
use dm_fs::{cleanup_stale_mount, Leftover, Mount, MountOptions};
use dm_store::{CommitRequest, DotName, FileKind, Store};

struct Fixture {
    store: Arc<Store>,
    dot: DotName,
    mount: Option<Mount>,
    mnt: PathBuf,
    _dir: tempfile::TempDir,
}

impl Fixture {
    /// Commits the branch master with message `msg`.
    fn commit(&self, msg: &str) -> dm_store::CommitInfo {
        let req = CommitRequest {
            message: msg.to_string(),
            author: "test".to_string(),
            metadata: BTreeMap::new(),
        };
        self.store.commit(&self.dot, "master", req).unwrap()
    }

    fn p(&self, rel: &str) -> PathBuf {
        self.mnt.join(rel)
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        if let Some(m) = self.mount.take() {
            if let Err(e) = m.unmount() {
                eprintln!("unmount failed: {e}");
            }
        }
    }
}

fn setup(subdot: &str) -> Option<Fixture> {
    if !can_mount() {
        return None;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(&dir.path().join("store")).expect("open store");
    let dot = DotName::new("fstest").expect("dot name");
    store.create_dot(&dot, None).expect("create dot");
    let fs = store.branch_fs(&dot, "master").expect("branch fs");
    let mnt = dir.path().join("mnt");
    fs::create_dir(&mnt).expect("mkdir mnt");
    let mount = Mount::mount(&mnt, fs, subdot, &MountOptions::default()).expect("mount");
    Some(Fixture {
        store,
        dot,
        mount: Some(mount),
        mnt,
        _dir: dir,
    })
}

fn cpath(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).expect("no NUL in test paths")
}

#[test]
fn create_write_read_append() {
    let Some(f) = setup("__default__") else {
        return;
    };
    let p = f.p("hello.txt");
    fs::write(&p, b"hello").unwrap();
    assert_eq!(fs::read(&p).unwrap(), b"hello");
    let mut a = OpenOptions::new().append(true).open(&p).unwrap();
    a.write_all(b" world").unwrap();
    drop(a);
    assert_eq!(fs::read(&p).unwrap(), b"hello world");
    // Overwrite in the middle, read at an offset.
    let mut w = OpenOptions::new().read(true).write(true).open(&p).unwrap();
    w.seek(SeekFrom::Start(6)).unwrap();
    w.write_all(b"WORLD").unwrap();
    w.seek(SeekFrom::Start(4)).unwrap();
    let mut buf = [0u8; 4];
    w.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"o WO");
    drop(w);
    assert_eq!(fs::metadata(&p).unwrap().len(), 11);
    // Create with O_EXCL on an existing name fails.
    let e = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&p)
        .unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EEXIST));
}

/// Files opened with O_APPEND bypass the page cache (one request per
/// write(2)); the rest of the mount must not notice: a reader that cached
/// the last partial page sees the appended bytes, and a shared mapping of
/// an O_RDWR|O_APPEND descriptor works and stays coherent with its writes.
#[test]
fn appends_stay_coherent_with_cached_readers_and_mappings() {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::FileExt;
    let Some(f) = setup("__default__") else {
        return;
    };
    let p = f.p("log");
    fs::write(&p, [b'a'; 5000]).unwrap();
    let reader = File::open(&p).unwrap();
    let mut buf = vec![0u8; 8192];
    assert_eq!(reader.read_at(&mut buf, 0).unwrap(), 5000);
    let mut appender = OpenOptions::new().append(true).open(&p).unwrap();
    appender.write_all(&[b'B'; 100]).unwrap();
    let mut want = vec![b'a'; 5000];
    want.extend_from_slice(&[b'B'; 100]);
    assert_eq!(reader.read_at(&mut buf, 0).unwrap(), 5100);
    assert!(buf[..5100] == want[..], "a cached reader missed an append");

    let rw = OpenOptions::new().read(true).append(true).open(&p).unwrap();
    // SAFETY: mapping the first 5100 bytes of a 5100-byte file, shared.
    let addr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            5100,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            rw.as_raw_fd(),
            0,
        )
    };
    assert_ne!(
        addr,
        libc::MAP_FAILED,
        "mmap of an O_APPEND descriptor: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: addr maps 5100 writable bytes.
    unsafe { std::ptr::copy_nonoverlapping(b"MMM".as_ptr(), addr.cast::<u8>(), 3) };
    // SAFETY: addr maps 5100 bytes.
    assert_eq!(unsafe { libc::msync(addr, 5100, libc::MS_SYNC) }, 0);
    (&rw).write_all(&[b'C'; 10]).unwrap();
    want[..3].copy_from_slice(b"MMM");
    want.extend_from_slice(&[b'C'; 10]);
    assert_eq!(fs::read(&p).unwrap(), want);
    // Reads through the O_APPEND descriptor are direct too: any offset,
    // short at the end.
    let mut tail = [0u8; 64];
    assert_eq!(rw.read_at(&mut tail, 5090).unwrap(), 20);
    assert_eq!(&tail[..20], &want[5090..]);
    // SAFETY: addr maps 5100 bytes, unmapped once.
    unsafe {
        assert_eq!(*addr.cast::<u8>().add(5099), b'B');
        libc::munmap(addr, 5100);
    }
}

#[test]
fn readahead_is_raised_to_the_largest_read() {
    let Some(f) = setup("__default__") else {
        return;
    };
    // The kernel starts a FUSE mount at 128 KiB of readahead; the mount
    // raises it to 1 MiB (sequential reads then come as 1 MiB READs).
    let dev = fs::metadata(&f.mnt).unwrap().dev();
    let sysfs = format!(
        "/sys/class/bdi/{}:{}/read_ahead_kb",
        libc::major(dev),
        libc::minor(dev)
    );
    assert_eq!(
        fs::read_to_string(&sysfs).unwrap().trim(),
        "1024",
        "{sysfs}"
    );
}

#[test]
fn large_file_round_trip() {
    let Some(f) = setup("__default__") else {
        return;
    };
    // 5 MiB + a bit: many blocks, 1 MiB writes, a sparse hole.
    let mut data = vec![0u8; 5 * 1024 * 1024 + 12345];
    for (i, b) in data.iter_mut().enumerate() {
        *b = (i % 251) as u8;
    }
    let p = f.p("big.bin");
    fs::write(&p, &data).unwrap();
    assert_eq!(fs::read(&p).unwrap(), data);
    let sparse = f.p("sparse.bin");
    let mut s = File::create(&sparse).unwrap();
    s.seek(SeekFrom::Start(3 * 1024 * 1024)).unwrap();
    s.write_all(b"end").unwrap();
    drop(s);
    let back = fs::read(&sparse).unwrap();
    assert_eq!(back.len(), 3 * 1024 * 1024 + 3);
    assert!(back[..3 * 1024 * 1024].iter().all(|b| *b == 0));
    assert_eq!(&back[3 * 1024 * 1024..], b"end");
}

#[test]
fn mkdir_readdir_many() {
    let Some(f) = setup("__default__") else {
        return;
    };
    let d = f.p("many");
    fs::create_dir(&d).unwrap();
    let n = 1500;
    for i in 0..n {
        File::create(d.join(format!("file-{i:05}-with-a-longer-name"))).unwrap();
    }
    fs::create_dir(d.join("sub")).unwrap();
    let mut names: Vec<String> = fs::read_dir(&d)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names.len(), n + 1);
    assert_eq!(names[0], "file-00000-with-a-longer-name");
    assert_eq!(names[n], "sub");
    let mut dedup = names.clone();
    dedup.dedup();
    assert_eq!(dedup.len(), names.len(), "readdir returned duplicates");
    assert_eq!(fs::metadata(&d).unwrap().nlink(), 3);
    // rmdir of a non-empty dir fails; removing everything then works.
    assert_eq!(
        fs::remove_dir(&d).unwrap_err().raw_os_error(),
        Some(libc::ENOTEMPTY)
    );
    fs::remove_dir_all(&d).unwrap();
    assert!(!d.exists());
}

#[test]
fn rename_and_overwrite() {
    let Some(f) = setup("__default__") else {
        return;
    };
    fs::write(f.p("a"), b"A").unwrap();
    fs::write(f.p("b"), b"B").unwrap();
    fs::rename(f.p("a"), f.p("c")).unwrap();
    assert!(!f.p("a").exists());
    assert_eq!(fs::read(f.p("c")).unwrap(), b"A");
    // Overwrite an existing target.
    fs::rename(f.p("c"), f.p("b")).unwrap();
    assert_eq!(fs::read(f.p("b")).unwrap(), b"A");
    assert!(!f.p("c").exists());
    // Across directories, and a directory itself.
    fs::create_dir(f.p("d1")).unwrap();
    fs::create_dir(f.p("d2")).unwrap();
    fs::rename(f.p("b"), f.p("d1/b")).unwrap();
    fs::rename(f.p("d1"), f.p("d2/d1")).unwrap();
    assert_eq!(fs::read(f.p("d2/d1/b")).unwrap(), b"A");
    // RENAME_NOREPLACE refuses an existing target.
    fs::write(f.p("x"), b"X").unwrap();
    fs::write(f.p("y"), b"Y").unwrap();
    let (x, y) = (cpath(&f.p("x")), cpath(&f.p("y")));
    // SAFETY: valid C strings; AT_FDCWD with absolute paths.
    let r = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            x.as_ptr(),
            libc::AT_FDCWD,
            y.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    assert_eq!(r, -1);
    assert_eq!(
        std::io::Error::last_os_error().raw_os_error(),
        Some(libc::EEXIST)
    );
    // RENAME_EXCHANGE swaps.
    // SAFETY: as above.
    let r = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            x.as_ptr(),
            libc::AT_FDCWD,
            y.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    assert_eq!(r, 0, "{}", std::io::Error::last_os_error());
    assert_eq!(fs::read(f.p("x")).unwrap(), b"Y");
    assert_eq!(fs::read(f.p("y")).unwrap(), b"X");
}

/// Readers of a file that another process saves by write-then-rename
/// (editors, config writers, package managers) read the old or the new
/// file, never ESTALE: the file a reader's kernel found stays until the
/// kernel forgets it, as on a native file system. Once nobody knows the
/// replaced files, they are freed (the store keeps no orphan).
#[test]
fn a_file_saved_by_rename_over_it_stays_readable_for_readers() {
    let Some(f) = setup("__default__") else {
        return;
    };
    fs::write(f.p("f"), b"0").unwrap();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let saver = {
        let (t, target, stop) = (f.p("t"), f.p("f"), stop.clone());
        std::thread::spawn(move || {
            let mut i = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                i += 1;
                fs::write(&t, i.to_string()).unwrap();
                fs::rename(&t, &target).unwrap();
            }
            i
        })
    };
    let readers: Vec<_> = (0..2)
        .map(|_| {
            let path = f.p("f");
            std::thread::spawn(move || {
                let started = std::time::Instant::now();
                let (mut reads, mut errors) = (0u64, Vec::new());
                while started.elapsed() < Duration::from_secs(4) {
                    match fs::read(&path) {
                        Ok(data) => assert!(!data.is_empty()),
                        Err(e) => errors.push(e.to_string()),
                    }
                    reads += 1;
                }
                (reads, errors)
            })
        })
        .collect();
    for r in readers {
        let (reads, errors) = r.join().unwrap();
        assert!(
            errors.is_empty(),
            "{} of {reads} reads failed: {:?}",
            errors.len(),
            &errors[..errors.len().min(3)]
        );
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let saves = saver.join().unwrap();
    assert!(saves > 100, "{saves} saves");
    // The replaced files go once the kernel forgets them.
    let branch = f.store.branch_fs(&f.dot, "master").unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while branch.orphan_count() > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "{} replaced files kept",
            branch.orphan_count()
        );
        fs::write("/proc/sys/vm/drop_caches", "2").unwrap();
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(fs::read(f.p("f")).unwrap(), saves.to_string().as_bytes());
}

#[test]
fn hard_links_and_symlinks() {
    let Some(f) = setup("__default__") else {
        return;
    };
    fs::write(f.p("orig"), b"data").unwrap();
    fs::hard_link(f.p("orig"), f.p("link")).unwrap();
    let m = fs::metadata(f.p("orig")).unwrap();
    assert_eq!(m.nlink(), 2);
    assert_eq!(m.ino(), fs::metadata(f.p("link")).unwrap().ino());
    fs::remove_file(f.p("orig")).unwrap();
    assert_eq!(fs::metadata(f.p("link")).unwrap().nlink(), 1);
    assert_eq!(fs::read(f.p("link")).unwrap(), b"data");

    std::os::unix::fs::symlink("link", f.p("sym")).unwrap();
    assert_eq!(fs::read_link(f.p("sym")).unwrap(), Path::new("link"));
    assert!(fs::symlink_metadata(f.p("sym"))
        .unwrap()
        .file_type()
        .is_symlink());
    assert_eq!(fs::read(f.p("sym")).unwrap(), b"data");
    std::os::unix::fs::symlink("/nonexistent/target", f.p("dangling")).unwrap();
    assert!(!f.p("dangling").exists());
}

#[test]
fn chmod_chown_utimes_truncate() {
    let Some(f) = setup("__default__") else {
        return;
    };
    let p = f.p("file");
    fs::write(&p, b"0123456789").unwrap();
    fs::set_permissions(&p, fs::Permissions::from_mode(0o640)).unwrap();
    assert_eq!(fs::metadata(&p).unwrap().mode() & 0o7777, 0o640);
    std::os::unix::fs::chown(&p, Some(1234), Some(4321)).unwrap();
    let m = fs::metadata(&p).unwrap();
    assert_eq!((m.uid(), m.gid()), (1234, 4321));
    // utimes with explicit times (incl. nanoseconds).
    let c = cpath(&p);
    let times = [
        libc::timespec {
            tv_sec: 1_000_000_000,
            tv_nsec: 5,
        },
        libc::timespec {
            tv_sec: 1_100_000_000,
            tv_nsec: 7,
        },
    ];
    // SAFETY: valid path and a two-element timespec array.
    let r = unsafe { libc::utimensat(libc::AT_FDCWD, c.as_ptr(), times.as_ptr(), 0) };
    assert_eq!(r, 0, "{}", std::io::Error::last_os_error());
    let m = fs::metadata(&p).unwrap();
    assert_eq!((m.atime(), m.atime_nsec()), (1_000_000_000, 5));
    assert_eq!((m.mtime(), m.mtime_nsec()), (1_100_000_000, 7));
    // Before 1970, with a fraction: -0.5 s is (secs -1, nsecs 500000000);
    // stored as -1.5 s once (`touch -d @-0.5`).
    let before = [
        libc::timespec {
            tv_sec: -1,
            tv_nsec: 500_000_000,
        },
        libc::timespec {
            tv_sec: -3,
            tv_nsec: 250_000_000,
        },
    ];
    // SAFETY: as above.
    let r = unsafe { libc::utimensat(libc::AT_FDCWD, c.as_ptr(), before.as_ptr(), 0) };
    assert_eq!(r, 0, "{}", std::io::Error::last_os_error());
    let m = fs::metadata(&p).unwrap();
    assert_eq!((m.atime(), m.atime_nsec()), (-1, 500_000_000));
    assert_eq!((m.mtime(), m.mtime_nsec()), (-3, 250_000_000));
    // UTIME_NOW.
    let now = [
        libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_NOW,
        },
        libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_NOW,
        },
    ];
    // SAFETY: as above.
    let r = unsafe { libc::utimensat(libc::AT_FDCWD, c.as_ptr(), now.as_ptr(), 0) };
    assert_eq!(r, 0);
    assert!(fs::metadata(&p).unwrap().mtime() > 1_100_000_000);

    // truncate down, up (zero fill), and via an open handle.
    let file = OpenOptions::new().write(true).open(&p).unwrap();
    file.set_len(4).unwrap();
    assert_eq!(fs::read(&p).unwrap(), b"0123");
    file.set_len(8).unwrap();
    assert_eq!(fs::read(&p).unwrap(), b"0123\0\0\0\0");
    drop(file);
    // O_TRUNC
    File::create(&p).unwrap();
    assert_eq!(fs::metadata(&p).unwrap().len(), 0);
    // umask applies to new files.
    // SAFETY: umask has no preconditions (process-wide, restored below).
    let old = unsafe { libc::umask(0o027) };
    fs::write(f.p("masked"), b"").unwrap();
    fs::create_dir(f.p("maskdir")).unwrap();
    // SAFETY: as above.
    unsafe { libc::umask(old) };
    assert_eq!(fs::metadata(f.p("masked")).unwrap().mode() & 0o777, 0o640);
    assert_eq!(fs::metadata(f.p("maskdir")).unwrap().mode() & 0o777, 0o750);
}

fn setxattr(p: &Path, name: &str, value: &[u8], flags: i32) -> std::io::Result<()> {
    let (c, n) = (cpath(p), CString::new(name).expect("no NUL"));
    // SAFETY: valid C strings and a valid buffer of value.len() bytes.
    let r = unsafe {
        libc::setxattr(
            c.as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            flags,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn getxattr(p: &Path, name: &str) -> std::io::Result<Vec<u8>> {
    let (c, n) = (cpath(p), CString::new(name).expect("no NUL"));
    let mut buf = vec![0u8; 4096];
    // SAFETY: valid C strings and a buffer of buf.len() bytes.
    let r = unsafe { libc::getxattr(c.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    buf.truncate(r as usize);
    Ok(buf)
}

fn listxattr(p: &Path) -> Vec<String> {
    let c = cpath(p);
    let mut buf = vec![0u8; 4096];
    // SAFETY: valid C string and buffer.
    let r = unsafe { libc::listxattr(c.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    assert!(r >= 0, "{}", std::io::Error::last_os_error());
    buf.truncate(r as usize);
    buf.split(|b| *b == 0)
        .filter(|s| !s.is_empty())
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect()
}

#[test]
fn xattrs() {
    let Some(f) = setup("__default__") else {
        return;
    };
    let p = f.p("x");
    fs::write(&p, b"").unwrap();
    setxattr(&p, "user.one", b"1", 0).unwrap();
    setxattr(&p, "user.two", b"second", 0).unwrap();
    assert_eq!(getxattr(&p, "user.one").unwrap(), b"1");
    // Names outside Linux's namespaces are refused, as by ext4, and a
    // namespace alone.
    for (bad, errno) in [
        ("foo", libc::EOPNOTSUPP),
        ("bogus.x", libc::EOPNOTSUPP),
        ("user.", libc::EINVAL),
    ] {
        assert_eq!(
            setxattr(&p, bad, b"1", 0).unwrap_err().raw_os_error(),
            Some(errno),
            "{bad}"
        );
    }
    // trusted.* names are listed to root only.
    setxattr(&p, "trusted.t", b"1", 0).unwrap();
    let listed_by_nobody = {
        use std::os::unix::process::CommandExt;
        let out = std::process::Command::new("python3")
            .args([
                "-c",
                "import os, sys; print(sorted(os.listxattr(sys.argv[1])))",
            ])
            .arg(&p)
            .uid(65534)
            .gid(65534)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    assert_eq!(listed_by_nobody, "['user.one', 'user.two']");
    assert!(listxattr(&p).contains(&"trusted.t".to_string()));
    let t = CString::new("trusted.t").unwrap();
    // SAFETY: valid C strings.
    assert_eq!(
        unsafe { libc::removexattr(cpath(&p).as_ptr(), t.as_ptr()) },
        0
    );
    // No access times are kept: the mount says noatime.
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap();
    let line = mountinfo
        .lines()
        .find(|l| l.split(' ').nth(4) == f.mnt.to_str())
        .unwrap();
    assert!(line.contains("noatime"), "{line}");
    let mut names = listxattr(&p);
    names.sort();
    assert_eq!(names, ["user.one", "user.two"]);
    assert_eq!(
        setxattr(&p, "user.one", b"x", libc::XATTR_CREATE)
            .unwrap_err()
            .raw_os_error(),
        Some(libc::EEXIST)
    );
    assert_eq!(
        setxattr(&p, "user.none", b"x", libc::XATTR_REPLACE)
            .unwrap_err()
            .raw_os_error(),
        Some(libc::ENODATA)
    );
    // Size query (size 0) and ERANGE.
    let (c, n) = (cpath(&p), CString::new("user.two").unwrap());
    // SAFETY: a null buffer with size 0 asks for the size only.
    let r = unsafe { libc::getxattr(c.as_ptr(), n.as_ptr(), std::ptr::null_mut(), 0) };
    assert_eq!(r, 6);
    let mut small = [0u8; 2];
    // SAFETY: valid buffer of 2 bytes.
    let r = unsafe { libc::getxattr(c.as_ptr(), n.as_ptr(), small.as_mut_ptr().cast(), 2) };
    assert_eq!(r, -1);
    assert_eq!(
        std::io::Error::last_os_error().raw_os_error(),
        Some(libc::ERANGE)
    );
    let n1 = CString::new("user.one").unwrap();
    // SAFETY: valid C strings.
    assert_eq!(unsafe { libc::removexattr(c.as_ptr(), n1.as_ptr()) }, 0);
    assert_eq!(
        getxattr(&p, "user.one").unwrap_err().raw_os_error(),
        Some(libc::ENODATA)
    );
}

#[test]
fn unlinked_open_file_stays_readable() {
    let Some(f) = setup("__default__") else {
        return;
    };
    let p = f.p("tmp");
    fs::write(&p, b"still here").unwrap();
    let mut h = OpenOptions::new().read(true).write(true).open(&p).unwrap();
    fs::remove_file(&p).unwrap();
    assert!(!p.exists());
    let mut s = String::new();
    h.read_to_string(&mut s).unwrap();
    assert_eq!(s, "still here");
    h.write_all(b"!").unwrap();
    h.seek(SeekFrom::Start(0)).unwrap();
    s.clear();
    h.read_to_string(&mut s).unwrap();
    assert_eq!(s, "still here!");
    assert_eq!(h.metadata().unwrap().nlink(), 0);
    drop(h);
}

#[test]
fn statfs_and_special_files() {
    let Some(f) = setup("__default__") else {
        return;
    };
    let c = cpath(&f.mnt);
    // SAFETY: zeroed statvfs is a valid out buffer.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid path and out pointer.
    assert_eq!(unsafe { libc::statvfs(c.as_ptr(), &mut st) }, 0);
    assert!(st.f_bsize > 0);
    assert!(st.f_namemax >= 255);

    let fifo = cpath(&f.p("fifo"));
    // SAFETY: valid path.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, 0);
    use std::os::unix::fs::FileTypeExt;
    assert!(fs::metadata(f.p("fifo")).unwrap().file_type().is_fifo());
    let dev = cpath(&f.p("null"));
    // SAFETY: valid path; creating a char device node as root.
    let r = unsafe { libc::mknod(dev.as_ptr(), libc::S_IFCHR | 0o600, libc::makedev(1, 3)) };
    assert_eq!(r, 0, "{}", std::io::Error::last_os_error());
    let m = fs::metadata(f.p("null")).unwrap();
    assert!(m.file_type().is_char_device());
    assert_eq!(m.rdev(), libc::makedev(1, 3));
}

#[test]
fn root_subdot_and_stale_cleanup() {
    let Some(f) = setup("__root__") else {
        return;
    };
    fs::create_dir(f.p("__default__")).unwrap();
    fs::write(f.p("__default__/f"), b"x").unwrap();
    assert_eq!(fs::read(f.p("__default__/f")).unwrap(), b"x");
    // A second mount of a subdot shows the same tree.
    let fs2 = f.store.branch_fs(&f.dot, "master").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let m2 = Mount::mount(dir.path(), fs2, "__default__", &MountOptions::default()).unwrap();
    assert_eq!(fs::read(dir.path().join("f")).unwrap(), b"x");
    assert_eq!(m2.path(), dir.path());
    assert_eq!(m2.branch(), "master");
    // A mount that answers is a live server's: left alone.
    assert_eq!(cleanup_stale_mount(dir.path()).unwrap(), Leftover::Live);
    assert_eq!(fs::read(dir.path().join("f")).unwrap(), b"x");
    m2.unmount().unwrap();
    // Not mounted: a no-op.
    assert_eq!(cleanup_stale_mount(dir.path()).unwrap(), Leftover::None);
}

#[test]
fn switch_between_branches_and_after_reset() {
    let Some(mut f) = setup("__default__") else {
        return;
    };
    fs::write(f.p("data"), b"commit one").unwrap();
    fs::create_dir(f.p("dir")).unwrap();
    fs::write(f.p("dir/inner"), b"inner A").unwrap();
    let c1 = f.commit("one");

    f.store
        .create_branch(&f.dot, "b", Some(c1.id))
        .expect("create branch");
    let fs_b = f.store.branch_fs(&f.dot, "b").unwrap();
    let fs_a = f.store.branch_fs(&f.dot, "master").unwrap();
    let mount = f.mount.take().expect("mounted");

    // Keep kernel caches warm on A: stat and read everything first.
    assert_eq!(fs::read(f.p("dir/inner")).unwrap(), b"inner A");

    mount.switch(fs_b.clone()).unwrap();
    assert_eq!(mount.branch(), "b");
    assert_eq!(fs::read(f.p("data")).unwrap(), b"commit one");
    fs::write(f.p("data"), b"branch B!").unwrap();
    fs::write(f.p("dir/inner"), b"inner B").unwrap();
    fs::write(f.p("only-b"), b"b").unwrap();
    fs::remove_dir_all(f.p("dir")).unwrap();
    fs::create_dir(f.p("dir")).unwrap();
    fs::write(f.p("dir/inner"), b"inner B2").unwrap();

    mount.switch(fs_a.clone()).unwrap();
    assert_eq!(mount.branch(), "master");
    assert_eq!(fs::read(f.p("data")).unwrap(), b"commit one");
    assert_eq!(fs::read(f.p("dir/inner")).unwrap(), b"inner A");
    assert!(!f.p("only-b").exists());

    mount.switch(fs_b.clone()).unwrap();
    assert_eq!(fs::read(f.p("data")).unwrap(), b"branch B!");
    assert_eq!(fs::read(f.p("dir/inner")).unwrap(), b"inner B2");
    assert!(f.p("only-b").exists());

    // Dirty the mounted branch, then reset --hard and switch to the same BranchFs.
    fs::write(f.p("data"), b"dirty").unwrap();
    fs::write(f.p("new-file"), b"new").unwrap();
    assert_eq!(fs::read(f.p("data")).unwrap(), b"dirty");
    f.store.reset(&f.dot, "b", c1.id, true).unwrap();
    mount.switch(fs_b).unwrap();
    assert_eq!(fs::read(f.p("data")).unwrap(), b"commit one");
    assert_eq!(fs::read(f.p("dir/inner")).unwrap(), b"inner A");
    assert!(!f.p("new-file").exists());
    assert!(!f.p("only-b").exists());
    mount.unmount().unwrap();
}

/// A reset that brings back a file deleted while open gives the restored
/// file another node id (the old one is dead: ESTALE), and both are let go
/// once the kernel forgets them.
#[test]
fn node_ids_a_reset_made_dead_are_let_go() {
    let Some(mut f) = setup("__default__") else {
        return;
    };
    fs::write(f.p("f"), b"committed").unwrap();
    let c1 = f.commit("one");
    let mount = f.mount.take().expect("mounted");
    let stale = File::open(f.p("f")).unwrap();
    let old_ino = stale.metadata().unwrap().ino();
    fs::remove_file(f.p("f")).unwrap();
    f.store.reset(&f.dot, "master", c1.id, true).unwrap();
    mount
        .switch(f.store.branch_fs(&f.dot, "master").unwrap())
        .unwrap();
    let err = stale.set_permissions(PermissionsExt::from_mode(0o600));
    assert_eq!(err.unwrap_err().raw_os_error(), Some(libc::ESTALE));
    let back = fs::metadata(f.p("f")).unwrap();
    assert_ne!(
        back.ino(),
        old_ino,
        "the restored file shares the dead node id"
    );
    assert_eq!(back.mode() & 0o777, 0o644);
    assert_eq!(fs::read(f.p("f")).unwrap(), b"committed");
    assert_eq!(mount.stale_ids(), (1, 1));
    drop(stale);
    let mut left = mount.stale_ids();
    for _ in 0..50 {
        fs::write("/proc/sys/vm/drop_caches", "2").unwrap();
        std::thread::sleep(Duration::from_millis(100));
        left = mount.stale_ids();
        if left == (0, 0) {
            break;
        }
    }
    assert_eq!(left, (0, 0), "dead node ids and aliases kept");
    mount.unmount().unwrap();
}

/// Files open across a checkout (another branch) and a reset (the same
/// branch, an earlier state).
#[test]
fn open_files_across_checkout_and_reset() {
    let Some(mut f) = setup("__default__") else {
        return;
    };
    fs::write(f.p("f"), b"master").unwrap();
    let c1 = f.commit("one");
    f.store.create_branch(&f.dot, "b", Some(c1.id)).unwrap();
    let fs_b = f.store.branch_fs(&f.dot, "b").unwrap();
    let mount = f.mount.take().expect("mounted");

    // Opened on master; after the checkout the path shows b's file of the
    // same inode number. The old descriptor must not read, write or
    // truncate it: EIO.
    let mut old = OpenOptions::new()
        .read(true)
        .write(true)
        .open(f.p("f"))
        .unwrap();
    mount.switch(fs_b.clone()).unwrap();
    let mut buf = [0u8; 6];
    let err = old.read(&mut buf).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "read: {err}");
    let err = old.write_all(b"oops").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "write: {err}");
    let err = old.set_len(0).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "ftruncate: {err}");
    drop(old);
    assert_eq!(fs::read(f.p("f")).unwrap(), b"master");

    // A reset keeps the branch: a file open across it that the reset keeps
    // is the same file; one it discards never lends its number to a new
    // file, so writes through the old descriptor cannot land in another.
    let mut kept = OpenOptions::new().write(true).open(f.p("f")).unwrap();
    let mut gone = File::create(f.p("discarded")).unwrap();
    let gone_ino = fs::metadata(f.p("discarded")).unwrap().ino();
    f.store.reset(&f.dot, "b", c1.id, true).unwrap();
    mount.switch(fs_b).unwrap();
    fs::write(f.p("new"), b"new").unwrap();
    assert_ne!(fs::metadata(f.p("new")).unwrap().ino(), gone_ino);
    let _ = gone.write_all(b"stale");
    drop(gone);
    assert_eq!(fs::read(f.p("new")).unwrap(), b"new");
    kept.write_all(b"MASTER").unwrap();
    drop(kept);
    assert_eq!(fs::read(f.p("f")).unwrap(), b"MASTER");

    // O_RDONLY|O_TRUNC truncates, as on Linux's own file systems.
    let fd = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_TRUNC)
        .open(f.p("f"))
        .unwrap();
    drop(fd);
    assert_eq!(fs::metadata(f.p("f")).unwrap().len(), 0);
    mount.unmount().unwrap();
}

#[test]
fn absent_names_are_cached_until_the_mount_is_told() {
    let Some(mut f) = setup("__default__") else {
        return;
    };
    let mount = f.mount.take().expect("mounted");
    assert!(!f.p("later").exists());
    // Created behind the kernel's back (no mount is told): the kernel keeps
    // answering "absent" from its negative entry, without asking us.
    let fs_a = f.store.branch_fs(&f.dot, "master").unwrap();
    let dir = fs_a.subdot_ino("__default__", false).unwrap();
    fs_a.mknod(dir, b"later", FileKind::File, 0o644, 0, 0, 0)
        .unwrap();
    assert!(
        !f.p("later").exists(),
        "the absent name was not cached (a LOOKUP per stat)"
    );
    // A switch (checkout, reset) drops negative entries with the rest.
    mount.switch(fs_a).unwrap();
    assert!(f.p("later").exists());
    // Names created through the mount itself replace their negative entry.
    assert!(!f.p("mine").exists());
    fs::write(f.p("mine"), b"x").unwrap();
    assert_eq!(fs::read(f.p("mine")).unwrap(), b"x");
    fs::remove_file(f.p("mine")).unwrap();
    assert!(!f.p("mine").exists());
    mount.unmount().unwrap();
}

/// Appends a line to `path` as uid/gid 65534 (no CAP_FSETID).
/// `echo more REDIRECT path` as user nobody (`>>` appends, `>` truncates).
fn write_as_nobody(path: &Path, redirect: &str) {
    use std::os::unix::process::CommandExt;
    let st = std::process::Command::new("/bin/sh")
        .arg("-c")
        .arg(format!("echo more {redirect} '{}'", path.display()))
        .uid(65534)
        .gid(65534)
        .status()
        .unwrap();
    assert!(st.success());
}

#[test]
fn writes_and_chown_clear_setid_bits() {
    let Some(f) = setup("__default__") else {
        return;
    };
    let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o7777;
    // A non-root writer clears S_ISUID and S_ISGID (group-executable).
    fs::write(f.p("suid"), b"x").unwrap();
    fs::set_permissions(f.p("suid"), fs::Permissions::from_mode(0o6777)).unwrap();
    write_as_nobody(&f.p("suid"), ">>");
    assert_eq!(
        mode(&f.p("suid")),
        0o777,
        "write by nobody keeps set-id bits"
    );
    // Root (CAP_FSETID) keeps them.
    fs::set_permissions(f.p("suid"), fs::Permissions::from_mode(0o6777)).unwrap();
    OpenOptions::new()
        .append(true)
        .open(f.p("suid"))
        .unwrap()
        .write_all(b"root")
        .unwrap();
    assert_eq!(mode(&f.p("suid")), 0o6777);
    // S_ISGID without group execute (mandatory locking) stays.
    fs::set_permissions(f.p("suid"), fs::Permissions::from_mode(0o6766)).unwrap();
    write_as_nobody(&f.p("suid"), ">>");
    assert_eq!(mode(&f.p("suid")), 0o2766);
    // So does an open with O_TRUNC by nobody (no SETATTR reaches us; the
    // kernel drops the attributes it cached).
    fs::set_permissions(f.p("suid"), fs::Permissions::from_mode(0o4777)).unwrap();
    assert_eq!(mode(&f.p("suid")), 0o4777);
    write_as_nobody(&f.p("suid"), ">");
    eventually("set-id bits cleared by a truncating open", || {
        mode(&f.p("suid")) == 0o777
    });
    // chown of a regular file clears them, even by root; not on directories.
    fs::set_permissions(f.p("suid"), fs::Permissions::from_mode(0o6755)).unwrap();
    std::os::unix::fs::chown(f.p("suid"), Some(65534), None).unwrap();
    assert_eq!(mode(&f.p("suid")), 0o755);
    fs::create_dir(f.p("sgid-dir")).unwrap();
    fs::set_permissions(f.p("sgid-dir"), fs::Permissions::from_mode(0o2775)).unwrap();
    std::os::unix::fs::chown(f.p("sgid-dir"), Some(65534), None).unwrap();
    assert_eq!(mode(&f.p("sgid-dir")), 0o2775);
    // Any write drops file capabilities, root's too, appends included (they
    // bypass the page cache, whose write path the kernel drops them in).
    // VFS_CAP_REVISION_2, CAP_NET_BIND_SERVICE permitted.
    let cap = [1u8, 0, 0, 2, 0, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    fs::write(f.p("capped"), b"x").unwrap();
    fs::set_permissions(f.p("capped"), fs::Permissions::from_mode(0o777)).unwrap();
    let has_cap = || getxattr(&f.p("capped"), "security.capability").is_ok();
    for (how, write) in [
        (
            "root's append",
            &(|| {
                OpenOptions::new()
                    .append(true)
                    .open(f.p("capped"))
                    .unwrap()
                    .write_all(b"root")
                    .unwrap()
            }) as &dyn Fn(),
        ),
        ("nobody's append", &|| write_as_nobody(&f.p("capped"), ">>")),
        ("root's overwrite", &|| {
            OpenOptions::new()
                .write(true)
                .open(f.p("capped"))
                .unwrap()
                .write_all(b"r")
                .unwrap()
        }),
    ] {
        setxattr(&f.p("capped"), "security.capability", &cap, 0).unwrap();
        assert!(has_cap());
        write();
        assert!(!has_cap(), "{how} kept security.capability");
    }
}

/// `ls -l` of a big directory (readdirplus hands out attributes with the
/// names), then a switch to a branch where every file changed: nothing the
/// kernel learned through readdirplus may survive the switch.
#[test]
fn listing_with_attributes_then_switch() {
    let Some(mut f) = setup("__default__") else {
        return;
    };
    fs::create_dir(f.p("many")).unwrap();
    for i in 0..300 {
        fs::write(f.p(&format!("many/f{i}")), vec![b'x'; i]).unwrap();
    }
    let listing = |dir: &Path| -> BTreeMap<String, u64> {
        fs::read_dir(dir)
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                let len = e.metadata().unwrap().len();
                (e.file_name().to_string_lossy().into_owned(), len)
            })
            .collect()
    };
    let before = listing(&f.p("many"));
    assert_eq!(before.len(), 300);
    assert!((0..300).all(|i| before[&format!("f{i}")] == i as u64));

    let c = f.commit("many");
    f.store.create_branch(&f.dot, "grown", Some(c.id)).unwrap();
    let grown = f.store.branch_fs(&f.dot, "grown").unwrap();
    let dir = grown
        .lookup(grown.subdot_ino("__default__", false).unwrap(), b"many")
        .unwrap();
    for i in 0..300 {
        let a = grown.lookup(dir.ino, format!("f{i}").as_bytes()).unwrap();
        grown.write(a.ino, i as u64, b"+").unwrap();
        grown.flush(a.ino).unwrap();
    }
    grown.unlink(dir.ino, b"f0").unwrap();
    let mount = f.mount.take().unwrap();
    mount.switch(grown).unwrap();
    let after = listing(&f.p("many"));
    assert_eq!(after.len(), 299);
    assert!((1..300).all(|i| after[&format!("f{i}")] == i as u64 + 1));
    assert!(!f.p("many/f0").exists());
    mount.unmount().unwrap();
}

/// Polls `check` for up to 20 s (a loaded machine): other mounts learn of a change a moment
/// after the call that made it returns (see dm-fs `peers`). Without the
/// invalidation they would serve their cached answer for the whole TTL.
fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !check() {
        assert!(
            std::time::Instant::now() < deadline,
            "other mount never saw: {what}"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

#[test]
fn two_mounts_of_one_branch_stay_coherent() {
    let Some(f) = setup("__default__") else {
        return;
    };
    // A second mount of the same branch (as a followed path and a pinned
    // dot@branch path are), and a third of the whole dot tree.
    let fs_a = f.store.branch_fs(&f.dot, "master").unwrap();
    let other = f._dir.path().join("other");
    let tree = f._dir.path().join("tree");
    fs::create_dir(&other).unwrap();
    fs::create_dir(&tree).unwrap();
    let m2 = Mount::mount(
        &other,
        fs_a.clone(),
        "__default__",
        &MountOptions::default(),
    )
    .unwrap();
    let m3 = Mount::mount(&tree, fs_a, "__root__", &MountOptions::default()).unwrap();
    let o = |rel: &str| other.join(rel);
    let t = |rel: &str| tree.join("__default__").join(rel);

    // Warm every cache: names, attributes, pages.
    fs::write(f.p("file"), b"version one").unwrap();
    fs::create_dir(f.p("dir")).unwrap();
    fs::write(f.p("dir/inner"), b"inner").unwrap();
    fs::hard_link(f.p("file"), f.p("link")).unwrap();
    for p in [o("file"), t("file")] {
        assert_eq!(fs::read(&p).unwrap(), b"version one");
    }
    assert_eq!(fs::metadata(o("link")).unwrap().nlink(), 2);
    assert_eq!(fs::read(o("dir/inner")).unwrap(), b"inner");

    // Same-size overwrite through the first mount: pages must be dropped.
    {
        let mut fh = OpenOptions::new().write(true).open(f.p("file")).unwrap();
        fh.write_all(b"VERSION TWO").unwrap();
    }
    eventually("an overwrite", || {
        fs::read(o("file")).unwrap() == b"VERSION TWO"
    });
    eventually("an overwrite (tree)", || {
        fs::read(t("file")).unwrap() == b"VERSION TWO"
    });

    // Append: size and data.
    OpenOptions::new()
        .append(true)
        .open(o("file"))
        .unwrap()
        .write_all(b" + more")
        .unwrap();
    eventually("an append", || {
        fs::read(f.p("file")).unwrap() == b"VERSION TWO + more"
    });

    // Truncate, chmod, unlink of one hard link, rename, rmdir.
    OpenOptions::new()
        .write(true)
        .open(f.p("file"))
        .unwrap()
        .set_len(3)
        .unwrap();
    eventually("a truncate", || fs::read(o("file")).unwrap() == b"VER");
    fs::set_permissions(f.p("file"), fs::Permissions::from_mode(0o600)).unwrap();
    eventually("a chmod", || {
        fs::metadata(o("file")).unwrap().permissions().mode() & 0o777 == 0o600
    });
    fs::remove_file(f.p("link")).unwrap();
    eventually("an unlink", || !o("link").exists());
    eventually("the link count", || {
        fs::metadata(o("file")).unwrap().nlink() == 1
    });
    fs::rename(o("dir/inner"), o("moved")).unwrap();
    eventually("a rename", || {
        !f.p("dir/inner").exists() && fs::read(f.p("moved")).unwrap() == b"inner"
    });
    fs::remove_dir(o("dir")).unwrap();
    eventually("an rmdir", || !f.p("dir").exists() && !t("dir").exists());

    // Names another mount has cached as absent: every way of creating one.
    let names = [
        "new-file", "new-dir", "new-sym", "new-link", "renamed", "node",
    ];
    for n in names {
        assert!(!o(n).exists() && !t(n).exists());
    }
    fs::write(f.p("new-file"), b"n").unwrap();
    fs::create_dir(f.p("new-dir")).unwrap();
    std::os::unix::fs::symlink("new-file", f.p("new-sym")).unwrap();
    fs::hard_link(f.p("new-file"), f.p("new-link")).unwrap();
    fs::rename(f.p("moved"), f.p("renamed")).unwrap();
    let node = cpath(&f.p("node"));
    // SAFETY: a valid NUL-terminated path; mknod of a FIFO has no other
    // preconditions.
    assert_eq!(
        unsafe { libc::mknod(node.as_ptr(), libc::S_IFIFO | 0o644, 0) },
        0
    );
    for n in names {
        eventually(n, || {
            o(n).symlink_metadata().is_ok() && t(n).symlink_metadata().is_ok()
        });
    }
    assert_eq!(fs::read(o("new-sym")).unwrap(), b"n");

    // A rename over one of two hard links: the other mount's cached link
    // count of the file drops too.
    assert_eq!(fs::metadata(o("new-link")).unwrap().nlink(), 2);
    fs::write(f.p("over"), b"o").unwrap();
    fs::rename(f.p("over"), f.p("new-file")).unwrap();
    eventually("the link count after a rename over a link", || {
        fs::metadata(o("new-link")).unwrap().nlink() == 1
    });

    // A subdot mounted later appears in the tree mount that found it absent.
    assert!(!tree.join("later").exists());
    let later = f._dir.path().join("later");
    fs::create_dir(&later).unwrap();
    let fs_l = f.store.branch_fs(&f.dot, "master").unwrap();
    let m4 = Mount::mount(&later, fs_l, "later", &MountOptions::default()).unwrap();
    eventually("a new subdot", || tree.join("later").is_dir());
    m4.unmount().unwrap();

    // So does one a switch makes: mounted on another branch, then switched
    // to this one, where it did not exist.
    assert!(!tree.join("switched").exists());
    let c = f.commit("for b2");
    f.store.create_branch(&f.dot, "b2", Some(c.id)).unwrap();
    let sw = f._dir.path().join("switched");
    fs::create_dir(&sw).unwrap();
    let fs_b2 = f.store.branch_fs(&f.dot, "b2").unwrap();
    let m5 = Mount::mount(&sw, fs_b2, "switched", &MountOptions::default()).unwrap();
    assert!(!tree.join("switched").exists());
    m5.switch(f.store.branch_fs(&f.dot, "master").unwrap())
        .unwrap();
    eventually("a subdot made by a switch", || {
        tree.join("switched").is_dir()
    });
    m5.unmount().unwrap();

    m3.unmount().unwrap();
    m2.unmount().unwrap();
}

/// Once a save by write-then-rename on one mount has fsynced its
/// directory, a write by path on another mount of the branch reaches the
/// new file: it went, 2 times in 300 (here 1 to 3 in 1,500), to the replaced file (deleted, kept
/// while the other kernel knew it), and was lost with it.
#[test]
fn a_write_on_another_mount_after_a_synced_rename_reaches_the_new_file() {
    let Some(f) = setup("__default__") else {
        return;
    };
    let other = f._dir.path().join("other");
    fs::create_dir(&other).unwrap();
    let fs_a = f.store.branch_fs(&f.dot, "master").unwrap();
    let m2 = Mount::mount(&other, fs_a, "__default__", &MountOptions::default()).unwrap();
    fs::write(f.p("b"), b"first\n").unwrap();
    let mut lost = Vec::new();
    for i in 0..1500 {
        let new = format!("new{i}\n");
        fs::write(f.p("b.tmp"), &new).unwrap();
        fs::rename(f.p("b.tmp"), f.p("b")).unwrap();
        File::open(&f.mnt).unwrap().sync_all().unwrap();
        // Looked up (and cached) on the other mount before the next round.
        OpenOptions::new()
            .append(true)
            .open(other.join("b"))
            .unwrap()
            .write_all(b"X")
            .unwrap();
        if fs::read(f.p("b")).unwrap() != format!("{new}X").as_bytes() {
            lost.push(i);
        }
    }
    assert!(lost.is_empty(), "appends lost in rounds {lost:?}");
    m2.unmount().unwrap();
}

/// Not a test on its own: when DM_FS_CHILD_MOUNT is set, mounts a fresh store
/// there and sleeps, so that `dead_mount_is_cleaned_up` can SIGKILL it.
#[test]
fn child_mount_helper() {
    let Some(path) = std::env::var_os("DM_FS_CHILD_MOUNT") else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path()).expect("open store");
    let dot = DotName::new("child").expect("dot name");
    store.create_dot(&dot, None).expect("create dot");
    let fs = store.branch_fs(&dot, "master").expect("branch fs");
    let _m = Mount::mount(
        Path::new(&path),
        fs,
        "__default__",
        &MountOptions::default(),
    )
    .expect("mount");
    fs::write(Path::new(&path).join("alive"), b"1").expect("write");
    // Tell the parent only now: killing this process while one of its own
    // threads waits on its own mount (e.g. close() flushing to the writeback
    // cache) would leave that thread in D state forever.
    println!("DM_FS_CHILD_READY");
    std::io::stdout().flush().expect("flush stdout");
    std::thread::sleep(std::time::Duration::from_secs(60));
}

#[test]
fn dead_mount_is_cleaned_up() {
    if !can_mount() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("mnt");
    fs::create_dir(&mnt).unwrap();
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child_mount_helper", "--nocapture"])
        .env("DM_FS_CHILD_MOUNT", &mnt)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let ready = std::io::BufRead::lines(std::io::BufReader::new(stdout))
        .map_while(Result::ok)
        .any(|l| l.contains("DM_FS_CHILD_READY"));
    assert!(ready, "child never mounted");
    child.kill().unwrap(); // SIGKILL: the mount stays, its server is gone
    child.wait().unwrap();
    // (The root's attributes may still be cached by the kernel: ask for a name.)
    let e = fs::metadata(mnt.join("not-cached")).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::ENOTCONN));
    assert_eq!(cleanup_stale_mount(&mnt).unwrap(), Leftover::Detached);
    assert!(fs::metadata(&mnt).unwrap().is_dir());
    // The path can be mounted again.
    let store = Store::open(&dir.path().join("store")).unwrap();
    let dot = DotName::new("again").unwrap();
    store.create_dot(&dot, None).unwrap();
    let m = Mount::mount(
        &mnt,
        store.branch_fs(&dot, "master").unwrap(),
        "__default__",
        &MountOptions::default(),
    )
    .unwrap();
    fs::write(mnt.join("x"), b"x").unwrap();
    m.unmount().unwrap();
}

/// Not a test on its own: with DM_FS_CHILD_MMAP=FILE, maps FILE shared,
/// dirties 16 bytes at 4096 through the mapping, says ready and waits for
/// stdin to close. A separate process: a FUSE server must not fault on its
/// own mount (munmap holds mmap_lock while the kernel waits for writeback,
/// and the server's own allocations need that lock).
#[test]
fn child_mmap_writer() {
    let Some(path) = std::env::var_os("DM_FS_CHILD_MMAP") else {
        return;
    };
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .expect("open");
    use std::os::fd::AsRawFd;
    // SAFETY: mapping 8192 bytes of an open 8192-byte file, shared, RW.
    let addr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            8192,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            0,
        )
    };
    assert_ne!(addr, libc::MAP_FAILED);
    // SAFETY: addr maps 8192 writable bytes.
    unsafe { std::ptr::write_bytes(addr.cast::<u8>().add(4096), b'Z', 16) };
    println!("DM_FS_CHILD_READY");
    std::io::stdout().flush().expect("flush stdout");
    let mut rest = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut rest);
}

#[test]
fn sync_before_commit_captures_mmap_writes() {
    let Some(mut f) = setup("__default__") else {
        return;
    };
    let p = f.p("mapped");
    fs::write(&p, vec![b'a'; 8192]).unwrap();
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child_mmap_writer", "--nocapture"])
        .env("DM_FS_CHILD_MMAP", &p)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(stdout));
    let ready = lines
        .by_ref()
        .map_while(Result::ok)
        .any(|l| l.contains("DM_FS_CHILD_READY"));
    assert!(ready, "child never wrote");
    // The dirty page is still only in the kernel: sync() must bring it in.
    let mount = f.mount.take().expect("mounted");
    // (syncfs alone returned before the page reached the daemon in about 3
    // of 4 runs when several mount tests ran at once; sync() also waits.)
    mount.sync().unwrap();
    let c = f.commit("mmap");
    drop(child.stdin.take());
    lines.for_each(drop); // drain, so the child never writes into a closed pipe
    assert!(child.wait().unwrap().success());
    f.store.create_branch(&f.dot, "snap", Some(c.id)).unwrap();
    mount
        .switch(f.store.branch_fs(&f.dot, "snap").unwrap())
        .unwrap();
    let data = fs::read(&p).unwrap();
    assert_eq!(&data[4096..4112], &[b'Z'; 16]);
    assert_eq!(data[4112], b'a');
    mount.unmount().unwrap();
}

/// The byte a writer puts at `off` of segment `seg` (never 0, so that a
/// stale read of the zeros a segment starts as cannot pass).
fn wal_byte(seg: u64, off: u64) -> u8 {
    (((off ^ (seg << 40)).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 56) as u8) | 1
}

/// PostgreSQL's WAL pattern, which a WAL sender or `pg_basebackup` reads
/// while the server writes: segments made as zeros, fsynced and renamed
/// into place, then filled in order with writes of any size, each followed
/// by fdatasync; another descriptor reads up to what was synced. The kernel
/// used to drop the page a write had just filled (its mtime check on every
/// read, FUSE_AUTO_INVAL_DATA) and read it ahead from the server before
/// the WRITE got there, keeping the old zeros: a reader got zeros for
/// synced data, about once in 15 s.
#[test]
fn a_reader_sees_what_another_descriptor_synced() {
    let Some(f) = setup("__default__") else {
        return;
    };
    fs::create_dir(f.p("wal")).unwrap();
    synced_wal_is_read(&f.p("wal"), &f.p("wal"));
}

/// A second mount of the fixture's branch at `other` in its directory (as a
/// pinned `dot@branch` path or a `dm mount` path is).
fn second_mount(f: &Fixture) -> (PathBuf, Mount) {
    let other = f._dir.path().join("other");
    fs::create_dir(&other).unwrap();
    let fs_a = f.store.branch_fs(&f.dot, "master").unwrap();
    let m = Mount::mount(&other, fs_a, "__default__", &MountOptions::default()).unwrap();
    (other, m)
}

/// The same with the reader on another mount of the branch (a pinned
/// `dot@branch` path, a `dm mount` path): an fsync returns once the other
/// mounts' kernels were told to drop what the writes made stale.
#[test]
fn a_reader_on_another_mount_sees_what_was_synced() {
    let Some(f) = setup("__default__") else {
        return;
    };
    let (other, m2) = second_mount(&f);
    fs::create_dir(f.p("wal")).unwrap();
    synced_wal_is_read(&f.p("wal"), &other.join("wal"));
    m2.unmount().unwrap();
}

/// Close-to-open across mounts of a branch: once a writer has closed its
/// file, a reader that opens it on another mount reads what was written,
/// also through sendfile(2) (`busybox cat`), which reads the kernel's
/// cached pages up to its cached size without asking for attributes: it
/// read new bytes cut at the old size ("a-much-l") when the invalidation
/// came just after its open. So does a name the reader's mount had
/// looked up while it did not exist yet.
#[test]
fn a_reader_on_another_mount_sees_what_a_closed_file_holds() {
    use std::os::fd::AsRawFd;
    let Some(f) = setup("__default__") else {
        return;
    };
    let (other, m2) = second_mount(&f);
    let sink = tempfile::tempfile().unwrap();
    let cat = |p: &Path| -> Vec<u8> {
        let src = File::open(p).unwrap();
        sink.set_len(0).unwrap();
        (&sink).seek(SeekFrom::Start(0)).unwrap();
        let mut off: libc::off_t = 0;
        // SAFETY: two open descriptors and a valid offset pointer.
        let n = unsafe { libc::sendfile(sink.as_raw_fd(), src.as_raw_fd(), &mut off, 1 << 20) };
        assert!(n >= 0, "sendfile: {}", std::io::Error::last_os_error());
        let mut got = vec![0u8; n as usize];
        std::os::unix::fs::FileExt::read_exact_at(&sink, &mut got, 0).unwrap();
        got
    };
    let mut wrong = Vec::new();
    for i in 0..400 {
        fs::write(f.p("t"), format!("short{i}\n")).unwrap();
        cat(&other.join("t"));
        let want = format!("a-much-longer-line-{i}\n");
        fs::write(f.p("t"), &want).unwrap();
        let got = cat(&other.join("t"));
        if got != want.as_bytes() {
            wrong.push(String::from_utf8_lossy(&got).into_owned());
        }
    }
    assert!(
        wrong.is_empty(),
        "{} of 400 reads wrong: {:?}",
        wrong.len(),
        &wrong[..wrong.len().min(5)]
    );
    // A name the reader's mount looked up while it did not exist, then
    // created and closed through the writer's: the reader opens it. The
    // race (the create told the peers after its reply, so the close could
    // wait for less than it) showed on a busy host: three spinning threads
    // make this one busy.
    fs::create_dir(f.p("neg")).unwrap();
    let stop = std::sync::atomic::AtomicBool::new(false);
    let missing = std::thread::scope(|scope| {
        for _ in 0..3 {
            scope.spawn(|| {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    std::hint::spin_loop();
                }
            });
        }
        let mut missing = 0;
        for i in 0..400 {
            let name = format!("neg/f{i}");
            assert!(!other.join(&name).exists());
            fs::write(f.p(&name), b"x").unwrap();
            if File::open(other.join(&name)).is_err() {
                missing += 1;
            }
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        missing
    });
    assert_eq!(
        missing, 0,
        "created and closed, yet missing on the other mount"
    );
    m2.unmount().unwrap();
}

/// Writes WAL-like segments in `dir` and reads them through `read_dir`
/// (the same directory, or another mount's view of it); panics on a read
/// of synced bytes that gives anything else.
fn synced_wal_is_read(dir: &Path, read_dir: &Path) {
    use std::os::unix::fs::FileExt;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Mutex;
    use std::time::{Duration, Instant};
    const SEG: u64 = 4 << 20;
    let dir = dir.to_path_buf();
    // (segment, bytes synced); segment -1: none yet.
    let synced = Arc::new(Mutex::new((-1i64, 0u64)));
    let done = Arc::new(AtomicBool::new(false));
    let writer = {
        let (dir, synced, done) = (dir.clone(), synced.clone(), done.clone());
        std::thread::spawn(move || {
            // 10 s and at least 3 segments synced, whichever comes last
            // (fsyncs on a loaded disk may be slow), at most 2 minutes;
            // sooner when the reader has seen enough bad reads.
            let start = Instant::now();
            let mut total = 0u64;
            let going = |total: u64| {
                let t = start.elapsed();
                !done.load(Ordering::SeqCst)
                    && t < Duration::from_secs(120)
                    && (t < Duration::from_secs(10) || total < 3 * SEG)
            };
            let mut rnd: u64 = 0x2545_F491_4F6C_DD1D;
            let mut next = move |n: u64| {
                rnd ^= rnd << 13;
                rnd ^= rnd >> 7;
                rnd ^= rnd << 17;
                rnd % n
            };
            let mut seg = 0u64;
            while going(total) {
                let tmp = dir.join("tmp");
                let file = File::create(&tmp).unwrap();
                for i in 0..SEG / 8192 {
                    file.write_all_at(&[0u8; 8192], i * 8192).unwrap();
                }
                file.sync_all().unwrap();
                drop(file);
                let path = dir.join(format!("seg{seg}"));
                fs::rename(&tmp, &path).unwrap();
                let file = OpenOptions::new().write(true).open(&path).unwrap();
                *synced.lock().unwrap() = (seg as i64, 0);
                let mut off = 0;
                while off < SEG && going(total) {
                    let n = match next(3) {
                        0 => 50 + next(3000),
                        1 => 3000 + next(17_000),
                        _ => 20_000 + next(111_072),
                    }
                    .min(SEG - off);
                    let data: Vec<u8> = (off..off + n).map(|o| wal_byte(seg, o)).collect();
                    file.write_all_at(&data, off).unwrap();
                    file.sync_data().unwrap();
                    off += n;
                    total += n;
                    synced.lock().unwrap().1 = off;
                }
                if seg >= 2 {
                    fs::remove_file(dir.join(format!("seg{}", seg - 2))).unwrap();
                }
                seg += 1;
            }
            done.store(true, Ordering::SeqCst);
        })
    };
    let (mut cur, mut file, mut pos) = (-1i64, None::<File>, 0u64);
    let (mut reads, mut bad) = (0u64, Vec::new());
    while !done.load(Ordering::SeqCst) && bad.len() < 5 {
        let (seg, upto) = *synced.lock().unwrap();
        if seg != cur {
            file = File::open(read_dir.join(format!("seg{seg}"))).ok();
            (cur, pos) = (seg, 0);
        }
        let Some(file) = file.as_ref().filter(|_| upto > pos) else {
            std::thread::sleep(Duration::from_micros(200));
            continue;
        };
        // As a WAL sender reads: up to what is synced, by 8 KiB pages.
        while pos < upto {
            let n = (upto - pos).min(8192 - pos % 8192);
            let mut got = vec![0u8; n as usize];
            file.read_exact_at(&mut got, pos).unwrap();
            reads += 1;
            if let Some(i) = (0..n).find(|&i| got[i as usize] != wal_byte(cur as u64, pos + i)) {
                bad.push(format!(
                    "segment {cur}: byte {:#x} of [{pos:#x}, {:#x}) is {:#04x}",
                    pos + i,
                    pos + n,
                    got[i as usize]
                ));
                break;
            }
            pos += n;
        }
    }
    done.store(true, Ordering::SeqCst);
    writer.join().unwrap();
    assert!(reads > 1000, "only {reads} reads");
    assert!(
        bad.is_empty(),
        "stale reads of synced data after {reads} reads:\n{}",
        bad.join("\n")
    );
}

/// Two writers open one file with O_CREAT (no O_EXCL) at once, each
/// through another mount of the branch: both opens succeed, as on a local
/// filesystem. The second failed with EEXIST (88 of 300 races), crashing a
/// log appender; O_EXCL still refuses, and O_TRUNC truncates what the other
/// made.
#[test]
fn creates_racing_on_two_mounts_both_open_the_file() {
    let Some(f) = setup("__default__") else {
        return;
    };
    let (other, m2) = second_mount(&f);
    let open = |p: PathBuf, extra: i32| {
        let c = cpath(&p);
        // SAFETY: a valid C string; the descriptor is closed below.
        let fd = unsafe { libc::open(c.as_ptr(), libc::O_WRONLY | libc::O_CREAT | extra, 0o644) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: fd was just opened by us.
        unsafe { libc::close(fd) };
        Ok(())
    };
    for i in 0..200 {
        let name = format!("log{i}");
        // Both kernels cache the name as absent first.
        assert!(!f.p(&name).exists() && !other.join(&name).exists());
        let barrier = std::sync::Arc::new(std::sync::Barrier::new(2));
        let (b, p) = (barrier.clone(), other.join(&name));
        let t = std::thread::spawn(move || {
            b.wait();
            open(p, libc::O_APPEND)
        });
        barrier.wait();
        let here = open(f.p(&name), libc::O_APPEND);
        let there = t.join().unwrap();
        assert!(
            here.is_ok() && there.is_ok(),
            "race {i}: {here:?} {there:?}"
        );
    }
    fs::write(f.p("made"), b"data").unwrap();
    // The other mount may still cache "made" as absent.
    let err = open(other.join("made"), libc::O_EXCL);
    assert!(err.is_err(), "O_EXCL opened an existing file");
    open(other.join("made"), libc::O_TRUNC).unwrap();
    assert_eq!(fs::read(f.p("made")).unwrap(), b"");
    m2.unmount().unwrap();
}

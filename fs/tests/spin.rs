//! The adaptive polling of `/dev/fuse`, in a test binary of its own: it
//! tells its mount's descriptors from the others of the process by
//! opening order, which a test mounting in parallel would upset.

use std::fs;
use std::path::Path;
use std::sync::Arc;

mod common;
use common::can_mount;
use dm_fs::{Mount, MountOptions};
use dm_store::{DotName, Store};

/// The `/dev/fuse` descriptors of this process.
fn fuse_fds() -> Vec<String> {
    fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| {
            let e = e.ok()?;
            let target = fs::read_link(e.path()).ok()?;
            (target == Path::new("/dev/fuse")).then(|| e.file_name().to_string_lossy().into_owned())
        })
        .collect()
}

/// Whether any of `fds` is open without blocking (O_NONBLOCK in fdinfo's
/// octal `flags`). A descriptor closed meanwhile counts as blocking.
fn any_nonblocking(fds: &[String]) -> bool {
    fds.iter().any(|fd| {
        let Ok(info) = fs::read_to_string(format!("/proc/self/fdinfo/{fd}")) else {
            return false;
        };
        info.lines()
            .find_map(|l| l.strip_prefix("flags:"))
            .and_then(|f| u32::from_str_radix(f.trim(), 8).ok())
            .is_some_and(|f| f & libc::O_NONBLOCK as u32 != 0)
    })
}

#[test]
fn device_is_polled_only_while_requests_come() {
    if !can_mount() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("store")).unwrap();
    let dot = DotName::new("spin").unwrap();
    store.create_dot(&dot, None).unwrap();
    let mnt = dir.path().join("mnt");
    fs::create_dir(&mnt).unwrap();
    let before = fuse_fds();
    let opts = MountOptions {
        spin: true,
        ..MountOptions::default()
    };
    let mount = Mount::mount(
        &mnt,
        store.branch_fs(&dot, "master").unwrap(),
        "__default__",
        &opts,
    )
    .unwrap();
    let ours: Vec<String> = fuse_fds()
        .into_iter()
        .filter(|fd| !before.contains(fd))
        .collect();
    assert!(!ours.is_empty(), "the mount opened no /dev/fuse descriptor");

    // A burst of requests (each a LOOKUP of a name never asked for): one
    // request loop polls the device meanwhile.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let prober = {
        let (stop, mnt) = (stop.clone(), mnt.clone());
        std::thread::spawn(move || {
            let mut i = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                i += 1;
                assert!(fs::symlink_metadata(mnt.join(format!("absent-{i}"))).is_err());
            }
        })
    };
    let (mut flag, mut fd) = (false, false);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while !(flag && fd) && std::time::Instant::now() < deadline {
        flag |= mount.is_polling();
        fd |= any_nonblocking(&ours);
        std::thread::sleep(std::time::Duration::from_micros(200));
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    prober.join().unwrap();
    assert!(flag, "no request loop polled during a burst of requests");
    assert!(fd, "the device was never made non-blocking during a burst");

    // Idle again: the device blocks (no CPU spent on an idle mount).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    while (mount.is_polling() || any_nonblocking(&ours)) && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    assert!(!mount.is_polling(), "still polling an idle mount");
    assert!(
        !any_nonblocking(&ours),
        "the device stayed non-blocking when idle"
    );
    // The mount still answers after the switch back to blocking reads.
    fs::write(mnt.join("after"), b"ok").unwrap();
    assert_eq!(fs::read(mnt.join("after")).unwrap(), b"ok");
    mount.unmount().unwrap();
}

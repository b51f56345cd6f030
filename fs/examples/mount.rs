//! Mounts one dot of a store at a path until SIGTERM/SIGINT; for test suites
//! (ci/fs-suites.sh) independent of the `dm` binary.
//!
//! Usage: `mount STORE_DIR MOUNTPOINT [DOT] [SUBDOT]`
//! Creates the dot if it does not exist, mounts its master branch.

use std::path::PathBuf;
use std::process::ExitCode;

use dm_fs::{cleanup_stale_mount, Mount, MountOptions};
use dm_store::{DotName, Store};

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mount: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 3 {
        return Err("usage: mount STORE_DIR MOUNTPOINT [DOT] [SUBDOT]".into());
    }
    let store_dir = PathBuf::from(&args[1]);
    let mountpoint = PathBuf::from(&args[2]);
    let dot = args.get(3).map(String::as_str).unwrap_or("fstest");
    let subdot = args.get(4).map(String::as_str).unwrap_or("__default__");

    // Block the signals in every thread (the FUSE threads inherit the mask),
    // then wait for them synchronously below.
    // SAFETY: plain libc signal-mask calls on a zeroed, initialised sigset_t.
    let set = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    };

    std::fs::create_dir_all(&store_dir)?;
    std::fs::create_dir_all(&mountpoint)?;
    cleanup_stale_mount(&mountpoint)?;
    let store = Store::open(&store_dir)?;
    let name = DotName::new(dot)?;
    if let Err(e) = store.create_dot(&name, None) {
        if !e.to_string().contains("already exists") {
            return Err(e.into());
        }
    }
    let fs = store.branch_fs(&name, "master")?;
    let mount = Mount::mount(&mountpoint, fs, subdot, &MountOptions::default())?;
    println!("mounted {dot} at {}", mountpoint.display());

    let mut sig: libc::c_int = 0;
    // SAFETY: set is a valid sigset_t, sig a valid out pointer.
    unsafe { libc::sigwait(&set, &mut sig) };
    eprintln!("signal {sig}: unmounting");
    mount.unmount()?;
    store.sync()?;
    Ok(())
}

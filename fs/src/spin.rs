//! Adaptive busy-polling of `/dev/fuse` while requests keep coming.
//!
//! A FUSE round trip wakes the daemon's thread and then the caller. On a VM
//! whose idle vCPUs halt at once (this project's machines: no guest halt
//! polling), each wakeup of a thread on the other, halted vCPU costs tens
//! of microseconds; measured there, a `stat(2)` through dm took 35-46 us
//! with both sides free and 13 us with both pinned to one CPU.
//!
//! While requests arrive, one of the mount's request loops therefore reads
//! the device without blocking (`O_NONBLOCK` on its open file; fuser's loop
//! retries on `EAGAIN`), so a new request finds it running and needs no
//! wakeup. [`IDLE`] after the last request the device blocks again, so an
//! idle mount costs no CPU. The switch is made by a monitor thread per
//! mount, woken by the first request of a burst ([`Spin::tick`]).

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use parking_lot::Mutex;
use tracing::{debug, warn};

/// How long after the last request the loop keeps polling. A synchronous
/// caller's next request follows its last answer within microseconds; a
/// short window keeps a trickle of requests (one every 10 ms) from costing
/// more than about 2% of a CPU. 1 ms and 100 us measured the same on small
/// files.
const IDLE: Duration = Duration::from_micros(200);

/// Shared between the request handlers (which tick) and the monitor.
pub(crate) struct Spin {
    /// Requests seen (bumped by every handler that reaches the branch).
    activity: AtomicU64,
    /// Whether the device is non-blocking now.
    spinning: AtomicBool,
    /// A wakeup of the monitor is pending.
    woken: AtomicBool,
    stop: AtomicBool,
    monitor: Mutex<Option<JoinHandle<()>>>,
}

impl Spin {
    /// Starts the monitor for the device `fd` (a duplicate of the session's
    /// descriptor: it shares the open file whose flags are switched, and
    /// stays valid however the session ends).
    pub(crate) fn start(fd: BorrowedFd<'_>) -> io::Result<Arc<Spin>> {
        let fd = fd.try_clone_to_owned()?;
        let spin = Arc::new(Spin {
            activity: AtomicU64::new(0),
            spinning: AtomicBool::new(false),
            woken: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            monitor: Mutex::new(None),
        });
        let s = spin.clone();
        let handle = std::thread::Builder::new()
            .name("dm-fs-spin".into())
            .spawn(move || s.run(&fd))?;
        *spin.monitor.lock() = Some(handle);
        Ok(spin)
    }

    /// Called by request handlers: counts the request, and wakes the
    /// monitor when this is the first request of a burst.
    pub(crate) fn tick(&self) {
        self.activity.fetch_add(1, Ordering::Relaxed);
        if !self.spinning.load(Ordering::Relaxed) && !self.woken.swap(true, Ordering::AcqRel) {
            if let Some(h) = self.monitor.lock().as_ref() {
                h.thread().unpark();
            }
        }
    }

    /// Whether the device is non-blocking now.
    pub(crate) fn is_spinning(&self) -> bool {
        self.spinning.load(Ordering::Acquire)
    }

    /// Stops the monitor and leaves the device blocking.
    pub(crate) fn stop(&self) {
        self.stop.store(true, Ordering::Release);
        let handle = self.monitor.lock().take();
        if let Some(h) = handle {
            h.thread().unpark();
            let _ = h.join();
        }
    }

    fn run(&self, fd: &OwnedFd) {
        while !self.stop.load(Ordering::Acquire) {
            // Woken by tick() or stop() (an unpark before the park is kept).
            std::thread::park();
            if !self.woken.load(Ordering::Acquire) || self.stop.load(Ordering::Acquire) {
                continue;
            }
            if let Err(e) = set_nonblocking(fd.as_fd(), true) {
                debug!("fuse spin: cannot make the device non-blocking: {e}");
                return;
            }
            self.spinning.store(true, Ordering::Release);
            let mut seen = self.activity.load(Ordering::Relaxed);
            loop {
                std::thread::sleep(IDLE);
                let now = self.activity.load(Ordering::Relaxed);
                if now == seen || self.stop.load(Ordering::Acquire) {
                    break;
                }
                seen = now;
            }
            if let Err(e) = set_nonblocking(fd.as_fd(), false) {
                // Try once more below, then give up the monitor: the loop
                // would otherwise poll for good.
                warn!("fuse spin: cannot make the device blocking again: {e}");
                break;
            }
            self.spinning.store(false, Ordering::Release);
            self.woken.store(false, Ordering::Release);
        }
        if let Err(e) = set_nonblocking(fd.as_fd(), false) {
            warn!("fuse spin: the device stays non-blocking: {e}");
        }
    }
}

fn set_nonblocking(fd: BorrowedFd<'_>, on: bool) -> io::Result<()> {
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    let raw = fd.as_raw_fd();
    let flags = OFlag::from_bits_retain(fcntl(raw, FcntlArg::F_GETFL)?);
    let new = if on {
        flags | OFlag::O_NONBLOCK
    } else {
        flags - OFlag::O_NONBLOCK
    };
    if new != flags {
        fcntl(raw, FcntlArg::F_SETFL(new))?;
    }
    Ok(())
}

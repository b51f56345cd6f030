//! Transfer progress: counters a transfer updates and anyone (a progress
//! bar, an API poll) can read.

use parking_lot::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

/// Bytes done and (estimated) total, and the current phase.
#[derive(Debug, Default)]
pub struct Progress {
    done: AtomicU64,
    total: AtomicU64,
    phase: Mutex<String>,
}

impl Progress {
    /// A fresh counter.
    pub fn new() -> Progress {
        Progress::default()
    }
    /// Sets the phase (comparing, sending, receiving, done).
    pub fn set_phase(&self, p: &str) {
        *self.phase.lock() = p.to_string();
    }
    /// The phase.
    pub fn phase(&self) -> String {
        self.phase.lock().clone()
    }
    /// Adds to the estimated total.
    pub fn add_total(&self, n: u64) {
        self.total.fetch_add(n, Ordering::Relaxed);
    }
    /// Adds to the bytes done.
    pub fn add_done(&self, n: u64) {
        self.done.fetch_add(n, Ordering::Relaxed);
    }
    /// Sets the bytes done.
    pub fn set_done(&self, n: u64) {
        self.done.store(n, Ordering::Relaxed);
    }
    /// (done, total); total is at least done.
    pub fn get(&self) -> (u64, u64) {
        let d = self.done.load(Ordering::Relaxed);
        (d, self.total.load(Ordering::Relaxed).max(d))
    }
}

/// Draws `(done, total)` updates: an indicatif bar with bytes, rate and ETA
/// on a terminal, plain lines otherwise.
pub struct Bar {
    bar: Option<indicatif::ProgressBar>,
    last_line: std::time::Instant,
}

impl Bar {
    /// A bar on stderr (plain lines when stderr is not a terminal).
    pub fn new(label: &str) -> Bar {
        use std::io::IsTerminal;
        let bar = if std::io::stderr().is_terminal() {
            let b = indicatif::ProgressBar::new(0);
            if let Ok(style) = indicatif::ProgressStyle::with_template(
                "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}",
            ) {
                b.set_style(style.progress_chars("=> "));
            }
            b.set_message(label.to_string());
            Some(b)
        } else {
            eprintln!("{label}...");
            None
        };
        Bar {
            bar,
            last_line: std::time::Instant::now(),
        }
    }
    /// Shows an update.
    pub fn update(&mut self, done: u64, total: u64) {
        match &self.bar {
            Some(b) => {
                b.set_length(total);
                b.set_position(done);
            }
            None => {
                if self.last_line.elapsed().as_secs() >= 2 {
                    eprintln!("  {done} / {total} bytes");
                    self.last_line = std::time::Instant::now();
                }
            }
        }
    }
    /// Ends the bar.
    pub fn finish(self) {
        if let Some(b) = self.bar {
            b.finish_and_clear();
        }
    }
}

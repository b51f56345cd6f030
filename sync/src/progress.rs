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

/// Draws `(phase, done, total)` updates: an indicatif bar with bytes, rate
/// and ETA on a terminal once there are bytes to move (the phase and the
/// time spent before: connecting, comparing), plain lines otherwise, only
/// when something changed.
pub struct Bar {
    bar: Option<indicatif::ProgressBar>,
    label: String,
    /// The bar shows bytes (not just the phase).
    counting: bool,
    last_line: std::time::Instant,
    last_shown: (String, u64),
}

impl Bar {
    /// A bar on stderr (plain lines when stderr is not a terminal).
    pub fn new(label: &str) -> Bar {
        use std::io::IsTerminal;
        let bar = if std::io::stderr().is_terminal() {
            let b = indicatif::ProgressBar::new(0);
            if let Ok(style) = indicatif::ProgressStyle::with_template("{msg} {spinner} {elapsed}")
            {
                b.set_style(style);
            }
            b.set_message(label.to_string());
            b.enable_steady_tick(std::time::Duration::from_millis(200));
            Some(b)
        } else {
            eprintln!("{label}...");
            None
        };
        Bar {
            bar,
            label: label.to_string(),
            counting: false,
            last_line: std::time::Instant::now(),
            last_shown: (String::new(), 0),
        }
    }

    /// Shows an update: the phase, and the bytes moved of an estimated
    /// total (the data the chunks hold, before compression, and the
    /// metadata).
    pub fn update(&mut self, phase: &str, done: u64, total: u64) {
        let phase = if phase.is_empty() { "starting" } else { phase };
        match &self.bar {
            Some(b) if total == 0 => b.set_message(format!("{} ({phase})", self.label)),
            Some(b) => {
                b.set_length(total);
                b.set_position(done);
                if !self.counting {
                    self.counting = true;
                    if let Ok(style) = indicatif::ProgressStyle::with_template(
                        "{msg} [{bar:30}] {bytes}/~{total_bytes} {bytes_per_sec} ETA {eta}",
                    ) {
                        b.set_style(style.progress_chars("=> "));
                    }
                }
                // After the bytes, what a pull waits for (its containers
                // stopping, its branch moving) is said.
                b.set_message(if matches!(phase, "sending" | "receiving") {
                    self.label.clone()
                } else {
                    format!("{} ({phase})", self.label)
                });
            }
            None => {
                if let Some(line) = self.plain_line(phase, done, total, std::time::Instant::now()) {
                    eprintln!("{line}");
                }
            }
        }
    }

    /// Without a terminal: a line at most every 2 s, and only when the
    /// phase or the bytes done changed (a stalled transfer repeated the
    /// same line until it failed).
    fn plain_line(
        &mut self,
        phase: &str,
        done: u64,
        total: u64,
        now: std::time::Instant,
    ) -> Option<String> {
        let shown = (phase.to_string(), done);
        if now.duration_since(self.last_line).as_secs() < 2 || shown == self.last_shown {
            return None;
        }
        self.last_line = now;
        self.last_shown = shown;
        Some(match total {
            0 => format!("  {phase}"),
            _ => format!(
                "  {phase}: {} of ~{}",
                indicatif::HumanBytes(done),
                indicatif::HumanBytes(total)
            ),
        })
    }

    /// Ends the bar.
    pub fn finish(self) {
        if let Some(b) = self.bar {
            b.finish_and_clear();
        }
    }
}

/// The phase of a push once the hub has been asked to move its branch.
pub const MOVING: &str = "moving the hub's branch";

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    #[test]
    fn plain_lines_only_when_something_changed() {
        let t0 = Instant::now();
        let mut b = Bar {
            bar: None,
            label: "x".into(),
            counting: false,
            last_line: t0,
            last_shown: (String::new(), 0),
        };
        let at = |s: u64| t0 + Duration::from_secs(s);
        assert_eq!(b.plain_line("sending", 10, 100, at(1)), None, "under 2 s");
        assert_eq!(
            b.plain_line("sending", 10, 100, at(2)).as_deref(),
            Some("  sending: 10 B of ~100 B")
        );
        assert_eq!(b.plain_line("sending", 10, 100, at(9)), None, "stalled");
        assert_eq!(
            b.plain_line("sending", 50, 100, at(10)).as_deref(),
            Some("  sending: 50 B of ~100 B")
        );
        assert_eq!(
            b.plain_line("connecting", 0, 0, at(20)).as_deref(),
            Some("  connecting")
        );
    }
}

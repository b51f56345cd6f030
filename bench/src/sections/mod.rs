//! The macro bench runner's sections. Each is a plain function that
//! measures, writes its part of the report and may add headline lines.
//!
//! To add one (e.g. from the FUSE, sync or PostgreSQL issue): write
//! `fn run(ctx: &mut Ctx) -> anyhow::Result<Outcome>` in a module here and
//! add a [`Section`] to [`all`]. Compare against a baseline measured in the
//! same run and report the ratio; put images in `ctx.opts.out` through
//! [`Ctx::plot`].

pub mod dedup;
pub mod external;
pub mod versioning;

use crate::plot::{self, LineChart};
use crate::report::Report;
use std::path::PathBuf;

/// Settings of one run (from the command line).
#[derive(Clone, Debug)]
pub struct Options {
    /// Where the report and plots go.
    pub out: PathBuf,
    /// Where scratch stores and data sets go.
    pub tmp: PathBuf,
    /// Multiplies the size of generated data sets.
    pub scale: f64,
    /// Largest dot of the versioning-cost sweep.
    pub max_dot_size: u64,
    /// Timed repetitions per operation and size.
    pub iterations: usize,
    /// Check the in-memory dedup model against a real store.
    pub verify: bool,
}

/// What a section's function returns.
pub enum Outcome {
    /// Measured; the section wrote its report.
    Done,
    /// Cannot be measured yet; the text says what it needs.
    NotMeasured(String),
}

/// What a section gets: the options, its part of the report, the headlines.
pub struct Ctx<'a> {
    /// The run's settings.
    pub opts: &'a Options,
    /// The section's Markdown (under its heading).
    pub report: &'a mut Report,
    /// One-line headline numbers for the top of the report.
    pub headlines: &'a mut Vec<String>,
}

impl Ctx<'_> {
    /// Draws `charts` into `out/file` and links it from the report; if it
    /// cannot (no font), says so in the report instead.
    pub fn plot(&mut self, file: &str, alt: &str, charts: &[LineChart], cols: usize) {
        match plot::draw(&self.opts.out.join(file), charts, cols, 560, 380) {
            Ok(()) => self.report.image(alt, file),
            Err(e) => self.report.para(&format!("(plot `{file}` not drawn: {e})")),
        }
    }
}

/// A section of the report.
pub struct Section {
    /// Id for `--only`.
    pub id: &'static str,
    /// Heading in the report.
    pub title: &'static str,
    /// Measures and writes the section.
    pub run: fn(&mut Ctx) -> anyhow::Result<Outcome>,
}

/// Every section, in report order.
pub fn all() -> Vec<Section> {
    vec![
        Section {
            id: "dedup",
            title: "Dedup: fixed-size blocks vs FastCDC",
            run: dedup::run,
        },
        Section {
            id: "versioning",
            title: "Commit / branch / checkout / reset cost vs dot size",
            run: versioning::run,
        },
        Section {
            id: "fuse",
            title: "FUSE vs native filesystem",
            run: external::fuse_vs_native,
        },
        Section {
            id: "push",
            title: "Push bytes vs ideal and vs rsync",
            run: external::push_bytes,
        },
        Section {
            id: "postgres",
            title: "PostgreSQL TPS on dm vs native",
            run: external::postgres_tps,
        },
        Section {
            id: "memory",
            title: "Server memory under a long write load",
            run: external::server_memory,
        },
    ]
}

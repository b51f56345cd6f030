//! dm's macro bench runner: measures every section and writes a Markdown
//! report plus PNG plots into `--out`.
//!
//! Run: `cargo run --release -p dm-bench --bin dm-bench -- --out bench/results/$(date +%F)`

use anyhow::{bail, Context, Result};
use clap::Parser;
use dm_bench::report::{self, Report};
use dm_bench::sections::{self, Ctx, Options, Outcome};
use std::path::PathBuf;
use std::time::Instant;

/// dm macro benchmarks: dedup, versioning cost, and (as they land) FUSE,
/// push and PostgreSQL.
#[derive(Parser, Debug)]
#[command(name = "dm-bench")]
struct Args {
    /// Directory for report.md and the plots (default bench/results/DATE).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Scratch directory for stores and data sets.
    #[arg(long, default_value = "/var/tmp")]
    tmp: PathBuf,
    /// Size factor for generated data sets (1 = tens of MiB per snapshot).
    #[arg(long, default_value_t = 1.0)]
    scale: f64,
    /// Largest dot of the versioning-cost sweep (e.g. 1G, 10G).
    #[arg(long, default_value = "1G", value_parser = report::parse_size)]
    max_dot_size: u64,
    /// Timed repetitions per operation and dot size.
    #[arg(long, default_value_t = 15)]
    iterations: usize,
    /// Sections to run, comma-separated (default: all). See --list.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Skip writing the dedup data sets through a real store.
    #[arg(long)]
    no_verify: bool,
    /// List the sections and exit.
    #[arg(long)]
    list: bool,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let all = sections::all();
    if args.list {
        for s in &all {
            println!("{:<12} {}", s.id, s.title);
        }
        return Ok(());
    }
    for id in &args.only {
        if !all.iter().any(|s| s.id == id) {
            bail!("unknown section {id:?} (see --list)");
        }
    }
    if !(args.scale > 0.0 && args.scale <= 100.0) {
        bail!("--scale must be in (0, 100]");
    }
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from("bench/results").join(report::today()));
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    std::fs::create_dir_all(&args.tmp)
        .with_context(|| format!("creating {}", args.tmp.display()))?;
    let opts = Options {
        out: out.clone(),
        tmp: args.tmp.clone(),
        scale: args.scale,
        max_dot_size: args.max_dot_size,
        iterations: args.iterations,
        verify: !args.no_verify,
    };
    let command = format!(
        "cargo run --release -p dm-bench --bin dm-bench --{}",
        std::env::args()
            .skip(1)
            .map(|a| format!(" {a}"))
            .collect::<String>()
    );

    let started = Instant::now();
    let mut headlines = Vec::new();
    let mut body = Report::new();
    let mut failed = 0;
    for s in &all {
        if !args.only.is_empty() && !args.only.iter().any(|o| o == s.id) {
            continue;
        }
        eprintln!("== {} ({})", s.title, s.id);
        let t = Instant::now();
        let mut part = Report::new();
        let outcome = {
            let mut ctx = Ctx {
                opts: &opts,
                report: &mut part,
                headlines: &mut headlines,
            };
            (s.run)(&mut ctx)
        };
        body.heading(2, s.title);
        match outcome {
            Ok(Outcome::Done) => {
                body.raw(&part.into_string());
                body.para(&format!(
                    "_(section `{}` took {:.1} s)_",
                    s.id,
                    t.elapsed().as_secs_f64()
                ));
            }
            Ok(Outcome::NotMeasured(why)) => {
                body.para(&format!("**Not measured yet**: {why}."));
                headlines.push(format!("{}: not measured yet", s.title));
            }
            Err(e) => {
                failed += 1;
                body.raw(&part.into_string());
                body.para(&format!("**Failed**: {e:#}"));
                headlines.push(format!("**{}: failed**: {e:#}", s.title));
                eprintln!("section {} failed: {e:#}", s.id);
            }
        }
    }

    let mut doc = Report::new();
    doc.heading(1, &format!("dm bench report, {}", report::today()));
    doc.para(&format!(
        "Command: `{command}`  \nRevision: `{}`  \nTotal time: {:.0} s",
        report::git_revision(),
        started.elapsed().as_secs_f64()
    ));
    doc.heading(2, "Machine");
    doc.raw(&report::machine(&[&opts.tmp, &opts.out]));
    doc.raw("\n");
    doc.heading(2, "Headlines");
    doc.raw(
        &headlines
            .iter()
            .map(|h| format!("- {h}\n"))
            .collect::<String>(),
    );
    doc.raw("\n");
    doc.raw(&body.into_string());
    let path = out.join("report.md");
    std::fs::write(&path, doc.into_string())
        .with_context(|| format!("writing {}", path.display()))?;
    println!("report: {}", path.display());
    if failed > 0 {
        bail!("{failed} section(s) failed; see the report");
    }
    Ok(())
}

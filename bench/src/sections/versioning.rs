//! Commit / branch / checkout / reset cost vs dot size, 1 MiB up to
//! `--max-dot-size` (1 GiB by default, 10 GiB optional) on a log scale.
//! design.md promises these do not grow with the dot: the lines must be flat.

use super::{Ctx, Outcome};
use crate::plot::{size_label, LineChart, Series};
use crate::report::{bytes, ms};
use crate::{req, Fixture};
use anyhow::Result;
use std::time::{Duration, Instant};

/// Median costs at one dot size.
pub struct Costs {
    /// Dot size in bytes.
    pub size: u64,
    /// Writing and committing the whole dot once (linear in size: contrast).
    pub fill: Duration,
    /// Commit after a 1 MiB change (16 x 64 KiB).
    pub commit: Duration,
    /// `checkout -b`: a new branch at HEAD.
    pub branch: Duration,
    /// `checkout`: make another branch current.
    pub checkout: Duration,
    /// `reset --hard` to the base commit after a 1 MiB change.
    pub reset: Duration,
    /// A commit with nothing changed: the fixed cost of a commit.
    pub empty_commit: Duration,
    /// Baseline: a 4 KiB write + fdatasync of a plain file in the same
    /// directory, timed in the same rounds (each op above is one synced
    /// RocksDB write batch).
    pub fsync: Duration,
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// Builds a dot of each size, then measures them round-robin
/// (`iterations` rounds, each visiting every size once), so that load from
/// other processes and background compaction fall on all sizes alike.
pub fn measure(tmp: &std::path::Path, sizes: &[u64], iterations: usize) -> Result<Vec<Costs>> {
    let mut dots = Vec::new();
    for &size in sizes {
        let t = Instant::now();
        let fx = Fixture::new_in(tmp, size);
        fx.store.sync()?;
        let fill = t.elapsed();
        eprintln!("versioning: {} dot filled in {:.1?}", bytes(size), fill);
        let base = fx.store.resolve(&fx.dot, "master", "HEAD")?;
        dots.push((
            fx,
            base,
            fill,
            [vec![], vec![], vec![], vec![], vec![], vec![]],
        ));
    }
    let probe_path = tmp.join(format!("dm-bench-fsync-{}", std::process::id()));
    let mut probe = std::fs::File::create(&probe_path)?;
    let page = vec![7u8; 4096];
    for i in 0..iterations.max(1) as u64 {
        for (fx, base, _, times) in dots.iter_mut() {
            {
                use std::io::{Seek, Write};
                let t = Instant::now();
                probe.seek(std::io::SeekFrom::Start(0))?;
                probe.write_all(&page)?;
                probe.sync_data()?;
                times[5].push(t.elapsed());
            }
            fx.change_1mib(i + 1);
            fx.fs.flush(fx.file)?;
            let t = Instant::now();
            fx.store.commit(&fx.dot, "master", req("c"))?;
            times[0].push(t.elapsed());

            let t = Instant::now();
            fx.store.commit(&fx.dot, "master", req("empty"))?;
            times[4].push(t.elapsed());

            let name = format!("b{i}");
            let t = Instant::now();
            fx.store.create_branch(&fx.dot, &name, None)?;
            times[1].push(t.elapsed());

            let t = Instant::now();
            fx.store.set_current_branch(&fx.dot, &name)?;
            times[2].push(t.elapsed());
            fx.store.set_current_branch(&fx.dot, "master")?;

            fx.change_1mib(i + 1000);
            fx.fs.flush(fx.file)?;
            let t = Instant::now();
            fx.store.reset(&fx.dot, "master", *base, true)?;
            times[3].push(t.elapsed());
        }
    }
    drop(probe);
    let _ = std::fs::remove_file(&probe_path);
    Ok(dots
        .into_iter()
        .map(|(fx, _, fill, [c, b, k, r, e, f])| Costs {
            size: fx.size,
            fill,
            commit: median(c),
            branch: median(b),
            checkout: median(k),
            reset: median(r),
            empty_commit: median(e),
            fsync: median(f),
        })
        .collect())
}

/// Least-squares slope of ln(y) over ln(x): 0 for constant, 1 for linear.
pub fn loglog_slope(points: &[(f64, f64)]) -> f64 {
    let pts: Vec<(f64, f64)> = points
        .iter()
        .filter(|p| p.0 > 0.0 && p.1 > 0.0)
        .map(|p| (p.0.ln(), p.1.ln()))
        .collect();
    let n = pts.len() as f64;
    if pts.len() < 2 {
        return 0.0;
    }
    let mx = pts.iter().map(|p| p.0).sum::<f64>() / n;
    let my = pts.iter().map(|p| p.1).sum::<f64>() / n;
    let sxy: f64 = pts.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    let sxx: f64 = pts.iter().map(|p| (p.0 - mx).powi(2)).sum();
    if sxx == 0.0 {
        0.0
    } else {
        sxy / sxx
    }
}

/// Dot sizes of the sweep: 1 MiB x 4^k up to `max`, then `max` itself.
pub fn sizes(max: u64) -> Vec<u64> {
    let mut v = Vec::new();
    let mut s = 1u64 << 20;
    while s <= max {
        v.push(s);
        s *= 4;
    }
    if v.last() != Some(&max) && max > 1 << 20 {
        v.push(max);
    }
    v
}

/// The report section.
pub fn run(ctx: &mut Ctx) -> Result<Outcome> {
    let opts = ctx.opts.clone();
    ctx.report.para(&format!(
        "A dot with one file of the given size (db-like data, ~2:1 compressible), committed \
         once; all sizes exist at once and are measured round-robin, {} rounds of: change 1 MiB (16 x 64 KiB writes) and commit; create a \
         branch at HEAD (`checkout -b`); make it current and back (`checkout`); change 1 MiB \
         and `reset --hard` to the base commit; a 4 KiB write + fdatasync of a plain file in the \
         same directory (*fsync*: the floor under each of these ops, which are one synced \
         RocksDB write batch each); after the first commit of each round, a commit \
         with no change (the fixed cost of a commit). Medians. **Baseline: the 1 MiB dot**, same run; \
         the ratio columns are cost / cost at 1 MiB (the promise: ~1 at every size). \
         *Fill* (write + first commit of the whole dot) is linear by nature and shown for \
         contrast. Store operations only (no FUSE).",
        opts.iterations
    ));
    let all = measure(&opts.tmp, &sizes(opts.max_dot_size), opts.iterations)?;
    for c in &all {
        eprintln!(
            "versioning: {} commit {} branch {} checkout {} reset {}",
            bytes(c.size),
            ms(c.commit),
            ms(c.branch),
            ms(c.checkout),
            ms(c.reset)
        );
    }
    let b = &all[0];
    let r =
        |x: Duration, y: Duration| format!("{:.2}", x.as_secs_f64() / y.as_secs_f64().max(1e-9));
    let rows: Vec<Vec<String>> = all
        .iter()
        .map(|c| {
            vec![
                bytes(c.size),
                format!("{:.2} s", c.fill.as_secs_f64()),
                ms(c.commit),
                r(c.commit, b.commit),
                ms(c.branch),
                r(c.branch, b.branch),
                ms(c.checkout),
                r(c.checkout, b.checkout),
                ms(c.reset),
                r(c.reset, b.reset),
                ms(c.empty_commit),
                r(c.empty_commit, b.empty_commit),
                ms(c.fsync),
            ]
        })
        .collect();
    ctx.report.table(
        &[
            "dot size",
            "fill",
            "commit",
            "ratio",
            "branch",
            "ratio",
            "checkout",
            "ratio",
            "reset --hard",
            "ratio",
            "empty commit",
            "ratio",
            "fsync (baseline)",
        ],
        &rows,
    );
    let slope = |f: fn(&Costs) -> Duration| {
        format!(
            "{:.3}",
            loglog_slope(
                &all.iter()
                    .map(|c| (c.size as f64, f(c).as_secs_f64()))
                    .collect::<Vec<_>>()
            )
        )
    };
    let mut srow = vec!["growth exponent".to_string(), slope(|c| c.fill)];
    for f in [
        (|c: &Costs| c.commit) as fn(&Costs) -> Duration,
        |c| c.branch,
        |c| c.checkout,
        |c| c.reset,
        |c| c.empty_commit,
    ] {
        srow.push(slope(f));
        srow.push(String::new());
    }
    ctx.report.table(
        &[
            "",
            "fill",
            "commit",
            "",
            "branch",
            "",
            "checkout",
            "",
            "reset --hard",
            "",
            "empty commit",
            "",
        ],
        &[srow],
    );
    ctx.report.para(
        "*Growth exponent*: slope of log(cost) over log(dot size), least squares over all \
         sizes: 0 is flat (the promise), 1 is linear in the size of the dot (like *fill*).",
    );
    let last = &all[all.len() - 1];
    ctx.headlines.push(format!(
        "versioning cost, {} dot vs 1 MiB dot (same run): commit {:.2}x ({}), branch {:.2}x ({}), \
         checkout {:.2}x ({}), reset --hard {:.2}x ({}); growth exponent of commit {} \
         (0 = flat, 1 = linear; fill: {})",
        bytes(last.size),
        last.commit.as_secs_f64() / b.commit.as_secs_f64().max(1e-9),
        ms(last.commit),
        last.branch.as_secs_f64() / b.branch.as_secs_f64().max(1e-9),
        ms(last.branch),
        last.checkout.as_secs_f64() / b.checkout.as_secs_f64().max(1e-9),
        ms(last.checkout),
        last.reset.as_secs_f64() / b.reset.as_secs_f64().max(1e-9),
        ms(last.reset),
        slope(|c| c.commit),
        slope(|c| c.fill),
    ));
    let line = |label: &str, f: fn(&Costs) -> Duration| Series {
        label: label.to_string(),
        points: all
            .iter()
            .map(|c| (c.size as f64, f(c).as_secs_f64() * 1e3))
            .collect(),
    };
    let chart = LineChart {
        title: "cost vs dot size (must be flat)".into(),
        x_label: "dot size (log scale)".into(),
        y_label: "median ms".into(),
        x_log2: true,
        x_fmt: size_label,
        series: vec![
            line("commit after 1 MiB change", |c| c.commit),
            line("branch (checkout -b)", |c| c.branch),
            line("checkout", |c| c.checkout),
            line("reset --hard after 1 MiB change", |c| c.reset),
            line("commit with no change", |c| c.empty_commit),
        ],
    };
    ctx.plot(
        "versioning-cost.png",
        "commit/branch/reset cost vs dot size",
        &[chart],
        1,
    );
    Ok(Outcome::Done)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sweep_sizes() {
        assert_eq!(sizes(1 << 20), vec![1 << 20]);
        assert_eq!(sizes(16 << 20), vec![1 << 20, 4 << 20, 16 << 20]);
        let ten = sizes(10 << 30);
        assert_eq!(ten.first(), Some(&(1 << 20)));
        assert_eq!(ten.last(), Some(&(10 << 30)));
        assert_eq!(ten.len(), 8);
    }

    #[test]
    fn slopes() {
        let flat: Vec<(f64, f64)> = (1..8).map(|i| (4f64.powi(i), 2.0)).collect();
        assert!(loglog_slope(&flat).abs() < 1e-9);
        let lin: Vec<(f64, f64)> = (1..8).map(|i| (4f64.powi(i), 3.0 * 4f64.powi(i))).collect();
        assert!((loglog_slope(&lin) - 1.0).abs() < 1e-9);
    }
}

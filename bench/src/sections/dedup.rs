//! Dedup: stored bytes, dedup ratio and chunk counts of dm's fixed-size
//! blocks vs FastCDC, with and without zstd, on generated data sets; the
//! model is checked against a real store.

use super::{Ctx, Outcome};
use crate::chunking::{ratio, standard_chunkers, Chunker, DedupStats};
use crate::datasets::{Dataset, PgBench, ShiftedInserts, Snapshot, SourceTree, VmImage};
use crate::plot::{size_label, LineChart, Series};
use crate::report::bytes;
use crate::req;
use anyhow::{bail, Context, Result};
use dm_store::{DotName, FileKind, Ino, SetAttr, Store, ROOT_INO};
use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;

/// Runs every chunker over every snapshot of `ds`.
pub fn analyse(ds: &dyn Dataset, chunkers: &[Chunker]) -> Result<Vec<DedupStats>> {
    let mut stats: Vec<DedupStats> = chunkers.iter().map(|&c| DedupStats::new(c)).collect();
    ds.for_each_snapshot(&mut |snap| {
        for s in stats.iter_mut() {
            for data in snap.values() {
                s.add_file(data);
            }
            s.end_snapshot();
        }
        Ok(())
    })?;
    Ok(stats)
}

/// Writes every snapshot of `ds` into a fresh store (dot block size
/// `block_size`) under `tmp`, committing after each, and returns the number
/// of chunks the commits reach (fsck's count). Unchanged files are not
/// rewritten; files are written in 1 MiB pieces, as a copy would.
pub fn store_chunk_count(ds: &dyn Dataset, block_size: u32, tmp: &Path) -> Result<u64> {
    let dir = tempfile::Builder::new()
        .prefix("dm-bench-verify")
        .tempdir_in(tmp)?;
    let store = Store::open(dir.path())?;
    let dot = DotName::new("verify")?;
    store.create_dot(&dot, Some(block_size))?;
    let fs = store.branch_fs(&dot, "master")?;
    let mut dirs: HashMap<String, Ino> = HashMap::new();
    dirs.insert(String::new(), ROOT_INO);
    let mut files: HashMap<String, (Ino, Ino, [u8; 32])> = HashMap::new();
    let mut n = 0;
    ds.for_each_snapshot(&mut |snap: &Snapshot| {
        let gone: Vec<String> = files
            .keys()
            .filter(|p| !snap.contains_key(*p))
            .cloned()
            .collect();
        for p in gone {
            if let Some((parent, _, _)) = files.remove(&p) {
                fs.unlink(parent, base_name(&p).as_bytes())?;
            }
        }
        for (path, data) in snap {
            let hash = *blake3::hash(data).as_bytes();
            let ino = match files.get(path) {
                Some(&(_, _, h)) if h == hash => continue,
                Some(&(_, ino, _)) => {
                    fs.setattr(
                        ino,
                        &SetAttr {
                            size: Some(0),
                            ..Default::default()
                        },
                    )?;
                    ino
                }
                None => {
                    let parent = mkdir_p(&fs, &mut dirs, parent_dir(path))?;
                    let ino = fs
                        .mknod(
                            parent,
                            base_name(path).as_bytes(),
                            FileKind::File,
                            0o644,
                            0,
                            0,
                            0,
                        )?
                        .ino;
                    files.insert(path.clone(), (parent, ino, hash));
                    ino
                }
            };
            for (i, piece) in data.chunks(1 << 20).enumerate() {
                fs.write(ino, (i as u64) << 20, piece)?;
            }
            fs.flush(ino)?;
            if let Some(e) = files.get_mut(path) {
                e.2 = hash;
            }
        }
        n += 1;
        store.commit(&dot, "master", req(&format!("snapshot {n}")))?;
        Ok(())
    })?;
    let report = store.fsck()?;
    if !report.is_clean() {
        bail!("fsck of the verification store: {:?}", report.problems);
    }
    Ok(report.chunks_checked)
}

fn parent_dir(path: &str) -> &str {
    path.rsplit_once('/').map(|(d, _)| d).unwrap_or("")
}

fn base_name(path: &str) -> &str {
    path.rsplit_once('/').map(|(_, b)| b).unwrap_or(path)
}

fn mkdir_p(fs: &dm_store::BranchFs, dirs: &mut HashMap<String, Ino>, dir: &str) -> Result<Ino> {
    if let Some(&ino) = dirs.get(dir) {
        return Ok(ino);
    }
    let parent = mkdir_p(fs, dirs, parent_dir(dir))?;
    let ino = fs
        .mkdir(parent, base_name(dir).as_bytes(), 0o755, 0, 0)?
        .ino;
    dirs.insert(dir.to_string(), ino);
    Ok(ino)
}

/// The data sets at `scale` (1.0: tens of MiB per snapshot).
fn generated(scale: f64) -> Vec<Box<dyn Dataset>> {
    let s = |n: f64| ((n * scale).round() as usize).max(1);
    vec![
        Box::new(SourceTree {
            files: s(4000.0),
            snapshots: 8,
            seed: 1,
        }),
        Box::new(VmImage {
            size: (s(16.0) as u64) << 22,
            snapshots: 8,
            writes: 256,
            seed: 2,
        }),
        Box::new(ShiftedInserts {
            files: s(16.0),
            snapshots: 8,
            seed: 3,
        }),
    ]
}

/// The report section.
pub fn run(ctx: &mut Ctx) -> Result<Outcome> {
    let opts = ctx.opts.clone();
    let chunkers = standard_chunkers();
    ctx.report.para(
        "Each data set is a sequence of snapshots, committed one after another. For each \
         chunking we count what a content-addressed store keeps: distinct chunks (blake3), \
         their bytes raw and as stored with zstd level 1 (`dm_store::chunk::encode`, the \
         store's own rule). **Baseline: full copies** of every snapshot (the sum of their \
         sizes); *dedup* = full copies / unique bytes, *dedup+zstd* = full copies / stored \
         bytes. *Added/snapshot* is the mean stored bytes each later snapshot adds (what a \
         commit keeps and a push sends). *vs dm* = stored bytes / those of dm's default \
         (fixed 64 KiB + zstd), same run. *Map entries/snapshot* = chunk references of one \
         snapshot (block-map size, the metadata cost). Fixed blocks restart at each file \
         and the last is short, as in the store; FastCDC (v2020) cuts each file with \
         min = avg/4, max = 4 x avg.",
    );
    let mut sets: Vec<Box<dyn Dataset>> = Vec::new();
    match PgBench::unavailable() {
        Some(why) => ctx
            .report
            .para(&format!("**PostgreSQL data set skipped**: {why}.")),
        None => {
            let t = Instant::now();
            let scale = ((5.0 * opts.scale).round() as u32).max(1);
            let txns = ((3000.0 * opts.scale).round() as u32).max(100);
            match PgBench::prepare(&opts.tmp, scale, 4, txns) {
                Ok(pg) => {
                    eprintln!("dedup: pgbench snapshots ready in {:.1?}", t.elapsed());
                    sets.push(Box::new(pg));
                }
                Err(e) => ctx
                    .report
                    .para(&format!("**PostgreSQL data set skipped**: {e:#}.")),
            }
        }
    }
    sets.extend(generated(opts.scale));

    let mut ratio_charts = Vec::new();
    let mut count_charts = Vec::new();
    for ds in &sets {
        let t = Instant::now();
        let stats =
            analyse(ds.as_ref(), &chunkers).with_context(|| format!("data set {}", ds.id()))?;
        eprintln!("dedup: {} analysed in {:.1?}", ds.id(), t.elapsed());
        let first = &stats[0];
        ctx.report.heading(3, ds.title());
        ctx.report.para(&format!(
            "{}. {} snapshots, {} as full copies (baseline).",
            ds.describe(),
            first.snapshots,
            bytes(first.logical_bytes)
        ));
        let dm = stats
            .iter()
            .find(|s| s.chunker == Chunker::Fixed(dm_store::DEFAULT_BLOCK_SIZE))
            .context("no fixed 64K row")?;
        let dm_stored = dm.stored_zstd;
        let mut rows = Vec::new();
        for s in &stats {
            rows.push(vec![
                s.chunker.label(),
                s.unique_chunks.to_string(),
                (s.refs / s.snapshots.max(1)).to_string(),
                bytes(s.unique_bytes),
                format!("{:.2}x", s.dedup_ratio()),
                bytes(s.stored_zstd),
                format!("{:.2}x", s.dedup_zstd_ratio()),
                bytes(s.added_per_snapshot_zstd()),
                format!("{:.3}", ratio(s.stored_zstd, dm_stored)),
            ]);
        }
        ctx.report.table(
            &[
                "chunking",
                "unique chunks",
                "map entries/snapshot",
                "unique bytes",
                "dedup",
                "stored (zstd)",
                "dedup+zstd",
                "added/snapshot (zstd)",
                "vs dm (fixed 64K)",
            ],
            &rows,
        );
        let best_cdc = stats
            .iter()
            .filter(|s| s.chunker.kind() == "fastcdc")
            .max_by(|a, b| a.dedup_zstd_ratio().total_cmp(&b.dedup_zstd_ratio()))
            .context("no fastcdc row")?;
        let best_fixed = stats
            .iter()
            .filter(|s| s.chunker.kind() == "fixed")
            .max_by(|a, b| a.dedup_zstd_ratio().total_cmp(&b.dedup_zstd_ratio()))
            .context("no fixed row")?;
        let cdc64 = stats
            .iter()
            .find(|s| s.chunker == Chunker::fastcdc(64 << 10))
            .context("no fastcdc 64K row")?;
        ctx.headlines.push(format!(
            "dedup, {}: dm (fixed 64K + zstd) stores {} for {} of full copies ({:.1}x); \
             FastCDC 64K {:.2}x the bytes of dm; best fixed {} ({:.1}x), best FastCDC avg {} ({:.1}x)",
            ds.id(),
            bytes(dm_stored),
            bytes(dm.logical_bytes),
            dm.dedup_zstd_ratio(),
            ratio(cdc64.stored_zstd, dm_stored),
            size_label(best_fixed.chunker.nominal() as f64),
            best_fixed.dedup_zstd_ratio(),
            size_label(best_cdc.chunker.nominal() as f64),
            best_cdc.dedup_zstd_ratio(),
        ));

        if opts.verify {
            let mut sizes = vec![dm_store::DEFAULT_BLOCK_SIZE];
            if ds.id() == "source-tree" {
                sizes.push(4096);
            }
            let mut vrows = Vec::new();
            for bs in sizes {
                let expected = stats
                    .iter()
                    .find(|s| s.chunker == Chunker::Fixed(bs))
                    .map(|s| s.unique_chunks)
                    .context("no row for the verified block size")?;
                let t = Instant::now();
                let got = store_chunk_count(ds.as_ref(), bs, &opts.tmp)?;
                vrows.push(vec![
                    size_label(bs as f64),
                    expected.to_string(),
                    got.to_string(),
                    if got == expected {
                        "match".into()
                    } else {
                        "**MISMATCH**".into()
                    },
                    format!("{:.1} s", t.elapsed().as_secs_f64()),
                ]);
                if got != expected {
                    ctx.headlines.push(format!(
                        "**dedup model MISMATCH on {} at {}: model {expected}, store {got}**",
                        ds.id(),
                        size_label(bs as f64)
                    ));
                }
            }
            ctx.report.para("Checked against the real store (every snapshot written through `BranchFs` and committed; chunks counted by fsck):");
            ctx.report.table(
                &[
                    "block size",
                    "model: unique chunks",
                    "store: chunks reached",
                    "",
                    "time",
                ],
                &vrows,
            );
        }

        let series = |kind: &str, zstd: bool| Series {
            label: format!("{kind}{}", if zstd { " + zstd" } else { "" }),
            points: stats
                .iter()
                .filter(|s| s.chunker.kind() == kind)
                .map(|s| {
                    let r = if zstd {
                        s.dedup_zstd_ratio()
                    } else {
                        s.dedup_ratio()
                    };
                    (s.chunker.nominal() as f64, r)
                })
                .collect(),
        };
        ratio_charts.push(LineChart {
            title: ds.id().to_string(),
            x_label: "chunk size (fixed) / average (FastCDC)".into(),
            y_label: "x less than full copies".into(),
            x_log2: true,
            x_fmt: size_label,
            series: vec![
                series("fixed", false),
                series("fixed", true),
                series("fastcdc", false),
                series("fastcdc", true),
            ],
        });
        let counts = |kind: &str| Series {
            label: format!("{kind}: unique chunks (thousands)"),
            points: stats
                .iter()
                .filter(|s| s.chunker.kind() == kind)
                .map(|s| (s.chunker.nominal() as f64, s.unique_chunks as f64 / 1000.0))
                .collect(),
        };
        count_charts.push(LineChart {
            title: format!("{}: chunk count (metadata)", ds.id()),
            x_label: "chunk size (fixed) / average (FastCDC)".into(),
            y_label: "unique chunks (thousands)".into(),
            x_log2: true,
            x_fmt: size_label,
            series: vec![counts("fixed"), counts("fastcdc")],
        });
    }
    ctx.report.heading(3, "Plots");
    ctx.plot(
        "dedup-ratio.png",
        "dedup ratio vs chunk size",
        &ratio_charts,
        2,
    );
    ctx.plot(
        "dedup-chunks.png",
        "chunk count vs chunk size",
        &count_charts,
        2,
    );
    Ok(Outcome::Done)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_matches_store_on_small_sets() {
        let tmp = std::env::temp_dir();
        let sets: Vec<Box<dyn Dataset>> = vec![
            Box::new(SourceTree {
                files: 60,
                snapshots: 3,
                seed: 5,
            }),
            Box::new(VmImage {
                size: 1 << 20,
                snapshots: 3,
                writes: 8,
                seed: 6,
            }),
            Box::new(ShiftedInserts {
                files: 2,
                snapshots: 3,
                seed: 7,
            }),
        ];
        for ds in &sets {
            for bs in [4096u32, 65536] {
                let stats = analyse(ds.as_ref(), &[Chunker::Fixed(bs)]).unwrap();
                let got = store_chunk_count(ds.as_ref(), bs, &tmp).unwrap();
                assert_eq!(got, stats[0].unique_chunks, "{} at {bs}", ds.id());
            }
        }
    }
}

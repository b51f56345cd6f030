//! Data sets for the dedup report, generated locally and reproducibly: each
//! is a sequence of snapshots (path -> bytes) that a user would commit one
//! after another. Generated sets depend only on their parameters and seed;
//! the PostgreSQL set runs a real server under pgbench, so it varies a little
//! from run to run (timing, concurrency).

use crate::Prng;
use anyhow::{bail, Context, Result};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

/// One snapshot: relative file path -> content, sorted by path.
pub type Snapshot = BTreeMap<String, Vec<u8>>;

/// A sequence of snapshots to analyse.
pub trait Dataset {
    /// Short id, used in file names (`source-tree`).
    fn id(&self) -> &'static str;
    /// Title for the report.
    fn title(&self) -> &'static str;
    /// How the set is made, with its parameters.
    fn describe(&self) -> String;
    /// Calls `f` with each snapshot in order. Calling it again replays the
    /// same snapshots.
    fn for_each_snapshot(&self, f: &mut dyn FnMut(&Snapshot) -> Result<()>) -> Result<()>;
}

const WORDS: &[&str] = &[
    "fn", "let", "mut", "self", "return", "if", "else", "match", "Some", "None", "Ok", "Err",
    "value", "index", "buffer", "len", "data", "result", "config", "store", "chunk", "block",
    "write", "read", "commit", "branch", "for", "in", "while", "struct", "impl", "pub", "use",
    "crate", "error", "size", "offset", "key", "node", "map", "iter", "into", "from", "as_ref",
];
const PUNCT: &[&str] = &[
    " ", " ", " ", ", ", ".", "(", ") ", " = ", "::", " + ", "[", "] ",
];

/// Appends one line of source-code-like text (compresses about 3-4:1).
pub fn code_line(rng: &mut Prng, out: &mut Vec<u8>) {
    let indent = 4 * rng.below(4) as usize;
    out.extend(std::iter::repeat_n(b' ', indent));
    let n = 2 + rng.below(9);
    for i in 0..n {
        out.extend_from_slice(WORDS[rng.below(WORDS.len() as u64) as usize].as_bytes());
        if rng.below(8) == 0 {
            out.extend_from_slice(rng.below(100_000).to_string().as_bytes());
        }
        if i + 1 < n {
            out.extend_from_slice(PUNCT[rng.below(PUNCT.len() as u64) as usize].as_bytes());
        }
    }
    out.extend_from_slice([";\n", " {\n", "\n", "}\n"][rng.below(4) as usize].as_bytes());
}

/// `n` lines of code-like text.
fn code_text(rng: &mut Prng, lines: u64) -> Vec<u8> {
    let mut v = Vec::new();
    for _ in 0..lines {
        code_line(rng, &mut v);
    }
    v
}

/// A source tree across edits: files of code-like text in nested folders;
/// each later snapshot edits ~3% of the files (line inserts, deletes,
/// changes), adds ~0.5% and deletes ~0.25%.
pub struct SourceTree {
    /// Files in the first snapshot.
    pub files: usize,
    /// Snapshots, including the first.
    pub snapshots: usize,
    /// Seed of the generator.
    pub seed: u64,
}

impl SourceTree {
    fn new_file(rng: &mut Prng) -> Vec<u8> {
        let lines = 10 + rng.below(60) * rng.below(60) / 8;
        code_text(rng, lines)
    }

    fn edit(rng: &mut Prng, data: &[u8]) -> Vec<u8> {
        let mut lines: Vec<Vec<u8>> = data
            .split_inclusive(|&b| b == b'\n')
            .map(<[u8]>::to_vec)
            .collect();
        for _ in 0..1 + rng.below(3) {
            let at = rng.below(lines.len() as u64 + 1) as usize;
            match rng.below(10) {
                0..=4 => {
                    for _ in 0..1 + rng.below(8) {
                        let mut l = Vec::new();
                        code_line(rng, &mut l);
                        lines.insert(at.min(lines.len()), l);
                    }
                }
                5..=6 => {
                    let n = (1 + rng.below(4) as usize).min(lines.len().saturating_sub(at));
                    lines.drain(at..at + n);
                }
                _ => {
                    if at < lines.len() {
                        let mut l = Vec::new();
                        code_line(rng, &mut l);
                        lines[at] = l;
                    }
                }
            }
        }
        lines.concat()
    }
}

impl Dataset for SourceTree {
    fn id(&self) -> &'static str {
        "source-tree"
    }
    fn title(&self) -> &'static str {
        "Source tree across edits"
    }
    fn describe(&self) -> String {
        format!(
            "{} files of code-like text (mean ~5 KiB) in 24 folders; {} snapshots; each later \
             one edits 3% of the files (1-3 line inserts/deletes/changes each), adds 0.5%, \
             deletes 0.25% (seed {})",
            self.files, self.snapshots, self.seed
        )
    }
    fn for_each_snapshot(&self, f: &mut dyn FnMut(&Snapshot) -> Result<()>) -> Result<()> {
        let mut rng = Prng::new(self.seed);
        let mut tree = Snapshot::new();
        let mut next = 0usize;
        let mut add = |tree: &mut Snapshot, rng: &mut Prng| {
            let path = format!("src/mod{:02}/file{:05}.rs", next % 24, next);
            next += 1;
            tree.insert(path, Self::new_file(rng));
        };
        for _ in 0..self.files {
            add(&mut tree, &mut rng);
        }
        f(&tree)?;
        for _ in 1..self.snapshots {
            let keys: Vec<String> = tree.keys().cloned().collect();
            for _ in 0..(self.files / 33).max(1) {
                let k = &keys[rng.below(keys.len() as u64) as usize];
                let new = Self::edit(&mut rng, &tree[k]);
                tree.insert(k.clone(), new);
            }
            for _ in 0..(self.files / 400).max(1) {
                let k = &keys[rng.below(keys.len() as u64) as usize];
                tree.remove(k);
            }
            for _ in 0..(self.files / 200).max(1) {
                add(&mut tree, &mut rng);
            }
            f(&tree)?;
        }
        Ok(())
    }
}

/// A VM-image-like file: 4 KiB filesystem blocks in extents of zeros (45%),
/// text (25%), database-like pages (20%) and compressed data (10%); each
/// later snapshot makes `writes` random 4 KiB-aligned writes of 1-4 blocks
/// and rewrites a 64 KiB journal slot.
pub struct VmImage {
    /// Image size in bytes (a multiple of 4 KiB).
    pub size: u64,
    /// Snapshots, including the first.
    pub snapshots: usize,
    /// Random writes per snapshot.
    pub writes: usize,
    /// Seed of the generator.
    pub seed: u64,
}

const FS_BLOCK: usize = 4096;

fn fill_kind(rng: &mut Prng, kind: u64, buf: &mut [u8]) {
    match kind {
        0 => buf.fill(0),
        1 => {
            let mut t = Vec::with_capacity(buf.len() + 128);
            while t.len() < buf.len() {
                code_line(rng, &mut t);
            }
            buf.copy_from_slice(&t[..buf.len()]);
        }
        2 => rng.fill_semi(buf),
        _ => rng.fill_random(buf),
    }
}

impl Dataset for VmImage {
    fn id(&self) -> &'static str {
        "vm-image"
    }
    fn title(&self) -> &'static str {
        "VM-image-like file with small random changes"
    }
    fn describe(&self) -> String {
        format!(
            "one {} MiB image of 4 KiB blocks in extents (45% zeros, 25% text, 20% db-like \
             pages, 10% incompressible); {} snapshots; each later one makes {} random \
             4 KiB-aligned writes of 1-4 blocks plus a 64 KiB journal write (seed {})",
            self.size >> 20,
            self.snapshots,
            self.writes,
            self.seed
        )
    }
    fn for_each_snapshot(&self, f: &mut dyn FnMut(&Snapshot) -> Result<()>) -> Result<()> {
        let mut rng = Prng::new(self.seed);
        let mut img = vec![0u8; self.size as usize];
        let blocks = img.len() / FS_BLOCK;
        let mut b = 0;
        while b < blocks {
            let len = (16 + rng.below(497) as usize).min(blocks - b);
            let kind = match rng.below(100) {
                0..=44 => 0,
                45..=69 => 1,
                70..=89 => 2,
                _ => 3,
            };
            fill_kind(&mut rng, kind, &mut img[b * FS_BLOCK..(b + len) * FS_BLOCK]);
            b += len;
        }
        let mut snap = Snapshot::new();
        snap.insert("disk.img".into(), img);
        f(&snap)?;
        let journal_slots = (blocks / 16).clamp(1, 64);
        for s in 1..self.snapshots {
            let img = snap.get_mut("disk.img").context("image")?;
            for _ in 0..self.writes {
                let n = 1 + rng.below(4) as usize;
                let at = rng.below((blocks - n.min(blocks)) as u64 + 1) as usize;
                let kind = match rng.below(10) {
                    0..=5 => 2,
                    6..=8 => 1,
                    _ => 3,
                };
                fill_kind(&mut rng, kind, &mut img[at * FS_BLOCK..(at + n) * FS_BLOCK]);
            }
            let slot = s % journal_slots;
            let end = ((slot + 1) * 16 * FS_BLOCK).min(img.len());
            fill_kind(&mut rng, 2, &mut img[slot * 16 * FS_BLOCK..end]);
            f(&snap)?;
        }
        Ok(())
    }
}

/// Files with shifted inserts: text and binary files of 256 KiB-4 MiB; each
/// later snapshot inserts 1-200 bytes at 1-3 random offsets in 4 files and
/// deletes 1-500 bytes in one, shifting everything after (the case where
/// fixed-size blocks lose to content-defined chunking).
pub struct ShiftedInserts {
    /// Number of files.
    pub files: usize,
    /// Snapshots, including the first.
    pub snapshots: usize,
    /// Seed of the generator.
    pub seed: u64,
}

impl Dataset for ShiftedInserts {
    fn id(&self) -> &'static str {
        "shifted-inserts"
    }
    fn title(&self) -> &'static str {
        "Files with shifted inserts"
    }
    fn describe(&self) -> String {
        format!(
            "{} files of 256 KiB-4 MiB (half code-like text, half db-like binary); {} \
             snapshots; each later one inserts 1-200 bytes at 1-3 random offsets in 4 files \
             and deletes 1-500 bytes in one (seed {})",
            self.files, self.snapshots, self.seed
        )
    }
    fn for_each_snapshot(&self, f: &mut dyn FnMut(&Snapshot) -> Result<()>) -> Result<()> {
        let mut rng = Prng::new(self.seed);
        let mut snap = Snapshot::new();
        for i in 0..self.files {
            let size = (256 << 10) + rng.below(15 * (256 << 10)) as usize;
            let mut data = vec![0u8; size];
            fill_kind(&mut rng, if i % 2 == 0 { 1 } else { 2 }, &mut data);
            snap.insert(format!("files/f{i:03}.dat"), data);
        }
        f(&snap)?;
        let keys: Vec<String> = snap.keys().cloned().collect();
        for _ in 1..self.snapshots {
            for _ in 0..4 {
                let k = &keys[rng.below(keys.len() as u64) as usize];
                let data = snap.get_mut(k).context("file")?;
                for _ in 0..1 + rng.below(3) {
                    let at = rng.below(data.len() as u64 + 1) as usize;
                    let mut ins = vec![0u8; 1 + rng.below(200) as usize];
                    fill_kind(&mut rng, 1, &mut ins);
                    data.splice(at..at, ins);
                }
            }
            let k = &keys[rng.below(keys.len() as u64) as usize];
            let data = snap.get_mut(k).context("file")?;
            let at = rng.below(data.len() as u64) as usize;
            let n = (1 + rng.below(500) as usize).min(data.len() - at);
            data.drain(at..at + n);
            f(&snap)?;
        }
        Ok(())
    }
}

/// Where PostgreSQL 15's programs live on Debian.
pub const PG_BIN: &str = "/usr/lib/postgresql/15/bin";

/// Successive snapshots of a PostgreSQL data directory under pgbench: one
/// after `pgbench -i`, then one after each round of transactions. The
/// server is stopped cleanly (a checkpoint) before each copy. Prepared once
/// (snapshots are copied to disk), then replayed from disk.
pub struct PgBench {
    _work: tempfile::TempDir,
    snaps: Vec<PathBuf>,
    desc: String,
}

fn run(cmd: &mut Command, what: &str) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {what}"))?;
    if !out.status.success() {
        bail!(
            "{what} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A command run as the `postgres` user (through runuser when root).
fn as_postgres(prog: &str) -> Command {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let path = format!("{PG_BIN}/{prog}");
    if root {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--", &path]);
        c
    } else {
        Command::new(path)
    }
}

impl PgBench {
    /// Why the set cannot run here, if it cannot.
    pub fn unavailable() -> Option<String> {
        for p in ["initdb", "pg_ctl", "pgbench"] {
            if !Path::new(PG_BIN).join(p).exists() {
                return Some(format!("{PG_BIN}/{p} is missing (install postgresql-15)"));
            }
        }
        // SAFETY: geteuid has no preconditions.
        let euid = unsafe { libc::geteuid() };
        if euid != 0 && std::env::var("USER").as_deref() != Ok("postgres") {
            return Some("needs root (to run PostgreSQL as the postgres user)".into());
        }
        None
    }

    /// Runs PostgreSQL in a temporary directory under `tmp`: `pgbench -i -s
    /// scale`, then `rounds` rounds of `-c 2 -t txns`, copying the data
    /// directory after each.
    pub fn prepare(tmp: &Path, scale: u32, rounds: usize, txns: u32) -> Result<PgBench> {
        if let Some(why) = Self::unavailable() {
            bail!(why);
        }
        let work = tempfile::Builder::new()
            .prefix("dm-bench-pg")
            .tempdir_in(tmp)?;
        let pg = work.path().join("pg");
        std::fs::create_dir(&pg)?;
        run(
            Command::new("chmod").args(["0755"]).arg(work.path()),
            "chmod",
        )?;
        run(
            Command::new("chown").args(["postgres:postgres"]).arg(&pg),
            "chown",
        )?;
        let data = pg.join("data");
        let port = (5500 + std::process::id() % 1000).to_string();
        run(
            as_postgres("initdb")
                .args(["-A", "trust", "-U", "postgres", "--no-sync", "-D"])
                .arg(&data),
            "initdb",
        )?;
        let opts = format!(
            "-p {port} -k {} -c listen_addresses='' -c synchronous_commit=off",
            pg.display()
        );
        let start = || {
            run(
                as_postgres("pg_ctl")
                    .args(["-w", "-D"])
                    .arg(&data)
                    .arg("-l")
                    .arg(pg.join("log"))
                    .args(["-o", &opts, "start"]),
                "pg_ctl start",
            )
        };
        let stop = || {
            run(
                as_postgres("pg_ctl")
                    .args(["-w", "-m", "fast", "-D"])
                    .arg(&data)
                    .arg("stop"),
                "pg_ctl stop",
            )
        };
        let mut snaps = Vec::new();
        let snapshot = |snaps: &mut Vec<PathBuf>| -> Result<()> {
            let dst = work.path().join(format!("snap-{:02}", snaps.len()));
            run(Command::new("cp").arg("-a").arg(&data).arg(&dst), "cp -a")?;
            snaps.push(dst);
            Ok(())
        };
        let host = pg.display().to_string();
        let bench = |args: &[&str]| -> Result<String> {
            let r = run(
                as_postgres("pgbench")
                    .args(["-h", &host, "-p", &port])
                    .args(args)
                    .arg("postgres"),
                "pgbench",
            );
            if r.is_err() {
                let _ = stop();
            }
            r
        };
        start()?;
        bench(&["-i", "-q", "-s", &scale.to_string()])?;
        stop()?;
        snapshot(&mut snaps)?;
        let t = txns.to_string();
        for _ in 0..rounds {
            start()?;
            bench(&["-n", "-c", "2", "-j", "1", "-t", &t])?;
            stop()?;
            snapshot(&mut snaps)?;
        }
        Ok(PgBench {
            _work: work,
            snaps,
            desc: format!(
                "PostgreSQL 15 data directory (initdb defaults, synchronous_commit=off): one \
                 snapshot after `pgbench -i -s {scale}`, then one after each of {rounds} \
                 rounds of `pgbench -c 2 -t {txns}`; clean shutdown before each copy"
            ),
        })
    }
}

fn read_tree(root: &Path, dir: &Path, out: &mut Snapshot) -> Result<()> {
    for e in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let e = e?;
        let ft = e.file_type()?;
        let p = e.path();
        if ft.is_dir() {
            read_tree(root, &p, out)?;
        } else if ft.is_file() {
            let rel = p.strip_prefix(root)?.to_string_lossy().into_owned();
            out.insert(rel, std::fs::read(&p)?);
        }
    }
    Ok(())
}

impl Dataset for PgBench {
    fn id(&self) -> &'static str {
        "pgbench"
    }
    fn title(&self) -> &'static str {
        "PostgreSQL data directory under pgbench"
    }
    fn describe(&self) -> String {
        self.desc.clone()
    }
    fn for_each_snapshot(&self, f: &mut dyn FnMut(&Snapshot) -> Result<()>) -> Result<()> {
        for s in &self.snaps {
            let mut snap = Snapshot::new();
            read_tree(s, s, &mut snap)?;
            f(&snap)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest(ds: &dyn Dataset) -> Vec<(usize, u64)> {
        let mut v = Vec::new();
        ds.for_each_snapshot(&mut |s| {
            let bytes: u64 = s.values().map(|d| d.len() as u64).sum();
            let mut h = blake3::Hasher::new();
            for (k, d) in s {
                h.update(k.as_bytes());
                h.update(d);
            }
            v.push((
                s.len(),
                bytes ^ u64::from_le_bytes(h.finalize().as_bytes()[..8].try_into().unwrap()),
            ));
            Ok(())
        })
        .unwrap();
        v
    }

    #[test]
    fn generated_sets_are_reproducible_and_change() {
        let sets: Vec<Box<dyn Dataset>> = vec![
            Box::new(SourceTree {
                files: 200,
                snapshots: 3,
                seed: 1,
            }),
            Box::new(VmImage {
                size: 1 << 20,
                snapshots: 3,
                writes: 8,
                seed: 2,
            }),
            Box::new(ShiftedInserts {
                files: 4,
                snapshots: 3,
                seed: 3,
            }),
        ];
        for ds in &sets {
            let a = digest(ds.as_ref());
            assert_eq!(a, digest(ds.as_ref()), "{}", ds.id());
            assert_eq!(a.len(), 3);
            assert_ne!(a[0], a[1], "{}", ds.id());
            assert_ne!(a[1], a[2], "{}", ds.id());
        }
    }
}

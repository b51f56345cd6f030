//! Prints what `dm status` and `dm diff HEAD^ HEAD` cost after one file
//! changed, in dots of 1,000, 10,000 and 100,000 files (100 per directory),
//! and the ratio to the 1,000-file dot: these should cost what changed,
//! not what the dot holds. The second set of lines also renames a
//! directory of 100 files each round (101 paths change). The last lines
//! delete every file and directory (each path a change) and print the
//! cost per path.
//!
//! Run: `cargo run --release -p dm-bench --bin status-cost`

use dm_bench::req;
use dm_store::{DotName, FileKind, Store, ROOT_INO};
use std::time::{Duration, Instant};

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// A dot of `files` files of 10 bytes, 100 per directory, committed: its
/// store (in the temp dir returned with it) and its directories.
fn dot_of(files: usize) -> (tempfile::TempDir, std::sync::Arc<Store>, DotName, Vec<u64>) {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = Store::open(dir.path()).expect("open store");
    let dot = DotName::new("bench").expect("dot name");
    store.create_dot(&dot, None).expect("create dot");
    let fs = store.branch_fs(&dot, "master").expect("branch");
    let mut dirs = Vec::new();
    for d in 0..files.div_ceil(100) {
        let di = fs
            .mkdir(ROOT_INO, format!("d{d}").as_bytes(), 0o755, 0, 0)
            .expect("mkdir")
            .ino;
        for f in 0..100 {
            let a = fs
                .mknod(
                    di,
                    format!("f{f}").as_bytes(),
                    FileKind::File,
                    0o644,
                    0,
                    0,
                    0,
                )
                .expect("create");
            // Opened and released as through a mount (a file never
            // opened keeps its write buffer).
            fs.open(a.ino).expect("open");
            fs.write(a.ino, 0, b"some bytes").expect("write");
            fs.release(a.ino).expect("release");
        }
        dirs.push(di);
    }
    store.commit(&dot, "master", req("base")).expect("commit");
    (dir, store, dot, dirs)
}

/// (status, diff of the commit) after every file and directory of a dot
/// of `files` files was deleted (`rm -rf *`): each path is a change.
fn measure_delete_all(files: usize) -> (Duration, Duration) {
    let (_dir, store, dot, dirs) = dot_of(files);
    let fs = store.branch_fs(&dot, "master").expect("branch");
    for (d, &di) in dirs.iter().enumerate() {
        for f in 0..100 {
            fs.unlink(di, format!("f{f}").as_bytes()).expect("unlink");
        }
        fs.rmdir(ROOT_INO, format!("d{d}").as_bytes())
            .expect("rmdir");
    }
    let (status, diff, changes) = status_commit_diff(&store, &dot);
    assert_eq!(changes, files + dirs.len());
    (status, diff)
}

/// Times `dm status` of the branch master, commits, and times `dm diff
/// HEAD^ HEAD`; returns both and how many paths status listed.
fn status_commit_diff(store: &Store, dot: &DotName) -> (Duration, Duration, usize) {
    let t = Instant::now();
    let changes = store.diff(dot, "master", None, None).expect("status");
    let status = t.elapsed();
    store.commit(dot, "master", req("c")).expect("commit");
    let head = store.resolve(dot, "master", "HEAD").expect("HEAD");
    let parent = store.resolve(dot, "master", "HEAD^").expect("HEAD^");
    let t = Instant::now();
    store
        .diff(dot, "master", Some(parent), Some(head))
        .expect("diff");
    (status, t.elapsed(), changes.len())
}

/// Median (status, diff of the last commit) over 15 rounds of changing one
/// file (or, with `rename`, renaming a directory) and committing.
fn measure(files: usize, rename: bool) -> (Duration, Duration) {
    let (_dir, store, dot, dirs) = dot_of(files);
    let fs = store.branch_fs(&dot, "master").expect("branch");
    let (mut status, mut diff) = (Vec::new(), Vec::new());
    let mut moved = vec![false; dirs.len()];
    for i in 0..15usize {
        let k = (i * 7919) % dirs.len();
        let d = dirs[k];
        if rename {
            let (name, other) = (format!("d{k}"), format!("d{k}-moved"));
            let (from, to) = if moved[k] {
                (other, name)
            } else {
                (name, other)
            };
            fs.rename(ROOT_INO, from.as_bytes(), ROOT_INO, to.as_bytes(), 0)
                .expect("rename");
            moved[k] = !moved[k];
        }
        let f = fs.lookup(d, b"f5").expect("lookup").ino;
        fs.open(f).expect("open");
        fs.write(f, 0, format!("round {i}").as_bytes())
            .expect("write");
        fs.release(f).expect("release");
        let (s, d, changes) = status_commit_diff(&store, &dot);
        assert!(changes > 0);
        status.push(s);
        diff.push(d);
    }
    (median(status), median(diff))
}

fn main() {
    println!("| after (median of 15) | files | dm status | dm diff HEAD^ HEAD | status / 1,000 files | diff / 1,000 files |");
    println!("|---|---|---|---|---|---|");
    for rename in [false, true] {
        let what = if rename {
            "renaming a directory of 100 files, writing one"
        } else {
            "writing one file"
        };
        let small = measure(1000, rename);
        for files in [1000, 10_000, 100_000] {
            let (s, d) = if files == 1000 {
                small
            } else {
                measure(files, rename)
            };
            println!(
                "| {what} | {files} | {:.2} ms | {:.2} ms | {:.2} | {:.2} |",
                s.as_secs_f64() * 1e3,
                d.as_secs_f64() * 1e3,
                s.as_secs_f64() / small.0.as_secs_f64(),
                d.as_secs_f64() / small.1.as_secs_f64(),
            );
        }
    }
    println!();
    println!("| after deleting every file and directory | paths | dm status | dm diff HEAD^ HEAD | status per path | diff per path |");
    println!("|---|---|---|---|---|---|");
    for files in [10_000, 100_000] {
        let (s, d) = measure_delete_all(files);
        let paths = (files + files / 100) as f64;
        println!(
            "| rm -rf | {paths} | {:.2} s | {:.2} s | {:.1} us | {:.1} us |",
            s.as_secs_f64(),
            d.as_secs_f64(),
            s.as_secs_f64() * 1e6 / paths,
            d.as_secs_f64() * 1e6 / paths,
        );
    }
}

//! Per-operation cost of an 8 KiB write + fsync through the store (no FUSE)
//! against the same on the native filesystem, in the same run.
//!
//! Run: `cargo run --release -p dm-bench --bin fsync-cost`

use dm_bench::dot_with_file;
use std::io::{Seek, SeekFrom, Write};
use std::time::Instant;

const OPS: u64 = 2000;

fn main() {
    let dir = tempfile::tempdir_in("/var/tmp").expect("temp dir");
    let data = vec![0x5au8; 8192];

    let mut f = std::fs::File::create(dir.path().join("native")).expect("create");
    let t = Instant::now();
    for i in 0..OPS {
        f.seek(SeekFrom::Start(i * 8192)).expect("seek");
        f.write_all(&data).expect("write");
        f.sync_data().expect("fdatasync");
    }
    let native = t.elapsed().as_secs_f64() / OPS as f64;

    println!("| 8 KiB append + fdatasync | µs/op | ratio vs native |");
    println!("|---|---|---|");
    println!("| native | {:.1} | 1.00 |", native * 1e6);
    for bs in [8192u32, 65536] {
        let (_store, fs, ino) = dot_with_file(&dir.path().join(format!("store{bs}")), Some(bs));
        let t = Instant::now();
        for i in 0..OPS {
            fs.write(ino, i * 8192, &data).expect("write");
            fs.fsync(ino, true).expect("fsync");
        }
        let dm = t.elapsed().as_secs_f64() / OPS as f64;
        println!(
            "| dm store, {} KiB blocks | {:.1} | {:.2} |",
            bs / 1024,
            dm * 1e6,
            native / dm
        );
    }
}

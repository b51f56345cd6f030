//! Where the time of random 8 KiB writes with an fsync every 16 goes in the
//! store itself (no FUSE): a 256 MiB file written whole first (as fio lays
//! it out), then 10 s of writes at random 8 KiB-aligned offsets, with the
//! patch writer run every 5 s as `dm server` does. Prints the mean cost of
//! a write and of an fsync against the same job on the native filesystem,
//! in the same run.
//!
//! Run: `cargo run --release -p dm-bench --bin randwrite-cost`

use dm_bench::{dot_with_file, Prng};
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

const FILE: u64 = 256 << 20;
const RUN: Duration = Duration::from_secs(10);

/// Mean write and fsync costs (µs) and MiB/s of one run.
struct Cost {
    write_us: f64,
    fsync_us: f64,
    mib_s: f64,
}

fn run(mut write: impl FnMut(u64, &[u8]), mut fsync: impl FnMut(), mut tick: impl FnMut()) -> Cost {
    // The same offsets for every target.
    let mut rng = Prng::new(1);
    let mut data = vec![0u8; 8192];
    let (mut tw, mut tf, mut n) = (Duration::ZERO, Duration::ZERO, 0u64);
    let start = Instant::now();
    let mut last_tick = start;
    while start.elapsed() < RUN {
        for _ in 0..16 {
            let off = rng.below(FILE / 8192) * 8192;
            data[..8].copy_from_slice(&rng.next_u64().to_le_bytes());
            let t = Instant::now();
            write(off, &data);
            tw += t.elapsed();
            n += 1;
        }
        let t = Instant::now();
        fsync();
        tf += t.elapsed();
        if last_tick.elapsed() > Duration::from_secs(5) {
            tick();
            last_tick = Instant::now();
        }
    }
    Cost {
        write_us: tw.as_secs_f64() * 1e6 / n as f64,
        fsync_us: tf.as_secs_f64() * 1e6 / (n / 16) as f64,
        mib_s: (n * 8192) as f64 / (1 << 20) as f64 / start.elapsed().as_secs_f64(),
    }
}

fn main() {
    let dir = tempfile::tempdir_in("/var/tmp").expect("temp dir");
    let layout = vec![0x11u8; 1 << 20];

    let path = dir.path().join("native");
    let f = std::fs::File::create(&path).expect("create");
    for i in 0..FILE / (1 << 20) {
        f.write_all_at(&layout, i << 20).expect("lay out");
    }
    f.sync_all().expect("fsync");
    let native = run(
        |off, d| f.write_all_at(d, off).expect("write"),
        || f.sync_data().expect("fdatasync"),
        || {},
    );
    println!(
        "| random 8 KiB writes, fsync every 16 | write µs | fsync µs | MiB/s | ratio vs native |"
    );
    println!("|---|---|---|---|---|");
    println!(
        "| native | {:.1} | {:.1} | {:.1} | 1.00 |",
        native.write_us, native.fsync_us, native.mib_s
    );
    let sizes: Vec<u32> = match std::env::var("DM_BENCH_BLOCK_SIZE") {
        Ok(s) => vec![s.parse().expect("DM_BENCH_BLOCK_SIZE: bytes")],
        Err(_) => vec![8192, 65536],
    };
    for bs in sizes {
        let (_store, fs, ino) = dot_with_file(&dir.path().join(format!("store{bs}")), Some(bs));
        for i in 0..FILE / (1 << 20) {
            fs.write(ino, i << 20, &layout).expect("lay out");
        }
        fs.fsync(ino, true).expect("fsync");
        let dm = run(
            |off, d| {
                fs.write(ino, off, d).expect("write");
            },
            || fs.fsync(ino, true).expect("fsync"),
            || {
                fs.materialize_patches().expect("patch writer");
            },
        );
        println!(
            "| dm store, {} KiB blocks | {:.1} | {:.1} | {:.1} | {:.2} |",
            bs / 1024,
            dm.write_us,
            dm.fsync_us,
            dm.mib_s,
            dm.mib_s / native.mib_s
        );
    }
}

//! Prints the cost of commit, branch and reset in a 10 MiB dot and a 1 GiB
//! dot, and the ratio between them (design.md promises ~1: these costs must
//! not grow with the size of the dot).
//!
//! Run: `cargo run --release -p dm-bench --bin versioning-cost`

use dm_bench::{req, Fixture};
use std::time::{Duration, Instant};

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

struct Costs {
    commit: Duration,
    branch: Duration,
    reset: Duration,
}

fn measure(size: u64) -> Costs {
    let fx = Fixture::new(size);
    let base = fx.store.resolve(&fx.dot, "master", "HEAD").expect("head");
    let (mut commit, mut branch, mut reset) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..21u64 {
        fx.change_1mib(i + 1);
        fx.fs.flush(fx.file).expect("flush");
        let t = Instant::now();
        fx.store
            .commit(&fx.dot, "master", req("c"))
            .expect("commit");
        commit.push(t.elapsed());

        let t = Instant::now();
        fx.store
            .create_branch(&fx.dot, &format!("b{i}"), None)
            .expect("branch");
        branch.push(t.elapsed());

        fx.change_1mib(i + 100);
        fx.fs.flush(fx.file).expect("flush");
        let t = Instant::now();
        fx.store
            .reset(&fx.dot, "master", base, true)
            .expect("reset");
        reset.push(t.elapsed());
    }
    Costs {
        commit: median(commit),
        branch: median(branch),
        reset: median(reset),
    }
}

fn main() {
    let small = measure(10 << 20);
    let big = measure(1 << 30);
    println!("| operation (median of 21) | 10 MiB dot | 1 GiB dot | ratio 1GiB/10MiB |");
    println!("|---|---|---|---|");
    for (name, s, b) in [
        ("commit after a 1 MiB change", small.commit, big.commit),
        ("branch (checkout -b)", small.branch, big.branch),
        ("reset --hard after a 1 MiB change", small.reset, big.reset),
    ] {
        println!(
            "| {name} | {:.3} ms | {:.3} ms | {:.2} |",
            s.as_secs_f64() * 1e3,
            b.as_secs_f64() * 1e3,
            b.as_secs_f64() / s.as_secs_f64()
        );
    }
}

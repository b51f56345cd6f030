//! Push benchmark over loopback: bytes on the wire and time for the first
//! push of a dot, a push after changing 1% of its blocks, and the push of a
//! second dot the hub mostly has; compared with `rsync -az --no-whole-file --ignore-times`
//! of the same files and with the size of the changed blocks.
//!
//! `cargo run --release -p dm-sync --example push_bench` (DM_BENCH_MIB sets
//! the dot size, default 1024; temp dirs under DM_BENCH_DIR or /var/tmp).
//! Prints a Markdown table.

use dm_store::{CommitRequest, DotName, FileKind, Store};
use dm_sync::{Hub, Progress, Remote, RemoteSpec, TransferOptions, Trust};
use rand::{Rng, RngCore, SeedableRng};
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

const BLOCK: usize = 64 << 10;

/// Half-compressible data: each 64 KiB block is 32 KiB random, 32 KiB zeros.
fn data(seed: u64, mib: usize) -> Vec<u8> {
    let mut r = rand::rngs::StdRng::seed_from_u64(seed);
    let mut v = vec![0u8; mib << 20];
    for b in v.chunks_mut(BLOCK) {
        let half = b.len() / 2;
        r.fill_bytes(&mut b[..half]);
    }
    v
}

/// Changes 4 KiB in 1% of the blocks; returns the changed block indexes.
fn change(v: &mut [u8], seed: u64) -> Vec<usize> {
    let mut r = rand::rngs::StdRng::seed_from_u64(seed);
    let blocks = v.len() / BLOCK;
    let mut picked: Vec<usize> = (0..blocks / 100).map(|_| r.gen_range(0..blocks)).collect();
    picked.sort();
    picked.dedup();
    for &b in &picked {
        r.fill_bytes(&mut v[b * BLOCK..b * BLOCK + 4096]);
    }
    picked
}

fn write_file(s: &Store, d: &DotName, name: &str, v: &[u8], only: Option<&[usize]>) {
    let fs = s.branch_fs(d, "master").expect("branch");
    let sub = fs.subdot_ino("__default__", true).expect("subdot");
    let ino = match fs.lookup(sub, name.as_bytes()) {
        Ok(a) => a.ino,
        Err(_) => {
            fs.mknod(sub, name.as_bytes(), FileKind::File, 0o644, 0, 0, 0)
                .expect("mknod")
                .ino
        }
    };
    match only {
        None => {
            for (i, part) in v.chunks(1 << 20).enumerate() {
                fs.write(ino, (i << 20) as u64, part).expect("write");
            }
        }
        Some(blocks) => {
            for &b in blocks {
                fs.write(ino, (b * BLOCK) as u64, &v[b * BLOCK..(b + 1) * BLOCK])
                    .expect("write");
            }
        }
    }
    fs.flush(ino).expect("flush");
    s.commit(
        d,
        "master",
        CommitRequest {
            message: "bench".into(),
            author: "bench".into(),
            ..Default::default()
        },
    )
    .expect("commit");
}

fn rsync(src: &Path, dst: &Path) -> Option<u64> {
    let out = std::process::Command::new("rsync")
        .args(["-az", "--no-whole-file", "--ignore-times", "--stats"])
        .arg(format!("{}/", src.display()))
        .arg(dst)
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| l.strip_prefix("Total bytes sent: "))
        .map(|n| n.replace(',', "").trim().parse().unwrap_or(0))
}

fn mib(n: u64) -> String {
    format!("{:.2} MiB", n as f64 / 1048576.0)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let size: usize = std::env::var("DM_BENCH_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1024);
    let base = std::env::var("DM_BENCH_DIR").unwrap_or_else(|_| "/var/tmp".into());
    let tmp = |p: &str| {
        tempfile::Builder::new()
            .prefix(p)
            .tempdir_in(&base)
            .expect("tempdir")
    };
    let (hd, ad) = (tmp("dm-bench-hub-"), tmp("dm-bench-src-"));
    let hub_store = Store::open(hd.path()).expect("hub store");
    let hub = Hub::start(
        hub_store.clone(),
        hd.path(),
        "127.0.0.1:0".parse().expect("addr"),
    )
    .expect("hub");
    let key = dm_sync::users::add_user(&hub_store, "alice").expect("user");
    let src: Arc<Store> = Store::open(ad.path()).expect("store");
    let spec = RemoteSpec {
        host: "127.0.0.1".into(),
        port: hub.local_addr().expect("addr").port(),
        user: "alice".into(),
        key,
        trust: Trust::Pinned(hub.fingerprint().into()),
    };
    let remote = Remote::connect(&spec).await.expect("connect");
    let app = DotName::parse("app").expect("name");
    src.create_dot(&app, None).expect("dot");
    let mut v = data(1, size);
    write_file(&src, &app, "data", &v, None);
    let mut rows = Vec::new();
    let push = |local: DotName, remote_dot: &str| {
        let src = src.clone();
        let remote = &remote;
        let rd = DotName::parse(remote_dot).expect("name");
        async move {
            let before = remote.bytes_sent();
            let t = Instant::now();
            let rep = dm_sync::push(
                src,
                remote,
                &local,
                "master",
                &rd,
                &TransferOptions::default(),
                &Progress::new(),
            )
            .await
            .expect("push");
            (remote.bytes_sent() - before, t.elapsed().as_secs_f64(), rep)
        }
    };
    let (first, secs, rep) = push(app.clone(), "alice/app").await;
    rows.push((
        "first push",
        first,
        secs,
        rep.chunk_bytes,
        (size << 20) as u64,
    ));
    let changed = change(&mut v, 2);
    write_file(&src, &app, "data", &v, Some(&changed));
    let (b, secs, rep) = push(app.clone(), "alice/app").await;
    let changed_bytes = (changed.len() * BLOCK) as u64;
    rows.push((
        "push of a 1% change",
        b,
        secs,
        rep.chunk_bytes,
        changed_bytes,
    ));
    let other = DotName::parse("other").expect("name");
    src.create_dot(&other, None).expect("dot");
    let mut w = v.clone();
    let changed2 = change(&mut w, 3);
    write_file(&src, &other, "data", &w, None);
    let (b, secs, rep) = push(other, "alice/other").await;
    rows.push((
        "push of a new dot the hub mostly has",
        b,
        secs,
        rep.chunk_bytes,
        (changed2.len() * BLOCK) as u64,
    ));

    // rsync of the same files.
    let (rs, rd, rd2) = (
        tmp("dm-bench-rs-src-"),
        tmp("dm-bench-rs-dst-"),
        tmp("dm-bench-rs-dst2-"),
    );
    let orig = data(1, size);
    std::fs::write(rs.path().join("data"), &orig).expect("write");
    let r1 = rsync(rs.path(), rd.path());
    std::fs::write(rs.path().join("data"), &v).expect("write");
    let r2 = rsync(rs.path(), rd.path());
    std::fs::write(rs.path().join("data"), &w).expect("write");
    let r3 = rsync(rs.path(), rd2.path());
    let rsyncs = [r1, r2, r3];

    println!("Dot of {size} MiB, 64 KiB blocks, each half random and half zeros (compresses ~2x); loopback QUIC, one process for both ends, 2 cores.\n");
    println!("| case | dm bytes on the wire | chunk bytes | time | throughput | changed blocks | rsync -az bytes sent |");
    println!("|---|---|---|---|---|---|---|");
    for ((name, bytes, secs, chunks, changed), r) in rows.iter().zip(rsyncs) {
        println!(
            "| {name} | {} | {} | {secs:.2} s | {} | {} | {} |",
            mib(*bytes),
            mib(*chunks),
            if *name == "push of a 1% change" {
                format!("{:.0} MiB/s of chunks", *chunks as f64 / 1048576.0 / secs)
            } else {
                format!("{:.0} MiB/s of dot data", size as f64 / secs)
            },
            mib(*changed),
            r.map(mib).unwrap_or_else(|| "rsync not installed".into())
        );
    }
    hub.close();
}

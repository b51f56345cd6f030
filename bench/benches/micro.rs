//! Criterion micro-benchmarks: hashing, compression, chunk put/get, and
//! commit / branch / reset at two dot sizes (their cost must not grow with
//! the dot: compare the 10 MiB and 1 GiB lines).

use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion, Throughput};
use dm_bench::{req, Fixture, Prng};
use dm_store::chunk;

fn block(size: usize) -> Vec<u8> {
    let mut b = vec![0u8; size];
    Prng::new(7).fill_semi(&mut b);
    b
}

fn hashing_and_compression(c: &mut Criterion) {
    let data = block(64 << 10);
    let mut g = c.benchmark_group("block-64KiB");
    g.throughput(Throughput::Bytes(data.len() as u64));
    g.bench_function("blake3", |b| b.iter(|| blake3::hash(&data)));
    g.bench_function("zstd-compress", |b| b.iter(|| chunk::encode(&data)));
    let stored = chunk::encode(&data);
    g.bench_function("zstd-decompress", |b| {
        b.iter(|| chunk::decode(&stored, 1 << 20).unwrap())
    });
    g.finish();
}

fn chunk_put_get(c: &mut Criterion) {
    let fx = Fixture::new(1 << 20);
    let mut g = c.benchmark_group("chunk");
    g.throughput(Throughput::Bytes(64 << 10));
    let mut rng = Prng::new(1);
    let mut buf = block(64 << 10);
    g.bench_function("write+flush-64KiB", |b| {
        b.iter(|| {
            let off = (rng.next_u64() % 16) * (64 << 10);
            buf[0] = buf[0].wrapping_add(1);
            fx.fs.write(fx.file, off, &buf).unwrap();
            fx.fs.flush(fx.file).unwrap();
        })
    });
    g.bench_function("read-64KiB", |b| {
        b.iter(|| {
            let off = (rng.next_u64() % 16) * (64 << 10);
            fx.fs.read(fx.file, off, 64 << 10).unwrap()
        })
    });
    g.finish();
}

fn versioning_cost(c: &mut Criterion) {
    let mut g = c.benchmark_group("versioning");
    g.sample_size(10);
    for (label, size) in [("10MiB", 10u64 << 20), ("1GiB", 1u64 << 30)] {
        let fx = Fixture::new(size);
        let mut n = 0u64;
        g.bench_with_input(
            BenchmarkId::new("commit-after-1MiB-change", label),
            &size,
            |b, _| {
                b.iter_batched(
                    || {
                        n += 1;
                        fx.change_1mib(n);
                        fx.fs.flush(fx.file).unwrap();
                    },
                    |_| fx.store.commit(&fx.dot, "master", req("c")).unwrap(),
                    BatchSize::PerIteration,
                )
            },
        );
        g.bench_with_input(BenchmarkId::new("branch", label), &size, |b, _| {
            b.iter(|| {
                n += 1;
                fx.store
                    .create_branch(&fx.dot, &format!("b{n}"), None)
                    .unwrap()
            })
        });
        let base = fx.store.resolve(&fx.dot, "master", "HEAD").unwrap();
        g.bench_with_input(
            BenchmarkId::new("reset-hard-after-1MiB-change", label),
            &size,
            |b, _| {
                b.iter_batched(
                    || {
                        n += 1;
                        fx.change_1mib(n);
                        fx.fs.flush(fx.file).unwrap();
                    },
                    |_| fx.store.reset(&fx.dot, "master", base, true).unwrap(),
                    BatchSize::PerIteration,
                )
            },
        );
    }
    g.finish();
}

criterion_group!(
    benches,
    hashing_and_compression,
    chunk_put_get,
    versioning_cost
);
criterion_main!(benches);

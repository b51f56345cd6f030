//! Criterion micro-benchmarks: hashing, compression, chunk put/get, block-map
//! updates (`dm_store::tree::apply` on an in-memory node source), and
//! commit / branch / reset at two dot sizes (their cost must not grow with
//! the dot: compare the 10 MiB and 1 GiB lines).

use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion, Throughput};
use dm_bench::{req, Fixture, Prng};
use dm_store::object::{decode_node, Node};
use dm_store::tree::{self, Mutation, NodeSource};
use dm_store::{chunk, keys, Id};
use std::collections::HashMap;
use std::sync::Arc;

/// Tree nodes in memory, so tree benches measure the tree, not RocksDB.
#[derive(Default)]
struct MemNodes(HashMap<Id, Arc<Node>>);

impl NodeSource for MemNodes {
    fn node(&self, id: &Id) -> dm_store::Result<Arc<Node>> {
        self.0
            .get(id)
            .cloned()
            .ok_or_else(|| dm_store::Error::Corrupt(format!("node {} missing", id.short())))
    }
}

impl MemNodes {
    fn apply(&mut self, root: &Id, muts: &[Mutation]) -> Id {
        let (root, new) = tree::apply(&*self, root, muts).unwrap();
        for (id, bytes) in new {
            self.0
                .insert(id, Arc::new(decode_node(&id, &bytes).unwrap()));
        }
        root
    }
}

/// Block-map mutations for `indexes` of inode 2 (sorted, unique).
fn block_muts(indexes: impl Iterator<Item = u64>, salt: u64) -> Vec<Mutation> {
    indexes
        .map(|i| {
            let id = Id::of(&(i ^ salt).to_le_bytes());
            (keys::block(2, i), Some(keys::block_value(&id, 65536)))
        })
        .collect()
}

/// Updating the block map of a 1 GiB file (16,384 blocks of 64 KiB): one
/// block, and a 1 MiB change spread as 16 blocks; plus a lookup.
fn block_map(c: &mut Criterion) {
    let mut src = MemNodes::default();
    let (empty, bytes) = tree::empty();
    src.0
        .insert(empty, Arc::new(decode_node(&empty, &bytes).unwrap()));
    let root = src.apply(&empty, &block_muts(0..16_384, 0));
    let one = block_muts(std::iter::once(8_000), 1);
    let spread = block_muts((0..16).map(|i| i * 1_000 + 7), 1);
    let mut g = c.benchmark_group("block-map-16384-blocks");
    g.bench_function("apply-1-block", |b| {
        b.iter(|| tree::apply(&src, &root, &one).unwrap())
    });
    g.bench_function("apply-16-spread-blocks", |b| {
        b.iter(|| tree::apply(&src, &root, &spread).unwrap())
    });
    let key = keys::block(2, 12_345);
    g.bench_function("get-1-block", |b| {
        b.iter(|| tree::get(&src, &root, &key).unwrap())
    });
    g.finish();
}

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

/// plotters is built with ab_glyph (for dm-bench's PNGs), so criterion's
/// SVG plots also need a registered font; without one, no plots.
fn config() -> Criterion {
    let c = Criterion::default();
    if dm_bench::plot::init_fonts().is_some() {
        c
    } else {
        c.without_plots()
    }
}

criterion_group! {
    name = benches;
    config = config();
    targets = hashing_and_compression, block_map, chunk_put_get, versioning_cost
}
criterion_main!(benches);

//! Helpers shared by dm's benchmarks: reproducible data and dot fixtures,
//! the dedup analysis, the generated data sets and the macro bench runner
//! (`cargo run --release -p dm-bench --bin dm-bench`).

pub mod chunking;
pub mod datasets;
pub mod plot;
pub mod report;
pub mod sections;

use dm_store::{BranchFs, CommitRequest, DotName, FileKind, Store, ROOT_INO};
use std::sync::Arc;

/// A fast, reproducible pseudo-random byte generator (xorshift64*), so data
/// sets are the same in every run without shipping them.
pub struct Prng(u64);

impl Prng {
    /// A generator for `seed`; the same seed gives the same bytes.
    pub fn new(seed: u64) -> Prng {
        Prng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A number in `0..n` (`n` > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    /// Fills `buf` with incompressible bytes (like compressed files).
    pub fn fill_random(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let r = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&r[..chunk.len()]);
        }
    }

    /// Fills `buf` with bytes that compress about 2:1 (half random, half
    /// runs), like typical database pages.
    pub fn fill_semi(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(64) {
            let r = self.next_u64();
            let half = chunk.len() / 2;
            for (i, b) in chunk.iter_mut().enumerate() {
                *b = if i < half {
                    (r >> ((i % 8) * 8)) as u8 ^ i as u8
                } else {
                    (r & 0xff) as u8
                };
            }
        }
    }
}

/// A store in `dir` with one dot `bench` (`block_size`, or the default)
/// holding one empty file `data` on master: the store, master's working
/// state and the file's inode.
pub fn dot_with_file(
    dir: &std::path::Path,
    block_size: Option<u32>,
) -> (Arc<Store>, Arc<BranchFs>, u64) {
    let store = Store::open(dir).expect("open store");
    let dot = DotName::new("bench").expect("valid name");
    store.create_dot(&dot, block_size).expect("create dot");
    let fs = store.branch_fs(&dot, "master").expect("branch");
    let file = fs
        .mknod(ROOT_INO, b"data", FileKind::File, 0o644, 0, 0, 0)
        .expect("create file")
        .ino;
    (store, fs, file)
}

/// A dot with one file of `size` bytes on master, committed once.
pub struct Fixture {
    /// The store's data directory (removed on drop).
    pub dir: tempfile::TempDir,
    /// The open store.
    pub store: Arc<Store>,
    /// The dot, `bench`.
    pub dot: DotName,
    /// master's working state.
    pub fs: Arc<BranchFs>,
    /// The file's inode.
    pub file: u64,
    /// The file's size.
    pub size: u64,
}

impl Fixture {
    /// Creates the dot in a temporary directory (under `TMPDIR`).
    pub fn new(size: u64) -> Fixture {
        Fixture::new_in(&std::env::temp_dir(), size)
    }

    /// Creates the dot in a temporary directory under `parent`.
    pub fn new_in(parent: &std::path::Path, size: u64) -> Fixture {
        let dir = tempfile::tempdir_in(parent).expect("temp dir");
        let (store, fs, file) = dot_with_file(dir.path(), None);
        let dot = DotName::new("bench").expect("valid name");
        let mut rng = Prng::new(size);
        let mut buf = vec![0u8; 1 << 20];
        let mut off = 0;
        while off < size {
            rng.fill_semi(&mut buf);
            let n = (size - off).min(buf.len() as u64) as usize;
            fs.write(file, off, &buf[..n]).expect("write");
            off += n as u64;
        }
        store.commit(&dot, "master", req("base")).expect("commit");
        Fixture {
            dir,
            store,
            dot,
            fs,
            file,
            size,
        }
    }

    /// Overwrites 1 MiB as 16 pieces of 64 KiB at spread offsets within the
    /// first 10 MiB, so that dots of every size get the same change and
    /// only the size of the dot differs between measurements.
    pub fn change_1mib(&self, seed: u64) {
        let mut rng = Prng::new(seed);
        let mut buf = vec![0u8; 64 << 10];
        let slots = (self.size.min(10 << 20) / (64 << 10)).max(1);
        for _ in 0..16 {
            rng.fill_semi(&mut buf);
            let off = (rng.next_u64() % slots) * (64 << 10);
            self.fs.write(self.file, off, &buf).expect("write");
        }
    }
}

/// A commit request with `msg`.
pub fn req(msg: &str) -> CommitRequest {
    CommitRequest {
        message: msg.to_string(),
        author: "bench".into(),
        ..Default::default()
    }
}

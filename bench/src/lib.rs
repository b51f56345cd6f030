//! Helpers shared by dm's benchmarks: reproducible data and dot fixtures.

use dm_store::{BranchFs, CommitRequest, DotName, FileKind, Store, ROOT_INO};
use std::sync::Arc;

/// A fast, reproducible pseudo-random byte generator (xorshift64*), so data
/// sets are the same in every run without shipping them.
pub struct Prng(u64);

impl Prng {
    pub fn new(seed: u64) -> Prng {
        Prng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
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

/// A dot with one file of `size` bytes on master, committed once.
pub struct Fixture {
    pub dir: tempfile::TempDir,
    pub store: Arc<Store>,
    pub dot: DotName,
    pub fs: Arc<BranchFs>,
    pub file: u64,
    pub size: u64,
}

impl Fixture {
    pub fn new(size: u64) -> Fixture {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Store::open(dir.path()).expect("open store");
        let dot = DotName::new("bench").expect("valid name");
        store.create_dot(&dot, None).expect("create dot");
        let fs = store.branch_fs(&dot, "master").expect("branch");
        let file = fs
            .mknod(ROOT_INO, b"data", FileKind::File, 0o644, 0, 0, 0)
            .expect("create file")
            .ino;
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

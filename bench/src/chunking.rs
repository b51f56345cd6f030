//! In-memory dedup analysis: split files into chunks with the store's rules
//! (fixed-size blocks per file, the last one short) or with FastCDC, and
//! count what a content-addressed store would keep.
//!
//! The fixed-size rule here is the one `BranchFs` applies at flush: block `i`
//! of a file of size `s` is `data[i*bs .. min(s, (i+1)*bs)]`, identified by
//! the blake3 of those bytes, stored as [`dm_store::chunk::encode`] makes it.
//! `dedup::verify_against_store` checks the two agree on a real store.

use std::collections::HashSet;

/// A way to cut a file into chunks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Chunker {
    /// dm's rule: fixed-size blocks of this many bytes, per file.
    Fixed(u32),
    /// FastCDC (fastcdc crate, v2020 module) with these min/avg/max sizes.
    FastCdc {
        /// Smallest chunk (except a file's last).
        min: u32,
        /// Target average chunk size.
        avg: u32,
        /// Largest chunk.
        max: u32,
    },
}

impl Chunker {
    /// FastCDC with the usual avg/4 .. avg*4 bounds around `avg`.
    pub fn fastcdc(avg: u32) -> Chunker {
        Chunker::FastCdc {
            min: (avg / 4).max(fastcdc::v2020::MINIMUM_MIN),
            avg,
            max: (avg * 4).min(fastcdc::v2020::MAXIMUM_MAX),
        }
    }

    /// The nominal (average) chunk size.
    pub fn nominal(&self) -> u32 {
        match *self {
            Chunker::Fixed(bs) => bs,
            Chunker::FastCdc { avg, .. } => avg,
        }
    }

    /// Short name: `fixed`, `fastcdc`.
    pub fn kind(&self) -> &'static str {
        match self {
            Chunker::Fixed(_) => "fixed",
            Chunker::FastCdc { .. } => "fastcdc",
        }
    }

    /// A label for tables: `fixed 64K`, `fastcdc 16K/64K/256K`.
    pub fn label(&self) -> String {
        match *self {
            Chunker::Fixed(bs) => format!("fixed {}", kib(bs)),
            Chunker::FastCdc { min, avg, max } => {
                format!("fastcdc {}/{}/{}", kib(min), kib(avg), kib(max))
            }
        }
    }

    /// Calls `f` with each chunk of one file, in order.
    pub fn for_each_chunk(&self, data: &[u8], f: &mut dyn FnMut(&[u8])) {
        match *self {
            Chunker::Fixed(bs) => data.chunks(bs as usize).for_each(f),
            Chunker::FastCdc { min, avg, max } => {
                for c in fastcdc::v2020::FastCDC::new(data, min, avg, max) {
                    f(&data[c.offset..c.offset + c.length]);
                }
            }
        }
    }
}

fn kib(n: u32) -> String {
    if n.is_multiple_of(1024) {
        format!("{}K", n / 1024)
    } else {
        format!("{n}B")
    }
}

/// The chunkers the dedup report compares: dm's fixed blocks at 4, 8, 16,
/// 64 and 128 KiB, and FastCDC at the same averages.
pub fn standard_chunkers() -> Vec<Chunker> {
    let sizes = [4u32, 8, 16, 64, 128].map(|k| k << 10);
    let mut v: Vec<Chunker> = sizes.iter().map(|&s| Chunker::Fixed(s)).collect();
    v.extend(sizes.iter().map(|&s| Chunker::fastcdc(s)));
    v
}

/// What a content-addressed store would keep for a sequence of snapshots
/// cut by one [`Chunker`].
#[derive(Clone, Debug)]
pub struct DedupStats {
    /// The chunker.
    pub chunker: Chunker,
    /// Bytes of all snapshots, as full copies (the baseline).
    pub logical_bytes: u64,
    /// Chunk references: entries of the block maps of every snapshot.
    pub refs: u64,
    /// Distinct chunks (rows of the chunk table).
    pub unique_chunks: u64,
    /// Their uncompressed bytes.
    pub unique_bytes: u64,
    /// Their stored bytes with zstd level 1 (`dm_store::chunk::encode`).
    pub stored_zstd: u64,
    /// Snapshots seen.
    pub snapshots: u64,
    /// `unique_bytes` and `stored_zstd` after the first snapshot.
    pub first: (u64, u64),
    seen: HashSet<[u8; 32]>,
}

impl DedupStats {
    /// Empty counters for `chunker`.
    pub fn new(chunker: Chunker) -> DedupStats {
        DedupStats {
            chunker,
            logical_bytes: 0,
            refs: 0,
            unique_chunks: 0,
            unique_bytes: 0,
            stored_zstd: 0,
            snapshots: 0,
            first: (0, 0),
            seen: HashSet::new(),
        }
    }

    /// Adds one file of a snapshot.
    pub fn add_file(&mut self, data: &[u8]) {
        self.logical_bytes += data.len() as u64;
        let chunker = self.chunker;
        chunker.for_each_chunk(data, &mut |c| {
            self.refs += 1;
            let id = *blake3::hash(c).as_bytes();
            if self.seen.insert(id) {
                self.unique_chunks += 1;
                self.unique_bytes += c.len() as u64;
                self.stored_zstd += dm_store::chunk::encode(c).len() as u64;
            }
        });
    }

    /// Marks the end of a snapshot.
    pub fn end_snapshot(&mut self) {
        self.snapshots += 1;
        if self.snapshots == 1 {
            self.first = (self.unique_bytes, self.stored_zstd);
        }
    }

    /// Logical bytes over unique bytes (no compression).
    pub fn dedup_ratio(&self) -> f64 {
        ratio(self.logical_bytes, self.unique_bytes)
    }

    /// Logical bytes over stored bytes with zstd.
    pub fn dedup_zstd_ratio(&self) -> f64 {
        ratio(self.logical_bytes, self.stored_zstd)
    }

    /// Mean stored (zstd) bytes each snapshot after the first added: what a
    /// commit keeps and a push of it sends.
    pub fn added_per_snapshot_zstd(&self) -> u64 {
        if self.snapshots < 2 {
            return 0;
        }
        (self.stored_zstd - self.first.1) / (self.snapshots - 1)
    }
}

/// `a / b` as f64, 0 when `b` is 0.
pub fn ratio(a: u64, b: u64) -> f64 {
    if b == 0 {
        0.0
    } else {
        a as f64 / b as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_blocks_last_short() {
        let data = vec![7u8; 10_000];
        let mut lens = Vec::new();
        Chunker::Fixed(4096).for_each_chunk(&data, &mut |c| lens.push(c.len()));
        assert_eq!(lens, vec![4096, 4096, 1808]);
    }

    #[test]
    fn identical_snapshots_dedup_fully() {
        let mut data = vec![0u8; 300_000];
        crate::Prng::new(3).fill_semi(&mut data);
        for ch in standard_chunkers() {
            let mut s = DedupStats::new(ch);
            for _ in 0..3 {
                s.add_file(&data);
                s.end_snapshot();
            }
            assert_eq!(s.logical_bytes, 900_000);
            assert_eq!(s.unique_bytes, 300_000, "{}", ch.label());
            assert_eq!(s.added_per_snapshot_zstd(), 0);
            assert!(s.stored_zstd < s.unique_bytes);
        }
    }

    #[test]
    fn fastcdc_cut_points_are_pinned() {
        const PINNED: [usize; 6] = [16934, 30193, 14816, 17947, 14529, 17101];
        // Chunker parameters are part of what we compare: pin the cut points.
        let mut data = vec![0u8; 200_000];
        crate::Prng::new(11).fill_random(&mut data);
        let mut lens = Vec::new();
        Chunker::fastcdc(16 << 10).for_each_chunk(&data, &mut |c| lens.push(c.len()));
        assert_eq!(lens.iter().sum::<usize>(), data.len());
        let again = {
            let mut v = Vec::new();
            Chunker::fastcdc(16 << 10).for_each_chunk(&data, &mut |c| v.push(c.len()));
            v
        };
        assert_eq!(lens, again);
        assert_eq!(
            &lens[..6],
            &PINNED[..],
            "FastCDC cut points moved: {lens:?}"
        );
    }
}

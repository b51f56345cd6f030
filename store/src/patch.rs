//! Patched blocks: how an fsync stores a block that was only partly
//! rewritten. Instead of a new chunk of the whole block (hashed, encoded
//! and appended to the chunk log, then a second disk sync), the working
//! state records the block as its previous chunk (the *base*) plus the
//! byte ranges written over it, in the same synced RocksDB batch as the
//! rest of the fsync. This is the role ZFS's intent log plays for small
//! synchronous writes.
//!
//! Patched values live only in a branch's working state, never in a
//! snapshot tree: a commit turns them into chunks first, and so does the
//! next flush that is not an fsync. See docs/format.md.

use crate::error::{Error, Result};
use crate::id::Id;

/// First byte of a patched block value. A plain block value is exactly 36
/// bytes (chunk id, valid length); a patched one is at least 46.
const MARKER: u8 = 0xFF;
/// Fixed part: marker, has-base flag, base id, base length, length, count.
const HEADER: usize = 1 + 1 + 32 + 4 + 4 + 4;

/// A block stored as a base chunk with byte ranges written over it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Patched {
    /// The chunk the block was read from and its valid length; `None`:
    /// the block was a hole (zeros).
    pub base: Option<(Id, u32)>,
    /// The block's valid length (bytes past it read as zeros).
    pub len: u32,
    /// (offset in the block, bytes), in offset order, not overlapping.
    pub patches: Vec<(u32, Vec<u8>)>,
}

/// Whether a working-state block value is patched.
pub fn is_patched(v: &[u8]) -> bool {
    v.len() != 36 && v.first() == Some(&MARKER)
}

impl Patched {
    /// Bytes of data in the patches.
    pub fn patch_bytes(&self) -> usize {
        self.patches.iter().map(|(_, d)| d.len()).sum()
    }

    /// The byte ranges `[start, end)` the patches cover.
    pub fn ranges(&self) -> Vec<(u32, u32)> {
        self.patches
            .iter()
            .map(|(o, d)| (*o, *o + d.len() as u32))
            .collect()
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(HEADER + self.patches.len() * 8 + self.patch_bytes());
        v.push(MARKER);
        match &self.base {
            Some((id, len)) => {
                v.push(1);
                v.extend_from_slice(&id.0);
                v.extend_from_slice(&len.to_le_bytes());
            }
            None => {
                v.push(0);
                v.extend_from_slice(&[0u8; 36]);
            }
        }
        v.extend_from_slice(&self.len.to_le_bytes());
        v.extend_from_slice(&(self.patches.len() as u32).to_le_bytes());
        for (off, data) in &self.patches {
            v.extend_from_slice(&off.to_le_bytes());
            v.extend_from_slice(&(data.len() as u32).to_le_bytes());
            v.extend_from_slice(data);
        }
        v
    }

    /// Parses a patched value, checking that its patches are in order,
    /// do not overlap and lie within `block_size`.
    pub fn parse(v: &[u8], block_size: u32) -> Result<Patched> {
        let bad = |what: &str| Error::Corrupt(format!("patched block value: {what}"));
        if v.len() < HEADER || v[0] != MARKER {
            return Err(bad("too short or not marked"));
        }
        let u32_at = |at: usize| -> Result<u32> {
            v.get(at..at + 4)
                .and_then(|b| b.try_into().ok())
                .map(u32::from_le_bytes)
                .ok_or_else(|| bad("truncated"))
        };
        let base = match v[1] {
            0 => None,
            1 => {
                let id = Id(v[2..34].try_into().map_err(|_| bad("truncated base id"))?);
                Some((id, u32_at(34)?))
            }
            _ => return Err(bad("unknown base flag")),
        };
        let len = u32_at(38)?;
        let count = u32_at(42)? as usize;
        if len > block_size {
            return Err(bad("length past the block size"));
        }
        let mut patches = Vec::with_capacity(count.min(v.len() / 8));
        let mut at = HEADER;
        let mut end_of_last = 0u32;
        for _ in 0..count {
            let off = u32_at(at)?;
            let n = u32_at(at + 4)?;
            at += 8;
            let data = v
                .get(at..at + n as usize)
                .ok_or_else(|| bad("truncated patch"))?;
            at += n as usize;
            let end = off.checked_add(n).ok_or_else(|| bad("patch overflows"))?;
            if off < end_of_last || end > block_size || n == 0 {
                return Err(bad("patches overlap, are empty or leave the block"));
            }
            end_of_last = end;
            patches.push((off, data.to_vec()));
        }
        if at != v.len() {
            return Err(bad("trailing bytes"));
        }
        Ok(Patched { base, len, patches })
    }

    /// `self` with `newer` written over it, as a later fsync of the same
    /// block on the same base leaves it: `newer`'s length, its patches
    /// where they overlap older ones, the older ones (cut to that length)
    /// elsewhere. Adjacent patches are joined.
    pub fn overlaid(&self, newer: &Patched) -> Patched {
        let mut out: Vec<(u32, Vec<u8>)> = Vec::new();
        for (off, data) in &self.patches {
            let end = off.saturating_add(data.len() as u32).min(newer.len);
            if *off >= end {
                continue;
            }
            // The parts of this patch that no newer patch covers.
            let mut pieces = vec![(*off, end)];
            for (noff, ndata) in &newer.patches {
                let nend = noff.saturating_add(ndata.len() as u32);
                pieces = pieces
                    .into_iter()
                    .flat_map(|(s, e)| {
                        if nend <= s || *noff >= e {
                            return vec![(s, e)];
                        }
                        let mut kept = Vec::new();
                        if s < *noff {
                            kept.push((s, *noff));
                        }
                        if nend < e {
                            kept.push((nend, e));
                        }
                        kept
                    })
                    .collect();
            }
            for (s, e) in pieces {
                out.push((s, data[(s - off) as usize..(e - off) as usize].to_vec()));
            }
        }
        for (off, data) in &newer.patches {
            let end = off.saturating_add(data.len() as u32).min(newer.len);
            if *off < end {
                out.push((*off, data[..(end - off) as usize].to_vec()));
            }
        }
        out.sort_by_key(|(off, _)| *off);
        let mut patches: Vec<(u32, Vec<u8>)> = Vec::with_capacity(out.len());
        for (off, data) in out {
            match patches.last_mut() {
                Some((lo, ld)) if *lo + ld.len() as u32 == off => ld.extend_from_slice(&data),
                _ => patches.push((off, data)),
            }
        }
        Patched {
            base: newer.base,
            len: newer.len,
            patches,
        }
    }

    /// The block's bytes (`block_size` of them, zeros past `len`), given
    /// the base chunk's bytes (ignored when there is no base).
    pub fn apply(&self, base: &[u8], block_size: u32) -> Vec<u8> {
        let mut out = vec![0u8; block_size as usize];
        let len = (self.len as usize).min(out.len());
        if let Some((_, base_len)) = self.base {
            let n = (base_len as usize).min(base.len()).min(len);
            out[..n].copy_from_slice(&base[..n]);
        }
        for (off, data) in &self.patches {
            let from = (*off as usize).min(len);
            let to = (*off as usize + data.len()).min(len);
            out[from..to].copy_from_slice(&data[..to - from]);
        }
        out
    }
}

/// Merged, sorted byte ranges `[start, end)` of a block.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Ranges(Vec<(u32, u32)>);

impl Ranges {
    /// The union of `r` (in any order, overlapping or not).
    pub fn from_ranges(r: Vec<(u32, u32)>) -> Ranges {
        let mut out = Ranges::default();
        for (a, b) in r {
            out.add(a, b);
        }
        out
    }

    /// Adds `[start, end)`, merging it with ranges it overlaps or touches.
    pub fn add(&mut self, start: u32, end: u32) {
        if start >= end {
            return;
        }
        let (mut s, mut e) = (start, end);
        // First range that could touch [s, e): the first ending at or after s.
        let i = self.0.partition_point(|&(_, re)| re < s);
        let mut j = i;
        while j < self.0.len() && self.0[j].0 <= e {
            s = s.min(self.0[j].0);
            e = e.max(self.0[j].1);
            j += 1;
        }
        self.0.splice(i..j, [(s, e)]);
    }

    /// Bytes covered.
    pub fn bytes(&self) -> usize {
        self.0.iter().map(|(a, b)| (b - a) as usize).sum()
    }

    pub fn iter(&self) -> impl Iterator<Item = (u32, u32)> + '_ {
        self.0.iter().copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn ranges_merge_overlapping_and_touching() {
        let mut r = Ranges::default();
        r.add(10, 20);
        r.add(30, 40);
        r.add(20, 25);
        assert_eq!(r.0, vec![(10, 25), (30, 40)]);
        r.add(0, 5);
        r.add(24, 31);
        assert_eq!(r.0, vec![(0, 5), (10, 40)]);
        r.add(7, 7);
        assert_eq!(r.bytes(), 35);
    }

    #[test]
    fn bad_values_are_errors() {
        let p = Patched {
            base: None,
            len: 100,
            patches: vec![(10, vec![1; 5]), (20, vec![2; 5])],
        };
        let v = p.encode();
        assert!(is_patched(&v));
        assert_eq!(Patched::parse(&v, 4096).unwrap(), p);
        // Truncated anywhere, or with a trailing byte: an error, no panic.
        for n in 0..v.len() {
            assert!(Patched::parse(&v[..n], 4096).is_err(), "prefix {n}");
        }
        let mut long = v.clone();
        long.push(0);
        assert!(Patched::parse(&long, 4096).is_err());
        // A patch past the block size.
        assert!(Patched::parse(&v, 24).is_err());
        // Overlapping patches.
        let o = Patched {
            patches: vec![(10, vec![1; 5]), (12, vec![2; 5])],
            ..p
        };
        assert!(Patched::parse(&o.encode(), 4096).is_err());
    }

    proptest! {
        /// Applying the ranges of a written block to its base gives the
        /// block back, whatever the writes.
        #[test]
        fn patches_reproduce_the_block(
            base_len in 0u32..=256,
            len in 0u32..=256,
            writes in proptest::collection::vec((0u32..256, 1u32..64, any::<u8>()), 0..12),
            has_base in any::<bool>(),
        ) {
            let bs = 256u32;
            let base_bytes: Vec<u8> = (0..base_len).map(|i| (i * 7 + 1) as u8).collect();
            let base = has_base.then(|| (Id::of(&base_bytes), base_len));
            let start = Patched { base, len: bs, patches: Vec::new() };
            let mut block = start.apply(&base_bytes, bs);
            let mut ranges = Ranges::default();
            for (off, n, b) in writes {
                let end = (off + n).min(bs);
                block[off as usize..end as usize].fill(b);
                ranges.add(off, end);
            }
            // The block as the file holds it: zeros past its valid length.
            block[len as usize..].fill(0);
            let p = Patched {
                base,
                len,
                patches: ranges
                    .iter()
                    .filter(|&(a, _)| a < len)
                    .map(|(a, e)| (a, block[a as usize..e.min(len) as usize].to_vec()))
                    .collect(),
            };
            let back = Patched::parse(&p.encode(), bs).unwrap();
            prop_assert_eq!(back.apply(&base_bytes, bs), block);
        }

        /// The patches of a later fsync written over an earlier one's (what
        /// the merge operator does, see view.rs) give the block the file
        /// holds after both, as a well-formed value.
        #[test]
        fn overlaid_patches_reproduce_the_block(
            base_len in 0u32..=256,
            first in proptest::collection::vec((0u32..256, 1u32..64, any::<u8>()), 0..8),
            second in proptest::collection::vec((0u32..256, 1u32..64, any::<u8>()), 0..8),
            has_base in any::<bool>(),
        ) {
            let bs = 256u32;
            let base_bytes: Vec<u8> = (0..base_len).map(|i| (i * 7 + 1) as u8).collect();
            let base = has_base.then(|| (Id::of(&base_bytes), base_len));
            let mut block = Patched { base, len: bs, patches: Vec::new() }.apply(&base_bytes, bs);
            let mut len = if has_base { base_len } else { 0 };
            // Writes extend the valid length; each fsync stores its ranges.
            let fsync = |writes: &[(u32, u32, u8)], block: &mut Vec<u8>, len: &mut u32| {
                let mut ranges = Ranges::default();
                for &(off, n, b) in writes {
                    let end = (off + n).min(bs);
                    block[off as usize..end as usize].fill(b);
                    ranges.add(off, end);
                    *len = (*len).max(end);
                }
                Patched {
                    base,
                    len: *len,
                    patches: ranges.iter().map(|(a, e)| (a, block[a as usize..e as usize].to_vec())).collect(),
                }
            };
            let p0 = fsync(&first, &mut block, &mut len);
            let p1 = fsync(&second, &mut block, &mut len);
            block[len as usize..].fill(0);
            let both = Patched::parse(&p0.overlaid(&p1).encode(), bs).unwrap();
            prop_assert_eq!(both.apply(&base_bytes, bs), block);
        }
    }
}

//! The process's allocator: jemalloc, with zeroed allocations of up to
//! [`MEMSET_MAX`] zeroed by a `memset` of freshly allocated memory.
//!
//! jemalloc zeroes a reused extent with `madvise(MADV_DONTNEED)`, which
//! interrupts every other CPU running the process (a TLB shootdown) and
//! makes each page fault again at its first touch. The server allocates a
//! zeroed block for nearly every write into a block it does not buffer yet
//! (`vec![0; 64 KiB]`): fio's random 8 KiB writes made 2,700 such calls a
//! second, about one per write. Larger zeroed allocations keep jemalloc's
//! way (fresh pages from the kernel are zero already and cost nothing
//! until touched).

use std::alloc::{GlobalAlloc, Layout};
use tikv_jemallocator::Jemalloc;

/// Zeroed allocations up to this size are zeroed with `memset`.
const MEMSET_MAX: usize = 1 << 20;

/// jemalloc, zeroing small and medium allocations itself.
pub struct Allocator;

// SAFETY: every method forwards to jemalloc with the same layout and
// pointer; `alloc_zeroed` writes zeros over the `layout.size()` bytes that
// jemalloc's `alloc` just returned for that layout.
unsafe impl GlobalAlloc for Allocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { Jemalloc.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if layout.size() > MEMSET_MAX {
            // SAFETY: forwarded with the caller's guarantees.
            return unsafe { Jemalloc.alloc_zeroed(layout) };
        }
        // SAFETY: forwarded with the caller's guarantees; a non-null result
        // is valid for `layout.size()` bytes of writes.
        unsafe {
            let p = Jemalloc.alloc(layout);
            if !p.is_null() {
                std::ptr::write_bytes(p, 0, layout.size());
            }
            p
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { Jemalloc.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { Jemalloc.realloc(ptr, layout, new_size) }
    }
}

/// What jemalloc holds, for the server's memory log: the bytes the
/// process has allocated (Rust's and RocksDB's C++ alike), the pages those
/// sit in (`active`: allocated plus fragmentation), the pages resident
/// (also freed ones not yet given back), jemalloc's own metadata, and
/// mappings kept but given back (`retained`, not resident).
pub fn stats() -> String {
    use tikv_jemalloc_ctl::{epoch, stats};
    // Statistics are cached until the epoch advances.
    if let Err(e) = epoch::advance() {
        return format!("allocator statistics unavailable: {e}");
    }
    let mib = |r: tikv_jemalloc_ctl::Result<usize>| match r {
        Ok(b) => format!("{:.1} MiB", b as f64 / (1 << 20) as f64),
        Err(_) => "?".to_string(),
    };
    format!(
        "allocated {}, active {}, resident {}, metadata {}, retained {}",
        mib(stats::allocated::read()),
        mib(stats::active::read()),
        mib(stats::resident::read()),
        mib(stats::metadata::read()),
        mib(stats::retained::read()),
    )
}

#[cfg(test)]
mod tests {
    /// Memory given back dirty and asked for again zeroed reads as zeros,
    /// at the sizes the server uses (blocks) and past the memset bound.
    #[test]
    fn zeroed_allocations_are_zero_after_reuse() {
        for size in [100, 8 << 10, 64 << 10, 1 << 20, 4 << 20] {
            for _ in 0..8 {
                drop(std::hint::black_box(vec![0xa5u8; size]));
                let v = std::hint::black_box(vec![0u8; size]);
                assert!(v.iter().all(|&b| b == 0), "{size} bytes not zeroed");
            }
        }
    }
}

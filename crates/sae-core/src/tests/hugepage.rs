//! The huge-page allocator: every path (system blocks, mapped blocks, reallocation across the
//! threshold both ways) keeps the bytes, zeroes what it promises to, and aligns what it maps.

use crate::hugepage::{HugePageAlloc, HUGE_PAGE_THRESHOLD};
use std::alloc::{GlobalAlloc, Layout};

fn fill(ptr: *mut u8, len: usize, seed: u8) {
    for i in 0..len {
        unsafe { *ptr.add(i) = (i as u8).wrapping_mul(31).wrapping_add(seed) };
    }
}

fn holds(ptr: *const u8, len: usize, seed: u8) -> bool {
    (0..len).all(|i| unsafe { *ptr.add(i) } == (i as u8).wrapping_mul(31).wrapping_add(seed))
}

#[test]
fn huge_page_alloc_keeps_bytes_across_every_path() {
    let a = HugePageAlloc;
    let big = HUGE_PAGE_THRESHOLD + 12_345;
    for align in [1usize, 8, 64, 4096] {
        unsafe {
            // Small, then grown past the threshold (system block -> mapped block).
            let layout = Layout::from_size_align(1000, align).unwrap();
            let p = a.alloc(layout);
            assert!(!p.is_null());
            assert_eq!(p as usize % align, 0);
            fill(p, 1000, 7);
            let p = a.realloc(p, layout, big);
            assert!(!p.is_null());
            assert_eq!(p as usize % align, 0);
            assert!(holds(p, 1000, 7), "bytes lost growing past the threshold");
            if cfg!(target_os = "linux") {
                assert_eq!(
                    p as usize % (2 << 20),
                    0,
                    "a mapped block starts on a 2 MiB page"
                );
            }
            // Grown within the same mapping, then to a larger one.
            let layout = Layout::from_size_align(big, align).unwrap();
            fill(p, big, 3);
            let p2 = a.realloc(p, layout, big + 1000);
            assert!(holds(p2, big, 3));
            let layout = Layout::from_size_align(big + 1000, align).unwrap();
            let p3 = a.realloc(p2, layout, 3 * big);
            assert!(holds(p3, big, 3), "bytes lost moving to a larger mapping");
            // Shrunk below the threshold (mapped block -> system block).
            let layout = Layout::from_size_align(3 * big, align).unwrap();
            let p4 = a.realloc(p3, layout, 500);
            assert!(
                holds(p4, 500, 3),
                "bytes lost shrinking below the threshold"
            );
            a.dealloc(p4, Layout::from_size_align(500, align).unwrap());
        }
    }
}

#[test]
fn huge_page_alloc_zeroes_fresh_blocks() {
    let a = HugePageAlloc;
    for size in [100usize, HUGE_PAGE_THRESHOLD, 3 * HUGE_PAGE_THRESHOLD + 1] {
        let layout = Layout::from_size_align(size, 16).unwrap();
        unsafe {
            // Dirty a block first so a reused one would show.
            let d = a.alloc(layout);
            fill(d, size, 1);
            a.dealloc(d, layout);
            let p = a.alloc_zeroed(layout);
            assert!(!p.is_null());
            assert!((0..size).all(|i| *p.add(i) == 0), "size {size}: not zeroed");
            a.dealloc(p, layout);
        }
    }
}

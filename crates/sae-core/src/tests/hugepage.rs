//! The huge-page allocator: every path (system blocks, mapped blocks, reallocation across the
//! threshold both ways, in and out of a scope) keeps the bytes, zeroes what it promises to,
//! and aligns what it maps.

use crate::hugepage::{scope, HugePageAlloc, HUGE_PAGE_THRESHOLD};
use std::alloc::{GlobalAlloc, Layout};

fn fill(ptr: *mut u8, len: usize, seed: u8) {
    for i in 0..len {
        unsafe { *ptr.add(i) = (i as u8).wrapping_mul(31).wrapping_add(seed) };
    }
}

fn holds(ptr: *const u8, len: usize, seed: u8) -> bool {
    (0..len).all(|i| unsafe { *ptr.add(i) } == (i as u8).wrapping_mul(31).wrapping_add(seed))
}

fn is_mapped(p: *mut u8) -> bool {
    (p as usize).is_multiple_of(2 << 20)
}

#[test]
fn huge_page_alloc_keeps_bytes_across_every_path() {
    let a = HugePageAlloc;
    let big = HUGE_PAGE_THRESHOLD + 12_345;
    for align in [1usize, 8, 64, 4096] {
        let guard = scope();
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
                assert!(
                    is_mapped(p),
                    "a large block in scope starts on a 2 MiB page"
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
            // Freed after the scope ends: still recognised as mapped.
            drop(guard);
            let layout = Layout::from_size_align(3 * big, align).unwrap();
            let p4 = a.realloc(p3, layout, 500);
            assert!(
                holds(p4, 500, 3),
                "bytes lost shrinking below the threshold"
            );
            a.dealloc(p4, Layout::from_size_align(500, align).unwrap());
        }
    }
    // A mapped block of exactly the threshold shrunk below it within one mapped length:
    // it must move, since `dealloc` only looks up large blocks.
    unsafe {
        let _guard = scope();
        let layout = Layout::from_size_align(HUGE_PAGE_THRESHOLD, 16).unwrap();
        let p = a.alloc(layout);
        fill(p, HUGE_PAGE_THRESHOLD, 5);
        let small = HUGE_PAGE_THRESHOLD - (512 << 10);
        let q = a.realloc(p, layout, small);
        assert!(holds(q, small, 5));
        a.dealloc(q, Layout::from_size_align(small, 16).unwrap());
    }
    // Out of scope, large blocks are the system's; in a nested scope that ended, too.
    unsafe {
        {
            let _outer = scope();
            drop(scope());
            let layout = Layout::from_size_align(big, 64).unwrap();
            let p = a.alloc(layout);
            if cfg!(target_os = "linux") {
                assert!(
                    is_mapped(p),
                    "the outer scope still holds after an inner one ends"
                );
            }
            a.dealloc(p, layout);
        }
        let layout = Layout::from_size_align(big, 16).unwrap();
        let p = a.alloc(layout);
        fill(p, big, 9);
        let p = a.realloc(p, layout, 2 * big);
        assert!(holds(p, big, 9));
        a.dealloc(p, Layout::from_size_align(2 * big, 16).unwrap());
    }
}

#[test]
fn huge_page_alloc_zeroes_fresh_blocks() {
    let a = HugePageAlloc;
    let _guard = scope();
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

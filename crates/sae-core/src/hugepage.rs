//! A global allocator that backs large blocks with 2 MiB transparent huge pages.
//!
//! The sparse passes gather rows of 2-4 KiB at random from buffers of 10-40 MB (the inputs,
//! the residuals, the decoder, the encoder's transpose and their gradients). With 4 KiB
//! pages almost every gathered row misses the TLB, and at L0 200 the page walks cost as much
//! as a quarter of the latent pass. Linux backs a region with huge pages only when asked
//! (`madvise(MADV_HUGEPAGE)`, the default `enabled=madvise` setting) and only where the
//! region is 2 MiB aligned, which `malloc` does not promise; so blocks of
//! [`HUGE_PAGE_THRESHOLD`] bytes or more are mapped here directly, 2 MiB aligned, and
//! advised. Smaller blocks, and every block on other systems, go to the system allocator.
//!
//! Libraries never choose the allocator: the `sae` binary and the Python extension declare
//! `#[global_allocator] static ALLOC: HugePageAlloc = HugePageAlloc;`.

use std::alloc::{GlobalAlloc, Layout, System};

/// Blocks of this many bytes or more are mapped on their own, 2 MiB aligned.
pub const HUGE_PAGE_THRESHOLD: usize = 4 << 20;

const HUGE_PAGE: usize = 2 << 20;

/// The system allocator, with huge pages under large blocks (see the module note).
pub struct HugePageAlloc;

/// Whether a block of this layout is mapped on its own. `dealloc` and `realloc` decide from
/// the layout alone, so this must not depend on anything else.
fn mapped_alone(layout: Layout) -> bool {
    cfg!(target_os = "linux") && layout.size() >= HUGE_PAGE_THRESHOLD && layout.align() <= HUGE_PAGE
}

fn mapped_len(size: usize) -> usize {
    size.div_ceil(HUGE_PAGE) * HUGE_PAGE
}

#[cfg(target_os = "linux")]
unsafe fn map_aligned(size: usize) -> *mut u8 {
    let len = mapped_len(size);
    // One spare huge page of address space, so an aligned start exists inside the mapping;
    // the unaligned head and tail are handed back at once.
    let Some(reserve) = len.checked_add(HUGE_PAGE) else {
        return std::ptr::null_mut();
    };
    let raw = libc::mmap(
        std::ptr::null_mut(),
        reserve,
        libc::PROT_READ | libc::PROT_WRITE,
        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
        -1,
        0,
    );
    if raw == libc::MAP_FAILED {
        return std::ptr::null_mut();
    }
    let start = raw as usize;
    let aligned = start.div_ceil(HUGE_PAGE) * HUGE_PAGE;
    let head = aligned - start;
    let tail = reserve - head - len;
    if head > 0 {
        libc::munmap(raw, head);
    }
    if tail > 0 {
        libc::munmap((aligned + len) as *mut libc::c_void, tail);
    }
    // Advice only: where huge pages are switched off the block still works on 4 KiB pages.
    libc::madvise(aligned as *mut libc::c_void, len, libc::MADV_HUGEPAGE);
    aligned as *mut u8
}

#[cfg(not(target_os = "linux"))]
unsafe fn map_aligned(_size: usize) -> *mut u8 {
    unreachable!("blocks are mapped alone only on Linux")
}

#[cfg(target_os = "linux")]
unsafe fn unmap(ptr: *mut u8, size: usize) {
    libc::munmap(ptr as *mut libc::c_void, mapped_len(size));
}

#[cfg(not(target_os = "linux"))]
unsafe fn unmap(_ptr: *mut u8, _size: usize) {
    unreachable!("blocks are mapped alone only on Linux")
}

unsafe impl GlobalAlloc for HugePageAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if mapped_alone(layout) {
            map_aligned(layout.size())
        } else {
            System.alloc(layout)
        }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if mapped_alone(layout) {
            // Fresh anonymous mappings read as zero; nothing is touched until used.
            map_aligned(layout.size())
        } else {
            System.alloc_zeroed(layout)
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if mapped_alone(layout) {
            unmap(ptr, layout.size())
        } else {
            System.dealloc(ptr, layout)
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let new_layout = Layout::from_size_align_unchecked(new_size, layout.align());
        match (mapped_alone(layout), mapped_alone(new_layout)) {
            (false, false) => System.realloc(ptr, layout, new_size),
            (true, true) if mapped_len(layout.size()) == mapped_len(new_size) => ptr,
            _ => {
                let new_ptr = self.alloc(new_layout);
                if !new_ptr.is_null() {
                    let keep = layout.size().min(new_size);
                    std::ptr::copy_nonoverlapping(ptr, new_ptr, keep);
                    self.dealloc(ptr, layout);
                }
                new_ptr
            }
        }
    }
}

//! A global allocator that backs the trainer's large buffers with 2 MiB transparent huge
//! pages.
//!
//! The sparse passes gather rows of 2-4 KiB at random from buffers of 10-40 MB (the inputs,
//! the residuals, the decoder, the encoder's transpose and their gradients). With 4 KiB
//! pages most gathered rows miss the TLB. Linux backs a region with huge pages only when
//! asked (`madvise(MADV_HUGEPAGE)` under the default `enabled=madvise`) and only where the
//! region is 2 MiB aligned, which `malloc` does not promise; so blocks of
//! [`HUGE_PAGE_THRESHOLD`] bytes or more allocated inside a [`scope`] (the trainer's
//! construction and steps) are mapped here directly, 2 MiB aligned, and advised. Everything
//! else goes to the system allocator: a fresh huge page costs a fault that zeroes 2 MiB, and
//! in a VM whose host backs memory lazily that was slow enough (5 s more to load the model,
//! 10-20% slower harvest on the Zen 4 VM) that the model's short-lived tensors are better
//! off on recycled small pages.
//!
//! Libraries never choose the allocator: the `sae` binary and the Python extension declare
//! `#[global_allocator] static ALLOC: HugePageAlloc = HugePageAlloc;`. Under another
//! allocator [`scope`] does nothing.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::{Cell, UnsafeCell};
use std::sync::atomic::{AtomicBool, Ordering};

/// Blocks of this many bytes or more allocated in a [`scope`] are mapped on their own.
pub const HUGE_PAGE_THRESHOLD: usize = 4 << 20;

const HUGE_PAGE: usize = 2 << 20;
/// Live mapped blocks tracked at once; past this, blocks go to the system allocator.
const MAPPED_SLOTS: usize = 256;

thread_local! {
    static IN_SCOPE: Cell<bool> = const { Cell::new(false) };
}

/// While the returned guard lives, this thread's large blocks go on huge pages.
pub fn scope() -> HugePageScope {
    let before = IN_SCOPE.with(|s| s.replace(true));
    HugePageScope { before }
}

/// Restores the thread's setting from before [`scope`] when dropped.
pub struct HugePageScope {
    before: bool,
}

impl Drop for HugePageScope {
    fn drop(&mut self) {
        IN_SCOPE.with(|s| s.set(self.before));
    }
}

/// The system allocator, with huge pages under large blocks in a [`scope`].
pub struct HugePageAlloc;

/// The blocks mapped here, so that freeing one needs no flag: `(start, mapped length)`,
/// a length of 0 marking a free slot.
struct MappedBlocks {
    busy: AtomicBool,
    slots: UnsafeCell<[(usize, usize); MAPPED_SLOTS]>,
}

// The slots are only touched with `busy` held.
unsafe impl Sync for MappedBlocks {}

static MAPPED: MappedBlocks = MappedBlocks {
    busy: AtomicBool::new(false),
    slots: UnsafeCell::new([(0, 0); MAPPED_SLOTS]),
};

impl MappedBlocks {
    /// Runs `f` on the slots under a spin lock (held for one scan of the table).
    fn with<R>(&self, f: impl FnOnce(&mut [(usize, usize); MAPPED_SLOTS]) -> R) -> R {
        while self
            .busy
            .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            std::hint::spin_loop();
        }
        let r = f(unsafe { &mut *self.slots.get() });
        self.busy.store(false, Ordering::Release);
        r
    }

    /// Records a block; false when the table is full.
    fn insert(&self, start: usize, len: usize) -> bool {
        self.with(|slots| match slots.iter_mut().find(|s| s.1 == 0) {
            Some(slot) => {
                *slot = (start, len);
                true
            }
            None => false,
        })
    }

    /// Forgets the block at `start`, returning its mapped length if it was one of ours.
    fn remove(&self, start: usize) -> Option<usize> {
        self.with(|slots| {
            let slot = slots.iter_mut().find(|s| s.1 != 0 && s.0 == start)?;
            Some(std::mem::take(slot).1)
        })
    }
}

fn wants_mapping(layout: Layout) -> bool {
    cfg!(target_os = "linux")
        && layout.size() >= HUGE_PAGE_THRESHOLD
        && layout.align() <= HUGE_PAGE
        && IN_SCOPE.try_with(|s| s.get()).unwrap_or(false)
}

fn mapped_len(size: usize) -> usize {
    size.div_ceil(HUGE_PAGE) * HUGE_PAGE
}

/// A fresh block of `size` bytes, 2 MiB aligned and advised, recorded in `MAPPED`; null when
/// it could not be mapped or recorded.
#[cfg(target_os = "linux")]
unsafe fn map_block(size: usize) -> *mut u8 {
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
    if !MAPPED.insert(aligned, len) {
        libc::munmap(aligned as *mut libc::c_void, len);
        return std::ptr::null_mut();
    }
    // Advice only: where huge pages are switched off the block still works on 4 KiB pages.
    libc::madvise(aligned as *mut libc::c_void, len, libc::MADV_HUGEPAGE);
    aligned as *mut u8
}

#[cfg(not(target_os = "linux"))]
unsafe fn map_block(_size: usize) -> *mut u8 {
    std::ptr::null_mut()
}

#[cfg(target_os = "linux")]
unsafe fn unmap_block(ptr: *mut u8, len: usize) {
    libc::munmap(ptr as *mut libc::c_void, len);
}

#[cfg(not(target_os = "linux"))]
unsafe fn unmap_block(_ptr: *mut u8, _len: usize) {}

/// The mapped length of `ptr` if this allocator mapped it (only large blocks can be).
fn ours(ptr: *mut u8, layout: Layout) -> Option<usize> {
    if layout.size() < HUGE_PAGE_THRESHOLD || !(ptr as usize).is_multiple_of(HUGE_PAGE) {
        return None;
    }
    MAPPED.remove(ptr as usize)
}

unsafe impl GlobalAlloc for HugePageAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if wants_mapping(layout) {
            let p = map_block(layout.size());
            if !p.is_null() {
                return p;
            }
        }
        System.alloc(layout)
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if wants_mapping(layout) {
            // Fresh anonymous mappings read as zero; nothing is touched until used.
            let p = map_block(layout.size());
            if !p.is_null() {
                return p;
            }
        }
        System.alloc_zeroed(layout)
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        match ours(ptr, layout) {
            Some(len) => unmap_block(ptr, len),
            None => System.dealloc(ptr, layout),
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let new_layout = Layout::from_size_align_unchecked(new_size, layout.align());
        let mine = layout.size() >= HUGE_PAGE_THRESHOLD
            && (ptr as usize).is_multiple_of(HUGE_PAGE)
            && MAPPED.with(|s| s.iter().any(|b| b.1 != 0 && b.0 == ptr as usize));
        if !mine && !wants_mapping(new_layout) {
            return System.realloc(ptr, layout, new_size);
        }
        // In place only while the block stays large: `dealloc` looks up large blocks only.
        if mine
            && new_size >= HUGE_PAGE_THRESHOLD
            && mapped_len(layout.size()) == mapped_len(new_size)
        {
            return ptr;
        }
        let new_ptr = self.alloc(new_layout);
        if !new_ptr.is_null() {
            std::ptr::copy_nonoverlapping(ptr, new_ptr, layout.size().min(new_size));
            self.dealloc(ptr, layout);
        }
        new_ptr
    }
}

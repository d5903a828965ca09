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
//! off on recycled small pages. Freed mapped blocks are kept for reuse (up to
//! [`CACHE_BYTES`]), so a scratch buffer allocated on every step faults its pages in once.
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

/// The blocks mapped here, live or kept for reuse, so that freeing one needs no flag.
///
/// Freed blocks are kept (up to [`CACHE_BYTES`]) and handed out again to a request of the
/// same mapped length: a step that allocates and frees the same scratch every time (the
/// `gemm` crate's packing buffer) would otherwise fault in, and zero, fresh huge pages on
/// every step.
struct MappedBlocks {
    busy: AtomicBool,
    table: UnsafeCell<Table>,
}

struct Table {
    /// `(start, mapped length, freed at)`: a length of 0 marks an empty slot, a `freed at`
    /// of 0 a live block, else the `clock` reading when it was freed.
    slots: [(usize, usize, u64); MAPPED_SLOTS],
    kept_bytes: usize,
    clock: u64,
}

/// Bytes of freed mappings kept for reuse; the oldest are unmapped past this.
pub const CACHE_BYTES: usize = 256 << 20;

// The table is only touched with `busy` held.
unsafe impl Sync for MappedBlocks {}

static MAPPED: MappedBlocks = MappedBlocks {
    busy: AtomicBool::new(false),
    table: UnsafeCell::new(Table {
        slots: [(0, 0, 0); MAPPED_SLOTS],
        kept_bytes: 0,
        clock: 0,
    }),
};

impl MappedBlocks {
    /// Runs `f` on the table under a spin lock (held for a scan of the slots, or an munmap).
    fn with<R>(&self, f: impl FnOnce(&mut Table) -> R) -> R {
        while self
            .busy
            .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            std::hint::spin_loop();
        }
        let r = f(unsafe { &mut *self.table.get() });
        self.busy.store(false, Ordering::Release);
        r
    }

    /// The most recently freed kept block of exactly `len` bytes, now live again.
    fn reuse(&self, len: usize) -> Option<usize> {
        self.with(|t| {
            let slot = t
                .slots
                .iter_mut()
                .filter(|s| s.1 == len && s.2 != 0)
                .max_by_key(|s| s.2)?;
            slot.2 = 0;
            t.kept_bytes -= len;
            Some(slot.0)
        })
    }

    /// Records a fresh live block; false when every slot holds a live one.
    fn insert(&self, start: usize, len: usize) -> bool {
        self.with(|t| {
            if !t.slots.iter().any(|s| s.1 == 0) {
                t.evict_oldest();
            }
            match t.slots.iter_mut().find(|s| s.1 == 0) {
                Some(slot) => {
                    *slot = (start, len, 0);
                    true
                }
                None => false,
            }
        })
    }

    /// Whether `start` is a live block of ours.
    fn is_live(&self, start: usize) -> bool {
        self.with(|t| t.slots.iter().any(|s| s.1 != 0 && s.2 == 0 && s.0 == start))
    }

    /// Frees the live block at `start` into the kept ones (unmapping the oldest past
    /// `CACHE_BYTES`); false if it is not one of ours.
    fn free(&self, start: usize) -> bool {
        self.with(|t| {
            t.clock += 1;
            let clock = t.clock;
            let Some(slot) = t
                .slots
                .iter_mut()
                .find(|s| s.1 != 0 && s.2 == 0 && s.0 == start)
            else {
                return false;
            };
            slot.2 = clock;
            t.kept_bytes += slot.1;
            while t.kept_bytes > CACHE_BYTES && t.evict_oldest() {}
            true
        })
    }
}

impl Table {
    /// Unmaps the kept block freed longest ago; false when none is kept.
    fn evict_oldest(&mut self) -> bool {
        let Some(slot) = self
            .slots
            .iter_mut()
            .filter(|s| s.1 != 0 && s.2 != 0)
            .min_by_key(|s| s.2)
        else {
            return false;
        };
        let (start, len, _) = std::mem::take(slot);
        self.kept_bytes -= len;
        unsafe { unmap_block(start as *mut u8, len) };
        true
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

/// A block of `size` bytes, 2 MiB aligned and advised, recorded in `MAPPED`: a kept one of
/// its length (zeroed if asked), else a fresh mapping; null when it could not be mapped or
/// recorded.
#[cfg(target_os = "linux")]
unsafe fn map_block(size: usize, zeroed: bool) -> *mut u8 {
    let len = mapped_len(size);
    if let Some(start) = MAPPED.reuse(len) {
        if zeroed {
            std::ptr::write_bytes(start as *mut u8, 0, size);
        }
        return start as *mut u8;
    }
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
unsafe fn map_block(_size: usize, _zeroed: bool) -> *mut u8 {
    std::ptr::null_mut()
}

#[cfg(target_os = "linux")]
unsafe fn unmap_block(ptr: *mut u8, len: usize) {
    libc::munmap(ptr as *mut libc::c_void, len);
}

#[cfg(not(target_os = "linux"))]
unsafe fn unmap_block(_ptr: *mut u8, _len: usize) {}

/// Whether `ptr` may be a block of ours (only large, aligned blocks can be).
fn may_be_ours(ptr: *mut u8, layout: Layout) -> bool {
    layout.size() >= HUGE_PAGE_THRESHOLD && (ptr as usize).is_multiple_of(HUGE_PAGE)
}

/// A mapped block in scope (zeroed if asked: a fresh mapping reads as zero), else null.
unsafe fn mapped_in_scope(layout: Layout, zeroed: bool) -> *mut u8 {
    match wants_mapping(layout) {
        true => map_block(layout.size(), zeroed),
        false => std::ptr::null_mut(),
    }
}

unsafe impl GlobalAlloc for HugePageAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        match mapped_in_scope(layout, false) {
            p if p.is_null() => System.alloc(layout),
            p => p,
        }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        match mapped_in_scope(layout, true) {
            p if p.is_null() => System.alloc_zeroed(layout),
            p => p,
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if !(may_be_ours(ptr, layout) && MAPPED.free(ptr as usize)) {
            System.dealloc(ptr, layout)
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let new_layout = Layout::from_size_align_unchecked(new_size, layout.align());
        let mine = may_be_ours(ptr, layout) && MAPPED.is_live(ptr as usize);
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

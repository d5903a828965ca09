//! Raw row access for tasks that own disjoint rows of a shared buffer.

/// Mutable rows of a `[rows, d]` buffer shared by tasks that touch disjoint rows.
#[derive(Clone, Copy)]
pub(super) struct SharedRows {
    ptr: *mut f32,
    len: usize,
    d: usize,
}
// SAFETY: only used in the latent pass, where each row index belongs to exactly one task.
unsafe impl Send for SharedRows {}
unsafe impl Sync for SharedRows {}

impl SharedRows {
    pub(super) fn new(v: &mut [f32], d: usize) -> Self {
        SharedRows {
            ptr: v.as_mut_ptr(),
            len: v.len(),
            d,
        }
    }
    /// # Safety
    /// No other live reference to row `j` may exist.
    #[allow(clippy::mut_from_ref)]
    pub(super) unsafe fn row(&self, j: usize) -> &mut [f32] {
        if self.len == 0 {
            return &mut [];
        }
        debug_assert!((j + 1) * self.d <= self.len);
        std::slice::from_raw_parts_mut(self.ptr.add(j * self.d), self.d)
    }
}

#[derive(Clone, Copy)]
pub(super) struct SharedU64(pub(super) *mut u64);
unsafe impl Send for SharedU64 {}
unsafe impl Sync for SharedU64 {}
impl SharedU64 {
    /// # Safety
    /// `j` in bounds and owned by the calling task.
    #[allow(clippy::mut_from_ref)]
    pub(super) unsafe fn at(&self, j: usize) -> &mut u64 {
        &mut *self.0.add(j)
    }
}

//! Growable buffers of 4-byte words that start on a 64-byte cache line.
//!
//! The AMX tiles load and store 64-byte rows; a row that straddles two lines costs two. A
//! `Vec`'s start is wherever the allocator put it (16 bytes past a page for a fresh large
//! block), so with `Vec` operands and outputs the harvest's speed in bf16 moved by a fifth
//! with the length of the command line (which shifts the heap). These buffers fix the start;
//! rows whose length is a multiple of 16 words then stay aligned throughout.

use std::marker::PhantomData;
use std::ops::{Deref, DerefMut};

/// Words these buffers hold: 4 bytes, every bit pattern valid, zero bits are zero.
pub trait Word: Copy + Send + Sync + 'static {}
impl Word for u32 {}
impl Word for f32 {}

#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([u32; 16]);

const WORDS_PER_LINE: usize = 16;

/// A growable `[T]` whose first word is 64-byte aligned.
pub struct AlignedVec<T: Word> {
    lines: Vec<Line>,
    len: usize,
    _word: PhantomData<T>,
}

impl<T: Word> Default for AlignedVec<T> {
    fn default() -> Self {
        Self {
            lines: Vec::new(),
            len: 0,
            _word: PhantomData,
        }
    }
}

impl<T: Word> Clone for AlignedVec<T> {
    fn clone(&self) -> Self {
        Self {
            lines: self.lines.clone(),
            len: self.len,
            _word: PhantomData,
        }
    }
}

impl<T: Word> std::fmt::Debug for AlignedVec<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AlignedVec(len {})", self.len)
    }
}

impl<T: Word> AlignedVec<T> {
    /// `len` zero words.
    pub fn zeroed(len: usize) -> Self {
        let mut v = Self::default();
        v.resize(len);
        v
    }

    /// Sets the length to `len`; words past the old length are zero (also those a shorter
    /// length left behind earlier).
    pub fn resize(&mut self, len: usize) {
        if len > self.len {
            let lines = len.div_ceil(WORDS_PER_LINE);
            if lines > self.lines.len() {
                self.lines.resize(lines, Line([0; WORDS_PER_LINE]));
            }
            let old = self.len;
            self.len = len;
            self[old..].fill(Self::zero());
        } else {
            self.len = len;
        }
    }

    fn zero() -> T {
        // SAFETY: `Word` types are 4 bytes for which zero bits are a valid zero.
        unsafe { std::mem::transmute_copy(&0u32) }
    }
}

impl<T: Word> Deref for AlignedVec<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        // SAFETY: `lines` holds at least `len` initialised 4-byte words, and `Word` types are
        // 4 bytes, 4-aligned, with every bit pattern valid.
        unsafe { std::slice::from_raw_parts(self.lines.as_ptr().cast(), self.len) }
    }
}

impl<T: Word> DerefMut for AlignedVec<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        // SAFETY: as in `deref`, and `&mut self` makes the borrow unique.
        unsafe { std::slice::from_raw_parts_mut(self.lines.as_mut_ptr().cast(), self.len) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starts_on_a_line_and_zeroes_what_it_grows() {
        let mut v = AlignedVec::<f32>::zeroed(5);
        assert_eq!(v.as_ptr() as usize % 64, 0);
        assert_eq!(&v[..], &[0.0; 5]);
        v.fill(3.0);
        v.resize(2);
        v.resize(40);
        assert_eq!(v.as_ptr() as usize % 64, 0);
        assert_eq!(&v[..2], &[3.0; 2]);
        assert!(v[2..].iter().all(|&x| x == 0.0), "regrown words are zero");
        assert_eq!(v.len(), 40);
    }
}

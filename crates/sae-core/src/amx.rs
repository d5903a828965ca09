//! Intel AMX tiles for the bf16 products: `tdpbf16ps` multiplies a 16 x 32 bf16 tile by a
//! 32 x 16 one into 16 x 16 f32 sums, 16 times the work of one `vdpbf16ps`.
//!
//! The operands are the ones `bf16` already makes: activation rows rounded to bf16 pairs
//! (`k.div_ceil(2)` u32 per row) and `PackedBf16` panels, whose rows are pairs of k and whose
//! 48 columns are three tiles' worth side by side. A tile loads straight from both with a
//! row stride, so nothing is repacked.
//!
//! Per call, `panel_sums` computes at most `ROWS` rows against one panel: the first two
//! column groups as a 2 x 2 block of sum tiles (tmm0-tmm3) fed by two activation tiles
//! (tmm4, tmm5) and two weight tiles (tmm6, tmm7), then the third group with half of them.
//! The tiles are not renamed, so the loads are interleaved with the products that wait on
//! them; that took a 2 x 2 step from 102 to 63 ns on the Xeon this was written on.
//!
//! Sums: the hardware adds each tile step's 32 products to the f32 sum in an order Intel does
//! not specify, with its own rounding (neither the even-then-odd nor the odd-then-even chain
//! of roundings, nor one exact rounding per step, matched all 256 sums of a random tile here).
//! The error stayed within 1.43 units of f32 rounding of the absolute sum per 32 products,
//! inside the recursive-summation bound the screened step uses (`ScreenMargin`, which the
//! bf16 tests check on this path). The results are deterministic: the same inputs give the
//! same bits, whatever the thread count. They are not the bits of the `vdpbf16ps` path.
//!
//! `Tiles::Emulated` computes the same sums in plain code (not the tiles' bits), so that the
//! code around the tiles runs in the tests of every CPU, not only of those with AMX.
//!
//! Linux gives a process the tile registers' state only after `arch_prctl(ARCH_REQ_XCOMP_PERM,
//! XFEATURE_XTILEDATA)`; `available` asks once. The tile configuration is per thread: each call
//! reads the current one (`sttilecfg`, about 5 ns) and loads its own only when it differs
//! (`ldtilecfg`, about 65 ns), so code elsewhere that configures the tiles on the same thread
//! is not trusted to have left ours.

use crate::bf16::PANEL_COLS;

/// Rows per `panel_sums` call: two tiles of 16.
pub const ROWS: usize = 32;
/// Pairs of k per tile step (a tile row is 64 bytes).
const STEP: usize = 16;

/// Room for the sums of `ROWS` rows against one panel (row stride `PANEL_COLS`), for
/// `panel_sums` to write into where they do not go straight to their destination. Left
/// uninitialised: only what `panel_sums` wrote is read back. Aligned to cache lines, so that
/// each 64-byte tile row is one line (a stack position that splits them cost up to a fifth
/// of a harvest's speed).
#[repr(C, align(64))]
#[derive(Clone, Copy)]
pub struct PanelSums(std::mem::MaybeUninit<[[f32; PANEL_COLS]; ROWS]>);

impl PanelSums {
    pub fn uninit() -> Self {
        PanelSums(std::mem::MaybeUninit::uninit())
    }

    /// The first sum; row `r` starts `r * PANEL_COLS` after it.
    pub fn as_ptr(&self) -> *const f32 {
        self.0.as_ptr().cast()
    }

    /// The first sum, for `Target::out` (row stride `PANEL_COLS`).
    pub fn as_mut_ptr(&mut self) -> *mut f32 {
        self.0.as_mut_ptr().cast()
    }
}

/// Runs `f` on `n` of this thread's `PanelSums` buffers, kept between calls rather than
/// allocated per tile (tens of KB each time, which the allocator may hand back to the OS and
/// fault in again).
pub fn with_sums<R>(n: usize, f: impl FnOnce(&mut [PanelSums]) -> R) -> R {
    thread_local! {
        static KEPT: std::cell::RefCell<Vec<PanelSums>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    KEPT.with(|kept| {
        let mut kept = kept.borrow_mut();
        if kept.len() < n {
            kept.resize(n, PanelSums::uninit());
        }
        f(&mut kept[..n])
    })
}

/// Where `panel_sums` computes: on the tiles, or in plain code that makes the same writes
/// (each sum in f32, in order of k), so that the code around the tiles (the tiling, the
/// staging of partial panels, the chunks of k) is tested against the f32 reference on CPUs
/// without AMX too. The emulated sums are not the tiles' bits (see the module notes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tiles {
    Hardware,
    Emulated,
}

/// Whether this CPU has AMX-TILE and AMX-BF16, the OS granted the tile state, and the CPU has
/// AVX512-BF16 (which rounds the activations). Asked once per process.
pub fn available() -> bool {
    static OK: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *OK.get_or_init(imp::detect)
}

/// Pairs of k per chunk of a tile's activation rows (a multiple of the tile step): 32 rows of
/// 144 pairs are 18 KB, which stay in L1 while the panels of a block stream past; 288 pairs
/// (SmolLM2's 576 inputs) did not, and ran a 4096-column product at 1.54 TFLOP/s per core
/// against 1.80 in two chunks of 144.
const K_CHUNK: usize = 144;

/// The ranges of pairs of k, in order, over which a product of `kp` pairs calls
/// `panel_sums`: one when the rows are short, else chunks of `K_CHUNK`. Each call after the
/// first adds onto the sums so far, which round-trip through memory as exact f32, so the
/// result has the bits of one call over all of k.
fn k_chunks(kp: usize) -> impl Iterator<Item = std::ops::Range<usize>> {
    let step = if kp <= K_CHUNK + K_CHUNK / 4 {
        kp.max(1)
    } else {
        K_CHUNK
    };
    (0..kp).step_by(step).map(move |k0| k0..kp.min(k0 + step))
}

/// `out[r * out_rs + c] (+)= sum_{j in k} a[r * a_stride + j] . panel[j * PANEL_COLS + c]`
/// (bf16 pair dot products) for `r < rows` and every `c` of the column groups of 16 that hold
/// the first `cols` columns (so up to `cols.next_multiple_of(16)` per row are written), added
/// onto what `out` holds when `accumulate`. `a` holds `rows` rounded rows of `a_stride` pairs;
/// `panel` is a whole `PackedBf16` panel, of at least `k.end` rows. `k.start` must be a
/// multiple of 16 (as `k_chunks` gives).
///
/// # Safety
/// `out` must be valid for those reads and writes. On `Tiles::Hardware`, panics unless
/// `available()`.
#[allow(clippy::too_many_arguments)]
pub unsafe fn panel_sums(
    tiles: Tiles,
    rows: usize,
    a: &[u32],
    a_stride: usize,
    k: std::ops::Range<usize>,
    panel: &[u32],
    cols: usize,
    out: *mut f32,
    out_rs: usize,
    accumulate: bool,
) {
    assert!(
        tiles == Tiles::Emulated || available(),
        "AMX products need AMX-TILE and AMX-BF16"
    );
    assert!((1..=ROWS).contains(&rows) && (1..=PANEL_COLS).contains(&cols));
    assert!(k.start < k.end && k.start.is_multiple_of(STEP) && k.end <= a_stride);
    assert!(a.len() >= (rows - 1) * a_stride + k.end && panel.len() >= k.end * PANEL_COLS);
    if tiles == Tiles::Emulated {
        let a = (0..rows).map(|r| &a[r * a_stride + k.start..][..k.len()]);
        return emulated_sums(
            a,
            &panel[k.start * PANEL_COLS..],
            cols,
            out,
            out_rs,
            accumulate,
        );
    }
    // AMX checked; the asserts above bound every tile load (see `imp::sums`); the caller
    // vouches for `out`.
    imp::sums(
        rows,
        a.as_ptr().add(k.start),
        a_stride,
        k.len(),
        panel.as_ptr().add(k.start * PANEL_COLS),
        cols,
        out,
        out_rs,
        accumulate,
    )
}

/// `panel_sums` in plain code: for each row of `a` (pairs of one chunk of k) and each column
/// of the groups of 16 holding the first `cols`, the sum over the pairs, in f32 in order of
/// k, of both halves' products.
///
/// # Safety
/// As `panel_sums`: `out` valid for those reads and writes.
unsafe fn emulated_sums<'a>(
    a: impl Iterator<Item = &'a [u32]>,
    panel: &[u32],
    cols: usize,
    out: *mut f32,
    out_rs: usize,
    accumulate: bool,
) {
    let half =
        |v: u32, hi: bool| crate::bf16::from_bf16(if hi { (v >> 16) as u16 } else { v as u16 });
    for (r, row) in a.enumerate() {
        for c in 0..cols.next_multiple_of(16) {
            let o = out.add(r * out_rs + c);
            let mut s = if accumulate { *o } else { 0.0 };
            for (j, &x) in row.iter().enumerate() {
                let w = panel[j * PANEL_COLS + c];
                s += half(x, false) * half(w, false) + half(x, true) * half(w, true);
            }
            *o = s;
        }
    }
}

/// Where `chunked_sums` puts one panel's sums: a whole `PackedBf16` panel, the columns of it
/// wanted, and the first sum with its row stride (`out_rs` floats).
pub struct Target<'a> {
    pub panel: &'a [u32],
    pub cols: usize,
    pub out: *mut f32,
    pub out_rs: usize,
}

/// `panel_sums` of `rows` rows of `a` (`kp` pairs each) against `n` panels, `target(i)` saying
/// where panel i's sums go, over all of k: in `k_chunks`, k outermost, so that a chunk of the
/// rows stays in L1 across the panels. Each sum has the bits of one call over all of k.
///
/// # Safety
/// Every target's `out` must be valid for `panel_sums`' reads and writes. On
/// `Tiles::Hardware`, panics unless `available()`.
pub unsafe fn chunked_sums<'a>(
    tiles: Tiles,
    rows: usize,
    a: &[u32],
    kp: usize,
    n: usize,
    mut target: impl FnMut(usize) -> Target<'a>,
) {
    for k in k_chunks(kp) {
        for i in 0..n {
            let t = target(i);
            let more = k.start > 0;
            panel_sums(
                tiles,
                rows,
                a,
                kp,
                k.clone(),
                t.panel,
                t.cols,
                t.out,
                t.out_rs,
                more,
            );
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod imp {
    use super::{PANEL_COLS, ROWS, STEP};
    use std::arch::asm;

    /// The 64-byte operand of `ldtilecfg`/`sttilecfg`, palette 1.
    #[repr(C, align(64))]
    #[derive(Clone, Copy, PartialEq, Eq)]
    struct TileConfig {
        palette: u8,
        start_row: u8,
        reserved: [u8; 14],
        colsb: [u16; 16],
        rows: [u8; 16],
    }

    impl TileConfig {
        const EMPTY: TileConfig = TileConfig {
            palette: 0,
            start_row: 0,
            reserved: [0; 14],
            colsb: [0; 16],
            rows: [0; 16],
        };

        /// tmm0, tmm1: sums of the first `r0` rows (two column groups); tmm2, tmm3: of the
        /// next `r1`; tmm4, tmm5: those rows' activations; tmm6, tmm7: 16 pair rows of
        /// weights for two column groups. A tile of 0 rows stays unconfigured.
        fn for_rows(r0: usize, r1: usize) -> Self {
            let mut c = Self::EMPTY;
            c.palette = 1;
            let mut set = |tiles: &[usize], rows: usize| {
                for &t in tiles.iter().filter(|_| rows > 0) {
                    c.rows[t] = rows as u8;
                    c.colsb[t] = 64;
                }
            };
            set(&[0, 1, 4], r0);
            set(&[2, 3, 5], r1);
            set(&[6, 7], STEP);
            c
        }
    }

    pub(super) fn detect() -> bool {
        // CPUID leaf 7: EDX bit 22 is AMX-BF16, bit 24 AMX-TILE.
        let leaf = std::arch::x86_64::__cpuid_count(7, 0);
        let has = |bit: u32| leaf.edx >> bit & 1 == 1;
        has(22) && has(24) && crate::kernels::cpu_has!("avx512f", "avx512bf16") && request()
    }

    #[cfg(target_os = "linux")]
    fn request() -> bool {
        const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
        const XFEATURE_XTILEDATA: libc::c_long = 18;
        // SAFETY: a plain system call; it only changes which state this process may use.
        unsafe {
            libc::syscall(
                libc::SYS_arch_prctl,
                ARCH_REQ_XCOMP_PERM,
                XFEATURE_XTILEDATA,
            ) == 0
        }
    }

    #[cfg(not(target_os = "linux"))]
    fn request() -> bool {
        false
    }

    /// Loads `want` unless it is this thread's configuration already.
    unsafe fn configure(want: &TileConfig) {
        let mut now = TileConfig::EMPTY;
        asm!("sttilecfg [{}]", in(reg) &mut now, options(nostack));
        if now != *want {
            asm!("ldtilecfg [{}]", in(reg) want, options(nostack));
        }
    }

    macro_rules! load {
        ($tile:literal, $ptr:expr, $stride:expr) => {
            asm!(
                concat!("tileloadd ", $tile, ", [{p} + {s} * 1]"),
                p = in(reg) $ptr,
                s = in(reg) $stride,
                options(nostack, readonly),
            )
        };
    }
    macro_rules! dot {
        ($c:literal, $a:literal, $b:literal) => {
            asm!(
                concat!("tdpbf16ps ", $c, ", ", $a, ", ", $b),
                options(nostack)
            )
        };
    }
    macro_rules! store {
        ($tile:literal, $ptr:expr, $stride:expr) => {
            asm!(
                concat!("tilestored [{p} + {s} * 1], ", $tile),
                p = in(reg) $ptr,
                s = in(reg) $stride,
                options(nostack),
            )
        };
    }

    /// `$op` (`load` or `store`) on the sum tiles in use between them and `out` (row stride
    /// `out_rs` floats): tmm0 at `out`, tmm1 16 columns on when `two`, tmm2 and tmm3 16 rows
    /// below them when `lower`.
    macro_rules! sum_tiles {
        ($op:ident, $out:expr, $out_rs:expr, $two:expr, $lower:expr) => {{
            let (out, out_rs) = ($out, $out_rs);
            $op!("tmm0", out, out_rs * 4);
            if $two {
                $op!("tmm1", out.add(16), out_rs * 4);
            }
            if $lower {
                $op!("tmm2", out.add(16 * out_rs), out_rs * 4);
                if $two {
                    $op!("tmm3", out.add(16 * out_rs + 16), out_rs * 4);
                }
            }
        }};
    }

    /// The last `kp % STEP` pairs of the rows and of the panel, zero-padded to a whole step,
    /// so that no tile load reads past either.
    #[repr(C, align(64))]
    struct Tail {
        a: [[u32; STEP]; ROWS],
        b: [[u32; PANEL_COLS]; STEP],
    }

    /// See `panel_sums`, for the `kp` pairs from `a` and `panel` on. Tile loads read, per step
    /// `t < kp / STEP`, activation values `[r * a_stride + STEP t, r * a_stride + STEP (t + 1))`
    /// of rows `r < rows` and panel rows `STEP t .. STEP (t + 1)`, columns below `PANEL_COLS`;
    /// the last partial step reads `Tail` instead. With `accumulate` the sum tiles start from
    /// `out`, else from zero.
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn sums(
        rows: usize,
        a: *const u32,
        a_stride: usize,
        kp: usize,
        panel: *const u32,
        cols: usize,
        out: *mut f32,
        out_rs: usize,
        accumulate: bool,
    ) {
        let (r0, r1) = (rows.min(16), rows.saturating_sub(16));
        configure(&TileConfig::for_rows(r0, r1));
        let (whole, rem) = (kp / STEP, kp % STEP);
        let mut tail = None;
        if rem > 0 {
            let mut t = Tail {
                a: [[0; STEP]; ROWS],
                b: [[0; PANEL_COLS]; STEP],
            };
            for r in 0..rows {
                let src = std::slice::from_raw_parts(a.add(r * a_stride + whole * STEP), rem);
                t.a[r][..rem].copy_from_slice(src);
            }
            for j in 0..rem {
                let src = std::slice::from_raw_parts(
                    panel.add((whole * STEP + j) * PANEL_COLS),
                    PANEL_COLS,
                );
                t.b[j].copy_from_slice(src);
            }
            tail = Some(t);
        }
        let steps = whole + usize::from(rem > 0);
        // (activations, their row stride in bytes, panel rows) of step t.
        let step = |t: usize| -> (*const u32, usize, *const u32) {
            match &tail {
                Some(tl) if t == whole => (tl.a.as_ptr().cast(), STEP * 4, tl.b.as_ptr().cast()),
                _ => (
                    a.add(t * STEP),
                    a_stride * 4,
                    panel.add(t * STEP * PANEL_COLS),
                ),
            }
        };
        let b_rs = PANEL_COLS * 4;
        let out_bytes = out_rs * 4;
        let groups = cols.div_ceil(16);
        // Column groups 0 and 1 (or 0 alone).
        let two = groups >= 2;
        if accumulate {
            sum_tiles!(load, out, out_rs, two, r1 > 0);
        } else {
            asm!("tilezero tmm0", "tilezero tmm1", options(nostack, nomem));
            if r1 > 0 {
                asm!("tilezero tmm2", "tilezero tmm3", options(nostack, nomem));
            }
        }
        for t in 0..steps {
            let (ap, a_rs, bp) = step(t);
            load!("tmm4", ap, a_rs);
            load!("tmm6", bp, b_rs);
            dot!("tmm0", "tmm4", "tmm6");
            if two {
                load!("tmm7", bp.add(16), b_rs);
                dot!("tmm1", "tmm4", "tmm7");
            }
            if r1 > 0 {
                load!("tmm5", (ap as *const u8).add(16 * a_rs), a_rs);
                dot!("tmm2", "tmm5", "tmm6");
                if two {
                    dot!("tmm3", "tmm5", "tmm7");
                }
            }
        }
        sum_tiles!(store, out, out_rs, two, r1 > 0);
        if groups < 3 {
            return;
        }
        // Column group 2.
        if accumulate {
            load!("tmm0", out.add(32), out_bytes);
            if r1 > 0 {
                load!("tmm2", out.add(16 * out_rs + 32), out_bytes);
            }
        } else {
            asm!("tilezero tmm0", options(nostack, nomem));
            if r1 > 0 {
                asm!("tilezero tmm2", options(nostack, nomem));
            }
        }
        for t in 0..steps {
            let (ap, a_rs, bp) = step(t);
            load!("tmm4", ap, a_rs);
            load!("tmm6", bp.add(32), b_rs);
            dot!("tmm0", "tmm4", "tmm6");
            if r1 > 0 {
                load!("tmm5", (ap as *const u8).add(16 * a_rs), a_rs);
                dot!("tmm2", "tmm5", "tmm6");
            }
        }
        store!("tmm0", out.add(32), out_bytes);
        if r1 > 0 {
            store!("tmm2", out.add(16 * out_rs + 32), out_bytes);
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
mod imp {
    pub(super) fn detect() -> bool {
        false
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn sums(
        _rows: usize,
        _a: *const u32,
        _a_stride: usize,
        _kp: usize,
        _panel: *const u32,
        _cols: usize,
        _out: *mut f32,
        _out_rs: usize,
        _accumulate: bool,
    ) {
        unreachable!("AMX is x86_64 only");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The ways `panel_sums` runs on this CPU.
    fn tiles_here() -> Vec<Tiles> {
        match available() {
            true => vec![Tiles::Hardware, Tiles::Emulated],
            false => vec![Tiles::Emulated],
        }
    }

    #[test]
    fn chunks_cover_k_in_whole_steps() {
        for kp in [1, 15, 16, 144, 180, 181, 288, 300, 768] {
            let chunks: Vec<_> = k_chunks(kp).collect();
            assert_eq!(chunks.first().unwrap().start, 0);
            assert_eq!(chunks.last().unwrap().end, kp);
            for w in chunks.windows(2) {
                assert_eq!(w[0].end, w[1].start);
                assert!(w[1].start.is_multiple_of(STEP), "kp {kp}: {chunks:?}");
            }
            assert!(chunks.iter().all(|c| c.len() <= K_CHUNK + K_CHUNK / 4));
        }
    }

    /// Sums over k in chunks, through memory between them, against one call over all of k:
    /// the same bits (a partial last step included), into a buffer, straight into a wider
    /// output, and through `chunked_sums`; on the tiles where the CPU has them, and emulated.
    #[test]
    fn chunked_sums_have_the_bits_of_one_pass() {
        for tiles in tiles_here() {
            chunked_sums_match_one_pass(tiles);
        }
    }

    fn chunked_sums_match_one_pass(tiles: Tiles) {
        let mut seed = 7u64;
        let mut next = || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            // Two bf16 values in [-2, 2), exponents varied so the order of the sums matters.
            let half = |x: u64| {
                let v = ((x & 0xffff) as f32 / 32768.0 - 1.0) * 2.0 * (1 << (x >> 16 & 7)) as f32;
                crate::bf16::to_bf16(v) as u32
            };
            half(seed >> 20) | half(seed >> 40) << 16
        };
        for (rows, kp, cols) in [(32usize, 300usize, 48usize), (19, 288, 40), (32, 400, 48)] {
            let a: Vec<u32> = (0..rows * kp).map(|_| next()).collect();
            let panel: Vec<u32> = (0..kp * PANEL_COLS).map(|_| next()).collect();
            let mut whole = PanelSums::uninit();
            let sums_in = |s: &mut PanelSums| s.as_mut_ptr();
            unsafe {
                panel_sums(
                    tiles,
                    rows,
                    &a,
                    kp,
                    0..kp,
                    &panel,
                    cols,
                    sums_in(&mut whole),
                    PANEL_COLS,
                    false,
                )
            };
            let mut chunked = PanelSums::uninit();
            let mut wide = vec![0f32; rows * 100];
            for k in k_chunks(kp) {
                let more = k.start > 0;
                let into = sums_in(&mut chunked);
                // SAFETY: a PanelSums, and rows x 100 values of which the first 48 per row are
                // written.
                unsafe {
                    panel_sums(
                        tiles,
                        rows,
                        &a,
                        kp,
                        k.clone(),
                        &panel,
                        cols,
                        into,
                        PANEL_COLS,
                        more,
                    );
                    let wide = wide.as_mut_ptr();
                    panel_sums(tiles, rows, &a, kp, k, &panel, cols, wide, 100, more);
                }
            }
            // The same through `chunked_sums`, twice the panel into two outputs.
            let mut pair = [PanelSums::uninit(), PanelSums::uninit()];
            let (first, second) = pair.split_at_mut(1);
            let outs = [sums_in(&mut first[0]), sums_in(&mut second[0])];
            // SAFETY: two PanelSums.
            unsafe {
                chunked_sums(tiles, rows, &a, kp, 2, |i| Target {
                    panel: &panel,
                    cols,
                    out: outs[i],
                    out_rs: PANEL_COLS,
                })
            };
            assert!(k_chunks(kp).count() > 1);
            // SAFETY: both wrote their first `rows` rows of `cols.next_multiple_of(16)` columns.
            let read =
                |s: &PanelSums, r: usize, c: usize| unsafe { *s.as_ptr().add(r * PANEL_COLS + c) };
            for r in 0..rows {
                for c in 0..cols {
                    let want = read(&whole, r, c).to_bits();
                    assert_eq!(
                        read(&chunked, r, c).to_bits(),
                        want,
                        "{rows}x{kp}x{cols} ({r}, {c})"
                    );
                    assert_eq!(
                        wide[r * 100 + c].to_bits(),
                        want,
                        "{rows}x{kp}x{cols} ({r}, {c})"
                    );
                    for (i, s) in pair.iter().enumerate() {
                        assert_eq!(read(s, r, c).to_bits(), want, "chunked_sums {i} ({r}, {c})");
                    }
                    // The sum itself, against f64 (the operands' products are exact), within
                    // f32 summation's bound of the absolute sum.
                    let h = |v: u32, s: u32| crate::bf16::from_bf16((v >> s) as u16) as f64;
                    let (exact, scale) = (0..kp).fold((0.0, 0.0), |(e, a_sum), j| {
                        let (x, w) = (a[r * kp + j], panel[j * PANEL_COLS + c]);
                        let (p0, p1) = (h(x, 0) * h(w, 0), h(x, 16) * h(w, 16));
                        (e + p0 + p1, a_sum + p0.abs() + p1.abs())
                    });
                    let got = f32::from_bits(want) as f64;
                    assert!(
                        (got - exact).abs() <= 2.0 * kp as f64 * f32::EPSILON as f64 * scale,
                        "{tiles:?} {rows}x{kp}x{cols} ({r}, {c}): {got} against {exact}"
                    );
                }
            }
        }
    }
}

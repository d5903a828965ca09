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
pub struct PanelSums(std::mem::MaybeUninit<[[f32; PANEL_COLS]; ROWS]>);

impl PanelSums {
    pub fn uninit() -> Self {
        PanelSums(std::mem::MaybeUninit::uninit())
    }

    /// The first sum; row `r` starts `r * PANEL_COLS` after it.
    pub fn as_ptr(&self) -> *const f32 {
        self.0.as_ptr().cast()
    }

    fn as_mut_ptr(&mut self) -> *mut f32 {
        self.0.as_mut_ptr().cast()
    }
}

/// Whether this CPU has AMX-TILE and AMX-BF16, the OS granted the tile state, and the CPU has
/// AVX512-BF16 (which rounds the activations). Asked once per process.
pub fn available() -> bool {
    static OK: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *OK.get_or_init(imp::detect)
}

/// `out[r * out_rs + c] = sum_j a[r * kp + j] . panel[j * PANEL_COLS + c]` (bf16 pair dot
/// products) for `r < rows` and every `c` of the column groups of 16 that hold the first
/// `cols` columns (so up to `cols.next_multiple_of(16)` per row are written). `a` holds `rows`
/// rounded rows of `kp` pairs; `panel` is a `PackedBf16` panel of `kp` rows.
///
/// # Safety
/// `out` must be valid for those writes. Panics unless `available()`.
pub unsafe fn panel_sums(
    rows: usize,
    a: &[u32],
    kp: usize,
    panel: &[u32],
    cols: usize,
    out: *mut f32,
    out_rs: usize,
) {
    assert!(available(), "AMX products need AMX-TILE and AMX-BF16");
    assert!((1..=ROWS).contains(&rows) && (1..=PANEL_COLS).contains(&cols) && kp > 0);
    assert!(a.len() >= rows * kp && panel.len() >= kp * PANEL_COLS);
    // AMX checked; the asserts above bound every tile load (see `imp::sums`); the caller
    // vouches for the stores.
    imp::sums(rows, a.as_ptr(), kp, panel.as_ptr(), cols, out, out_rs)
}

/// `panel_sums` into `sums`, whose first `rows` rows and `cols.next_multiple_of(16)`
/// columns it writes. Panics unless `available()`.
pub fn panel_sums_into(
    rows: usize,
    a: &[u32],
    kp: usize,
    panel: &[u32],
    cols: usize,
    sums: &mut PanelSums,
) {
    // SAFETY: `sums` holds ROWS x PANEL_COLS values; `panel_sums` checks rows and cols.
    unsafe {
        panel_sums(
            rows,
            a,
            kp,
            panel,
            cols,
            sums.as_mut_ptr().cast(),
            PANEL_COLS,
        )
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

    /// The last `kp % STEP` pairs of the rows and of the panel, zero-padded to a whole step,
    /// so that no tile load reads past either.
    #[repr(C, align(64))]
    struct Tail {
        a: [[u32; STEP]; ROWS],
        b: [[u32; PANEL_COLS]; STEP],
    }

    /// See `panel_sums`. Tile loads read, per step `t < kp / STEP`, activation bytes
    /// `[r * kp + STEP t, r * kp + STEP (t + 1))` of rows `r < rows` and panel rows
    /// `STEP t .. STEP (t + 1)`, columns below `PANEL_COLS`; the last partial step reads
    /// `Tail` instead.
    pub(super) unsafe fn sums(
        rows: usize,
        a: *const u32,
        kp: usize,
        panel: *const u32,
        cols: usize,
        out: *mut f32,
        out_rs: usize,
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
                let src = std::slice::from_raw_parts(a.add(r * kp + whole * STEP), rem);
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
                _ => (a.add(t * STEP), kp * 4, panel.add(t * STEP * PANEL_COLS)),
            }
        };
        let b_rs = PANEL_COLS * 4;
        let out_bytes = out_rs * 4;
        let groups = cols.div_ceil(16);
        // Column groups 0 and 1 (or 0 alone).
        let two = groups >= 2;
        asm!("tilezero tmm0", "tilezero tmm1", options(nostack, nomem));
        if r1 > 0 {
            asm!("tilezero tmm2", "tilezero tmm3", options(nostack, nomem));
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
        store!("tmm0", out, out_bytes);
        if two {
            store!("tmm1", out.add(16), out_bytes);
        }
        if r1 > 0 {
            store!("tmm2", out.add(16 * out_rs), out_bytes);
            if two {
                store!("tmm3", out.add(16 * out_rs + 16), out_bytes);
            }
        }
        if groups < 3 {
            return;
        }
        // Column group 2.
        asm!("tilezero tmm0", options(nostack, nomem));
        if r1 > 0 {
            asm!("tilezero tmm2", options(nostack, nomem));
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

    pub(super) unsafe fn sums(
        _rows: usize,
        _a: *const u32,
        _kp: usize,
        _panel: *const u32,
        _cols: usize,
        _out: *mut f32,
        _out_rs: usize,
    ) {
        unreachable!("AMX is x86_64 only");
    }
}

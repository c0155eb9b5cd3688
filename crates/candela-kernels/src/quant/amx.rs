//! The AMX int8 kernel (Sapphire Rapids and later): tile products (`tdpbsud`) for the integer
//! group sums, then the float fold of the AVX-512 kernel in `x86.rs`.
//!
//! One `tdpbsud` computes 16 activation rows x 16 output columns x up to 64 k of i8 x u8 dot
//! products into i32, work that costs the AVX-512 kernel 64 to 256 `vpdpbusd`s plus their
//! broadcasts. The per-group fold (`acc += float(isum) * (d * sx) + m * sumx`) stays on
//! AVX-512, as the very instruction sequence of `block_512`, so the output is bit-identical to
//! the AVX-512 VNNI kernel's. The fold also bounds the gain: it costs as much per group as
//! before, and with few rows the 16-row tiles are mostly padding, which is why the driver
//! picks this kernel only from `AMX_ROWS_MIN` rows (see `driver.rs` for the measurements).
//!
//! Tiles (palette 1), with `ks` = bytes of k per `tdpbsud` (the group size, capped at 64):
//!
//! ```text
//! tmm0, 1  C  16 rows x 64 B    i32 sums, rows r0 .. r0 + 16 x the 16 columns of tile t
//! tmm4, 5  A  16 rows x ks B    xq rows r0 .. r0 + 16, row stride k (signed)
//! tmm6, 7  B  ks/4 rows x 64 B  codes of tile t, VNNI order (unsigned):
//!                               int8 straight from the packed block (stride 64), int4
//!                               unpacked first: chunk c -> rows 2c (low nibbles, k 8c ..
//!                               8c + 3) and 2c + 1 (high nibbles, k 8c + 4 .. 8c + 7)
//! ```
//!
//! Two of each (even and odd groups): see [`block`] for why.
//!
//! Rows past `m` in the last row block are read from zero padding that the driver adds to
//! `xq` for this kernel (so tile loads stay in bounds with one fixed configuration); their
//! sums are computed and dropped.
//!
//! Operating system: Linux enables the 8 KiB tile state per process only on request
//! (`arch_prctl(ARCH_REQ_XCOMP_PERM)`, done once in [`available`]), and the tile
//! configuration is per thread, so every thread that runs the kernel (each rayon worker, any
//! fresh thread) loads it on first use and again only when it needs another `ks`. The kernel
//! leaves the tiles configured (no `tilerelease`): the OS saves them with the thread, and the
//! next call skips the reload.

use std::arch::asm;
use std::arch::x86_64::*;
use std::cell::{Cell, RefCell};
use std::sync::OnceLock;

use super::driver::KernelArgs;
use super::pack::{CHUNK_BYTES, TILE_COLS};
use super::{QuantBits, ScaleDType};

/// Activation rows of an A (and C) tile, the most a tile holds; the driver pads `xq` to a
/// multiple of it.
pub(crate) const TILE_ROWS: usize = 16;

/// Whether this CPU and OS run AMX int8 (tile and int8 support in CPUID, tile state enabled in
/// XCR0) and the kernel granted this process the tile data state. Checked once per process; a
/// refusal makes AMX unavailable, not an error.
pub(crate) fn available() -> bool {
    static AMX: OnceLock<bool> = OnceLock::new();
    *AMX.get_or_init(detect)
}

fn detect() -> bool {
    if __get_cpuid_max(0).0 < 7 {
        return false;
    }
    let edx = __cpuid_count(7, 0).edx;
    let (tile, int8) = (edx & (1 << 24) != 0, edx & (1 << 25) != 0);
    let osxsave = __cpuid(1).ecx & (1 << 27) != 0;
    if !(tile && int8 && osxsave) {
        return false;
    }
    // SAFETY: OSXSAVE (checked above) means the OS enabled XGETBV.
    let xcr0 = unsafe { _xgetbv(0) };
    // XTILECFG (17) and XTILEDATA (18).
    if xcr0 & (0b11 << 17) != 0b11 << 17 {
        return false;
    }
    match request_tile_permission() {
        Ok(()) => true,
        Err(errno) => {
            tracing::warn!(
                errno,
                "the OS refused AMX tile state; AMX kernel unavailable"
            );
            false
        }
    }
}

/// `arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`: without it Linux (5.16+) faults
/// the first tile instruction. A raw syscall because this crate has no libc dependency and
/// one call with a fixed ABI does not justify adding one. Returns the errno on refusal.
#[cfg(target_os = "linux")]
fn request_tile_permission() -> Result<(), i64> {
    const SYS_ARCH_PRCTL: i64 = 158;
    const ARCH_REQ_XCOMP_PERM: u64 = 0x1023;
    const XFEATURE_XTILEDATA: u64 = 18;
    let ret: i64;
    // SAFETY: this request only widens which register state the process may use; it reads
    // and writes none of our memory. The syscall instruction clobbers rcx and r11, declared.
    unsafe {
        asm!(
            "syscall",
            inlateout("rax") SYS_ARCH_PRCTL => ret,
            in("rdi") ARCH_REQ_XCOMP_PERM,
            in("rsi") XFEATURE_XTILEDATA,
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack),
        );
    }
    if ret == 0 {
        Ok(())
    } else {
        Err(-ret)
    }
}

/// Other systems: tile permission is not requested, so the kernel is not offered.
#[cfg(not(target_os = "linux"))]
fn request_tile_permission() -> Result<(), i64> {
    Err(0)
}

/// Bytes of k per `tdpbsud` for a group size (a multiple of 16): the largest tile width
/// (64, 32 or 16 bytes) that divides the group, so a group is whole steps.
fn k_step(group_size: usize) -> usize {
    [64, 32, 16]
        .into_iter()
        .find(|s| group_size.is_multiple_of(*s))
        .unwrap_or(16)
}

/// The 64-byte `ldtilecfg` operand: palette, then per tile its bytes per row and rows.
#[repr(C, align(64))]
struct TileConfig([u8; 64]);

impl TileConfig {
    fn new(k_step: usize) -> Self {
        debug_assert!(matches!(k_step, 16 | 32 | 64));
        let mut b = [0u8; 64];
        b[0] = 1; // palette 1: 8 tiles of up to 16 rows x 64 bytes
        let mut set = |tile: usize, rows: usize, bytes_per_row: usize| {
            b[16 + 2 * tile..][..2].copy_from_slice(&(bytes_per_row as u16).to_le_bytes());
            b[48 + tile] = rows as u8;
        };
        // tmm2 and tmm3 stay unconfigured: the kernel does not use them.
        for c in 0..2 {
            set(c, TILE_ROWS, 64);
        }
        for a in 4..6 {
            set(a, TILE_ROWS, k_step);
        }
        for w in 6..8 {
            set(w, k_step / 4, 64);
        }
        Self(b)
    }
}

thread_local! {
    /// The `k_step` whose tile configuration this thread loaded last (0: none yet).
    static LOADED_K_STEP: Cell<usize> = const { Cell::new(0) };
    /// Int4 codes of the current tiles, unpacked to one byte each (see the module doc).
    static UNPACKED: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Loads the tile configuration for `k_step` on this thread unless it is the one loaded.
///
/// # Safety
/// [`available`] must be true.
unsafe fn configure(k_step: usize) {
    if LOADED_K_STEP.get() == k_step {
        return;
    }
    let cfg = TileConfig::new(k_step);
    // SAFETY: the caller checked AMX support and permission; `cfg` is a valid palette-1
    // configuration (rows <= 16, bytes per row <= 64) of 64 readable bytes.
    unsafe {
        asm!("ldtilecfg [{}]", in(reg) cfg.0.as_ptr(), options(nostack, readonly, preserves_flags));
    }
    LOADED_K_STEP.set(k_step);
}

// The tile instructions, one asm statement each (stable Rust has no AMX intrinsics), with the
// tile register as a const operand. None is `pure`, so the compiler keeps them in order.

/// `tmm{T} <- rows at p, p + stride, ...` (as configured for tile `T`).
#[inline(always)]
unsafe fn tile_load<const T: u8>(p: *const u8, stride: usize) {
    asm!(
        "tileloadd tmm{t}, [{p} + {s}*1]",
        t = const T,
        p = in(reg) p,
        s = in(reg) stride,
        options(nostack, readonly, preserves_flags),
    );
}

/// Rows of `tmm{T}` -> `p`, 64 bytes apart.
#[inline(always)]
unsafe fn tile_store<const T: u8>(p: *mut u8) {
    asm!(
        "tilestored [{p} + {s}*1], tmm{t}",
        t = const T,
        p = in(reg) p,
        s = in(reg) 64usize,
        options(nostack, preserves_flags),
    );
}

#[inline(always)]
unsafe fn tile_zero<const T: u8>() {
    asm!("tilezero tmm{t}", t = const T, options(nostack, nomem, preserves_flags));
}

/// `tmm{C} += tmm{A} (i8) x tmm{B} (u8)`, four products summed per i32 lane.
#[inline(always)]
unsafe fn tile_dpbsud<const C: u8, const A: u8, const B: u8>() {
    asm!(
        "tdpbsud tmm{c}, tmm{a}, tmm{b}",
        c = const C,
        a = const A,
        b = const B,
        options(nostack, nomem, preserves_flags),
    );
}

/// Runs the kernel on output tiles `tile_begin..tile_end`, all rows.
///
/// # Safety
/// [`available`] must be true and the CPU must run the AVX-512 VNNI kernel
/// (`Kernel::Amx.is_available()`); `a.xq` must hold `m` rounded up to [`TILE_ROWS`] rows.
pub(crate) unsafe fn run_tiles(a: &KernelArgs<'_>, tile_begin: usize, tile_end: usize) {
    let l = &a.layout;
    assert!(a.xq.len() >= a.m.next_multiple_of(TILE_ROWS) * l.k);
    // SAFETY: the caller checked AMX.
    unsafe { configure(k_step(l.group_size)) };
    if l.bits == QuantBits::Int8 {
        // SAFETY: the caller checked the CPU features; no scratch is read for int8.
        unsafe { run(a, tile_begin, tile_end, &mut []) };
        return;
    }
    UNPACKED.with(|cell| {
        // Nothing in `run` calls back into the matmul, but a fresh buffer is cheaper to reason
        // about than a panic if that ever changes.
        let mut fresh = Vec::new();
        let mut borrowed = cell.try_borrow_mut();
        let buf = match borrowed.as_deref_mut() {
            Ok(buf) => buf,
            Err(_) => &mut fresh,
        };
        // One tile of k codes at one byte each.
        let need = TILE_COLS * l.k;
        if buf.len() < need {
            buf.resize(need, 0);
        }
        // SAFETY: as above; `buf` holds the two unpacked tiles `run` writes and reads.
        unsafe { run(a, tile_begin, tile_end, buf) };
    });
}

/// Each weight tile against all rows in blocks of 16.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,fma,f16c")]
unsafe fn run(a: &KernelArgs<'_>, tile_begin: usize, tile_end: usize, unpacked: &mut [u8]) {
    let l = &a.layout;
    for t in tile_begin..tile_end {
        // The B rows of the tile's first group, and the bytes from one group's to the next's.
        let (b, b_group_bytes) = if l.bits == QuantBits::Int4 {
            unpack_int4(a, t, unpacked);
            (unpacked.as_ptr(), TILE_COLS * l.group_size)
        } else {
            (a.w.as_ptr().add(t * l.tile_bytes), l.block_bytes)
        };
        for r0 in (0..a.m).step_by(TILE_ROWS) {
            block(
                a,
                &Tiles {
                    t,
                    r0,
                    b,
                    b_group_bytes,
                },
            );
        }
    }
}

/// Tile `t`'s int4 codes as bytes in B-tile order: for every 64-byte chunk, a 64-byte row of
/// its low nibbles, then one of its high nibbles.
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn unpack_int4(a: &KernelArgs<'_>, t: usize, dst: &mut [u8]) {
    let l = &a.layout;
    let chunks = l.group_size / 8;
    assert!(dst.len() >= l.groups * chunks * 2 * CHUNK_BYTES);
    let nib = _mm512_set1_epi8(0x0F);
    let out = dst.as_mut_ptr();
    for g in 0..l.groups {
        let src = a.w.as_ptr().add(t * l.tile_bytes + g * l.block_bytes);
        for c in 0..chunks {
            let v = _mm512_loadu_si512(src.add(c * CHUNK_BYTES).cast());
            let row = out.add((g * chunks + c) * 2 * CHUNK_BYTES);
            _mm512_storeu_si512(row.cast(), _mm512_and_si512(v, nib));
            let hi = _mm512_and_si512(_mm512_srli_epi16::<4>(v), nib);
            _mm512_storeu_si512(row.add(CHUNK_BYTES).cast(), hi);
        }
    }
}

/// One C tile's i32 sums, row-major, as `tilestored` writes them.
#[repr(C, align(64))]
#[derive(Clone, Copy)]
struct Sums([[i32; TILE_COLS]; TILE_ROWS]);

/// Where a [`block`] works: rows `r0..r0 + 16` (those below `m`) x tile `t`. `b` points at
/// the tile's B rows for its first group; a group's rows are `b_group_bytes` after the
/// previous one's.
struct Tiles {
    t: usize,
    r0: usize,
    b: *const u8,
    b_group_bytes: usize,
}

/// Zeroes tile `C` and accumulates group `g` into it, through tiles `A` and `B`.
#[inline(always)]
unsafe fn products<const C: u8, const A: u8, const B: u8>(
    a: &KernelArgs<'_>,
    at: &Tiles,
    g: usize,
) {
    let l = &a.layout;
    let gs = l.group_size;
    let ks = k_step(gs);
    let xq = a.xq.as_ptr().cast::<u8>().add(at.r0 * l.k);
    tile_zero::<C>();
    for s in 0..gs / ks {
        let kk = g * gs + s * ks;
        tile_load::<A>(xq.add(kk), l.k);
        tile_load::<B>(
            at.b.add(g * at.b_group_bytes + s * ks / 4 * CHUNK_BYTES),
            CHUNK_BYTES,
        );
        tile_dpbsud::<C, A, B>();
    }
}

/// One row block against one weight tile, all groups. Every tile is double-buffered across
/// groups (even groups use tmm0, 4, 6; odd ones tmm1, 5, 7) and group `g + 1`'s products are
/// issued before group `g`'s sums are stored and folded, so that no tile instruction waits for
/// the one before it on the same tile (tiles are not renamed). Measured on Sapphire Rapids
/// (groups of 32), this and two other shapes (2 x 2 C tiles per block without double
/// buffering; 2 C tiles per group, double-buffered, sharing the A tile) ran within noise of
/// each other: the tile stores after every group and the fold, not the products, set the pace.
/// Issuing group `g + 1`'s products before group `g`'s store changed nothing; storing every
/// group's sums first and then folding row by row (each accumulator in one register) was
/// 1.1-1.9x slower: 1 KiB of sums per group leaves L1 at k = 1536.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,fma,f16c")]
unsafe fn block(a: &KernelArgs<'_>, at: &Tiles) {
    let l = &a.layout;
    let rows = (a.m - at.r0).min(TILE_ROWS);
    let f32_scales = l.scales == ScaleDType::F32;
    let min_per_scale = l.min_per_scale();
    // 16 registers' worth: they live on the stack, each touched once per group (unrolling
    // all 16 rows to keep them in registers measured slower).
    let mut facc = [_mm512_setzero_ps(); TILE_ROWS];
    // Not zeroed: every group's `tilestored` writes all 16 rows before the fold reads them
    // (zeroing 1 KiB per block was 5% of a 64-sequence decode step, as `memset`).
    let mut sums = std::mem::MaybeUninit::<Sums>::uninit();
    let out = sums.as_mut_ptr().cast::<u8>();
    products::<0, 4, 6>(a, at, 0);
    for g in 0..l.groups {
        let next = g + 1 < l.groups;
        if g % 2 == 0 {
            tile_store::<0>(out);
            if next {
                products::<1, 5, 7>(a, at, g + 1);
            }
        } else {
            tile_store::<1>(out);
            if next {
                products::<0, 4, 6>(a, at, g + 1);
            }
        }
        // The fold of `block_512`, operation for operation (bit-identical results).
        let sp =
            a.w.as_ptr()
                .add(at.t * l.tile_bytes + g * l.block_bytes + l.code_bytes);
        let (d, mn) = super::x86::scales_512(sp, f32_scales, min_per_scale);
        for (rr, acc) in facc.iter_mut().enumerate().take(rows) {
            let gi = (at.r0 + rr) * l.groups + g;
            // SAFETY: row `rr` of the sums, written by the tile store above.
            let isum = _mm512_load_si512(out.add(rr * 64).cast());
            let s = _mm512_mul_ps(d, _mm512_set1_ps(*a.sx.get_unchecked(gi)));
            let f = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), s, *acc);
            *acc = _mm512_fmadd_ps(mn, _mm512_set1_ps(*a.sumx.get_unchecked(gi)), f);
        }
    }
    let col = at.t * TILE_COLS;
    let cols = TILE_COLS.min(l.n - col);
    for (rr, &v) in facc.iter().enumerate().take(rows) {
        let dst = a.y.at((at.r0 + rr) * l.n + col, cols);
        if cols == TILE_COLS {
            _mm512_storeu_ps(dst, v);
        } else {
            _mm512_mask_storeu_ps(dst, ((1u32 << cols) - 1) as u16, v);
        }
    }
}

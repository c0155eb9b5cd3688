//! The matmul driver: validates, quantizes the activations into thread-local scratch, then
//! splits the output tiles over rayon's current pool and runs the chosen kernel on each range.

use std::cell::RefCell;
use std::mem::MaybeUninit;

use rayon::prelude::*;

use super::act::{self, ActBuf};
use super::pack::PackLayout;
use super::{portable, Kernel, PackedWeight, QuantError, Result};

/// Below this many multiply-adds a call runs on the calling thread: waking the pool costs a
/// few microseconds, more than such a matmul takes.
const PARALLEL_MACS_MIN: usize = 1 << 20;
/// The same inside a pass that keeps the workers awake (`crate::team`), where going parallel
/// costs a steal: SmolLM2's batch-1 q/k/v, o and down projections (0.3-0.9M multiply-adds)
/// then split too.
const PARALLEL_MACS_MIN_AWAKE: usize = 1 << 16;

/// Fewest rows for which [`super::PackedWeight::matmul_f32`] runs the AMX kernel (when it is
/// the detected one) rather than AVX-512 VNNI, whose output it matches bit for bit. Measured
/// (`examples/amx_timing`, bench/results/amx-qmatmul.md; Sapphire Rapids VM, SmolLM2-135M
/// shapes, groups of 32, minimum per call, one thread), AMX time / AVX-512 VNNI time:
///
/// | rows | int8 (Q8_0) | int4 (Q4_1) |
/// |---:|---|---|
/// | 1 | 2.6-3.5x slower | 5-8x slower |
/// | 8 | 1.0-1.1x slower | 1.5-1.9x slower |
/// | 16 | 1.1-1.25x faster | 1.05-1.1x slower |
/// | 32 | 1.1-1.25x faster | 1.0-1.05x faster |
/// | 64-256 | 1.1-1.2x faster | 1.07-1.12x faster (once 0.96) |
///
/// Two threads: the same picture, noisier. 32 is where both code widths stop losing.
pub const AMX_ROWS_MIN: usize = 32;

/// Everything a kernel reads, plus where it writes.
pub(crate) struct KernelArgs<'a> {
    pub layout: PackLayout,
    pub w: &'a [u8],
    pub m: usize,
    /// `[m, k]` quantized activations; for the AMX kernel, zero rows follow up to a multiple
    /// of 16 rows (whole tiles).
    pub xq: &'a [i8],
    /// `[m, groups]` activation scales, their `sx * sum(xq)`, and `sum(xq)`.
    pub sx: &'a [f32],
    pub sumx: &'a [f32],
    pub sumq: &'a [i32],
    pub y: OutPtr,
}

/// The `[m, n]` output, written by several threads at once, each on its own tiles' columns.
#[derive(Clone, Copy)]
pub(crate) struct OutPtr {
    ptr: *mut f32,
    len: usize,
}

// SAFETY: the driver hands each thread a disjoint range of output columns, so no element is
// written twice or read while written.
unsafe impl Send for OutPtr {}
// SAFETY: as above.
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// # Safety
    /// `i` must be in bounds and owned by the calling thread's tile range.
    #[inline(always)]
    pub unsafe fn write(&self, i: usize, v: f32) {
        debug_assert!(i < self.len);
        self.ptr.add(i).write(v);
    }

    /// # Safety
    /// As [`Self::write`], for `i..i + count`.
    #[inline(always)]
    pub unsafe fn at(&self, i: usize, count: usize) -> *mut f32 {
        debug_assert!(i + count <= self.len);
        self.ptr.add(i)
    }

    /// Elements `start..start + len` as an output of their own (indices from `start`).
    ///
    /// # Safety
    /// The range must be in bounds and written by the caller alone.
    unsafe fn range(&self, start: usize, len: usize) -> OutPtr {
        debug_assert!(start + len <= self.len);
        OutPtr {
            ptr: self.ptr.add(start),
            len,
        }
    }
}

thread_local! {
    static SCRATCH: RefCell<ActBuf> = RefCell::new(ActBuf::default());
}

/// `y` may be uninitialized: every kernel writes each of its `m * n` elements exactly once
/// (tests fill it with NaN first and compare against the portable kernel), so callers can
/// skip zeroing a buffer that is about to be overwritten.
pub(crate) fn matmul(
    w: &PackedWeight,
    kernel: Kernel,
    x: &[f32],
    m: usize,
    y: &mut [MaybeUninit<f32>],
) -> Result<()> {
    if !kernel.is_available() {
        return Err(QuantError::KernelUnavailable { kernel });
    }
    let l = w.layout;
    if x.len() != m * l.k {
        return Err(QuantError::Length {
            what: "activations x [m, k]",
            expected: m * l.k,
            got: x.len(),
        });
    }
    if y.len() != m * l.n {
        return Err(QuantError::Length {
            what: "output y [m, n]",
            expected: m * l.n,
            got: y.len(),
        });
    }
    if m == 0 {
        return Ok(());
    }
    let y_ptr = OutPtr {
        ptr: y.as_mut_ptr().cast::<f32>(),
        len: y.len(),
    };
    let chunks = row_chunks(m, m * l.n * l.k, rayon::current_num_threads());
    if chunks > 1 {
        (0..chunks).into_par_iter().for_each(|c| {
            let (r0, r1) = (c * m / chunks, (c + 1) * m / chunks);
            // SAFETY: the chunks' row ranges are disjoint and within `y`.
            let y_rows = unsafe { y_ptr.range(r0 * l.n, (r1 - r0) * l.n) };
            let x_rows = &x[r0 * l.k..r1 * l.k];
            with_scratch(|buf| quantize_and_run(w, kernel, x_rows, r1 - r0, y_rows, buf, false));
        });
    } else {
        with_scratch(|buf| quantize_and_run(w, kernel, x, m, y_ptr, buf, true));
    }
    Ok(())
}

/// Fewest rows for which the driver splits a call by rows rather than by output tiles. Split
/// by tiles, every thread reads every activation row, all quantized first by the calling
/// thread alone; split by rows, each thread quantizes the rows it reads, in its own cache
/// (and reads all of the weights, which a call this tall reuses many times anyway). Measured
/// on a 2-core Zen 4 with the workers awake, SmolLM2's down projection on a 512-token chunk:
/// 1.80 -> 1.48 ms. Decode batches stay split by tiles: their rows are few and every thread
/// reading all of the weights would double a step's weight traffic.
const ROW_SPLIT_ROWS_MIN: usize = 128;
/// Fewest rows per chunk of a row split.
const ROW_CHUNK_MIN: usize = 64;

/// How many row chunks a call of `m` rows and `macs` multiply-adds runs in (1: split by
/// tiles instead, or run on this thread).
fn row_chunks(m: usize, macs: usize, threads: usize) -> usize {
    if threads <= 1 || m < ROW_SPLIT_ROWS_MIN || macs < PARALLEL_MACS_MIN {
        return 1;
    }
    (m / ROW_CHUNK_MIN).clamp(1, threads)
}

/// Runs `f` with this thread's activation scratch. A rayon worker that calls the driver while
/// already inside a call (work stealing while it waits) finds its scratch borrowed; it then
/// uses a fresh buffer rather than failing.
fn with_scratch(f: impl FnOnce(&mut ActBuf)) {
    SCRATCH.with(|cell| match cell.try_borrow_mut() {
        Ok(mut buf) => f(&mut buf),
        Err(_) => f(&mut ActBuf::default()),
    });
}

/// Quantizes the `m` rows of `x` into `buf` and computes their output rows into `y`: split
/// over the pool by tiles when `split_tiles`, else all on this thread.
fn quantize_and_run(
    w: &PackedWeight,
    kernel: Kernel,
    x: &[f32],
    m: usize,
    y: OutPtr,
    buf: &mut ActBuf,
    split_tiles: bool,
) {
    let l = w.layout;
    act::quantize_rows(x, m, l.k, l.group_size, kernel, buf);
    let xq_rows = if kernel == Kernel::Amx {
        pad_rows(&mut buf.xq, m, l.k)
    } else {
        m
    };
    let args = KernelArgs {
        layout: l,
        w: w.data.as_slice(),
        m,
        xq: &buf.xq[..xq_rows * l.k],
        sx: &buf.sx[..m * l.groups],
        sumx: &buf.sumx[..m * l.groups],
        sumq: &buf.sumq[..m * l.groups],
        y,
    };
    if split_tiles {
        run_parallel(&args, kernel);
    } else {
        run_tiles(&args, kernel, 0, l.tiles);
    }
}

/// Zeroes `xq` rows `m..` up to whole AMX tiles (16 rows), so tile loads stay in bounds;
/// returns the padded row count.
fn pad_rows(xq: &mut Vec<i8>, m: usize, k: usize) -> usize {
    #[cfg(target_arch = "x86_64")]
    let rows = m.next_multiple_of(super::amx::TILE_ROWS);
    #[cfg(not(target_arch = "x86_64"))]
    let rows = m;
    if xq.len() < rows * k {
        xq.resize(rows * k, 0);
    }
    xq[m * k..rows * k].fill(0);
    rows
}

fn run_parallel(a: &KernelArgs<'_>, kernel: Kernel) {
    let l = &a.layout;
    let threads = rayon::current_num_threads();
    let macs = a.m * l.n * l.k;
    let macs_min = if crate::team::workers_awake() {
        PARALLEL_MACS_MIN_AWAKE
    } else {
        PARALLEL_MACS_MIN
    };
    if threads <= 1 || macs < macs_min || l.tiles < 2 {
        run_tiles(a, kernel, 0, l.tiles);
        return;
    }
    // A few chunks per thread so a thread slowed by a noisy neighbour does not hold up the
    // call, but not so many that the per-chunk overhead shows.
    let per_thread = if macs >= 64 << 20 { 4 } else { 1 };
    let chunks = (threads * per_thread).min(l.tiles);
    (0..chunks).into_par_iter().for_each(|c| {
        let begin = c * l.tiles / chunks;
        let end = (c + 1) * l.tiles / chunks;
        run_tiles(a, kernel, begin, end);
    });
}

fn run_tiles(a: &KernelArgs<'_>, kernel: Kernel, tile_begin: usize, tile_end: usize) {
    match kernel {
        Kernel::Portable => portable::run_tiles(a, tile_begin, tile_end),
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `matmul` checked `kernel.is_available()`, i.e. the CPU features it needs.
        k => unsafe { super::x86::run_tiles(a, k, tile_begin, tile_end) },
        #[cfg(not(target_arch = "x86_64"))]
        _ => portable::run_tiles(a, tile_begin, tile_end),
    }
}

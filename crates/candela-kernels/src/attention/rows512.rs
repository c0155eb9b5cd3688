//! The AVX-512 CPU attention kernel for tasks with many query rows (prefill chunks): query
//! rows sit in vector lanes, so a key costs a few fused multiply-adds per 16 rows and no
//! horizontal sums, and the online softmax runs on 16 rows at once.
//!
//! The row-major kernel (`attend` in the parent) spends most of a long prefill on per-key
//! reductions: each score is a 64-element dot product summed across lanes, ~25 cycles per
//! (row, key) pair all told on a 2,430-token prompt (`perf`: 70% of its time in attention).
//! Here the task's queries are transposed once (`qt[dim][row]`), so for a key the scores of 16
//! rows are `sum_dim k[dim] * qt[dim][rows]`: one broadcast FMA per dimension, four keys at a
//! time for independent chains. The scores stay key-major (`st[key][row]`), which is what the
//! softmax wants (max, exp and sums are elementwise over rows) and what the weighted sum of V
//! rows reads (one weight per (key, row)).
//!
//! Taken for tasks of at least [`ROWS_MIN`] rows with `head_dim` a multiple of 64 and no
//! sliding window; the parent's kernel runs everything else (decode's 1-token tasks would leave
//! most lanes empty). Numerics: every dot product is one FMA chain in dimension order and
//! `exp` is the parent's `fast_exp`, lane for lane, so results differ from the row-major
//! kernel only by summation order (the tests hold both to the baseline within tolerance).

use std::arch::x86_64::*;
use std::array::from_fn;

use candle_core::DType;

use super::{CpuArgs, KvElem, OutPtr, Task, TaskGeometry};

/// Fewest rows (query tokens x heads of one KV head) for which this kernel runs: below it the
/// 16-lane row vectors are mostly padding and the row-major kernel is cheaper.
pub(super) const ROWS_MIN: usize = 8;

const LANES: usize = 16;
/// Keys whose scores one tile computes (see [`score_tile`]).
const KEYS: usize = 4;
/// Rows whose V accumulators (4 registers of 16 dims each) stay in registers across a block.
const PV_ROWS: usize = 6;

/// Whether a task of `rows` rows takes this kernel.
pub(super) fn applies(rows: usize, head_dim: usize, windowed: bool) -> bool {
    !windowed && rows >= ROWS_MIN && head_dim.is_multiple_of(64)
}

/// Per-thread scratch, reused across tasks.
#[derive(Default)]
pub(super) struct Scratch {
    /// `[head_dim, rows_pad]`: scaled queries, transposed.
    qt: Vec<f32>,
    /// `[block_size, rows_pad]`: one block's scores, then its softmax weights.
    st: Vec<f32>,
    /// `[block_size rounded up to KEYS, head_dim]`: one block's K rows in f32.
    k: Vec<f32>,
    /// `[rows_pad]`: each row's token position.
    pos: Vec<i32>,
    /// `[rows, head_dim]`: un-normalised outputs.
    acc: Vec<f32>,
    /// `[rows_pad]` each: running max, running sum, this block's rescale factor.
    max: Vec<f32>,
    sum: Vec<f32>,
    corr: Vec<f32>,
    /// `[head_dim]`: one query row in f32 (converted, rounded, scaled).
    q_row: Vec<f32>,
}

fn resized(buf: &mut Vec<f32>, len: usize, value: f32) -> &mut [f32] {
    buf.clear();
    buf.resize(len, value);
    buf
}

/// 16 elements from `p` as f32.
///
/// # Safety
/// `p..p + 16` is readable; the CPU has AVX-512F (and F16C for f16).
#[inline(always)]
unsafe fn load16<T: KvElem>(p: *const T) -> __m512 {
    match T::DTYPE {
        DType::F32 => _mm512_loadu_ps(p.cast()),
        DType::F16 => _mm512_cvtph_ps(_mm256_loadu_si256(p.cast())),
        // bf16 is the top half of the f32 with the same bits.
        DType::BF16 => _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(
            _mm256_loadu_si256(p.cast()),
        ))),
        _ => {
            let (lo, hi) = (T::load8(p), T::load8(p.add(8)));
            _mm512_insertf32x8::<1>(_mm512_castps256_ps512(lo), hi)
        }
    }
}

/// `exp(x)` lane by lane: the parent's `fast_exp::<true>`, operation for operation.
#[inline(always)]
unsafe fn exp16(x: __m512) -> __m512 {
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    const ROUND: f32 = 12_582_912.0;
    let x = _mm512_min_ps(
        _mm512_max_ps(x, _mm512_set1_ps(-87.0)),
        _mm512_set1_ps(88.0),
    );
    let round = _mm512_set1_ps(ROUND);
    let t = _mm512_fmadd_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E), round);
    let k = _mm512_sub_ps(t, round);
    let r = _mm512_fmadd_ps(k, _mm512_set1_ps(-LN2_HI), x);
    let r = _mm512_fmadd_ps(k, _mm512_set1_ps(-LN2_LO), r);
    let mut p = _mm512_set1_ps(1.987_569_1e-4);
    for c in [
        1.398_199_9e-3,
        8.333_452e-3,
        4.166_579_6e-2,
        1.666_666_5e-1,
        0.5,
    ] {
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
    }
    let e_r = _mm512_add_ps(
        _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), r),
        _mm512_set1_ps(1.0),
    );
    let k_int = _mm512_sub_epi32(
        _mm512_castps_si512(t),
        _mm512_set1_epi32(ROUND.to_bits() as i32),
    );
    let scale = _mm512_slli_epi32::<23>(_mm512_add_epi32(k_int, _mm512_set1_epi32(127)));
    _mm512_mul_ps(e_r, _mm512_castsi512_ps(scale))
}

/// The scores of keys `i..i + KEYS` of a block (those below `len`; their f32 K rows at `k`)
/// for `C` 16-row chunks of transposed queries at `q` (`d` rows of `rows_pad`), stored to `st`
/// (`[key][rows_pad]`).
struct ScoreTile {
    k: *const f32,
    q: *const f32,
    st: *mut f32,
    d: usize,
    rows_pad: usize,
    i: usize,
    len: usize,
}

impl ScoreTile {
    /// Computes and stores the tile's scores, -inf in the lanes whose row does not see the key
    /// (`ends`: per lane of each chunk, how many of the block's keys the row sees).
    ///
    /// Each dot product is the row-major kernel's, bit for bit: 8 partial sums over dimensions
    /// `l, l + 8, ...`, each one FMA chain in dimension order from zero, then its `hadd` tree.
    /// Partial `l` of all KEYS x C (key, chunk) pairs is finished before partial `l + 1`
    /// begins, so the pairs' independent chains share every load (the old order, all 8
    /// partials of one key at a time, needed three loads per two FMAs and was load-bound).
    ///
    /// # Safety
    /// `k` holds `KEYS * d` readable floats, each of `q`'s rows `C * 16`, `st`'s rows `i..len`
    /// are writable; the CPU has AVX-512F.
    // `kk` and `h` index the accumulators, the partials and the chunk masks at once.
    #[allow(clippy::needless_range_loop)]
    #[inline(always)]
    unsafe fn run<const C: usize>(&self, ends: &[__m512i; C]) {
        let Self {
            k,
            q,
            st,
            d,
            rows_pad,
            i,
            len,
        } = *self;
        let mut parts = [[[_mm512_setzero_ps(); C]; KEYS]; 8];
        for (l, part) in parts.iter_mut().enumerate() {
            let mut acc = [[_mm512_setzero_ps(); C]; KEYS];
            for dim in (l..d).step_by(8) {
                let qs: [__m512; C] =
                    from_fn(|h| _mm512_loadu_ps(q.add(dim * rows_pad + h * LANES)));
                for kk in 0..KEYS {
                    let kv = _mm512_set1_ps(*k.add(kk * d + dim));
                    for h in 0..C {
                        acc[kk][h] = _mm512_fmadd_ps(kv, qs[h], acc[kk][h]);
                    }
                }
            }
            *part = acc;
        }
        for kk in 0..KEYS.min(len - i) {
            for h in 0..C {
                let p = |l: usize| parts[l][kk][h];
                let dot = _mm512_add_ps(
                    _mm512_add_ps(_mm512_add_ps(p(0), p(1)), _mm512_add_ps(p(2), p(3))),
                    _mm512_add_ps(_mm512_add_ps(p(4), p(5)), _mm512_add_ps(p(6), p(7))),
                );
                let sees = _mm512_cmpgt_epi32_mask(ends[h], _mm512_set1_epi32((i + kk) as i32));
                let v = _mm512_mask_mov_ps(_mm512_set1_ps(f32::NEG_INFINITY), sees, dot);
                _mm512_storeu_ps(st.add((i + kk) * rows_pad + h * LANES), v);
            }
        }
    }
}

/// The weighted sum of one block's V rows into the output accumulators of `NR` rows.
struct PvBlock<C> {
    /// The block's first V row (of this KV head), rows `kv_row` apart.
    v: *const C,
    kv_row: usize,
    /// The block's softmax weights, `[key][rows_pad]`.
    st: *const f32,
    rows_pad: usize,
    /// Per row, the rescale of its accumulator.
    corr: *const f32,
    /// `[rows, d]` accumulators.
    acc: *mut f32,
    d: usize,
    len: usize,
}

impl<C: KvElem> PvBlock<C> {
    /// Rows `r0..r0 + NR`: `NR` a constant so that the row loops unroll without a branch per
    /// row and key (with the count known only at run time, they cost a compare and jump each).
    ///
    /// # Safety
    /// The pointers cover the rows, keys and dimensions named; the CPU has AVX-512F and F16C.
    #[inline(always)]
    unsafe fn run<const NR: usize>(&self, r0: usize) {
        const { assert!(NR <= PV_ROWS) };
        for c0 in (0..self.d).step_by(64) {
            let mut a = [[_mm512_setzero_ps(); 4]; NR];
            for (r, row) in a.iter_mut().enumerate() {
                let cf = _mm512_set1_ps(*self.corr.add(r0 + r));
                let pa = self.acc.add((r0 + r) * self.d + c0);
                for (q, v) in row.iter_mut().enumerate() {
                    *v = _mm512_mul_ps(_mm512_loadu_ps(pa.add(q * LANES)), cf);
                }
            }
            for i in 0..self.len {
                let pv = self.v.add(i * self.kv_row + c0);
                let vs = [
                    load16(pv),
                    load16(pv.add(LANES)),
                    load16(pv.add(2 * LANES)),
                    load16(pv.add(3 * LANES)),
                ];
                for (r, row) in a.iter_mut().enumerate() {
                    let w = _mm512_set1_ps(*self.st.add(i * self.rows_pad + r0 + r));
                    for (v, &x) in row.iter_mut().zip(&vs) {
                        *v = _mm512_fmadd_ps(w, x, *v);
                    }
                }
            }
            for (r, row) in a.iter().enumerate() {
                let pa = self.acc.add((r0 + r) * self.d + c0);
                for (q, &v) in row.iter().enumerate() {
                    _mm512_storeu_ps(pa.add(q * LANES), v);
                }
            }
        }
    }
}

/// One task through the transposed kernel (see the module doc); `applies` was true for it.
///
/// # Safety
/// The CPU has AVX-512F, AVX2, FMA and F16C; `out` as in the parent's `attend`.
// `j` indexes the two chunks' accumulators and the key buffer at once.
#[allow(clippy::needless_range_loop)]
#[target_feature(enable = "avx512f,avx512dq,avx2,fma,f16c")]
pub(super) unsafe fn attend<Q: KvElem, C: KvElem>(
    args: &CpuArgs<'_, Q, C>,
    task: &Task,
    s: &mut Scratch,
    out: OutPtr<Q>,
) {
    let TaskGeometry {
        d,
        g,
        bs,
        kv_row,
        q_begin,
        rows,
        first_pos,
        last_pos,
        ..
    } = args.geometry(task);
    let rows_pad = rows.next_multiple_of(LANES);
    let chunks = rows_pad / LANES;

    // Queries as the row-major kernel prepares them (cache precision, then scaled), stored
    // transposed; padding rows stay zero (their scores are 0, finite, and never written out).
    let qt = resized(&mut s.qt, d * rows_pad, 0.0);
    let q_row = resized(&mut s.q_row, d, 0.0);
    for r in 0..rows {
        args.query_row(task, r, q_row);
        for (dim, &x) in q_row.iter().enumerate() {
            qt[dim * rows_pad + r] = x;
        }
    }
    let st = resized(&mut s.st, bs * rows_pad, 0.0);
    let kbuf = resized(&mut s.k, bs.next_multiple_of(KEYS) * d, 0.0);
    let acc = resized(&mut s.acc, rows * d, 0.0);
    let max = resized(&mut s.max, rows_pad, f32::NEG_INFINITY);
    let sum = resized(&mut s.sum, rows_pad, 0.0);
    let corr = resized(&mut s.corr, rows_pad, 0.0);

    // Position of each row's token (padding rows: the last token's), for the causal masks.
    let pos = &mut s.pos;
    pos.clear();
    pos.extend((0..rows_pad).map(|r| (first_pos + r.min(rows - 1) / g) as i32));
    let pos_ptr = pos.as_ptr();
    // Per lane of chunk `c`: how many of the block's keys (from `p0`, `len` of them) the row
    // sees, `clamp(pos + 1 - p0, 0, len)`.
    let i_end = |c: usize, p0: usize, len: usize| {
        let pv = _mm512_loadu_si512(pos_ptr.add(c * LANES).cast());
        let e = _mm512_sub_epi32(pv, _mm512_set1_epi32(p0 as i32 - 1));
        _mm512_min_epi32(
            _mm512_max_epi32(e, _mm512_setzero_si512()),
            _mm512_set1_epi32(len as i32),
        )
    };
    let table =
        &args.meta.block_tables[task.seq * args.dims.max_blocks_per_seq..][..last_pos / bs + 1];
    let (pq, pst) = (qt.as_ptr(), st.as_mut_ptr());
    for (b, &block) in table.iter().enumerate() {
        let p0 = b * bs;
        let len = (last_pos + 1 - p0).min(bs);
        let block_base = block as usize * bs * kv_row + task.kv_head * d;
        if let Some(&next) = table.get(b + 1) {
            let next_base = next as usize * bs * kv_row + task.kv_head * d;
            for i in 0..(last_pos + 1 - (p0 + bs)).min(bs) {
                super::prefetch_row(&args.k_cache[next_base + i * kv_row..][..d]);
                super::prefetch_row(&args.v_cache[next_base + i * kv_row..][..d]);
            }
        }

        // The block's K rows in f32, converted once for all row chunks.
        for i in 0..len {
            let k_row = &args.k_cache[block_base + i * kv_row..][..d];
            for c in (0..d).step_by(LANES) {
                _mm512_storeu_ps(
                    kbuf.as_mut_ptr().add(i * d + c),
                    load16(k_row.as_ptr().add(c)),
                );
            }
        }
        // Scores, KEYS keys x up to 4 16-row chunks at a time: a tile's queries (16 KiB at
        // head_dim 64) stay in L1 across the block's keys, and each vector loaded feeds KEYS
        // (or 4) FMAs. A row sees the block's keys `i < i_end` (its position + 1 - p0); the
        // others get -inf.
        let mut c = 0;
        while c < chunks {
            let n = match chunks - c {
                1 => 1,
                2 | 3 => 2,
                _ => 4,
            };
            for i in (0..len).step_by(KEYS) {
                let tile = ScoreTile {
                    k: kbuf.as_ptr().add(i * d),
                    q: pq.add(c * LANES),
                    st: pst.add(c * LANES),
                    d,
                    rows_pad,
                    i,
                    len,
                };
                let ends = |h: usize| i_end(c + h, p0, len);
                match n {
                    4 => tile.run::<4>(&from_fn(ends)),
                    2 => tile.run::<2>(&from_fn(ends)),
                    _ => tile.run::<1>(&from_fn(ends)),
                }
            }
            c += n;
        }

        // Online softmax, 16 rows at a time, with the row-major kernel's arithmetic: the
        // weights summed in 8 lanes over the row's whole chunks of 8 keys plus a tail, then
        // `hsum`; libm's `exp` for the rescale, applied only where the max grew.
        for c in 0..chunks {
            let lane = c * LANES;
            let ends = i_end(c, p0, len);
            let full_end = _mm512_and_si512(ends, _mm512_set1_epi32(!7));
            let mut m_blk = _mm512_set1_ps(f32::NEG_INFINITY);
            for i in 0..len {
                m_blk = _mm512_max_ps(m_blk, _mm512_loadu_ps(pst.add(i * rows_pad + lane)));
            }
            let m_old = _mm512_loadu_ps(max.as_ptr().add(lane));
            let m_new = _mm512_max_ps(m_old, m_blk);
            let mut lanes8 = [_mm512_setzero_ps(); 8];
            let mut tail = _mm512_setzero_ps();
            for i in 0..len {
                let p = pst.add(i * rows_pad + lane);
                let at = _mm512_set1_epi32(i as i32);
                let seen = _mm512_cmpgt_epi32_mask(ends, at);
                let full = _mm512_cmpgt_epi32_mask(full_end, at);
                let w = _mm512_maskz_mov_ps(seen, exp16(_mm512_sub_ps(_mm512_loadu_ps(p), m_new)));
                _mm512_storeu_ps(p, w);
                let l = &mut lanes8[i % 8];
                *l = _mm512_mask_add_ps(*l, full, *l, w);
                tail = _mm512_mask_add_ps(tail, seen & !full, tail, w);
            }
            let [l0, l1, l2, l3, l4, l5, l6, l7] = lanes8;
            let blk_sum = _mm512_add_ps(
                _mm512_add_ps(
                    _mm512_add_ps(_mm512_add_ps(l0, l4), _mm512_add_ps(l2, l6)),
                    _mm512_add_ps(_mm512_add_ps(l1, l5), _mm512_add_ps(l3, l7)),
                ),
                tail,
            );
            // The rescale: exp(old max - new max) where the max grew, else exactly 1 (which
            // leaves sums and accumulators as they are, as the row-major kernel does).
            let grew = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(m_new, m_old);
            let cf_out = corr.as_mut_ptr().add(lane);
            _mm512_storeu_ps(cf_out, _mm512_set1_ps(1.0));
            if grew != 0 {
                let mut olds = [0f32; LANES];
                let mut news = [0f32; LANES];
                _mm512_storeu_ps(olds.as_mut_ptr(), m_old);
                _mm512_storeu_ps(news.as_mut_ptr(), m_new);
                for j in 0..LANES {
                    if grew & (1 << j) != 0 {
                        *cf_out.add(j) = (olds[j] - news[j]).exp();
                    }
                }
            }
            let cf = _mm512_loadu_ps(cf_out);
            let old_sum = _mm512_loadu_ps(sum.as_ptr().add(lane));
            let new_sum = _mm512_add_ps(_mm512_mul_ps(old_sum, cf), blk_sum);
            _mm512_storeu_ps(sum.as_mut_ptr().add(lane), new_sum);
            _mm512_storeu_ps(max.as_mut_ptr().add(lane), m_new);
        }

        // acc[r] = acc[r] * corr[r] + sum_i w[i][r] * V[i], PV_ROWS rows x 64 dims in
        // registers across the block's keys.
        // The block's V rows are in the cache (checked once here; `PvBlock` reads them raw).
        let v_block = &args.v_cache[block_base..][..(len - 1) * kv_row + d];
        let pv = PvBlock {
            v: v_block.as_ptr(),
            kv_row,
            st: pst,
            rows_pad,
            corr: corr.as_ptr(),
            acc: acc.as_mut_ptr(),
            d,
            len,
        };
        let mut r0 = 0;
        while r0 < rows {
            let nr = (rows - r0).min(PV_ROWS);
            match nr {
                6 => pv.run::<6>(r0),
                5 => pv.run::<5>(r0),
                4 => pv.run::<4>(r0),
                3 => pv.run::<3>(r0),
                2 => pv.run::<2>(r0),
                _ => pv.run::<1>(r0),
            }
            r0 += nr;
        }
    }

    super::write_rows::<Q, C>(args, task, q_begin, acc, sum, out);
}

//! The portable kernel: plain Rust over the packed layout, the same integer math as the SIMD
//! kernels (int32 group sums, then one float fold per group), on any CPU.

use super::driver::KernelArgs;
use super::pack::{CHUNK_BYTES, TILE_COLS};
use super::{QuantBits, ScaleDType};

/// Computes output tiles `tile_begin..tile_end` for every row.
pub(crate) fn run_tiles(a: &KernelArgs<'_>, tile_begin: usize, tile_end: usize) {
    let l = &a.layout;
    let g_size = l.group_size;
    let min_per_scale = l.min_per_scale();
    for t in tile_begin..tile_end {
        let tile = &a.w[t * l.tile_bytes..][..l.tile_bytes];
        let cols = TILE_COLS.min(l.n - t * TILE_COLS);
        for r in 0..a.m {
            let mut facc = [0f32; TILE_COLS];
            for g in 0..l.groups {
                let block = &tile[g * l.block_bytes..][..l.block_bytes];
                let xq = &a.xq[r * l.k + g * g_size..][..g_size];
                let mut iacc = [0i32; TILE_COLS];
                match l.bits {
                    QuantBits::Int8 => {
                        for (chunk, xs) in block[..l.code_bytes]
                            .chunks_exact(CHUNK_BYTES)
                            .zip(xq.chunks_exact(4))
                        {
                            for (acc, lane) in iacc.iter_mut().zip(chunk.chunks_exact(4)) {
                                for (&q, &x) in lane.iter().zip(xs) {
                                    *acc += q as i32 * x as i32;
                                }
                            }
                        }
                    }
                    QuantBits::Int4 => {
                        for (chunk, xs) in block[..l.code_bytes]
                            .chunks_exact(CHUNK_BYTES)
                            .zip(xq.chunks_exact(8))
                        {
                            for (acc, lane) in iacc.iter_mut().zip(chunk.chunks_exact(4)) {
                                for (b, &q) in lane.iter().enumerate() {
                                    *acc += (q & 0x0F) as i32 * xs[b] as i32
                                        + (q >> 4) as i32 * xs[b + 4] as i32;
                                }
                            }
                        }
                    }
                }
                let sx = a.sx[r * l.groups + g];
                let sumx = a.sumx[r * l.groups + g];
                let scales = &block[l.code_bytes..];
                for (j, f) in facc.iter_mut().enumerate() {
                    let d = match l.scales {
                        ScaleDType::F16 => f16_at(scales, 2 * j),
                        ScaleDType::F32 => f32_at(scales, 4 * j),
                    };
                    // A symmetric layout's min is `-z d`, exact (see pack.rs).
                    let m = match (min_per_scale, l.scales) {
                        (Some(z), _) => d * z,
                        (None, ScaleDType::F16) => f16_at(scales, 32 + 2 * j),
                        (None, ScaleDType::F32) => f32_at(scales, 64 + 4 * j),
                    };
                    *f += iacc[j] as f32 * (d * sx) + m * sumx;
                }
            }
            for (j, &v) in facc.iter().enumerate().take(cols) {
                // SAFETY: row r < m and column t * 16 + j < n lie inside y, and this tile's
                // columns are written by this call only (the driver splits tiles disjointly).
                unsafe { a.y.write(r * l.n + t * TILE_COLS + j, v) };
            }
        }
    }
}

fn f16_at(b: &[u8], at: usize) -> f32 {
    half::f16::from_bits(u16::from_le_bytes([b[at], b[at + 1]])).to_f32()
}

fn f32_at(b: &[u8], at: usize) -> f32 {
    f32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

//! GGUF k-quants (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K) repacked losslessly into the packed layout.
//!
//! A k-quant super-block holds 256 weights of one row as sub-blocks of 32 (Q4_K, Q5_K) or 16
//! (Q2_K, Q3_K, Q6_K) weights, each with a small integer scale (and for Q2_K/Q4_K/Q5_K a min)
//! multiplying the super-block's f16 `d` (and `dmin`). A sub-block becomes one group with f32
//! scale and min; the codes keep the stored integers, shifted to be unsigned:
//!
//! ```text
//! Q4_K  w = (d sc) q - dmin m              q in 0..16   -> int4, g32: d' = d sc, m' = -(dmin m)
//! Q5_K  w = (d sc) q - dmin m              q in 0..32   -> int8, g32: as Q4_K
//! Q6_K  w = (d sc) (q - 32)                q in 0..64   -> int8, g16: d' = d sc, m' = -32 d'
//! Q3_K  w = (d (sc - 32)) (q - 4)          q in 0..8    -> int4, g16: d' = d (sc - 32), m' = -4 d'
//! Q2_K  w = (d sc) q - dmin m              q in 0..4    -> int4, g16: as Q4_K
//! ```
//!
//! Why this is exact: `d` has an 11-bit significand and `sc` at most 8 bits, so `d'` (at most 19
//! bits) is exact in f32, and so are `-(dmin m)`, `-32 d'` and `-4 d'`. candle dequantizes to
//! `d' * q - dmin m` (the same two roundings as our `q * d' + m'`) or to `d' * (q - 32)`, which is
//! exact (at most 24 bits), as are our `q d'` and `-32 d'`, whose sum is that same exact value.
//! `tests/quant.rs` checks every type bit for bit against candle's dequantization.

use super::{read_f16, PackLayout, Packer, ScaleDType};
use crate::quant::{PackedWeight, QuantBits, QuantError, Result};
use candle_core::quantized::GgmlDType;

/// Weights per super-block.
const QK_K: usize = 256;

/// The k-quant types we repack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum KQuant {
    Q2K,
    Q3K,
    Q4K,
    Q5K,
    Q6K,
}

impl KQuant {
    pub(super) fn of(dtype: GgmlDType) -> Option<Self> {
        match dtype {
            GgmlDType::Q2K => Some(Self::Q2K),
            GgmlDType::Q3K => Some(Self::Q3K),
            GgmlDType::Q4K => Some(Self::Q4K),
            GgmlDType::Q5K => Some(Self::Q5K),
            GgmlDType::Q6K => Some(Self::Q6K),
            _ => None,
        }
    }

    fn dtype(self) -> GgmlDType {
        match self {
            Self::Q2K => GgmlDType::Q2K,
            Self::Q3K => GgmlDType::Q3K,
            Self::Q4K => GgmlDType::Q4K,
            Self::Q5K => GgmlDType::Q5K,
            Self::Q6K => GgmlDType::Q6K,
        }
    }

    /// Bytes of one super-block (candle's `BlockQ*K` sizes).
    fn block_bytes(self) -> usize {
        match self {
            Self::Q2K => 84,
            Self::Q3K => 110,
            Self::Q4K => 144,
            Self::Q5K => 176,
            Self::Q6K => 210,
        }
    }

    fn bits(self) -> QuantBits {
        match self {
            Self::Q5K | Self::Q6K => QuantBits::Int8,
            Self::Q2K | Self::Q3K | Self::Q4K => QuantBits::Int4,
        }
    }

    /// The largest code (`2^bits - 1` of the stored integers).
    fn code_max(self) -> u8 {
        match self {
            Self::Q2K => 3,
            Self::Q3K => 7,
            Self::Q4K => 15,
            Self::Q5K => 31,
            Self::Q6K => 63,
        }
    }

    fn group_size(self) -> usize {
        match self {
            Self::Q4K | Self::Q5K => 32,
            Self::Q2K | Self::Q3K | Self::Q6K => 16,
        }
    }
}

/// One super-block decoded: 256 unsigned codes and, per sub-block, f32 `(d', m')`.
struct SuperBlock {
    codes: [u8; QK_K],
    /// Up to 16 sub-blocks (8 for the 32-weight types).
    scales: [(f32, f32); 16],
}

pub(super) fn repack(kq: KQuant, data: &[u8], n: usize, k: usize) -> Result<PackedWeight> {
    let dtype = kq.dtype();
    debug_assert_eq!(kq.block_bytes(), dtype.type_size());
    debug_assert_eq!(QK_K, dtype.block_size());
    if k == 0 || !k.is_multiple_of(QK_K) {
        return Err(QuantError::KNotMultipleOfGroup {
            k,
            group_size: QK_K,
        });
    }
    let gs = kq.group_size();
    let layout =
        PackLayout::new(n, k, kq.bits(), gs, ScaleDType::F32)?.with_code_max(kq.code_max());
    let expected = n * (k / QK_K) * kq.block_bytes();
    if data.len() != expected {
        return Err(QuantError::Length {
            what: "GGML data bytes",
            expected,
            got: data.len(),
        });
    }
    let sub_blocks = QK_K / gs;
    let blocks_per_row = k / QK_K;
    let mut packer = Packer::new(layout);
    let mut sb = SuperBlock {
        codes: [0; QK_K],
        scales: [(0.0, 0.0); 16],
    };
    for (i, b) in data.chunks_exact(kq.block_bytes()).enumerate() {
        let (col, blk) = (i / blocks_per_row, i % blocks_per_row);
        match kq {
            KQuant::Q2K => decode_q2k(b, &mut sb),
            KQuant::Q3K => decode_q3k(b, &mut sb),
            KQuant::Q4K => decode_q4k(b, &mut sb),
            KQuant::Q5K => decode_q5k(b, &mut sb),
            KQuant::Q6K => decode_q6k(b, &mut sb),
        }
        for s in 0..sub_blocks {
            let (d, m) = sb.scales[s];
            if !d.is_finite() || !m.is_finite() {
                return Err(QuantError::NotRepresentable {
                    row: col,
                    group: blk * sub_blocks + s,
                });
            }
            let codes = &sb.codes[s * gs..][..gs];
            packer.set_group(col, blk * sub_blocks + s, codes, d, m);
        }
    }
    Ok(packer.finish(Some(dtype)))
}

/// `(sc, m)` of sub-block `j` from the 12 packed 6-bit scale bytes of Q4_K and Q5_K (candle's
/// `get_scale_min_k4`).
fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// Q4_K: `d, dmin: f16; scales: [u8; 12]; qs: [u8; 128]`. Each 32 bytes of `qs` hold two
/// sub-blocks: the low nibbles, then the high ones.
fn decode_q4k(b: &[u8], sb: &mut SuperBlock) {
    let (d, dmin) = (read_f16(b, 0).to_f32(), read_f16(b, 2).to_f32());
    let (scales, qs) = (&b[4..16], &b[16..144]);
    for j in 0..4 {
        let q = &qs[32 * j..][..32];
        for (h, shift) in [(0, 0), (1, 4)] {
            let s = 2 * j + h;
            let (sc, m) = scale_min_k4(s, scales);
            sb.scales[s] = (d * sc as f32, -(dmin * m as f32));
            for (c, &v) in sb.codes[32 * s..][..32].iter_mut().zip(q) {
                *c = (v >> shift) & 0xF;
            }
        }
    }
}

/// Q5_K: `d, dmin: f16; scales: [u8; 12]; qh: [u8; 32]; qs: [u8; 128]`: Q4_K's nibbles plus
/// bit `s` of `qh[i]` as bit 4 of element `i` of sub-block `s`.
fn decode_q5k(b: &[u8], sb: &mut SuperBlock) {
    let (d, dmin) = (read_f16(b, 0).to_f32(), read_f16(b, 2).to_f32());
    let (scales, qh, qs) = (&b[4..16], &b[16..48], &b[48..176]);
    for j in 0..4 {
        let q = &qs[32 * j..][..32];
        for (h, shift) in [(0, 0), (1, 4)] {
            let s = 2 * j + h;
            let (sc, m) = scale_min_k4(s, scales);
            sb.scales[s] = (d * sc as f32, -(dmin * m as f32));
            let codes = &mut sb.codes[32 * s..][..32];
            for (i, c) in codes.iter_mut().enumerate() {
                *c = ((q[i] >> shift) & 0xF) | (((qh[i] >> s) & 1) << 4);
            }
        }
    }
}

/// Q6_K: `ql: [u8; 128]; qh: [u8; 64]; scales: [i8; 16]; d: f16`. Each 128-weight half `n`
/// reads `ql[64 n..]` and `qh[32 n..]`; its quarter `t` takes nibble `t / 2` of
/// `ql[l + 32 (t % 2)]` and bits `2 t..2 t + 2` of `qh[l]` as bits 4..6.
fn decode_q6k(b: &[u8], sb: &mut SuperBlock) {
    let (ql, qh, scales) = (&b[..128], &b[128..192], &b[192..208]);
    let d = read_f16(b, 208).to_f32();
    for (s, out) in sb.scales.iter_mut().enumerate() {
        let ds = d * scales[s] as i8 as f32;
        *out = (ds, -32.0 * ds);
    }
    for half in 0..2 {
        let (ql, qh) = (&ql[64 * half..], &qh[32 * half..]);
        for t in 0..4 {
            let codes = &mut sb.codes[128 * half + 32 * t..][..32];
            for (l, c) in codes.iter_mut().enumerate() {
                let low = (ql[l + 32 * (t % 2)] >> (4 * (t / 2))) & 0xF;
                *c = low | (((qh[l] >> (2 * t)) & 3) << 4);
            }
        }
    }
}

/// Q3_K: `hmask: [u8; 32]; qs: [u8; 64]; scales: [u8; 12]; d: f16`. Each 128-weight half `c`
/// reads `qs[32 c..]`; its quarter `j` takes bits `2 j..2 j + 2` of `qs[i]` and, as bit 2, bit
/// `4 c + j` of `hmask[i]` (a clear bit means "minus 4" in GGML's terms).
fn decode_q3k(b: &[u8], sb: &mut SuperBlock) {
    let (hmask, qs, packed) = (&b[..32], &b[32..96], &b[96..108]);
    let d = read_f16(b, 108).to_f32();
    // The 16 6-bit scales, unpacked as candle's `to_float` does.
    const KMASK1: u32 = 0x0303_0303;
    const KMASK2: u32 = 0x0f0f_0f0f;
    let word = |i: usize| {
        u32::from_le_bytes([
            packed[4 * i],
            packed[4 * i + 1],
            packed[4 * i + 2],
            packed[4 * i + 3],
        ])
    };
    let (a0, a1, tmp) = (word(0), word(1), word(2));
    let aux = [
        (a0 & KMASK2) | ((tmp & KMASK1) << 4),
        (a1 & KMASK2) | (((tmp >> 2) & KMASK1) << 4),
        ((a0 >> 4) & KMASK2) | (((tmp >> 4) & KMASK1) << 4),
        ((a1 >> 4) & KMASK2) | (((tmp >> 6) & KMASK1) << 4),
    ];
    for (s, out) in sb.scales.iter_mut().enumerate() {
        let sc = (aux[s / 4] >> (8 * (s % 4))) as u8 as i8;
        let ds = d * (sc as f32 - 32.0);
        *out = (ds, -4.0 * ds);
    }
    for c in 0..2 {
        let q = &qs[32 * c..][..32];
        for j in 0..4 {
            let codes = &mut sb.codes[128 * c + 32 * j..][..32];
            for (i, code) in codes.iter_mut().enumerate() {
                let high = (hmask[i] >> (4 * c + j)) & 1;
                *code = ((q[i] >> (2 * j)) & 3) | (high << 2);
            }
        }
    }
}

/// Q2_K: `scales: [u8; 16]; qs: [u8; 64]; d, dmin: f16`. Scale byte `s` holds the sub-block's
/// `sc` (low nibble) and `m` (high nibble); each 128-weight half `c` reads `qs[32 c..]`, its
/// quarter `j` bits `2 j..2 j + 2`.
fn decode_q2k(b: &[u8], sb: &mut SuperBlock) {
    let (scales, qs) = (&b[..16], &b[16..80]);
    let (d, dmin) = (read_f16(b, 80).to_f32(), read_f16(b, 82).to_f32());
    for (s, out) in sb.scales.iter_mut().enumerate() {
        let sc = scales[s];
        *out = (d * (sc & 0xF) as f32, -(dmin * (sc >> 4) as f32));
    }
    for c in 0..2 {
        let q = &qs[32 * c..][..32];
        for j in 0..4 {
            let codes = &mut sb.codes[128 * c + 32 * j..][..32];
            for (code, &v) in codes.iter_mut().zip(q) {
                *code = (v >> (2 * j)) & 3;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scale_unpacking_matches_the_packed_bits() {
        // Sub-blocks 0..4 read the low 6 bits of bytes 0..4 (scales) and 4..8 (mins); 4..8
        // the nibbles of bytes 8..12 plus the top two bits of bytes 0..8.
        let q = [
            0xC1, 0x02, 0x03, 0x04, 0x45, 0x06, 0x07, 0x08, 0x9A, 0x00, 0x00, 0x00,
        ];
        assert_eq!(scale_min_k4(0, &q), (1, 5));
        assert_eq!(scale_min_k4(4, &q), (0xA | (3 << 4), 0x9 | (1 << 4)));
    }
}

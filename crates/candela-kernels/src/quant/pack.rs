//! The packed byte layout, and conversions into it (f32 quantization, GGML repacking) and out
//! of it (dequantization).
//!
//! Output columns are grouped in tiles of [`TILE_COLS`] = 16 (one 512-bit register of i32 lanes,
//! or two 256-bit ones). The data is tile-major, then group-major along k, so a kernel working
//! on one tile streams one contiguous run of bytes:
//!
//! ```text
//! tile t: [ group 0 block ][ group 1 block ] ... [ group k/G-1 block ]
//! block:  [ chunk 0 ][ chunk 1 ] ... [ 16 x d ][ 16 x m ]   (f16 or f32)
//! chunk:  64 bytes = 16 lanes (columns) x 4 bytes
//!   int8: lane j, byte b  = code of w[col j, k0 + b]                      (k0 = g G + 4 c)
//!   int4: lane j, byte b  = code of w[col j, k0 + b]       in the low nibble
//!                         | code of w[col j, k0 + 4 + b]   in the high nibble (k0 = g G + 8 c)
//! ```
//!
//! Each lane's 4 bytes line up with 4 consecutive activations, which is exactly what one
//! `vpdpbusd` lane sums, so the kernels broadcast 4 activation bytes and never reduce
//! horizontally. Columns past `n` in the last tile are zero (code 0, d = m = 0).
//!
//! A group is at least 16 weights (two int4 chunks or four int8 ones): codes are whole cache
//! lines (128 bytes or more), the scale and min rows 32 (f16) or 64 (f32) bytes each.
//!
//! Symmetric types (Q4_0, Q5_0, Q8_0, `--quantize int8`) have `m = -z d` for a fixed zero
//! point `z` (8, 16, 128), a power of two, so `d * -z` is exact in f32 and equals the stored
//! min bit for bit. Their blocks leave out the min row ([`PackLayout::zero_point`]) and the
//! kernels compute it: Q4_0 then reads 18 bytes per 32 weights, as in the GGUF file, not 20.
//! Such blocks are 32-byte aligned rather than 64 (288 bytes for Q4_0); batch-1 decode,
//! which streams every weight once a token, reads 10% fewer bytes for it.

use half::f16;

mod kquant;

use super::{PackedWeight, QuantBits, QuantError, Result, ScaleDType};
use candle_core::quantized::GgmlDType;

/// Output columns per tile.
pub const TILE_COLS: usize = 16;
/// Bytes per chunk: 16 lanes of 4 bytes.
pub(crate) const CHUNK_BYTES: usize = 64;
/// The largest group size accepted (keeps the i32 group accumulators far from overflow).
const GROUP_SIZE_MAX: usize = 512;

/// Shape of a packed weight and the byte offsets derived from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PackLayout {
    pub n: usize,
    pub k: usize,
    pub bits: QuantBits,
    pub group_size: usize,
    pub scales: ScaleDType,
    /// The largest code stored (15 for int4). Below 128, int8 codes can go through AVX2's
    /// `vpmaddubsw` as they are: pairs of 127 x 127 do not saturate its i16 sums.
    pub code_max: u8,
    /// `Some(z)`: every group's min is `-z d` and blocks store no min row (symmetric types;
    /// `z` a power of two, so the product is exact). `None`: a min row follows the scales.
    pub zero_point: Option<u8>,
    /// `k / group_size`.
    pub groups: usize,
    /// `ceil(n / TILE_COLS)`.
    pub tiles: usize,
    /// Bytes of codes in one block (one tile x one group).
    pub code_bytes: usize,
    /// Bytes of the scale row and of the min row at the end of a block (16 of each).
    pub scale_row_bytes: usize,
    /// Bytes of one block: codes, then scales, then mins (when stored).
    pub block_bytes: usize,
    /// Bytes of one tile: `groups` blocks.
    pub tile_bytes: usize,
}

impl PackLayout {
    pub(crate) fn new(
        n: usize,
        k: usize,
        bits: QuantBits,
        group_size: usize,
        scales: ScaleDType,
    ) -> Result<Self> {
        if group_size == 0 || !group_size.is_multiple_of(16) || group_size > GROUP_SIZE_MAX {
            return Err(QuantError::GroupSize { group_size });
        }
        if k == 0 || !k.is_multiple_of(group_size) {
            return Err(QuantError::KNotMultipleOfGroup { k, group_size });
        }
        if n == 0 {
            return Err(QuantError::EmptyN);
        }
        let code_bytes = match bits {
            QuantBits::Int8 => TILE_COLS * group_size,
            QuantBits::Int4 => TILE_COLS * group_size / 2,
        };
        let scale_row_bytes = match scales {
            ScaleDType::F16 => TILE_COLS * 2,
            ScaleDType::F32 => TILE_COLS * 4,
        };
        let block_bytes = code_bytes + 2 * scale_row_bytes;
        debug_assert_eq!(code_bytes % CHUNK_BYTES, 0);
        let groups = k / group_size;
        Ok(Self {
            n,
            k,
            bits,
            group_size,
            scales,
            zero_point: None,
            code_max: match bits {
                QuantBits::Int8 => u8::MAX,
                QuantBits::Int4 => 15,
            },
            groups,
            tiles: n.div_ceil(TILE_COLS),
            code_bytes,
            scale_row_bytes,
            block_bytes,
            tile_bytes: groups * block_bytes,
        })
    }

    /// The same layout, promising codes of at most `code_max` (checked as groups are stored).
    pub(crate) fn with_code_max(self, code_max: u8) -> Self {
        debug_assert!(code_max <= self.code_max);
        Self { code_max, ..self }
    }

    /// The same layout for a symmetric type (`Some(z)`): mins are `-z d`, not stored. `None`
    /// leaves the layout as it is.
    pub(crate) fn with_zero_point(self, zero_point: Option<u8>) -> Self {
        let Some(z) = zero_point else {
            return self;
        };
        // A power of two keeps `d * -z` exact (it only moves the exponent).
        debug_assert!(z.is_power_of_two());
        let block_bytes = self.code_bytes + self.scale_row_bytes;
        Self {
            zero_point: Some(z),
            block_bytes,
            tile_bytes: self.groups * block_bytes,
            ..self
        }
    }

    /// `-z` of a symmetric layout (each group's min over its scale); `None` when mins are
    /// stored.
    #[inline]
    pub(crate) fn min_per_scale(&self) -> Option<f32> {
        self.zero_point.map(|z| -f32::from(z))
    }

    /// The packed size; whole cache lines, since [`AlignedBytes`] holds lines (a symmetric
    /// layout with an odd count of 32-byte-aligned blocks leaves 32 bytes of padding).
    fn total_bytes(&self) -> usize {
        (self.tiles * self.tile_bytes).next_multiple_of(64)
    }

    fn block_offset(&self, col: usize, group: usize) -> usize {
        (col / TILE_COLS) * self.tile_bytes + group * self.block_bytes
    }

    /// Byte index and nibble shift (0 or 4; always 0 for int8) of weight `(col, kk)` within
    /// its block, `kk` counted from the start of the group.
    fn code_position(&self, col: usize, kk: usize) -> (usize, u32) {
        let lane = col % TILE_COLS;
        match self.bits {
            QuantBits::Int8 => (CHUNK_BYTES * (kk / 4) + 4 * lane + kk % 4, 0),
            QuantBits::Int4 => {
                let within = kk % 8;
                let shift = if within < 4 { 0 } else { 4 };
                (CHUNK_BYTES * (kk / 8) + 4 * lane + within % 4, shift)
            }
        }
    }
}

/// A byte buffer whose start is 64-byte aligned, so every block starts on a cache line.
#[derive(Clone)]
pub(crate) struct AlignedBytes {
    lines: Vec<CacheLine>,
}

#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct CacheLine([u8; 64]);

impl AlignedBytes {
    fn zeroed(len: usize) -> Self {
        debug_assert_eq!(len % 64, 0);
        Self {
            lines: vec![CacheLine([0; 64]); len / 64],
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.lines.len() * 64
    }

    pub(crate) fn as_slice(&self) -> &[u8] {
        // SAFETY: CacheLine is repr(C) over [u8; 64] with no padding (size 64, align 64), so the
        // lines are one contiguous run of initialized bytes.
        unsafe { std::slice::from_raw_parts(self.lines.as_ptr().cast::<u8>(), self.len()) }
    }

    fn as_mut_slice(&mut self) -> &mut [u8] {
        let len = self.len();
        // SAFETY: as in `as_slice`, and we hold the only reference.
        unsafe { std::slice::from_raw_parts_mut(self.lines.as_mut_ptr().cast::<u8>(), len) }
    }
}

/// Writes groups into a zeroed buffer.
struct Packer {
    layout: PackLayout,
    data: AlignedBytes,
}

impl Packer {
    fn new(layout: PackLayout) -> Self {
        Self {
            data: AlignedBytes::zeroed(layout.total_bytes()),
            layout,
        }
    }

    /// Stores one group of codes (`group_size` of them, each < 16 for int4) with its scale/min.
    /// With f16 scales, `d` and `m` must be f16 values (callers check with [`exact_f16`]); in
    /// a symmetric layout `m` must be `-z d` and is not stored.
    fn set_group(&mut self, col: usize, group: usize, codes: &[u8], d: f32, m: f32) {
        let l = self.layout;
        debug_assert_eq!(codes.len(), l.group_size);
        let base = l.block_offset(col, group);
        let bytes = self.data.as_mut_slice();
        let block = &mut bytes[base..base + l.block_bytes];
        for (kk, &q) in codes.iter().enumerate() {
            let (i, shift) = l.code_position(col, kk);
            debug_assert!(q <= l.code_max, "code {q} > {}", l.code_max);
            block[i] |= q << shift;
        }
        let lane = col % TILE_COLS;
        let ds = l.code_bytes;
        let ms = l.code_bytes + l.scale_row_bytes;
        if let Some(per_scale) = l.min_per_scale() {
            debug_assert!(
                (d * per_scale).to_bits() == m.to_bits() || m.is_nan(),
                "min {m} is not {per_scale} x {d}"
            );
        }
        let with_min = l.zero_point.is_none();
        match l.scales {
            ScaleDType::F16 => {
                let (dh, mh) = (f16::from_f32(d), f16::from_f32(m));
                // NaN too: a corrupt GGML block's NaN scale is carried as it is.
                debug_assert!(
                    (dh.to_f32() == d || d.is_nan())
                        && (!with_min || mh.to_f32() == m || m.is_nan())
                );
                block[ds + 2 * lane..][..2].copy_from_slice(&dh.to_bits().to_le_bytes());
                if with_min {
                    block[ms + 2 * lane..][..2].copy_from_slice(&mh.to_bits().to_le_bytes());
                }
            }
            ScaleDType::F32 => {
                block[ds + 4 * lane..][..4].copy_from_slice(&d.to_le_bytes());
                if with_min {
                    block[ms + 4 * lane..][..4].copy_from_slice(&m.to_le_bytes());
                }
            }
        }
    }

    fn finish(self, source: Option<GgmlDType>) -> PackedWeight {
        PackedWeight {
            layout: self.layout,
            data: self.data,
            source,
            #[cfg(feature = "cuda")]
            cuda: std::sync::OnceLock::new(),
        }
    }
}

/// Reads one group back: codes into `codes`, returns (d, m).
fn get_group(w: &PackedWeight, col: usize, group: usize, codes: &mut [u8]) -> (f32, f32) {
    let l = w.layout;
    let base = l.block_offset(col, group);
    let block = &w.data.as_slice()[base..base + l.block_bytes];
    for (kk, q) in codes.iter_mut().enumerate() {
        let (i, shift) = l.code_position(col, kk);
        *q = match l.bits {
            QuantBits::Int8 => block[i],
            QuantBits::Int4 => (block[i] >> shift) & 0x0F,
        };
    }
    let lane = col % TILE_COLS;
    let (ds, ms) = (l.code_bytes, l.code_bytes + l.scale_row_bytes);
    let d = match l.scales {
        ScaleDType::F16 => read_f16(block, ds + 2 * lane).to_f32(),
        ScaleDType::F32 => read_f32(block, ds + 4 * lane),
    };
    let m = match (l.min_per_scale(), l.scales) {
        (Some(per_scale), _) => d * per_scale,
        (None, ScaleDType::F16) => read_f16(block, ms + 2 * lane).to_f32(),
        (None, ScaleDType::F32) => read_f32(block, ms + 4 * lane),
    };
    (d, m)
}

pub(crate) fn concat_rows(parts: &[&PackedWeight]) -> Result<PackedWeight> {
    stack_rows(parts, true)
}

/// `w` with a stored min row in every block, as the CUDA kernels read it (a symmetric layout
/// leaves the row out). Fails with [`QuantError::Incompatible`] where a computed min is no f16
/// (`-8 d` of a Q4_0 scale above 8188).
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub(crate) fn with_stored_mins(w: &PackedWeight) -> Result<PackedWeight> {
    stack_rows(&[w], false)
}

/// `parts` stacked along n; the result is symmetric when `symmetric_ok` and every part is,
/// with the same zero point.
fn stack_rows(parts: &[&PackedWeight], symmetric_ok: bool) -> Result<PackedWeight> {
    let first = parts.first().ok_or(QuantError::EmptyN)?.layout;
    let compatible = |l: &PackLayout| {
        (l.k, l.bits, l.group_size, l.scales)
            == (first.k, first.bits, first.group_size, first.scales)
    };
    if !parts.iter().all(|p| compatible(&p.layout)) {
        return Err(QuantError::Incompatible);
    }
    let n = parts.iter().map(|p| p.layout.n).sum();
    let code_max = parts
        .iter()
        .map(|p| p.layout.code_max)
        .max()
        .unwrap_or(u8::MAX);
    // Parts of different zero points (Q4_0 beside Q4_1) stack with stored mins.
    let zero_point = first.zero_point.filter(|_| {
        symmetric_ok
            && parts
                .iter()
                .all(|p| p.layout.zero_point == first.zero_point)
    });
    let layout = PackLayout::new(n, first.k, first.bits, first.group_size, first.scales)?
        .with_code_max(code_max)
        .with_zero_point(zero_point);
    let mut packer = Packer::new(layout);
    let mut codes = vec![0u8; first.group_size];
    let mut base = 0;
    for part in parts {
        // A symmetric part's computed mins, stored as f16, must be f16 values (`-8 d` of a
        // huge Q4_0 scale is not); stored mins are already.
        let check_mins = zero_point.is_none()
            && part.layout.zero_point.is_some()
            && layout.scales == ScaleDType::F16;
        for col in 0..part.layout.n {
            for g in 0..first.groups {
                let (d, m) = get_group(part, col, g, &mut codes);
                if check_mins && !m.is_nan() && exact_f16(m).is_none() {
                    return Err(QuantError::Incompatible);
                }
                packer.set_group(base + col, g, &codes, d, m);
            }
        }
        base += part.layout.n;
    }
    let source = parts[0].source;
    let same_source = parts.iter().all(|p| p.source == source);
    Ok(packer.finish(if same_source { source } else { None }))
}

pub(crate) fn dequantize(w: &PackedWeight) -> Vec<f32> {
    let l = w.layout;
    let mut out = vec![0f32; l.n * l.k];
    let mut codes = vec![0u8; l.group_size];
    for col in 0..l.n {
        for g in 0..l.groups {
            let (d, m) = get_group(w, col, g, &mut codes);
            let row = &mut out[col * l.k + g * l.group_size..][..l.group_size];
            for (o, &q) in row.iter_mut().zip(codes.iter()) {
                // Same expression and rounding as candle's `to_float` (no fused multiply-add),
                // which makes the repacked GGML types dequantize bit-exactly.
                *o = q as f32 * d + m;
            }
        }
    }
    out
}

/// f16 of `v` if it holds `v` exactly (guards the lossless repacking of `m = -8 d` and
/// friends, and quantized scales that overflow f16).
fn exact_f16(v: f32) -> Option<f16> {
    let h = f16::from_f32(v);
    (h.to_f32() == v).then_some(h)
}

pub(crate) fn quantize_f32(
    w: &[f32],
    n: usize,
    k: usize,
    bits: QuantBits,
    group_size: usize,
) -> Result<PackedWeight> {
    // Int8 is symmetric: codes q + 128, so every min is -128 d.
    let layout = PackLayout::new(n, k, bits, group_size, ScaleDType::F16)?
        .with_zero_point((bits == QuantBits::Int8).then_some(128));
    if w.len() != n * k {
        return Err(QuantError::Length {
            what: "weight",
            expected: n * k,
            got: w.len(),
        });
    }
    let mut packer = Packer::new(layout);
    let mut codes = vec![0u8; group_size];
    for col in 0..n {
        for g in 0..layout.groups {
            let xs = &w[col * k + g * group_size..][..group_size];
            let bad = QuantError::NotRepresentable { row: col, group: g };
            if xs.iter().any(|v| !v.is_finite()) {
                return Err(bad);
            }
            let (d, m) = match bits {
                QuantBits::Int8 => {
                    let amax = xs.iter().fold(0f32, |a, v| a.max(v.abs()));
                    let d = f16::from_f32(amax / 127.0);
                    let df = d.to_f32();
                    if !df.is_finite() {
                        return Err(bad);
                    }
                    let inv = if df > 0.0 { 1.0 / df } else { 0.0 };
                    for (c, &v) in codes.iter_mut().zip(xs) {
                        let q = (v * inv).round().clamp(-127.0, 127.0) as i32;
                        *c = (q + 128) as u8;
                    }
                    (df, -128.0 * df)
                }
                QuantBits::Int4 => {
                    let lo = xs.iter().fold(f32::INFINITY, |a, &v| a.min(v));
                    let hi = xs.iter().fold(f32::NEG_INFINITY, |a, &v| a.max(v));
                    let d = f16::from_f32((hi - lo) / 15.0);
                    let m = f16::from_f32(lo);
                    let (df, mf) = (d.to_f32(), m.to_f32());
                    if !df.is_finite() || !mf.is_finite() {
                        return Err(bad);
                    }
                    let inv = if df > 0.0 { 1.0 / df } else { 0.0 };
                    for (c, &v) in codes.iter_mut().zip(xs) {
                        *c = ((v - mf) * inv).round().clamp(0.0, 15.0) as u8;
                    }
                    (df, mf)
                }
            };
            packer.set_group(col, g, &codes, d, m);
        }
    }
    Ok(packer.finish(None))
}

/// GGML block sizes: every type we repack has 32 weights per block.
const GGML_BLOCK: usize = 32;

fn read_f16(b: &[u8], at: usize) -> f16 {
    f16::from_bits(u16::from_le_bytes([b[at], b[at + 1]]))
}

fn read_f32(b: &[u8], at: usize) -> f32 {
    f32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

pub(crate) fn from_ggml(dtype: GgmlDType, data: &[u8], n: usize, k: usize) -> Result<PackedWeight> {
    if let Some(kq) = kquant::KQuant::of(dtype) {
        return kquant::repack(kq, data, n, k);
    }
    // (codes, bytes per block, largest code, zero point of the symmetric types)
    let (bits, block_bytes, code_max, zero_point) = match dtype {
        GgmlDType::Q4_0 => (QuantBits::Int4, 18, 15, Some(8)),
        GgmlDType::Q4_1 => (QuantBits::Int4, 20, 15, None),
        GgmlDType::Q5_0 => (QuantBits::Int8, 22, 31, Some(16)),
        GgmlDType::Q5_1 => (QuantBits::Int8, 24, 31, None),
        GgmlDType::Q8_0 => (QuantBits::Int8, 34, 255, Some(128)),
        _ => return Err(QuantError::UnsupportedGgml { dtype }),
    };
    debug_assert_eq!(block_bytes, dtype.type_size());
    let layout = PackLayout::new(n, k, bits, GGML_BLOCK, ScaleDType::F16)?
        .with_code_max(code_max)
        .with_zero_point(zero_point);
    let expected = n * (k / GGML_BLOCK) * block_bytes;
    if data.len() != expected {
        return Err(QuantError::Length {
            what: "GGML data bytes",
            expected,
            got: data.len(),
        });
    }
    let mut packer = Packer::new(layout);
    let mut codes = [0u8; GGML_BLOCK];
    for (i, b) in data.chunks_exact(block_bytes).enumerate() {
        let (col, g) = (i / layout.groups, i % layout.groups);
        let d = read_f16(b, 0);
        // GGML stores element j in the low nibble of byte j and element j + 16 in the high
        // nibble; the 5-bit types keep bit 4 of element j in bit j of `qh`.
        let (dd, m) = match dtype {
            GgmlDType::Q4_0 => {
                nibbles(&b[2..18], &mut codes);
                (d, -8.0 * d.to_f32())
            }
            GgmlDType::Q4_1 => {
                nibbles(&b[4..20], &mut codes);
                (d, read_f16(b, 2).to_f32())
            }
            GgmlDType::Q5_0 => {
                let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
                nibbles(&b[6..22], &mut codes);
                high_bits(qh, &mut codes);
                (d, -16.0 * d.to_f32())
            }
            GgmlDType::Q5_1 => {
                let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
                nibbles(&b[8..24], &mut codes);
                high_bits(qh, &mut codes);
                (d, read_f16(b, 2).to_f32())
            }
            GgmlDType::Q8_0 => {
                for (c, &q) in codes.iter_mut().zip(&b[2..34]) {
                    *c = (q as i8 as i32 + 128) as u8;
                }
                (d, -128.0 * d.to_f32())
            }
            _ => return Err(QuantError::UnsupportedGgml { dtype }),
        };
        packer.set_group(col, g, &codes, dd.to_f32(), m);
    }
    Ok(packer.finish(Some(dtype)))
}

fn nibbles(qs: &[u8], codes: &mut [u8; GGML_BLOCK]) {
    for (j, &q) in qs.iter().enumerate() {
        codes[j] = q & 0x0F;
        codes[j + GGML_BLOCK / 2] = q >> 4;
    }
}

fn high_bits(qh: u32, codes: &mut [u8; GGML_BLOCK]) {
    for (j, c) in codes.iter_mut().enumerate() {
        *c |= (((qh >> j) & 1) as u8) << 4;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_positions_cover_each_block_byte_once() {
        for bits in [QuantBits::Int8, QuantBits::Int4] {
            let l = PackLayout::new(TILE_COLS, 64, bits, 64, ScaleDType::F16).unwrap();
            let mut seen = vec![0u32; l.code_bytes];
            for col in 0..TILE_COLS {
                for kk in 0..64 {
                    let (i, shift) = l.code_position(col, kk);
                    seen[i] += 1 << shift;
                }
            }
            let want = if bits == QuantBits::Int8 { 1 } else { 1 + 16 };
            assert!(seen.iter().all(|&s| s == want), "{bits:?}");
        }
    }

    #[test]
    fn stacked_rows_compute_what_the_parts_compute() -> Result<()> {
        // Odd n (not a multiple of TILE_COLS) so parts straddle tiles once stacked.
        let k = 96;
        let shapes = [
            (21usize, QuantBits::Int4),
            (7, QuantBits::Int4),
            (37, QuantBits::Int4),
        ];
        let weights: Vec<PackedWeight> = shapes
            .iter()
            .enumerate()
            .map(|(i, &(n, bits))| {
                let w: Vec<f32> = (0..n * k)
                    .map(|j| ((j * 37 + i * 11) % 101) as f32 / 50.0 - 1.0)
                    .collect();
                quantize_f32(&w, n, k, bits, 32)
            })
            .collect::<Result<_>>()?;
        let refs: Vec<&PackedWeight> = weights.iter().collect();
        let stacked = concat_rows(&refs)?;
        assert_eq!(stacked.n(), 21 + 7 + 37);
        let expected: Vec<f32> = weights.iter().flat_map(|w| w.dequantize()).collect();
        assert_eq!(stacked.dequantize(), expected);
        let m = 3;
        let x: Vec<f32> = (0..m * k).map(|j| (j % 13) as f32 / 6.0 - 1.0).collect();
        let mut y = vec![0f32; m * stacked.n()];
        stacked.matmul_f32(&x, m, &mut y)?;
        let mut col = 0;
        for w in &weights {
            let mut part = vec![0f32; m * w.n()];
            w.matmul_f32(&x, m, &mut part)?;
            for r in 0..m {
                for c in 0..w.n() {
                    let (a, b) = (y[r * stacked.n() + col + c], part[r * w.n() + c]);
                    assert!(
                        (a - b).abs() <= 1e-5 * b.abs().max(1.0),
                        "row {r} col {c}: {a} vs {b}"
                    );
                }
            }
            col += w.n();
        }
        let int8 = quantize_f32(&vec![0.5; 16 * k], 16, k, QuantBits::Int8, 32)?;
        assert!(matches!(
            concat_rows(&[&weights[0], &int8]),
            Err(QuantError::Incompatible)
        ));
        Ok(())
    }

    #[test]
    fn stored_mins_compute_the_same_bits() -> Result<()> {
        let (n, k) = (21, 96);
        let w: Vec<f32> = (0..n * k)
            .map(|j| ((j * 29) % 97) as f32 / 40.0 - 1.2)
            .collect();
        let sym = quantize_f32(&w, n, k, QuantBits::Int8, 32)?;
        assert_eq!(sym.layout.zero_point, Some(128));
        let full = with_stored_mins(&sym)?;
        assert_eq!(full.layout.zero_point, None);
        assert_eq!(full.layout.block_bytes, sym.layout.block_bytes + 32);
        assert_eq!(full.dequantize(), sym.dequantize());
        let m = 5;
        let x: Vec<f32> = (0..m * k).map(|j| (j % 11) as f32 / 5.0 - 1.0).collect();
        let (mut a, mut b) = (vec![0f32; m * n], vec![0f32; m * n]);
        sym.matmul_f32(&x, m, &mut a)?;
        full.matmul_f32(&x, m, &mut b)?;
        assert_eq!(a, b);
        // A Q4_0 scale whose `-8 d` overflows f16 has no stored-min form.
        let mut block = vec![0u8; 18];
        block[..2].copy_from_slice(&f16::from_f32(9000.0).to_bits().to_le_bytes());
        let huge = from_ggml(GgmlDType::Q4_0, &block, 1, 32)?;
        assert!(matches!(
            with_stored_mins(&huge),
            Err(QuantError::Incompatible)
        ));
        Ok(())
    }

    #[test]
    fn rejects_bad_shapes() {
        assert!(matches!(
            PackLayout::new(4, 48, QuantBits::Int4, 32, ScaleDType::F16),
            Err(QuantError::KNotMultipleOfGroup { .. })
        ));
        assert!(matches!(
            PackLayout::new(4, 64, QuantBits::Int4, 40, ScaleDType::F16),
            Err(QuantError::GroupSize { .. })
        ));
        assert!(matches!(
            PackLayout::new(0, 64, QuantBits::Int8, 32, ScaleDType::F16),
            Err(QuantError::EmptyN)
        ));
    }

    #[test]
    fn quantize_rejects_non_finite_and_huge() {
        let mut w = vec![0.5f32; 32];
        w[3] = f32::NAN;
        assert!(quantize_f32(&w, 1, 32, QuantBits::Int4, 32).is_err());
        let w = vec![1e9f32; 32];
        assert!(quantize_f32(&w, 1, 32, QuantBits::Int8, 32).is_err());
    }
}

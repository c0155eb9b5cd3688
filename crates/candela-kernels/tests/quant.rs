//! Integration tests of `candela_kernels::quant`: packing round trips, GGML repacking against
//! candle's own dequantization and `QMatMul`, and every kernel this CPU runs (plus the portable
//! one) against an f32 matmul of the dequantized weight.

use candela_kernels::quant::{
    Kernel, PackedWeight, QuantBits, QuantError, ScaleDType, AMX_ROWS_MIN,
};
use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn random_vec(rng: &mut StdRng, len: usize, scale: f32) -> Vec<f32> {
    (0..len)
        .map(|_| (rng.random::<f32>() * 2.0 - 1.0) * scale)
        .collect()
}

/// Weights with some structure: per-row offsets and an occasional outlier, like real layers.
fn random_weight(rng: &mut StdRng, n: usize, k: usize) -> Vec<f32> {
    let mut w = random_vec(rng, n * k, 0.05);
    for (i, v) in w.iter_mut().enumerate() {
        *v += ((i / k) % 7) as f32 * 0.01 - 0.03;
        if rng.random::<f32>() < 0.002 {
            *v *= 20.0;
        }
    }
    w
}

fn matmul_ref(x: &[f32], w: &[f32], m: usize, n: usize, k: usize) -> Vec<f32> {
    let mut y = vec![0f32; m * n];
    for r in 0..m {
        for j in 0..n {
            let mut acc = 0f64;
            for i in 0..k {
                acc += x[r * k + i] as f64 * w[j * k + i] as f64;
            }
            y[r * n + j] = acc as f32;
        }
    }
    y
}

/// Per output, the largest error that int8 activation quantization can cause
/// (`|x - sx xq| <= sx / 2` per element), plus room for float rounding.
fn error_bound(x: &[f32], w: &[f32], m: usize, n: usize, k: usize, gs: usize) -> Vec<f32> {
    let mut b = vec![0f32; m * n];
    for r in 0..m {
        for j in 0..n {
            let mut bound = 0f64;
            let mut mag = 0f64;
            for g in 0..k / gs {
                let xs = &x[r * k + g * gs..][..gs];
                let amax = xs.iter().fold(0f32, |a, v| a.max(v.abs())) as f64;
                for (i, &xv) in xs.iter().enumerate() {
                    let wv = w[j * k + g * gs + i].abs() as f64;
                    bound += wv * amax / 127.0 / 2.0;
                    mag += wv * xv.abs() as f64;
                }
            }
            b[r * n + j] = (bound * 1.001 + mag * 1e-5 + 1e-6) as f32;
        }
    }
    b
}

#[test]
fn quantize_f32_round_trip_within_half_a_step() {
    let mut rng = StdRng::seed_from_u64(1);
    for (bits, gs) in [
        (QuantBits::Int8, 32),
        (QuantBits::Int8, 128),
        (QuantBits::Int4, 32),
        (QuantBits::Int4, 64),
    ] {
        let (n, k) = (37, 256);
        let w = random_weight(&mut rng, n, k);
        let p = PackedWeight::quantize_f32(&w, n, k, bits, gs).unwrap();
        assert_eq!((p.n(), p.k(), p.bits(), p.group_size()), (n, k, bits, gs));
        let back = p.dequantize();
        assert_eq!(back.len(), n * k);
        for (row, (ws, bs)) in w.chunks(gs).zip(back.chunks(gs)).enumerate() {
            let lo = ws.iter().fold(f32::INFINITY, |a, &v| a.min(v));
            let hi = ws.iter().fold(f32::NEG_INFINITY, |a, &v| a.max(v));
            let amax = lo.abs().max(hi.abs());
            let step = match bits {
                QuantBits::Int8 => amax / 127.0,
                QuantBits::Int4 => (hi - lo) / 15.0,
            };
            // Half a step, plus the f16 rounding of the scale and min.
            let tol = step * 0.5 + amax * 2e-3 + 1e-7;
            for (a, b) in ws.iter().zip(bs) {
                assert!(
                    (a - b).abs() <= tol,
                    "{bits:?} g{gs} group {row}: {a} vs {b}"
                );
            }
        }
        // Dequantized values are representable: packing them again reproduces them.
        let again = PackedWeight::quantize_f32(&back, n, k, bits, gs).unwrap();
        let back2 = again.dequantize();
        let max_diff = back
            .iter()
            .zip(&back2)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        let scale = back.iter().fold(0f32, |a, v| a.max(v.abs()));
        assert!(
            max_diff <= scale * 4e-3,
            "{bits:?}: requantized drift {max_diff}"
        );
    }
}

#[test]
fn ggml_repacking_dequantizes_bit_exactly_like_candle() {
    let mut rng = StdRng::seed_from_u64(2);
    let dev = Device::Cpu;
    for dtype in [
        GgmlDType::Q4_0,
        GgmlDType::Q4_1,
        GgmlDType::Q5_0,
        GgmlDType::Q5_1,
        GgmlDType::Q8_0,
    ] {
        let (n, k) = (19, 96);
        let w = random_weight(&mut rng, n, k);
        let t = Tensor::from_vec(w, (n, k), &dev).unwrap();
        let qt = QTensor::quantize(&t, dtype).unwrap();
        let data = qt.data().unwrap();
        let p = PackedWeight::from_ggml(dtype, &data, n, k).unwrap();
        assert_eq!(p.source_ggml(), Some(dtype));
        let ours = p.dequantize();
        let theirs: Vec<f32> = qt
            .dequantize(&dev)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(ours.len(), theirs.len());
        for (i, (a, b)) in ours.iter().zip(&theirs).enumerate() {
            // Bit-exact, except that candle's `(q - 8) * d` gives -0.0 where our `q * d + m`
            // gives +0.0 (a negative d times a zero code); the two compare equal.
            assert!(
                a.to_bits() == b.to_bits() || (*a == 0.0 && *b == 0.0),
                "{dtype:?} element {i}: {a} vs {b}"
            );
        }
    }
}

#[test]
fn ggml_repacking_rejects_what_it_cannot_keep() {
    let dev = Device::Cpu;
    let t = Tensor::zeros((4, 256), candle_core::DType::F32, &dev).unwrap();
    let qt = QTensor::quantize(&t, GgmlDType::F16).unwrap();
    let err = PackedWeight::from_ggml(GgmlDType::F16, &qt.data().unwrap(), 4, 256).unwrap_err();
    assert!(matches!(err, QuantError::UnsupportedGgml { .. }));
    // Wrong byte count for the shape.
    let err = PackedWeight::from_ggml(GgmlDType::Q4_1, &[0u8; 39], 1, 64).unwrap_err();
    assert!(matches!(err, QuantError::Length { .. }));
    let err = PackedWeight::from_ggml(GgmlDType::Q4K, &[0u8; 143], 1, 256).unwrap_err();
    assert!(matches!(err, QuantError::Length { .. }));
    // k-quant rows are whole super-blocks of 256.
    let err = PackedWeight::from_ggml(GgmlDType::Q6K, &[0u8; 210], 2, 128).unwrap_err();
    assert!(matches!(
        err,
        QuantError::KNotMultipleOfGroup { k: 128, .. }
    ));
}

const KQUANTS: [GgmlDType; 5] = [
    GgmlDType::Q2K,
    GgmlDType::Q3K,
    GgmlDType::Q4K,
    GgmlDType::Q5K,
    GgmlDType::Q6K,
];

/// candle's dequantization of `qt` as row-major f32.
fn candle_dequantized(qt: &QTensor) -> Vec<f32> {
    qt.dequantize(&Device::Cpu)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

#[test]
fn kquant_repacking_dequantizes_bit_exactly_like_candle() {
    let mut rng = StdRng::seed_from_u64(8);
    let dev = Device::Cpu;
    for dtype in KQUANTS {
        for &(n, k) in &[(19, 256), (16, 512), (3, 1280)] {
            let w = random_weight(&mut rng, n, k);
            let t = Tensor::from_vec(w, (n, k), &dev).unwrap();
            let qt = QTensor::quantize(&t, dtype).unwrap();
            let p = PackedWeight::from_ggml(dtype, &qt.data().unwrap(), n, k).unwrap();
            assert_eq!(p.source_ggml(), Some(dtype));
            assert_eq!(p.scale_dtype(), ScaleDType::F32);
            let (bits, gs) = match dtype {
                GgmlDType::Q4K => (QuantBits::Int4, 32),
                GgmlDType::Q5K => (QuantBits::Int8, 32),
                GgmlDType::Q6K => (QuantBits::Int8, 16),
                _ => (QuantBits::Int4, 16),
            };
            assert_eq!((p.bits(), p.group_size()), (bits, gs), "{dtype:?}");
            let ours = p.dequantize();
            let theirs = candle_dequantized(&qt);
            assert_eq!(ours.len(), theirs.len());
            for (i, (a, b)) in ours.iter().zip(&theirs).enumerate() {
                // Bit-exact, up to the sign of zero (see the test of the 32-weight types).
                assert!(
                    a.to_bits() == b.to_bits() || (*a == 0.0 && *b == 0.0),
                    "{dtype:?} n{n} k{k} element {i}: {a} vs {b}"
                );
            }
        }
    }
}

/// Every k-quant through every kernel this CPU runs (the portable one included), at decode and
/// prefill row counts, against candle's dequantize-then-matmul: within the error that int8
/// activation quantization (per group of the weight's group size) can cause.
#[test]
fn kquant_matmul_matches_candle_dequantized_matmul() {
    let mut rng = StdRng::seed_from_u64(9);
    let dev = Device::Cpu;
    let kernels = Kernel::available();
    for dtype in KQUANTS {
        for &(n, k) in &[(40, 256), (17, 512), (64, 768)] {
            let w = random_weight(&mut rng, n, k);
            let qt = QTensor::quantize(&Tensor::from_vec(w, (n, k), &dev).unwrap(), dtype).unwrap();
            let p = PackedWeight::from_ggml(dtype, &qt.data().unwrap(), n, k).unwrap();
            let wd = candle_dequantized(&qt);
            let wt = Tensor::from_vec(wd.clone(), (n, k), &dev).unwrap();
            for m in [1, 7, 64] {
                let x = random_vec(&mut rng, m * k, 2.0);
                let xt = Tensor::from_vec(x.clone(), (m, k), &dev).unwrap();
                let want: Vec<f32> = xt
                    .matmul(&wt.t().unwrap())
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                let bound = error_bound(&x, &wd, m, n, k, p.group_size());
                for &kernel in &kernels {
                    let mut y = vec![f32::NAN; m * n];
                    p.matmul_f32_with(kernel, &x, m, &mut y).unwrap();
                    for i in 0..m * n {
                        // The bound, plus candle's f32 summation order.
                        let tol = bound[i] * 1.01 + 1e-5 * want[i].abs();
                        assert!(
                            (y[i] - want[i]).abs() <= tol,
                            "{kernel:?} {dtype:?} m{m} n{n} k{k} at {i}: {} vs candle {} (bound {tol})",
                            y[i],
                            want[i]
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn k_not_a_multiple_of_the_group_is_rejected() {
    let w = vec![0.1f32; 3 * 48];
    let err = PackedWeight::quantize_f32(&w, 3, 48, QuantBits::Int4, 32).unwrap_err();
    assert!(matches!(err, QuantError::KNotMultipleOfGroup { k: 48, .. }));
    let err = PackedWeight::quantize_f32(&w, 3, 48, QuantBits::Int8, 40).unwrap_err();
    assert!(matches!(err, QuantError::GroupSize { group_size: 40 }));
}

/// Every kernel against f32 math on random shapes, odd n and partial tiles included; the
/// SIMD kernels also against the portable one, which sees the same quantized activations.
#[test]
fn every_kernel_matches_dequantized_f32_matmul() {
    let kernels = Kernel::available();
    assert!(kernels.contains(&Kernel::Portable));
    let mut rng = StdRng::seed_from_u64(3);
    let shapes = [
        (1, 1, 32, 32),
        (1, 17, 96, 32),
        (2, 33, 64, 64),
        (3, 16, 128, 128),
        (4, 67, 160, 32),
        (5, 48, 576, 32),
        (7, 15, 256, 64),
        (9, 31, 192, 64),
        (1, 200, 576, 32),
        (13, 50, 384, 128),
    ];
    for &(m, n, k, gs) in &shapes {
        for bits in [QuantBits::Int8, QuantBits::Int4] {
            let w = random_weight(&mut rng, n, k);
            let x = random_vec(&mut rng, m * k, 2.0);
            let p = PackedWeight::quantize_f32(&w, n, k, bits, gs).unwrap();
            let wd = p.dequantize();
            let want = matmul_ref(&x, &wd, m, n, k);
            let bound = error_bound(&x, &wd, m, n, k, gs);
            let mut portable = vec![f32::NAN; m * n];
            p.matmul_f32_with(Kernel::Portable, &x, m, &mut portable)
                .unwrap();
            for &kernel in &kernels {
                let mut y = vec![f32::NAN; m * n];
                p.matmul_f32_with(kernel, &x, m, &mut y).unwrap();
                for i in 0..m * n {
                    let ctx = format!("{kernel:?} {bits:?} m{m} n{n} k{k} g{gs} at {i}");
                    assert!(
                        (y[i] - want[i]).abs() <= bound[i],
                        "{ctx}: {} vs f32 {} (bound {})",
                        y[i],
                        want[i],
                        bound[i]
                    );
                    let close = 1e-5 * bound[i] * 500.0 + 1e-6;
                    assert!(
                        (y[i] - portable[i]).abs() <= close,
                        "{ctx}: {} vs portable {}",
                        y[i],
                        portable[i]
                    );
                }
            }
        }
    }
}

/// A row's output does not depend on how many rows share the call (each kernel blocks rows
/// differently by count: 1, 4 + 1, 5, 4 + 4 + 1, ...): what lets the engine promise the same
/// tokens alone, amid traffic and under speculative verification.
#[test]
fn a_row_gives_the_same_bits_in_calls_of_any_row_count() {
    let mut rng = StdRng::seed_from_u64(5);
    let (n, k) = (70, 256);
    for bits in [QuantBits::Int8, QuantBits::Int4] {
        let w = random_weight(&mut rng, n, k);
        let p = PackedWeight::quantize_f32(&w, n, k, bits, 32).unwrap();
        let x = random_vec(&mut rng, 13 * k, 2.0);
        for kernel in Kernel::available() {
            let mut alone = vec![f32::NAN; 13 * n];
            for (row, out) in x.chunks_exact(k).zip(alone.chunks_exact_mut(n)) {
                p.matmul_f32_with(kernel, row, 1, out).unwrap();
            }
            for m in 2..=13 {
                let mut y = vec![f32::NAN; m * n];
                p.matmul_f32_with(kernel, &x[..m * k], m, &mut y).unwrap();
                for (i, (a, b)) in y.iter().zip(&alone).enumerate() {
                    assert_eq!(
                        a.to_bits(),
                        b.to_bits(),
                        "{kernel:?} {bits:?} m{m} row {} col {}",
                        i / n,
                        i % n
                    );
                }
            }
        }
    }
}

/// Large enough to take the parallel paths (16 rows: split by output tiles; 200 rows: split by
/// rows, into 2 or 3 chunks of uneven sizes) on 2- and 3-thread pools; every element must be
/// written, with the serial result's bits.
#[test]
fn parallel_split_matches_single_thread() {
    let mut rng = StdRng::seed_from_u64(4);
    let (n, k) = (300, 576);
    let w = random_weight(&mut rng, n, k);
    let p = PackedWeight::quantize_f32(&w, n, k, QuantBits::Int4, 32).unwrap();
    let pool = |threads| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap()
    };
    for m in [16, 200] {
        let x = random_vec(&mut rng, m * k, 1.0);
        let mut serial = vec![f32::NAN; m * n];
        pool(1)
            .install(|| p.matmul_f32(&x, m, &mut serial))
            .unwrap();
        assert!(serial.iter().all(|v| v.is_finite()));
        for threads in [2, 3] {
            let mut y = vec![f32::NAN; m * n];
            pool(threads)
                .install(|| p.matmul_f32(&x, m, &mut y))
                .unwrap();
            let same = serial
                .iter()
                .zip(&y)
                .all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(same, "{m} rows on {threads} threads differ from one thread");
        }
    }
}

/// Our int4 kernel on repacked Q4_1 bytes against candle's Q4_1 `QMatMul` (which quantizes
/// activations to Q8_1, i.e. also int8 per 32): both are within the activation-quantization
/// error of the exact product, so within twice that of each other.
#[test]
fn repacked_q4_1_matches_candle_qmatmul() {
    let mut rng = StdRng::seed_from_u64(5);
    let dev = Device::Cpu;
    for &(m, n, k) in &[(1, 576, 576), (4, 67, 1536), (16, 192, 576)] {
        let w = random_weight(&mut rng, n, k);
        let x = random_vec(&mut rng, m * k, 1.5);
        let wt = Tensor::from_vec(w, (n, k), &dev).unwrap();
        let qt = QTensor::quantize(&wt, GgmlDType::Q4_1).unwrap();
        let p = PackedWeight::from_ggml(GgmlDType::Q4_1, &qt.data().unwrap(), n, k).unwrap();
        let xt = Tensor::from_vec(x.clone(), (m, k), &dev).unwrap();
        let theirs: Vec<f32> = QMatMul::from_qtensor(qt)
            .unwrap()
            .forward(&xt)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let ours: Vec<f32> = p
            .matmul(&xt)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let wd = p.dequantize();
        let bound = error_bound(&x, &wd, m, n, k, 32);
        for i in 0..m * n {
            assert!(
                (ours[i] - theirs[i]).abs() <= 2.0 * bound[i],
                "m{m} n{n} k{k} at {i}: ours {} candle {} (bound {})",
                ours[i],
                theirs[i],
                bound[i]
            );
        }
    }
}

/// The symmetric types (Q4_0, Q5_0, Q8_0) are packed without a min row, their mins computed
/// as `-z d`; stacked beside a type with real mins (Q4_1, Q5_1) the same weights get a stored
/// min row. Every kernel must give the same bits from both, at row counts that take each
/// kernel's row blocks, and the symmetric packing must be as small as the GGUF blocks.
#[test]
fn symmetric_packing_gives_the_bits_of_stored_mins() {
    let mut rng = StdRng::seed_from_u64(8);
    let dev = Device::Cpu;
    // k = 96: three groups, an odd count of 32-byte-aligned blocks (the tile ends mid-line).
    let (n, k) = (19, 96);
    let quantized = |rng: &mut StdRng, dtype| {
        let w = random_weight(rng, n, k);
        let qt = QTensor::quantize(&Tensor::from_vec(w, (n, k), &dev).unwrap(), dtype).unwrap();
        PackedWeight::from_ggml(dtype, &qt.data().unwrap(), n, k).unwrap()
    };
    for (symmetric, with_mins, bytes_per_32) in [
        (GgmlDType::Q4_0, GgmlDType::Q4_1, 18),
        (GgmlDType::Q5_0, GgmlDType::Q5_1, 34),
        (GgmlDType::Q8_0, GgmlDType::Q5_1, 34),
    ] {
        let sym = quantized(&mut rng, symmetric);
        let other = quantized(&mut rng, with_mins);
        let stacked = PackedWeight::concat_rows(&[&sym, &other]).unwrap();
        let packed = (n.div_ceil(16) * 16 * k / 32 * bytes_per_32).next_multiple_of(64);
        assert_eq!(sym.storage_bytes(), packed, "{symmetric:?}");
        // Stacked, every block carries 16 f16 mins: 2 more bytes per 32 weights.
        let with_mins = (2 * n).div_ceil(16) * 16 * k / 32 * (bytes_per_32 + 2);
        assert_eq!(stacked.storage_bytes(), with_mins, "{symmetric:?} stacked");
        assert_eq!(stacked.dequantize()[..n * k], sym.dequantize()[..]);
        for m in [1, 2, 4, 5, 9] {
            let x = random_vec(&mut rng, m * k, 2.0);
            for kernel in Kernel::available() {
                let mut y = vec![f32::NAN; m * n];
                sym.matmul_f32_with(kernel, &x, m, &mut y).unwrap();
                let mut ys = vec![f32::NAN; m * stacked.n()];
                stacked.matmul_f32_with(kernel, &x, m, &mut ys).unwrap();
                for r in 0..m {
                    for c in 0..n {
                        let (a, b) = (y[r * n + c], ys[r * stacked.n() + c]);
                        assert_eq!(
                            a.to_bits(),
                            b.to_bits(),
                            "{symmetric:?} {kernel:?} m{m} row {r} col {c}: {a} vs {b}"
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn tensor_wrapper_flattens_leading_dims_and_checks_input() {
    let mut rng = StdRng::seed_from_u64(6);
    let dev = Device::Cpu;
    let (n, k) = (21, 64);
    let w = random_weight(&mut rng, n, k);
    let p = PackedWeight::quantize_f32(&w, n, k, QuantBits::Int8, 32).unwrap();
    let x = random_vec(&mut rng, 6 * k, 1.0);
    let mut flat = vec![0f32; 6 * n];
    p.matmul_f32(&x, 6, &mut flat).unwrap();

    let x3 = Tensor::from_vec(x.clone(), (2, 3, k), &dev).unwrap();
    let y3 = p.matmul(&x3).unwrap();
    assert_eq!(y3.dims(), &[2, 3, n]);
    assert_eq!(y3.flatten_all().unwrap().to_vec1::<f32>().unwrap(), flat);

    let x1 = Tensor::from_vec(x[..k].to_vec(), k, &dev).unwrap();
    let y1 = p.matmul(&x1).unwrap();
    assert_eq!(y1.dims(), &[n]);
    assert_eq!(y1.to_vec1::<f32>().unwrap(), flat[..n].to_vec());

    // A transposed (non-contiguous) view is made contiguous first.
    let xt = Tensor::from_vec(x.clone(), (k, 6), &dev)
        .unwrap()
        .t()
        .unwrap();
    let want = matmul_ref(
        &xt.contiguous()
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap(),
        &p.dequantize(),
        6,
        n,
        k,
    );
    let got = p
        .matmul(&xt)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let scale = want.iter().fold(0f32, |a, v| a.max(v.abs()));
    for (a, b) in got.iter().zip(&want) {
        assert!((a - b).abs() <= scale * 0.02, "{a} vs {b}");
    }

    let bad = Tensor::zeros((2, k + 1), candle_core::DType::F32, &dev).unwrap();
    assert!(p.matmul(&bad).is_err());
    let f16 = Tensor::zeros((2, k), candle_core::DType::F16, &dev).unwrap();
    assert!(p.matmul(&f16).is_err());
}

#[test]
fn slice_api_checks_lengths() {
    let p = PackedWeight::quantize_f32(&[0.5f32; 2 * 32], 2, 32, QuantBits::Int4, 32).unwrap();
    let mut y = vec![0f32; 2];
    let err = p.matmul_f32(&[0f32; 31], 1, &mut y).unwrap_err();
    assert!(matches!(err, QuantError::Length { .. }));
    let err = p.matmul_f32(&[0f32; 32], 1, &mut y[..1]).unwrap_err();
    assert!(matches!(err, QuantError::Length { .. }));
    // m = 0 is an empty product, not an error.
    p.matmul_f32(&[], 0, &mut []).unwrap();
}

/// Whether the AMX kernel runs here; if not, says why the calling test is skipped.
fn amx_or_skip(test: &str) -> bool {
    let ok = Kernel::Amx.is_available();
    if !ok {
        eprintln!(
            "{test}: skipped, no AMX int8 here (CPU, OS tile state or permission missing, or no \
             AVX-512 VNNI)"
        );
    }
    ok
}

/// `p` through the AMX tiles and through AVX-512 VNNI: identical integer sums and the same
/// fold, so identical bits; both within float-rounding distance of the portable kernel.
fn check_amx(p: &PackedWeight, x: &[f32], m: usize, ctx: &str) {
    let n = p.n();
    let run = |kernel| {
        let mut y = vec![f32::NAN; m * n];
        p.matmul_f32_with(kernel, x, m, &mut y).unwrap();
        y
    };
    let amx = run(Kernel::Amx);
    let avx512 = run(Kernel::Avx512Vnni);
    let portable = run(Kernel::Portable);
    let bound = error_bound(x, &p.dequantize(), m, n, p.k(), p.group_size());
    for i in 0..m * n {
        assert_eq!(
            amx[i].to_bits(),
            avx512[i].to_bits(),
            "{ctx} at {i}: amx {} vs avx512vnni {}",
            amx[i],
            avx512[i]
        );
        // As in `every_kernel_matches_dequantized_f32_matmul`: the portable kernel adds the
        // fold's products without FMA, so it rounds differently.
        let close = 1e-5 * bound[i] * 500.0 + 1e-6;
        assert!(
            (amx[i] - portable[i]).abs() <= close,
            "{ctx} at {i}: amx {} vs portable {}",
            amx[i],
            portable[i]
        );
    }
}

const AMX_ROWS: [usize; 6] = [1, 3, 16, 17, 33, 64];

/// The tile path at every row count (partial and several 16-row blocks), n with and without a
/// partial tile, one and several groups, groups of 16, 32, 64 and 128 (one to several
/// `tdpbsud` per group, so the tile configuration changes between shapes), int8 and int4, on
/// a two-thread pool: the tile configuration must be loaded on each worker.
#[test]
fn amx_matches_avx512_bit_for_bit_f16_scales() {
    if !amx_or_skip("amx_matches_avx512_bit_for_bit_f16_scales") {
        return;
    }
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .build()
        .unwrap();
    let mut rng = StdRng::seed_from_u64(10);
    let shapes = [
        (16, 32, 32),
        (40, 96, 32),
        (200, 576, 32),
        (33, 64, 16),
        (64, 256, 16),
        (17, 128, 64),
        (48, 512, 128),
    ];
    pool.install(|| {
        for &(n, k, gs) in &shapes {
            for bits in [QuantBits::Int8, QuantBits::Int4] {
                let w = random_weight(&mut rng, n, k);
                let p = PackedWeight::quantize_f32(&w, n, k, bits, gs).unwrap();
                for m in AMX_ROWS {
                    let x = random_vec(&mut rng, m * k, 2.0);
                    check_amx(&p, &x, m, &format!("{bits:?} m{m} n{n} k{k} g{gs}"));
                }
            }
        }
    });
}

/// As above with f32 scales (GGUF k-quants): int4 in groups of 32 (Q4_K) and 16 (Q3_K), int8
/// in groups of 32 (Q5_K) and 16 (Q6_K).
#[test]
fn amx_matches_avx512_bit_for_bit_f32_scales() {
    if !amx_or_skip("amx_matches_avx512_bit_for_bit_f32_scales") {
        return;
    }
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .build()
        .unwrap();
    let mut rng = StdRng::seed_from_u64(11);
    let dev = Device::Cpu;
    pool.install(|| {
        for dtype in [
            GgmlDType::Q4K,
            GgmlDType::Q3K,
            GgmlDType::Q5K,
            GgmlDType::Q6K,
        ] {
            for &(n, k) in &[(17, 256), (64, 512)] {
                let w = random_weight(&mut rng, n, k);
                let t = Tensor::from_vec(w, (n, k), &dev).unwrap();
                let qt = QTensor::quantize(&t, dtype).unwrap();
                let p = PackedWeight::from_ggml(dtype, &qt.data().unwrap(), n, k).unwrap();
                assert_eq!(p.scale_dtype(), ScaleDType::F32);
                for m in AMX_ROWS {
                    let x = random_vec(&mut rng, m * k, 2.0);
                    check_amx(&p, &x, m, &format!("{dtype:?} m{m} n{n} k{k}"));
                }
            }
        }
    });
}

/// A thread that never ran the kernel (its tile configuration not loaded yet) gets the same
/// bits as this one.
#[test]
fn amx_on_a_fresh_thread() {
    if !amx_or_skip("amx_on_a_fresh_thread") {
        return;
    }
    let mut rng = StdRng::seed_from_u64(12);
    let (m, n, k) = (20, 48, 192);
    let w = random_weight(&mut rng, n, k);
    let x = random_vec(&mut rng, m * k, 1.0);
    let p = PackedWeight::quantize_f32(&w, n, k, QuantBits::Int4, 32).unwrap();
    let mut here = vec![0f32; m * n];
    p.matmul_f32_with(Kernel::Amx, &x, m, &mut here).unwrap();
    let there = std::thread::scope(|s| {
        s.spawn(|| {
            let mut y = vec![0f32; m * n];
            p.matmul_f32_with(Kernel::Amx, &x, m, &mut y).unwrap();
            y
        })
        .join()
        .unwrap()
    });
    assert_eq!(here, there);
}

/// The automatic choice takes AVX-512 VNNI below `AMX_ROWS_MIN` rows and AMX from it; both give
/// the same bits, so whichever runs must equal the AMX result.
#[test]
fn automatic_choice_around_the_amx_threshold_agrees() {
    if !amx_or_skip("automatic_choice_around_the_amx_threshold_agrees") {
        return;
    }
    let mut rng = StdRng::seed_from_u64(13);
    let (n, k) = (64, 576);
    let w = random_weight(&mut rng, n, k);
    let p = PackedWeight::quantize_f32(&w, n, k, QuantBits::Int4, 32).unwrap();
    for m in [AMX_ROWS_MIN - 1, AMX_ROWS_MIN] {
        let x = random_vec(&mut rng, m * k, 1.0);
        let mut auto = vec![0f32; m * n];
        let mut amx = vec![0f32; m * n];
        p.matmul_f32(&x, m, &mut auto).unwrap();
        p.matmul_f32_with(Kernel::Amx, &x, m, &mut amx).unwrap();
        assert_eq!(auto, amx, "m{m}");
    }
}

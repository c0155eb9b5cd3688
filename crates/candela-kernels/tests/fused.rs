//! `rope_qkv` and `silu_mul` on the CPU against the candle_nn compositions they replace (as
//! the model runs them: q/k/v narrowed out of the fused projection, `rope_i`/`rope` per head
//! group, `silu(gate) * up`), on random shapes, dtypes and strided inputs; and the errors bad
//! arguments must give.
//!
//! Tolerances. In f32 both sides run the same f32 operations in the same order (products
//! rounded, then the sum), so f32 rope results must be bit for bit equal; silu_mul within 1e-6
//! relative (on an AVX2 CPU its `exp` is a polynomial within 3e-7 of libm's `expf`). In
//! f16/bf16 candle rounds to the dtype after every operation while the fused ops round once,
//! from f32. With `eps` the dtype's machine epsilon and `u = eps / 2` its unit roundoff:
//! - rope: candle's `rnd(rnd(x0 c) - rnd(x1 s))` is within `u (|x0 c| + |x1 s|) + u |y|` of the
//!   exact value and ours within `u |y|`, with `|y| <= |x0| + |x1|` (`|c|, |s| <= 1`): the two
//!   differ by at most `1.5 eps (|x0| + |x1|)`; we allow `2 eps (|x0| + |x1|)`.
//! - silu_mul: candle's `rnd(rnd(g / rnd(1 + rnd(exp(-g)))) * up)` is within `4 u` relative
//!   of the exact value (to first order: `2 u` from the denominator, `u` each from the
//!   quotient and the product), ours within `u`: they differ by at most `5 u = 2.5 eps`
//!   relative (2.46 eps seen in f16); we allow `3 eps`, plus a floor of a few f16 subnormals
//!   for results below f16's normal range.
//!
//! - gelu_tanh_mul: computed as `g / (1 + exp(-2 u))` (equal to `0.5 g (1 + tanh(u))`), while
//!   candle's GELU forms `1 + tanh(u)`, which cancels where `g` is very negative (tanh near
//!   -1): its absolute error there is about `0.5 |g| eps32 |up|`, so f32 allows 1e-5 relative
//!   plus 1e-6 absolute (|g|, |up| <= ~10). In f16/bf16 candle's GELU rounds every step to the
//!   dtype (percent errors where `1 + tanh` cancels), so the reference is candle's f32 GELU of
//!   the same inputs, and ours is within its one rounding (`eps` relative) of it.
//!
//! v heads are a copy in either case: equal bit for bit.

#[path = "support/mod.rs"]
mod support;

use candela_kernels::{gelu_tanh_mul, rope_qkv, silu_mul, RopeStyle};
use candle_core::{DType, Device, Tensor, D};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use support::{assert_close, eps, to_f32_vec, RopeCase};

/// `randn * scale` of `shape`, in `dtype`, on the CPU.
fn randn(rng: &mut StdRng, shape: &[usize], scale: f32, dtype: DType) -> Tensor {
    let n = shape.iter().product();
    let data: Vec<f32> = (0..n)
        .map(|_| {
            // Box-Muller: rand 0.9 has no normal distribution without rand_distr.
            let (a, b): (f32, f32) = (rng.random_range(1e-7..1.0), rng.random());
            scale * (-2.0 * a.ln()).sqrt() * (std::f32::consts::TAU * b).cos()
        })
        .collect();
    Tensor::from_vec(data, shape, &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
}

/// `[rows, cols]` in `dtype`, as a narrow of a wider tensor (row stride > cols, non-zero
/// offset) when `strided`.
fn maybe_strided(
    rng: &mut StdRng,
    rows: usize,
    cols: usize,
    strided: bool,
    dtype: DType,
) -> Tensor {
    if !strided {
        return randn(rng, &[rows, cols], 1.0, dtype);
    }
    let (before, after) = (rng.random_range(1..9), rng.random_range(0..9));
    let wide = randn(rng, &[rows, before + cols + after], 1.0, dtype);
    let t = wide.narrow(1, before, cols).unwrap();
    assert!(rows < 2 || !t.is_contiguous());
    t
}

/// Per-token `(cos, sin)` tables `[T, head_dim / 2]` of RoPE angles at random positions.
fn rope_tables(rng: &mut StdRng, t: usize, head_dim: usize, dtype: DType) -> (Tensor, Tensor) {
    let half = head_dim / 2;
    let (mut cos, mut sin) = (Vec::new(), Vec::new());
    for _ in 0..t {
        let pos = rng.random_range(0..4096) as f32;
        for i in 0..half {
            let angle = pos * 10_000f32.powf(-2.0 * i as f32 / head_dim as f32);
            cos.push(angle.cos());
            sin.push(angle.sin());
        }
    }
    let table = |v: Vec<f32>| {
        Tensor::from_vec(v, (t, half), &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap()
    };
    (table(cos), table(sin))
}

/// The model's unfused path: narrow q/k/v out of `qkv`, rope q and k per head group the way
/// `Llama::rope` does (each token its own batch entry of length 1), then lay all heads out.
fn candle_rope_qkv(
    qkv: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    (h, kvh, d): (usize, usize, usize),
    style: RopeStyle,
) -> Tensor {
    let t = qkv.dim(0).unwrap();
    let cos = cos.reshape((t, 1, d / 2)).unwrap();
    let sin = sin.reshape((t, 1, d / 2)).unwrap();
    let rope = |start: usize, heads: usize| {
        let x = qkv
            .narrow(1, start * d, heads * d)
            .unwrap()
            .reshape((t, heads, 1, d))
            .unwrap();
        let y = match style {
            RopeStyle::Interleaved => candle_nn::rotary_emb::rope_i(&x, &cos, &sin),
            RopeStyle::Half => candle_nn::rotary_emb::rope(&x, &cos, &sin),
        };
        y.unwrap().reshape((t, heads, d)).unwrap()
    };
    let v = qkv
        .narrow(1, (h + kvh) * d, kvh * d)
        .unwrap()
        .reshape((t, kvh, d))
        .unwrap();
    Tensor::cat(&[rope(0, h), rope(h, kvh), v], 1).unwrap()
}

/// Runs one case through `rope_qkv` and the candle_nn composition and checks them against
/// each other within the module doc's bound. Returns the largest difference, in units of the
/// bound's `eps (|x0| + |x1|)`.
fn check_rope_case(rng: &mut StdRng, c: RopeCase) -> f32 {
    let (h, kvh, d, t) = (c.num_heads, c.num_kv_heads, c.head_dim, c.num_tokens);
    let heads = h + 2 * kvh;
    let qkv = maybe_strided(rng, t, heads * d, c.strided, c.dtype);
    let (cos, sin) = rope_tables(rng, t, d, c.dtype);
    let ours = rope_qkv(&qkv, &cos, &sin, h, kvh, d, c.style).unwrap();
    assert_eq!(ours.dims(), [t, heads, d], "{c:?}");
    assert_eq!(ours.dtype(), c.dtype, "{c:?}");
    assert!(ours.is_contiguous(), "{c:?}");
    if t == 0 {
        return 0.0;
    }
    let want = candle_rope_qkv(&qkv, &cos, &sin, (h, kvh, d), c.style);
    let (ours, want, x) = (to_f32_vec(&ours), to_f32_vec(&want), to_f32_vec(&qkv));
    let half = d / 2;
    let mut worst = 0f32;
    for (e, (&o, &w)) in ours.iter().zip(&want).enumerate() {
        let (head, i) = ((e / d) % heads, e % d);
        if head >= h + kvh || c.dtype == DType::F32 {
            // v is copied; f32 rope runs candle's exact operations.
            assert!(o.to_bits() == w.to_bits(), "{c:?}: element {e}: {o} != {w}");
            continue;
        }
        let partner = match c.style {
            RopeStyle::Interleaved => i ^ 1,
            RopeStyle::Half => (i + half) % d,
        };
        let row = e - i;
        let scale = eps(c.dtype) * (x[row + i].abs() + x[row + partner].abs());
        let diff = (o - w).abs();
        // 1e-7: the gap between f16 subnormals is 6e-8.
        assert!(
            diff <= 2.0 * scale + 1e-7,
            "{c:?}: element {e}: {o} vs candle {w}, bound {}",
            2.0 * scale
        );
        if scale > 0.0 {
            worst = worst.max(diff / scale);
        }
    }
    worst
}

#[test]
fn rope_qkv_matches_candle_nn_on_random_shapes() {
    let mut rng = StdRng::seed_from_u64(0x0f05_ed01);
    let mut worst = [0f32; 3];
    for case in 0..120 {
        let dtype = [DType::F32, DType::F16, DType::BF16][case % 3];
        let style = [RopeStyle::Interleaved, RopeStyle::Half][(case / 3) % 2];
        let num_kv_heads = rng.random_range(1..=4);
        let c = RopeCase {
            dtype,
            style,
            num_tokens: [0, 1, 1, 2, 3, 5, 7, 17, 33][rng.random_range(0..9)],
            num_heads: num_kv_heads * [1, 2, 3, 4, 8][rng.random_range(0..5)],
            num_kv_heads,
            head_dim: [2, 6, 64, 80, 128][rng.random_range(0..5)],
            strided: rng.random_bool(0.5),
        };
        let w = check_rope_case(&mut rng, c);
        worst[case % 3] = worst[case % 3].max(w);
    }
    eprintln!(
        "worst |diff| / (eps (|x0| + |x1|)): f32 0 (exact), f16 {}, bf16 {}",
        worst[1], worst[2]
    );
}

#[test]
fn rope_qkv_edge_shapes() {
    let mut rng = StdRng::seed_from_u64(3);
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        for style in [RopeStyle::Interleaved, RopeStyle::Half] {
            // head_dim 2 (one pair), a single token, no GQA; and a long strided batch.
            for (t, h, kvh, d, strided) in [
                (1, 1, 1, 2, false),
                (1, 1, 1, 2, true),
                (0, 2, 1, 64, true),
                (1, 32, 8, 128, true),
                (64, 4, 2, 80, true),
            ] {
                check_rope_case(
                    &mut rng,
                    RopeCase {
                        dtype,
                        style,
                        num_tokens: t,
                        num_heads: h,
                        num_kv_heads: kvh,
                        head_dim: d,
                        strided,
                    },
                );
            }
        }
    }
}

#[test]
fn rope_qkv_on_a_narrow_with_row_offset() {
    // A narrow along the tokens too: the first row starts at a non-zero offset.
    let mut rng = StdRng::seed_from_u64(11);
    let (h, kvh, d) = (2, 1, 8);
    let wide = randn(&mut rng, &[9, (h + 2 * kvh) * d + 5], 1.0, DType::F32);
    let qkv = wide
        .narrow(0, 2, 6)
        .unwrap()
        .narrow(1, 3, (h + 2 * kvh) * d)
        .unwrap();
    let (cos, sin) = rope_tables(&mut rng, 6, d, DType::F32);
    for style in [RopeStyle::Interleaved, RopeStyle::Half] {
        let ours = rope_qkv(&qkv, &cos, &sin, h, kvh, d, style).unwrap();
        let want = candle_rope_qkv(&qkv, &cos, &sin, (h, kvh, d), style);
        assert_eq!(to_f32_vec(&ours), to_f32_vec(&want));
    }
}

fn err_text(r: candle_core::Result<Tensor>) -> String {
    match r {
        Ok(t) => panic!("expected an error, got a tensor of shape {:?}", t.dims()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn rope_qkv_rejects_bad_arguments() {
    let dev = Device::Cpu;
    let (t, h, kvh, d) = (3, 4, 2, 8);
    let qkv = Tensor::zeros((t, (h + 2 * kvh) * d), DType::F32, &dev).unwrap();
    let cs = Tensor::zeros((t, d / 2), DType::F32, &dev).unwrap();
    let style = RopeStyle::Half;
    assert!(rope_qkv(&qkv, &cs, &cs, h, kvh, d, style).is_ok());

    // Odd head_dim (width still consistent: 8 heads of 7).
    let qkv7 = Tensor::zeros((t, (h + 2 * kvh) * 7), DType::F32, &dev).unwrap();
    let cs3 = Tensor::zeros((t, 3), DType::F32, &dev).unwrap();
    let msg = err_text(rope_qkv(&qkv7, &cs3, &cs3, h, kvh, 7, style));
    assert!(msg.contains("`head_dim` must be even"), "{msg}");
    // Width not (h + 2 kvh) * d.
    let msg = err_text(rope_qkv(&qkv, &cs, &cs, h, kvh + 1, d, style));
    assert!(msg.contains("`qkv` must have shape [T, 80]"), "{msg}");
    // Rank.
    let qkv3 = qkv.reshape((t, h + 2 * kvh, d)).unwrap();
    let msg = err_text(rope_qkv(&qkv3, &cs, &cs, h, kvh, d, style));
    assert!(msg.contains("`qkv` must have rank 2"), "{msg}");
    // cos/sin dtype differs from qkv's.
    let cs16 = cs.to_dtype(DType::F16).unwrap();
    let msg = err_text(rope_qkv(&qkv, &cs16, &cs, h, kvh, d, style));
    assert!(msg.contains("`cos` must have dtype F32, got F16"), "{msg}");
    let msg = err_text(rope_qkv(&qkv, &cs, &cs16, h, kvh, d, style));
    assert!(msg.contains("`sin` must have dtype F32, got F16"), "{msg}");
    // qkv dtype not a float the op runs in.
    let qkv64 = qkv.to_dtype(DType::F64).unwrap();
    let msg = err_text(rope_qkv(&qkv64, &cs, &cs, h, kvh, d, style));
    assert!(
        msg.contains("`qkv` must have dtype F32, F16 or BF16, got F64"),
        "{msg}"
    );
    // cos/sin rows must be the tokens, columns head_dim / 2.
    let short = Tensor::zeros((t - 1, d / 2), DType::F32, &dev).unwrap();
    let msg = err_text(rope_qkv(&qkv, &short, &cs, h, kvh, d, style));
    assert!(msg.contains("`cos` must have shape [3, 4]"), "{msg}");
    let wide = Tensor::zeros((t, d), DType::F32, &dev).unwrap();
    let msg = err_text(rope_qkv(&qkv, &cs, &wide, h, kvh, d, style));
    assert!(msg.contains("`sin` must have shape [3, 4]"), "{msg}");
    // Non-contiguous tables, a qkv whose last dimension is strided, zero heads.
    let cs_t = Tensor::zeros((d / 2, t), DType::F32, &dev)
        .unwrap()
        .t()
        .unwrap();
    let msg = err_text(rope_qkv(&qkv, &cs_t, &cs, h, kvh, d, style));
    assert!(msg.contains("`cos` must be contiguous"), "{msg}");
    let qkv_t = Tensor::zeros(((h + 2 * kvh) * d, t), DType::F32, &dev)
        .unwrap()
        .t()
        .unwrap();
    let msg = err_text(rope_qkv(&qkv_t, &cs, &cs, h, kvh, d, style));
    assert!(
        msg.contains("`qkv` must be contiguous in its last dimension"),
        "{msg}"
    );
    let msg = err_text(rope_qkv(&qkv, &cs, &cs, 0, kvh, d, style));
    assert!(msg.contains("`num_heads` must be > 0"), "{msg}");
    let msg = err_text(rope_qkv(&qkv, &cs, &cs, h, 0, d, style));
    assert!(msg.contains("`num_kv_heads` must be > 0"), "{msg}");
}

#[derive(Debug, Clone, Copy)]
struct SiluCase {
    dtype: DType,
    num_tokens: usize,
    width: usize,
    strided: bool,
}

/// Checks `silu_mul` against `silu(gate) * up` within the module doc's bound; returns the
/// largest relative difference seen.
fn check_silu_case(rng: &mut StdRng, c: SiluCase, scale: f32) -> f32 {
    check_glu_case(rng, c, scale, Glu::Silu)
}

/// The gated activations under test, and candle's composition each replaces.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Glu {
    Silu,
    GeluTanh,
}

fn check_glu_case(rng: &mut StdRng, c: SiluCase, scale: f32, act: Glu) -> f32 {
    let (t, w) = (c.num_tokens, c.width);
    let gate_up = if c.strided {
        let before = rng.random_range(1..9);
        randn(rng, &[t, before + 2 * w + 3], scale, c.dtype)
            .narrow(1, before, 2 * w)
            .unwrap()
    } else {
        randn(rng, &[t, 2 * w], scale, c.dtype)
    };
    let ours = match act {
        Glu::Silu => silu_mul(&gate_up, w),
        Glu::GeluTanh => gelu_tanh_mul(&gate_up, w),
    }
    .unwrap();
    assert_eq!(ours.dims(), [t, w], "{c:?}");
    assert_eq!(ours.dtype(), c.dtype, "{c:?}");
    assert!(ours.is_contiguous(), "{c:?}");
    if t == 0 {
        return 0.0;
    }
    let gate = gate_up.narrow(D::Minus1, 0, w).unwrap();
    let up = gate_up.narrow(D::Minus1, w, w).unwrap();
    let want = match act {
        Glu::Silu => (candle_nn::ops::silu(&gate).unwrap() * up).unwrap(),
        // candle's f16 GELU rounds every step of `1 + tanh(u)` to f16 (percent errors where it
        // cancels): the reference is its f32 GELU of the same inputs, which ours must equal up
        // to the one rounding to the dtype.
        Glu::GeluTanh => {
            let f32 = |x: &Tensor| x.to_dtype(DType::F32).unwrap();
            (f32(&gate).gelu().unwrap() * f32(&up)).unwrap()
        }
    };
    let (rel, floor): (f32, f32) = match c.dtype {
        DType::F32 if act == Glu::Silu => (1e-6, 1e-30),
        DType::F32 => (1e-5, 1e-6),
        _ if act == Glu::GeluTanh => (eps(c.dtype), 2e-7),
        // Results below the f16 normal range (6.1e-5) lose relative precision.
        DType::F16 => (3.0 * eps(c.dtype), 2e-7),
        _ => (3.0 * eps(c.dtype), 1e-30),
    };
    let floor = if act == Glu::GeluTanh {
        floor.max(1e-6)
    } else {
        floor
    };
    assert_close(&to_f32_vec(&ours), &to_f32_vec(&want), rel, floor, |e| {
        format!("{c:?}: element {e}, ours vs candle")
    })
}

#[test]
fn silu_mul_matches_candle_nn_on_random_shapes() {
    let mut rng = StdRng::seed_from_u64(0x5111_0000);
    let mut worst = [0f32; 3];
    for case in 0..90 {
        let dtype = [DType::F32, DType::F16, DType::BF16][case % 3];
        let c = SiluCase {
            dtype,
            num_tokens: [0, 1, 2, 3, 7, 17, 33][rng.random_range(0..7)],
            width: [1, 3, 64, 100, 1023, 1025, 2816][rng.random_range(0..7)],
            strided: rng.random_bool(0.5),
        };
        // Scale 2 reaches |gate| ~ 8, deep into both tails of silu, and stays clear of
        // exp(-gate) overflowing f16 in candle's path (gate < -11).
        let w = check_silu_case(&mut rng, c, 2.0);
        worst[case % 3] = worst[case % 3].max(w);
    }
    eprintln!(
        "worst relative diff: f32 {}, f16 {}, bf16 {}",
        worst[0], worst[1], worst[2]
    );
}

#[test]
fn gelu_tanh_mul_matches_candle_nn_on_random_shapes() {
    let mut rng = StdRng::seed_from_u64(0x6e10_0000);
    for case in 0..60 {
        let c = SiluCase {
            dtype: [DType::F32, DType::F16, DType::BF16][case % 3],
            num_tokens: [0, 1, 2, 7, 17][rng.random_range(0..5)],
            width: [1, 3, 64, 1023, 2048][rng.random_range(0..5)],
            strided: rng.random_bool(0.5),
        };
        check_glu_case(&mut rng, c, 2.0, Glu::GeluTanh);
    }
}

#[test]
fn silu_mul_f32_extremes_match_candle() {
    // Large |gate| (exp over- and underflow), zero and signed zero: within 1e-6 relative, or
    // 1e-30 absolute where silu underflows (exp(-gate) is clamped to f32's range: -1.8e-36
    // instead of candle's -0 at gate -200).
    let gate = [
        -200.0f32, -90.0, -20.0, -1e-30, -0.0, 0.0, 1e-30, 0.5, 20.0, 90.0, 200.0,
    ];
    let up = [1.5f32, -2.0, 3.0, 1.0, 1.0, 1.0, -1.0, 2.0, 0.25, -1.0, 1.0];
    let w = gate.len();
    let gate_up = Tensor::from_iter(gate.iter().chain(&up).copied(), &Device::Cpu)
        .unwrap()
        .reshape((1, 2 * w))
        .unwrap();
    let ours = to_f32_vec(&silu_mul(&gate_up, w).unwrap());
    let g = gate_up.narrow(1, 0, w).unwrap();
    let u = gate_up.narrow(1, w, w).unwrap();
    let want = to_f32_vec(&(candle_nn::ops::silu(&g).unwrap() * u).unwrap());
    assert_close(&ours, &want, 1e-6, 1e-30, |e| {
        format!("gate {}, up {}: ours vs candle", gate[e], up[e])
    });
}

#[test]
fn silu_mul_rejects_bad_arguments() {
    let dev = Device::Cpu;
    let x = Tensor::zeros((3, 10), DType::F32, &dev).unwrap();
    assert!(silu_mul(&x, 5).is_ok());
    let msg = err_text(silu_mul(&x, 4));
    assert!(
        msg.contains("`gate_up` must have shape [T, 2 * width] with width = 4"),
        "{msg}"
    );
    let msg = err_text(silu_mul(&x, 0));
    assert!(msg.contains("`width` must be > 0"), "{msg}");
    let msg = err_text(silu_mul(&x.flatten_all().unwrap(), 15));
    assert!(msg.contains("`gate_up` must have rank 2"), "{msg}");
    let msg = err_text(silu_mul(&x.to_dtype(DType::F64).unwrap(), 5));
    assert!(
        msg.contains("`gate_up` must have dtype F32, F16 or BF16, got F64"),
        "{msg}"
    );
    let xt = Tensor::zeros((10, 3), DType::F32, &dev)
        .unwrap()
        .t()
        .unwrap();
    let msg = err_text(silu_mul(&xt, 5));
    assert!(
        msg.contains("`gate_up` must be contiguous in its last dimension"),
        "{msg}"
    );
}

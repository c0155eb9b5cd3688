//! The model's shape and hyper-parameters, read from GGUF metadata or `config.json`.
//!
//! The engine sizes the paged KV cache from it (`num_layers`, `num_kv_heads`,
//! `head_dim`), bounds requests by `max_position`, and stops on `eos_token_ids`.
//! The families we serve (see [`crate::families`]) share one decoder and differ only in small,
//! named switches kept here: q/k/v bias, fused q/k/v and gate/up matrices, per-head q/k norm,
//! sandwich norms, the MLP's activation, embedding scaling, rope layout, scaling and partial
//! rotation, sliding-window layers and final logit soft-capping.

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};

/// Model families we implement. All share one decoder block (`crate::decoder`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Architecture {
    /// Llama 2/3, SmolLM2, TinyLlama, ...
    Llama,
    /// Mistral (llama with sliding-window attention in every layer).
    Mistral,
    /// Qwen2 / Qwen2.5 (llama with q/k/v bias).
    Qwen2,
    /// Qwen3 (per-head q/k norm, no bias, head size from the file).
    Qwen3,
    /// Gemma 3 text (q/k norm, sandwich norms, GeGLU, scaled embeddings, 5 of 6 layers
    /// windowed).
    Gemma3,
    /// Phi-3 / Phi-3.5 / Phi-4-mini (fused q/k/v and gate/up matrices, partial rotary,
    /// LongRoPE).
    Phi3,
}

/// The activation of the MLP's gate (`act(gate) * up`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Activation {
    /// SwiGLU (llama, Qwen, Mistral).
    #[default]
    Silu,
    /// GeGLU with the tanh approximation of GELU (Gemma: `gelu_pytorch_tanh`).
    GeluTanh,
}

/// Which layers attend through a sliding window.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WindowLayers {
    /// Every layer (Mistral).
    All,
    /// Every `n`-th layer is global (layer `i` with `(i + 1) % n == 0`), the rest windowed
    /// (Gemma 3: n = 6).
    GlobalEvery(usize),
}

/// Sliding-window attention: a windowed layer's query at position `p` sees key positions
/// `k` with `p - k < size` (llama.cpp's rule: `size` keys including itself).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SlidingWindow {
    /// Keys a query sees, itself included.
    pub size: usize,
    /// Which layers are windowed.
    pub layers: WindowLayers,
    /// Rope base of the windowed layers, when it differs from `rope_theta` (Gemma 3: 10,000).
    pub rope_theta: Option<f32>,
}

impl SlidingWindow {
    /// Whether layer `i` is windowed.
    pub fn applies_to(&self, layer: usize) -> bool {
        match self.layers {
            WindowLayers::All => true,
            WindowLayers::GlobalEvery(n) => n == 0 || !(layer + 1).is_multiple_of(n),
        }
    }
}

/// How the rotary embedding pairs the dimensions of a head.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RopeStyle {
    /// Pairs (2i, 2i+1). llama.cpp's GGUF converter permutes llama's q/k rows into this layout.
    Interleaved,
    /// Pairs (i, i + d/2): Hugging Face checkpoints, and Qwen2 in GGUF.
    Half,
}

/// Rotary frequency scaling for long contexts.
#[derive(Clone, Debug, PartialEq)]
pub enum RopeScaling {
    /// Positions divided by `factor` (every frequency divided by it).
    Linear {
        /// The divisor.
        factor: f32,
    },
    /// Llama 3.1's wavelength-dependent scaling (`rope_type: "llama3"` in config.json).
    Llama3 {
        /// Scale of low frequencies.
        factor: f32,
        /// Wavelength threshold for full scaling.
        low_freq_factor: f32,
        /// Wavelength threshold for no scaling.
        high_freq_factor: f32,
        /// Context length of pre-training.
        original_max_position: usize,
    },
    /// Per-frequency divisors stored in a GGUF `rope_freqs.weight` tensor (llama.cpp's form of
    /// llama3 scaling). One entry per rotated pair.
    FreqFactors(Vec<f32>),
    /// LongRoPE (Phi-3 128k, Phi-3.5, Phi-4-mini; `rope_type: "longrope"`): per-frequency
    /// divisors, one set for contexts up to the pre-training length and one beyond it, and
    /// cos/sin multiplied by an attention factor.
    ///
    /// Which set applies is decided once, from `max_position` (as llama.cpp decides from its
    /// context size): the long factors when it exceeds `original_max_position`. transformers
    /// and vLLM switch per step on the longest position seen, which rotates the keys already
    /// cached with the other set; a paged cache needs one rotation per position.
    LongRope {
        /// Divisors for contexts within `original_max_position`, one per rotated pair.
        short_factors: Vec<f32>,
        /// Divisors for longer contexts, one per rotated pair.
        long_factors: Vec<f32>,
        /// Context length of pre-training.
        original_max_position: usize,
        /// Multiplies cos and sin; `None` is transformers' default,
        /// `sqrt(1 + ln(s) / ln(original_max_position))` with `s = max_position /
        /// original_max_position` (1 when `s <= 1`).
        attention_factor: Option<f32>,
    },
}

/// The switches a family sets over the shared decoder (`crate::families`). `Default` is
/// llama's: none of them.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct FamilySwitches {
    /// q, k and v stored as one `[q + 2 kv, hidden]` matrix (Phi-3's `qkv_proj`, GGUF
    /// `attn_qkv`), run as one matmul.
    pub fused_qkv: bool,
    /// gate and up stored as one `[2 intermediate, hidden]` matrix, gate rows first (Phi-3's
    /// `gate_up_proj`; in GGUF the `ffn_up` tensor holds both).
    pub fused_gate_up: bool,
    /// Rope rotates only the first `n` dimensions of each head and passes the rest through
    /// (`partial_rotary_factor` times `head_dim` in config.json, GGUF `rope.dimension_count`);
    /// `None` rotates all of them.
    pub rotary_dim: Option<usize>,
    /// Per-head RMSNorm of q and k before rope (Qwen 3, Gemma 3).
    pub qk_norm: bool,
    /// RMSNorms on the attention output and the MLP output before each residual add
    /// (Gemma 3's four norms per block).
    pub sandwich_norms: bool,
    /// The MLP's gate activation.
    pub activation: Activation,
    /// Embeddings multiplied by `sqrt(hidden_size)` (Gemma).
    pub scale_embeddings: bool,
    /// Norm weights are stored as `w` for a norm that multiplies by `1 + w` (Gemma's Hugging
    /// Face checkpoints; its GGUF files store `1 + w`). Added at load.
    pub norm_weights_offset: bool,
    /// Attention scale; `None` is `1 / sqrt(head_dim)`.
    pub attention_scale: Option<f32>,
    /// Sliding-window layers, if any.
    pub sliding_window: Option<SlidingWindow>,
    /// Final logits become `cap * tanh(logits / cap)`.
    pub final_logit_softcap: Option<f32>,
}

/// Shape and hyper-parameters of a loaded model.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelConfig {
    /// Model family.
    pub architecture: Architecture,
    /// Decoder layers.
    pub num_layers: usize,
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads (GQA: divides `num_heads`).
    pub num_kv_heads: usize,
    /// Size of one head.
    pub head_dim: usize,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Width of the MLP.
    pub intermediate_size: usize,
    /// Rows of the embedding and of the logits.
    pub vocab_size: usize,
    /// Longest sequence (prompt + generated) the model supports; rope tables are built to it.
    pub max_position: usize,
    /// Rope base frequency.
    pub rope_theta: f32,
    /// Rope layout of q/k.
    pub rope_style: RopeStyle,
    /// Rope frequency scaling, if any.
    pub rope_scaling: Option<RopeScaling>,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// q/k/v projections carry a bias (Qwen2).
    pub attention_bias: bool,
    /// What the family changes in the shared decoder.
    pub switches: FamilySwitches,
    /// Beginning-of-sequence token, when the model defines one.
    pub bos_token_id: Option<u32>,
    /// Tokens that end generation.
    pub eos_token_ids: Vec<u32>,
}

impl ModelConfig {
    /// Checks the relations between fields that the forward pass relies on.
    pub fn validate(&self) -> Result<()> {
        let positive = [
            ("num_layers", self.num_layers),
            ("num_heads", self.num_heads),
            ("num_kv_heads", self.num_kv_heads),
            ("head_dim", self.head_dim),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("vocab_size", self.vocab_size),
            ("max_position", self.max_position),
        ];
        for (key, value) in positive {
            if value == 0 {
                return Err(invalid(key, "must be positive"));
            }
        }
        if !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return Err(invalid(
                "num_kv_heads",
                format!(
                    "{} query heads are not a multiple of {} kv heads",
                    self.num_heads, self.num_kv_heads
                ),
            ));
        }
        if !self.head_dim.is_multiple_of(2) {
            return Err(invalid("head_dim", "rope needs an even head size"));
        }
        if self.max_position > u32::MAX as usize {
            return Err(invalid("max_position", "does not fit in u32 positions"));
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 0.0) {
            return Err(invalid("rope_theta", "must be a positive number"));
        }
        if let Some(w) = &self.switches.sliding_window {
            if w.size == 0 {
                return Err(invalid("sliding_window", "must be positive"));
            }
            if let Some(theta) = w.rope_theta {
                if !(theta.is_finite() && theta > 0.0) {
                    return Err(invalid("rope_local_base_freq", "must be a positive number"));
                }
            }
        }
        if let Some(cap) = self.switches.final_logit_softcap {
            if !(cap.is_finite() && cap > 0.0) {
                return Err(invalid(
                    "final_logit_softcapping",
                    "must be a positive number",
                ));
            }
        }
        let rotary = self.rotary_dim();
        if rotary == 0 || rotary > self.head_dim || !rotary.is_multiple_of(2) {
            return Err(invalid(
                "partial_rotary_factor",
                format!(
                    "rotates {rotary} of {} dimensions a head (GGUF `rope.dimension_count`): \
                     must be even, positive and at most the head size",
                    self.head_dim
                ),
            ));
        }
        let pairs = rotary / 2;
        let check_factors = |key: &str, f: &[f32]| -> Result<()> {
            if f.len() != pairs {
                return Err(invalid(
                    key,
                    format!("{} factors for {pairs} rotated pairs", f.len()),
                ));
            }
            if !f.iter().all(|x| x.is_finite() && *x > 0.0) {
                return Err(invalid(key, "factors must be positive numbers"));
            }
            Ok(())
        };
        match &self.rope_scaling {
            Some(RopeScaling::FreqFactors(f)) => check_factors("rope_freqs", f)?,
            Some(RopeScaling::LongRope {
                short_factors,
                long_factors,
                original_max_position,
                attention_factor,
            }) => {
                check_factors("rope_scaling.short_factor", short_factors)?;
                check_factors("rope_scaling.long_factor", long_factors)?;
                if *original_max_position == 0 {
                    return Err(invalid(
                        "original_max_position_embeddings",
                        "must be positive",
                    ));
                }
                if let Some(a) = attention_factor {
                    if !(a.is_finite() && *a > 0.0) {
                        return Err(invalid(
                            "rope_scaling.attention_factor",
                            "must be a positive number",
                        ));
                    }
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// Dimensions of each head that rope rotates (the first ones; see
    /// [`FamilySwitches::rotary_dim`]).
    pub fn rotary_dim(&self) -> usize {
        self.switches.rotary_dim.unwrap_or(self.head_dim)
    }

    /// The window of layer `i`, if it is a windowed layer.
    pub fn layer_window(&self, layer: usize) -> Option<usize> {
        self.switches
            .sliding_window
            .filter(|w| w.applies_to(layer))
            .map(|w| w.size)
    }

    /// Rope base of layer `i`: windowed layers may have their own.
    pub fn layer_rope_theta(&self, layer: usize) -> f32 {
        match self.switches.sliding_window {
            Some(w) if w.applies_to(layer) => w.rope_theta.unwrap_or(self.rope_theta),
            _ => self.rope_theta,
        }
    }

    /// Rotary inverse frequencies, one per rotated pair, after scaling.
    pub fn rope_inv_freqs(&self) -> Vec<f64> {
        self.rope_inv_freqs_for(self.rope_theta, true)
    }

    /// [`Self::rope_inv_freqs`] for a base, with or without `rope_scaling` (which applies to
    /// global layers only, as in transformers' Gemma 3, whose local rotary embedding is
    /// unscaled).
    fn rope_inv_freqs_for(&self, theta: f32, scaled: bool) -> Vec<f64> {
        // With partial rotation the exponents run over the rotated dimensions only
        // (transformers' `dim = head_dim * partial_rotary_factor`, llama.cpp's `n_rot`).
        let d = self.rotary_dim();
        let base = theta as f64;
        let scaling = self.rope_scaling.as_ref().filter(|_| scaled);
        let inv: Vec<f64> = (0..d / 2)
            .map(|i| 1.0 / base.powf((2 * i) as f64 / d as f64))
            .collect();
        match scaling {
            None => inv,
            Some(RopeScaling::LongRope {
                short_factors,
                long_factors,
                original_max_position,
                ..
            }) => {
                // transformers' `_compute_longrope_parameters`: `1 / (factor * base^(2i/d))`.
                let factors = if self.max_position > *original_max_position {
                    long_factors
                } else {
                    short_factors
                };
                inv.into_iter()
                    .zip(factors)
                    .map(|(f, s)| f / *s as f64)
                    .collect()
            }
            Some(RopeScaling::Linear { factor }) => {
                inv.into_iter().map(|f| f / *factor as f64).collect()
            }
            Some(RopeScaling::FreqFactors(factors)) => inv
                .into_iter()
                .zip(factors)
                .map(|(f, s)| f / *s as f64)
                .collect(),
            Some(RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position,
            }) => {
                // Same formula as transformers' `_compute_llama3_parameters`.
                let (factor, low, high) = (
                    *factor as f64,
                    *low_freq_factor as f64,
                    *high_freq_factor as f64,
                );
                let old_len = *original_max_position as f64;
                let low_freq_wavelen = old_len / low;
                let high_freq_wavelen = old_len / high;
                inv.into_iter()
                    .map(|freq| {
                        let wavelen = 2.0 * std::f64::consts::PI / freq;
                        if wavelen < high_freq_wavelen {
                            freq
                        } else if wavelen > low_freq_wavelen {
                            freq / factor
                        } else {
                            let smooth = (old_len / wavelen - low) / (high - low);
                            (1.0 - smooth) * freq / factor + smooth * freq
                        }
                    })
                    .collect()
            }
        }
    }

    /// What cos and sin are multiplied by (LongRoPE's attention factor; 1 otherwise).
    pub fn rope_attention_factor(&self) -> f64 {
        match &self.rope_scaling {
            Some(RopeScaling::LongRope {
                original_max_position,
                attention_factor,
                ..
            }) => attention_factor.map_or_else(
                || {
                    // transformers' default (and llama.cpp's converter's `attn_factor`).
                    let original = *original_max_position as f64;
                    let scale = self.max_position as f64 / original;
                    if scale <= 1.0 {
                        1.0
                    } else {
                        (1.0 + scale.ln() / original.ln()).sqrt()
                    }
                },
                f64::from,
            ),
            _ => 1.0,
        }
    }

    /// cos and sin tables `[max_position, head_dim / 2]` (f32), built once at load and
    /// indexed by position at each step.
    ///
    /// Pair `i` of a head is rotated by column `i`. With partial rotation only the first
    /// `rotary_dim / 2` columns rotate; the others hold cos 1 and sin 0, which the rope kernel
    /// turns into an exact copy (`x * 1 - y * 0`). The decoder lays each head out so that the
    /// pairs it rotates fall on those columns (see `crate::decoder`).
    pub fn rope_tables(&self, device: &Device) -> Result<(Tensor, Tensor)> {
        self.rope_tables_for(self.rope_theta, true, device)
    }

    /// [`Self::rope_tables`] for a base, with or without `rope_scaling` (the windowed layers'
    /// own base is unscaled).
    pub fn rope_tables_for(
        &self,
        theta: f32,
        scaled: bool,
        device: &Device,
    ) -> Result<(Tensor, Tensor)> {
        let inv = self.rope_inv_freqs_for(theta, scaled);
        let half = self.head_dim / 2;
        let passed = half - inv.len();
        let factor = if scaled {
            self.rope_attention_factor()
        } else {
            1.0
        };
        let n = self.max_position;
        let mut cos = Vec::with_capacity(n * half);
        let mut sin = Vec::with_capacity(n * half);
        for p in 0..n {
            for f in &inv {
                let angle = p as f64 * f;
                cos.push((angle.cos() * factor) as f32);
                sin.push((angle.sin() * factor) as f32);
            }
            cos.extend(std::iter::repeat_n(1.0, passed));
            sin.extend(std::iter::repeat_n(0.0, passed));
        }
        let cos = Tensor::from_vec(cos, (n, half), device)?;
        let sin = Tensor::from_vec(sin, (n, half), device)?;
        Ok((cos, sin))
    }

    /// Bytes of KV cache one token takes in all layers (K and V), for sizing the cache.
    pub fn kv_bytes_per_token(&self, dtype: DType) -> usize {
        2 * self.num_layers * self.num_kv_heads * self.head_dim * dtype.size_in_bytes()
    }
}

pub(crate) fn invalid(key: &str, reason: impl Into<String>) -> Error {
    Error::InvalidMetadata {
        key: key.to_string(),
        reason: reason.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn smol() -> ModelConfig {
        ModelConfig {
            architecture: Architecture::Llama,
            num_layers: 30,
            num_heads: 9,
            num_kv_heads: 3,
            head_dim: 64,
            hidden_size: 576,
            intermediate_size: 1536,
            vocab_size: 49152,
            max_position: 16,
            rope_theta: 100_000.0,
            rope_style: RopeStyle::Interleaved,
            rope_scaling: None,
            rms_norm_eps: 1e-5,
            attention_bias: false,
            switches: FamilySwitches::default(),
            bos_token_id: Some(1),
            eos_token_ids: vec![2],
        }
    }

    #[test]
    fn validate_rejects_bad_gqa() {
        let mut c = smol();
        assert!(c.validate().is_ok());
        c.num_kv_heads = 4;
        assert!(matches!(c.validate(), Err(Error::InvalidMetadata { .. })));
    }

    #[test]
    fn rope_tables_shape_and_position_zero() -> Result<()> {
        let c = smol();
        let (cos, sin) = c.rope_tables(&Device::Cpu)?;
        assert_eq!(cos.dims(), &[16, 32]);
        let cos0 = cos.get(0)?.to_vec1::<f32>()?;
        let sin0 = sin.get(0)?.to_vec1::<f32>()?;
        assert!(cos0.iter().all(|&x| x == 1.0));
        assert!(sin0.iter().all(|&x| x == 0.0));
        // First pair rotates at one radian per position.
        let cos3 = cos.get(3)?.to_vec1::<f32>()?;
        assert!((cos3[0] - 3f32.cos()).abs() < 1e-6);
        Ok(())
    }

    #[test]
    fn llama3_scaling_keeps_high_and_divides_low_frequencies() {
        let mut c = smol();
        c.rope_theta = 500_000.0;
        c.head_dim = 128;
        let plain = c.rope_inv_freqs();
        c.rope_scaling = Some(RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position: 8192,
        });
        let scaled = c.rope_inv_freqs();
        assert_eq!(plain[0], scaled[0]);
        let last = plain.len() - 1;
        assert!((scaled[last] - plain[last] / 8.0).abs() < 1e-15);
    }

    /// LongRoPE against the formulas written out by hand (transformers'
    /// `_compute_longrope_parameters`), with partial rotation: 48 of 64 dimensions.
    #[test]
    fn longrope_divides_by_the_context_s_factors_and_scales_cos_and_sin() -> Result<()> {
        let mut c = smol();
        c.switches.rotary_dim = Some(48);
        let short: Vec<f32> = (0..24).map(|i| 1.0 + i as f32 / 8.0).collect();
        let long: Vec<f32> = (0..24).map(|i| 2.0 + i as f32).collect();
        c.rope_scaling = Some(RopeScaling::LongRope {
            short_factors: short.clone(),
            long_factors: long.clone(),
            original_max_position: 16,
            attention_factor: None,
        });
        c.validate()?;
        let theta = c.rope_theta as f64;
        let expected = |factors: &[f32]| -> Vec<f64> {
            (0..24)
                .map(|i| 1.0 / (factors[i] as f64 * theta.powf((2 * i) as f64 / 48.0)))
                .collect()
        };
        let close = |a: &[f64], b: &[f64]| {
            a.len() == b.len()
                && a.iter()
                    .zip(b)
                    .all(|(x, y)| (x - y).abs() <= 1e-15 * y.abs())
        };
        // A context within the pre-training length: short factors, no scaling of cos/sin.
        assert_eq!(c.max_position, 16);
        assert!(close(&c.rope_inv_freqs(), &expected(&short)));
        assert_eq!(c.rope_attention_factor(), 1.0);
        // Four times longer: long factors, cos/sin times sqrt(1 + ln 4 / ln 16) = sqrt(1.5).
        c.max_position = 64;
        let inv = c.rope_inv_freqs();
        assert!(close(&inv, &expected(&long)));
        let m = 1.5f64.sqrt();
        assert!((c.rope_attention_factor() - m).abs() < 1e-12);
        let (cos, sin) = c.rope_tables(&Device::Cpu)?;
        assert_eq!(cos.dims(), &[64, 32]);
        let (cos, sin) = (cos.to_vec2::<f32>()?, sin.to_vec2::<f32>()?);
        for p in [0, 1, 17, 63] {
            for i in 0..24 {
                let angle = p as f64 * inv[i];
                assert!((cos[p][i] as f64 - angle.cos() * m).abs() < 1e-6);
                assert!((sin[p][i] as f64 - angle.sin() * m).abs() < 1e-6);
            }
            // The passed pairs: angle 0, not scaled, so the kernel copies them exactly.
            assert!(cos[p][24..].iter().all(|&x| x == 1.0));
            assert!(sin[p][24..].iter().all(|&x| x == 0.0));
        }
        // A stated attention factor wins.
        if let Some(RopeScaling::LongRope {
            attention_factor, ..
        }) = &mut c.rope_scaling
        {
            *attention_factor = Some(2.0);
        }
        assert_eq!(c.rope_attention_factor(), 2.0);
        Ok(())
    }

    #[test]
    fn validate_names_bad_rope_factors_and_rotary_dims() {
        let mut c = smol();
        c.rope_scaling = Some(RopeScaling::LongRope {
            short_factors: vec![1.0; 32],
            long_factors: vec![1.0; 31],
            original_max_position: 8,
            attention_factor: None,
        });
        let key = |c: &ModelConfig| match c.validate() {
            Err(Error::InvalidMetadata { key, .. }) => key,
            other => panic!("expected invalid metadata, got {other:?}"),
        };
        assert_eq!(key(&c), "rope_scaling.long_factor");
        // Factors count rotated pairs, not the head's.
        c.switches.rotary_dim = Some(62);
        c.rope_scaling = Some(RopeScaling::LongRope {
            short_factors: vec![1.0; 31],
            long_factors: vec![1.0; 31],
            original_max_position: 8,
            attention_factor: None,
        });
        assert!(c.validate().is_ok());
        c.switches.rotary_dim = Some(63);
        assert_eq!(key(&c), "partial_rotary_factor");
        c.switches.rotary_dim = Some(66);
        assert_eq!(key(&c), "partial_rotary_factor");
    }
}

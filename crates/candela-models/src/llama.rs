//! The llama decoder (SmolLM2, Llama 2/3, Mistral, Qwen2) over flattened variable-length
//! batches, attending through candela-kernels' paged KV cache.
//!
//! One forward call per engine step, whatever mix of prefills, prefill chunks and decodes
//! it holds: every matmul sees all `T` tokens of the step at once, and only attention
//! looks at sequence boundaries (through [`AttentionMetadata`]). The LM head runs only on
//! the rows that are sampled, since it is a fifth of a small model's multiply-adds.
//!
//! Family switches: q/k/v bias (Qwen2), rope layout (GGUF llama weights are permuted for
//! interleaved pairs, Hugging Face ones are not) and rope frequency scaling (Llama 3).
//!
//! [`AttentionMetadata`]: candela_kernels::attention::AttentionMetadata

use candela_kernels::attention::{paged_attention, takes_activations, write_kv};
use candela_kernels::fused::{rope_qkv, silu_mul, RopeStyle as FusedRope};
use candela_kernels::kv_cache::PagedKvCache;
use candela_kernels::norm::add_rms_norm;
use candle_core::{DType, Device, Tensor};

use crate::batch::BatchInputs;
use crate::config::{ModelConfig, RopeStyle};
use crate::error::{Error, Result};
use crate::linear::{Linear, Quantize};
use crate::model::{LlamaNames, Model, WeightSource};

/// Weight of one tensor role in a layer, for naming.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    AttnNorm,
    Q,
    K,
    V,
    O,
    FfnNorm,
    Gate,
    Up,
    Down,
}

impl Role {
    /// Every role, with bias vectors aside.
    pub(crate) const ALL: [Role; 9] = [
        Role::AttnNorm,
        Role::Q,
        Role::K,
        Role::V,
        Role::O,
        Role::FfnNorm,
        Role::Gate,
        Role::Up,
        Role::Down,
    ];
}

impl LlamaNames {
    pub(crate) fn layer(self, i: usize, role: Role) -> String {
        let (g, h) = match role {
            Role::AttnNorm => ("attn_norm", "input_layernorm"),
            Role::Q => ("attn_q", "self_attn.q_proj"),
            Role::K => ("attn_k", "self_attn.k_proj"),
            Role::V => ("attn_v", "self_attn.v_proj"),
            Role::O => ("attn_output", "self_attn.o_proj"),
            Role::FfnNorm => ("ffn_norm", "post_attention_layernorm"),
            Role::Gate => ("ffn_gate", "mlp.gate_proj"),
            Role::Up => ("ffn_up", "mlp.up_proj"),
            Role::Down => ("ffn_down", "mlp.down_proj"),
        };
        match self {
            Self::Gguf => format!("blk.{i}.{g}"),
            Self::HuggingFace => format!("model.layers.{i}.{h}"),
        }
    }

    pub(crate) fn embedding(self) -> &'static str {
        match self {
            Self::Gguf => "token_embd.weight",
            Self::HuggingFace => "model.embed_tokens.weight",
        }
    }

    pub(crate) fn final_norm(self) -> &'static str {
        match self {
            Self::Gguf => "output_norm.weight",
            Self::HuggingFace => "model.norm.weight",
        }
    }

    pub(crate) fn head(self) -> &'static str {
        match self {
            Self::Gguf => "output.weight",
            Self::HuggingFace => "lm_head.weight",
        }
    }
}

/// Projections of the same input, side by side in one output row: one stacked matmul, or,
/// for weights that cannot be stacked (dense, candle-quantized), one matmul each, concatenated.
enum Projections {
    Stacked(Linear),
    Each(Vec<Linear>),
}

impl Projections {
    fn new(parts: Vec<Linear>) -> Result<Self> {
        let refs: Vec<&Linear> = parts.iter().collect();
        Ok(match Linear::stack(&refs)? {
            Some(weight) => Self::Stacked(weight),
            None => Self::Each(parts),
        })
    }

    /// `[t, sum of widths]`: the projections side by side, in order (the fused ops after
    /// them read the parts from one row).
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::Stacked(weight) => Ok(weight.forward(x)?),
            Self::Each(parts) => {
                let outs = parts
                    .iter()
                    .map(|l| l.forward(x))
                    .collect::<std::result::Result<Vec<_>, _>>()?;
                Ok(Tensor::cat(&outs, 1)?)
            }
        }
    }
}

struct Attention {
    /// q, k and v.
    qkv: Projections,
    o: Linear,
    /// q, k and v biases side by side (Qwen2).
    bias: Option<Tensor>,
}

struct Mlp {
    /// gate and up.
    gate_up: Projections,
    down: Linear,
}

struct Layer {
    attn_norm: Tensor,
    attn: Attention,
    ffn_norm: Tensor,
    mlp: Mlp,
}

/// A llama-family model.
pub struct Llama {
    config: ModelConfig,
    device: Device,
    dtype: DType,
    /// `[vocab, hidden]`, dense for row lookups.
    embedding: Tensor,
    layers: Vec<Layer>,
    final_norm: Tensor,
    /// `[vocab, hidden]`: `output.weight`, or the embedding's stored form when tied.
    head: Linear,
    /// `[max_position, head_dim / 2]` each, built once at load.
    rope_cos: Tensor,
    rope_sin: Tensor,
    attn_scale: f32,
    /// `(tensor, storage and matmul)` of every matrix, for the load report.
    weight_paths: Vec<(String, String)>,
}

impl std::fmt::Debug for Llama {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Llama")
            .field("config", &self.config)
            .field("device", &self.device)
            .finish()
    }
}

impl Llama {
    pub(crate) fn load<S: WeightSource>(
        src: &mut S,
        config: ModelConfig,
        device: &Device,
        dtype: DType,
        names: LlamaNames,
        quantize: Option<Quantize>,
    ) -> Result<Self> {
        config.validate()?;
        let c = &config;
        let q_out = c.num_heads * c.head_dim;
        let kv_out = c.num_kv_heads * c.head_dim;
        let (hidden, inter) = (c.hidden_size, c.intermediate_size);

        let check = |src: &S, name: &str, expected: &[usize]| -> Result<()> {
            let got = src.dims(name)?;
            if got != expected {
                return Err(Error::ShapeMismatch {
                    name: name.to_string(),
                    expected: expected.to_vec(),
                    got,
                });
            }
            Ok(())
        };
        // Every matrix's storage and matmul, in load order, for the load report.
        let mut weight_paths = Vec::new();
        let mut linear = |src: &mut S, name: String, shape: [usize; 2]| -> Result<Linear> {
            let name = format!("{name}.weight");
            check(src, &name, &shape)?;
            let l = src.linear(&name, device, dtype, quantize)?;
            weight_paths.push((name, l.describe()));
            Ok(l)
        };
        let vector = |src: &mut S, name: String, len: usize| -> Result<Tensor> {
            check(src, &name, &[len])?;
            src.dense(&name, device, dtype)
        };

        let embed_name = names.embedding();
        check(src, embed_name, &[c.vocab_size, hidden])?;
        let (embedding, tied_head) = src.embedding_and_tied_head(embed_name, device, dtype)?;
        // The LM head stays as stored, as vLLM leaves it unquantized: it decides every token.
        let (head, head_name) = if src.contains(names.head()) {
            check(src, names.head(), &[c.vocab_size, hidden])?;
            let head = src.linear(names.head(), device, dtype, None)?;
            (head, names.head().to_string())
        } else {
            (tied_head, format!("{embed_name} (tied LM head)"))
        };
        let final_norm = vector(src, names.final_norm().to_string(), hidden)?;

        let mut layers = Vec::with_capacity(c.num_layers);
        for i in 0..c.num_layers {
            let n = |role| names.layer(i, role);
            let bias = if c.attention_bias {
                Some(Tensor::cat(
                    &[
                        vector(src, format!("{}.bias", n(Role::Q)), q_out)?,
                        vector(src, format!("{}.bias", n(Role::K)), kv_out)?,
                        vector(src, format!("{}.bias", n(Role::V)), kv_out)?,
                    ],
                    0,
                )?)
            } else {
                None
            };
            layers.push(Layer {
                attn_norm: vector(src, format!("{}.weight", n(Role::AttnNorm)), hidden)?,
                attn: Attention {
                    qkv: Projections::new(vec![
                        linear(src, n(Role::Q), [q_out, hidden])?,
                        linear(src, n(Role::K), [kv_out, hidden])?,
                        linear(src, n(Role::V), [kv_out, hidden])?,
                    ])?,
                    o: linear(src, n(Role::O), [hidden, q_out])?,
                    bias,
                },
                ffn_norm: vector(src, format!("{}.weight", n(Role::FfnNorm)), hidden)?,
                mlp: Mlp {
                    gate_up: Projections::new(vec![
                        linear(src, n(Role::Gate), [inter, hidden])?,
                        linear(src, n(Role::Up), [inter, hidden])?,
                    ])?,
                    down: linear(src, n(Role::Down), [hidden, inter])?,
                },
            });
        }
        weight_paths.push((head_name, head.describe()));
        let stacked = layers
            .iter()
            .filter(|l| matches!(l.attn.qkv, Projections::Stacked(_)))
            .count();
        tracing::info!(
            "q/k/v and gate/up stacked into one matmul each in {stacked} of {} layers",
            layers.len()
        );
        let (rope_cos, rope_sin) = config.rope_tables(device)?;
        let (rope_cos, rope_sin) = (rope_cos.to_dtype(dtype)?, rope_sin.to_dtype(dtype)?);
        Ok(Self {
            attn_scale: 1.0 / (config.head_dim as f32).sqrt(),
            config,
            device: device.clone(),
            dtype,
            embedding,
            layers,
            final_norm,
            head,
            rope_cos,
            rope_sin,
            weight_paths,
        })
    }

    fn check_inputs(&self, input: &BatchInputs, kv: &PagedKvCache) -> Result<usize> {
        let t = input.token_ids.dims1()?;
        let positions = input.positions.dims1()?;
        if positions != t {
            return Err(Error::InvalidBatch(format!(
                "{t} tokens but {positions} positions"
            )));
        }
        if input.attn.slot_mapping.dims1()? != t {
            return Err(Error::InvalidBatch(format!(
                "{t} tokens but {} slots",
                input.attn.slot_mapping.dims1()?
            )));
        }
        if input.attn.max_context_len > self.config.max_position {
            return Err(Error::InvalidBatch(format!(
                "context of {} tokens exceeds the model's {}",
                input.attn.max_context_len, self.config.max_position
            )));
        }
        if kv.num_layers() != self.layers.len() {
            return Err(Error::InvalidBatch(format!(
                "KV cache has {} layers, model has {}",
                kv.num_layers(),
                self.layers.len()
            )));
        }
        Ok(t)
    }
}

impl Model for Llama {
    fn forward(&self, input: &BatchInputs, kv: &mut PagedKvCache) -> Result<Tensor> {
        if self.device.is_cpu() && rayon::current_thread_index().is_none() {
            // Called from outside the thread pool (the engine thread), every parallel op of
            // the step (about ten per layer) would inject its job into the pool and sleep on
            // a latch until a worker woke up and finished it: two thread wake-ups per op,
            // hundreds per decode step. Run the whole step on a pool worker instead: nested
            // ops then start on that worker at once and the other workers steal from it.
            return rayon::scope(|_| self.forward_on_pool(input, kv));
        }
        self.forward_on_pool(input, kv)
    }

    fn config(&self) -> &ModelConfig {
        &self.config
    }

    fn device(&self) -> &Device {
        &self.device
    }

    fn dtype(&self) -> DType {
        self.dtype
    }

    fn weight_paths(&self) -> &[(String, String)] {
        &self.weight_paths
    }
}

impl Llama {
    fn forward_on_pool(&self, input: &BatchInputs, kv: &mut PagedKvCache) -> Result<Tensor> {
        let t = self.check_inputs(input, kv)?;
        let c = &self.config;
        let (h, kvh, d) = (c.num_heads, c.num_kv_heads, c.head_dim);
        let eps = c.rms_norm_eps as f32;

        let half = d / 2;
        let cos = self.rope_cos.index_select(&input.positions, 0)?;
        let sin = self.rope_sin.index_select(&input.positions, 0)?;
        debug_assert_eq!(cos.dims(), [t, half]);
        let kv_dtype = kv.dtype();
        let rope_style = match c.rope_style {
            RopeStyle::Interleaved => FusedRope::Interleaved,
            RopeStyle::Half => FusedRope::Half,
        };

        // Each residual add is fused with the norm after it: the attention output's with the
        // layer's MLP norm, the MLP output's with the next layer's attention norm (the final
        // norm after the last layer). On a GPU that halves the launches of the small ops.
        let mut x = self.embedding.index_select(&input.token_ids, 0)?;
        let mut hs = match self.layers.first() {
            Some(layer) => candle_nn::ops::rms_norm(&x, &layer.attn_norm, eps)?,
            None => candle_nn::ops::rms_norm(&x, &self.final_norm, eps)?,
        };
        for (i, layer) in self.layers.iter().enumerate() {
            let a = &layer.attn;
            let mut qkv = a.qkv.forward(&hs)?;
            if let Some(bias) = &a.bias {
                qkv = qkv.broadcast_add(bias)?;
            }
            // `[t, h + 2 kvh, d]`: q and k rotated, v copied, in one pass over the row.
            let mut qkv = rope_qkv(&qkv, &cos, &sin, h, kvh, d, rope_style)?;
            // A KV cache in another dtype than the activations (`--kv-cache-dtype`): the CPU
            // kernels take f32 q/k/v over a half-precision cache as they are (k/v rounded as
            // they are stored); otherwise q/k/v are cast to the cache's dtype, q rounded once,
            // as llama.cpp's flash attention does with an f16 cache.
            if !takes_activations(qkv.dtype(), kv_dtype, &self.device) {
                qkv = qkv.to_dtype(kv_dtype)?;
            }
            let (q, k, v) = (
                qkv.narrow(1, 0, h)?,
                qkv.narrow(1, h, kvh)?,
                qkv.narrow(1, h + kvh, kvh)?,
            );
            let (key_cache, value_cache) = kv.layer(i);
            write_kv(&k, &v, key_cache, value_cache, &input.attn.slot_mapping)?;
            let o = paged_attention(&q, key_cache, value_cache, &input.attn, self.attn_scale)?;
            let attn_out = a.o.forward(&o.reshape((t, h * d))?.to_dtype(x.dtype())?)?;
            let (sum, normed) = add_rms_norm(&x, &attn_out, &layer.ffn_norm, eps)?;

            let m = &layer.mlp;
            let act = silu_mul(&m.gate_up.forward(&normed)?, c.intermediate_size)?;
            let mlp_out = m.down.forward(&act)?;
            let next_norm = self
                .layers
                .get(i + 1)
                .map_or(&self.final_norm, |next| &next.attn_norm);
            (x, hs) = add_rms_norm(&sum, &mlp_out, next_norm, eps)?;
        }
        // `hs` is the final norm of every row now; the head runs only on the sampled rows.
        if input.sample_rows.dims1()? == 0 {
            // A step of non-final prefill chunks samples nothing.
            return Ok(Tensor::zeros((0, c.vocab_size), DType::F32, &self.device)?);
        }
        // Sampled rows are increasing, so all `t` of them means every row in order (a step of
        // decodes only): no gather needed.
        let rows = if input.sample_rows.dims1()? == t {
            hs
        } else {
            hs.index_select(&input.sample_rows, 0)?
        };
        Ok(self.head.forward(&rows)?.to_dtype(DType::F32)?)
    }
}

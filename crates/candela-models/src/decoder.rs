//! The decoder every family shares (llama, Mistral, Qwen 2/3, Gemma 3; see
//! [`crate::families`]) over flattened variable-length batches, attending through
//! candela-kernels' paged KV cache.
//!
//! One forward call per engine step, whatever mix of prefills, prefill chunks and decodes
//! it holds: every matmul sees all `T` tokens of the step at once, and only attention
//! looks at sequence boundaries (through [`AttentionMetadata`]). The LM head runs only on
//! the rows that are sampled, since it is a fifth of a small model's multiply-adds; rows that
//! embeddings pool leave as their final hidden states, summed per pool ([`Model::forward_pooled`]).
//!
//! Family switches, all read from [`ModelConfig`]: q/k/v bias (Qwen2), q/k/v and gate/up
//! stored fused (Phi-3), per-head q/k norm (Qwen3, Gemma 3), sandwich norms, GeGLU and scaled
//! embeddings (Gemma 3), rope layout (GGUF llama weights are permuted for interleaved pairs,
//! Hugging Face ones are not), partial rotation (Phi-3.5, Phi-4-mini), rope scaling (Llama 3,
//! LongRoPE), sliding-window layers with their own rope base (Gemma 3, Mistral) and final
//! logit soft-capping.
//!
//! Partial rotation with half-split pairs reorders each q and k head's rows at load
//! ([`rotary_head_order`]) so that the fused rope kernel, which pairs `(i, i + d/2)` over the
//! whole head, rotates exactly the pairs the model rotates and copies the others (their
//! table columns hold angle 0). q and k get the same order, so every dot product, and thus
//! attention, is unchanged; the order never leaves the KV cache.
//!
//! [`AttentionMetadata`]: candela_kernels::attention::AttentionMetadata

use std::num::NonZeroUsize;

use candela_kernels::attention::{paged_attention_windowed, takes_activations, write_kv};
use candela_kernels::fused::{gelu_tanh_mul, rope_qkv, silu_mul, RopeStyle as FusedRope};
use candela_kernels::kv_cache::PagedKvCache;
use candela_kernels::norm::add_rms_norm;
use candle_core::{DType, Device, Tensor};

use crate::batch::BatchInputs;
use crate::config::{Activation, ModelConfig, RopeStyle};
use crate::error::{Error, Result};
use crate::linear::{Linear, Quantize};
use crate::model::{Model, TensorNames, WeightSource};

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
    /// Per-head norm of q (Qwen3, Gemma 3).
    QNorm,
    /// Per-head norm of k.
    KNorm,
    /// Norm of the attention output (Gemma 3).
    PostAttnNorm,
    /// Norm before the MLP when the block has sandwich norms (Gemma 3); `FfnNorm` otherwise.
    PreFfnNorm,
    /// Norm of the MLP output (Gemma 3).
    PostFfnNorm,
    /// q, k and v in one matrix (Phi-3).
    Qkv,
    /// gate and up in one matrix, gate rows first (Phi-3; GGUF's `ffn_up` then holds both).
    GateUp,
}

impl Role {
    /// The roles of a llama block, with bias vectors aside.
    pub(crate) const LLAMA: [Role; 9] = [
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

impl TensorNames {
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
            Role::QNorm => ("attn_q_norm", "self_attn.q_norm"),
            Role::KNorm => ("attn_k_norm", "self_attn.k_norm"),
            Role::PostAttnNorm => ("post_attention_norm", "post_attention_layernorm"),
            Role::PreFfnNorm => ("ffn_norm", "pre_feedforward_layernorm"),
            Role::PostFfnNorm => ("post_ffw_norm", "post_feedforward_layernorm"),
            Role::Qkv => ("attn_qkv", "self_attn.qkv_proj"),
            Role::GateUp => ("ffn_up", "mlp.gate_up_proj"),
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

/// The order in which one head's rows are loaded for partial rotation with half-split pairs,
/// as indices into the stored head; `None` when rope rotates the whole head (no reordering).
///
/// The model rotates pairs `(j, j + r/2)` of the first `r` dimensions and passes the other
/// `d - r` through; the kernel rotates pairs `(i, i + d/2)`, with angle 0 (an exact copy) for
/// `i >= r/2`. So the rotated halves go to the starts of the kernel's halves and the passed
/// dimensions fill the rest:
///
/// ```text
/// stored  (d = 8, r = 4):  r0 r1 r2 r3 | p0 p1 p2 p3     model pairs (r0, r2) (r1, r3)
/// loaded:                  r0 r1 p0 p1 | r2 r3 p2 p3     kernel pairs (i, i + 4):
///                          (r0, r2) (r1, r3) rotated, (p0, p2) (p1, p3) at angle 0
/// ```
fn rotary_head_order(head_dim: usize, rotary_dim: usize) -> Option<Vec<usize>> {
    if rotary_dim >= head_dim {
        return None;
    }
    let (half, rot_half) = (head_dim / 2, rotary_dim / 2);
    Some(
        (0..head_dim)
            .map(|i| {
                if i < rot_half {
                    i
                } else if i < half {
                    // The first half of the passed dimensions.
                    rotary_dim + (i - rot_half)
                } else if i < half + rot_half {
                    // The second half of the rotated dimensions.
                    rot_half + (i - half)
                } else {
                    // The rest of the passed dimensions stay where they are.
                    i
                }
            })
            .collect(),
    )
}

struct Attention {
    /// q, k and v.
    qkv: Projections,
    o: Linear,
    /// q, k and v biases side by side (Qwen2).
    bias: Option<Tensor>,
    /// `[head_dim]` weights of the per-head q and k norms (Qwen3, Gemma 3).
    qk_norm: Option<(Tensor, Tensor)>,
    /// This layer's sliding window, if it is windowed.
    window: Option<NonZeroUsize>,
    /// Whether it uses the windowed layers' rope tables.
    local_rope: bool,
}

struct Mlp {
    /// gate and up.
    gate_up: Projections,
    down: Linear,
}

struct Layer {
    attn_norm: Tensor,
    attn: Attention,
    /// Norm of the attention output (sandwich norms).
    post_attn_norm: Option<Tensor>,
    /// The norm before the MLP.
    ffn_norm: Tensor,
    mlp: Mlp,
    /// Norm of the MLP output (sandwich norms).
    post_ffn_norm: Option<Tensor>,
}

/// Rope cos and sin tables `[max_position, head_dim / 2]`, built once at load.
struct RopeTables {
    cos: Tensor,
    sin: Tensor,
}

/// A decoder-only model of any family we serve.
pub struct Decoder {
    config: ModelConfig,
    device: Device,
    dtype: DType,
    /// `[vocab, hidden]`, dense for row lookups.
    embedding: Tensor,
    layers: Vec<Layer>,
    final_norm: Tensor,
    /// `[vocab, hidden]`: `output.weight`, or the embedding's stored form when tied.
    head: Linear,
    /// The global layers' rope tables.
    rope: RopeTables,
    /// The windowed layers' own tables, when their rope base differs (Gemma 3).
    rope_local: Option<RopeTables>,
    attn_scale: f32,
    /// `sqrt(hidden_size)` when embeddings are scaled (Gemma).
    embedding_scale: Option<f64>,
    /// `(tensor, storage and matmul)` of every matrix, for the load report.
    weight_paths: Vec<(String, String)>,
}

impl std::fmt::Debug for Decoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Decoder")
            .field("config", &self.config)
            .field("device", &self.device)
            .finish()
    }
}

impl Decoder {
    pub(crate) fn load<S: WeightSource>(
        src: &mut S,
        config: ModelConfig,
        device: &Device,
        dtype: DType,
        names: TensorNames,
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
        // A matrix, its rows reordered when `rows` is given (see `rotary_head_order`).
        let mut linear = |src: &mut S,
                          name: String,
                          shape: [usize; 2],
                          rows: Option<&[usize]>|
         -> Result<Linear> {
            let name = format!("{name}.weight");
            check(src, &name, &shape)?;
            let l = match rows {
                Some(rows) => src.linear_rows(&name, rows, device, dtype, quantize)?,
                None => src.linear(&name, device, dtype, quantize)?,
            };
            weight_paths.push((name, l.describe()));
            Ok(l)
        };
        let vector = |src: &mut S, name: String, len: usize| -> Result<Tensor> {
            check(src, &name, &[len])?;
            src.dense(&name, device, dtype)
        };
        // Gemma's checkpoints store a norm's weight as `w` for a norm that multiplies by
        // `1 + w`; its GGUF files (and every other family) store the factor itself.
        let norm_offset = if c.switches.norm_weights_offset {
            1.0
        } else {
            0.0
        };
        let norm = |src: &mut S, name: String, len: usize| -> Result<Tensor> {
            Ok(vector(src, name, len)?.affine(1.0, norm_offset)?)
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
        let final_norm = norm(src, names.final_norm().to_string(), hidden)?;

        // The row order of q, k and v when partial rotation reorders each head, as indices
        // into the stored rows: q's heads, then k's, then v's (never reordered).
        let head_order = match c.rope_style {
            RopeStyle::Half => rotary_head_order(c.head_dim, c.rotary_dim()),
            // Interleaved pairs `(2i, 2i + 1)` already put the rotated pairs first.
            RopeStyle::Interleaved => None,
        };
        let heads_rows = |heads: usize, offset: usize| -> Option<Vec<usize>> {
            let order = head_order.as_ref()?;
            Some(
                (0..heads)
                    .flat_map(|head| order.iter().map(move |&j| offset + head * c.head_dim + j))
                    .collect(),
            )
        };
        let (q_rows, k_rows) = (heads_rows(c.num_heads, 0), heads_rows(c.num_kv_heads, 0));
        let qkv_rows: Option<Vec<usize>> = match (
            heads_rows(c.num_heads, 0),
            heads_rows(c.num_kv_heads, q_out),
        ) {
            (Some(q), Some(k)) => Some(
                q.into_iter()
                    .chain(k)
                    .chain(q_out + kv_out..q_out + 2 * kv_out)
                    .collect(),
            ),
            _ => None,
        };
        let reorder = |t: Tensor, rows: Option<&[usize]>| -> Result<Tensor> {
            match rows {
                Some(rows) => {
                    let rows: Vec<u32> = rows.iter().map(|&r| r as u32).collect();
                    Ok(t.index_select(&Tensor::new(rows, device)?, 0)?)
                }
                None => Ok(t),
            }
        };
        let qkv_width = q_out + 2 * kv_out;

        let mut layers = Vec::with_capacity(c.num_layers);
        for i in 0..c.num_layers {
            let n = |role| names.layer(i, role);
            let bias = if c.attention_bias {
                let b = if c.switches.fused_qkv {
                    vector(src, format!("{}.bias", n(Role::Qkv)), qkv_width)?
                } else {
                    Tensor::cat(
                        &[
                            vector(src, format!("{}.bias", n(Role::Q)), q_out)?,
                            vector(src, format!("{}.bias", n(Role::K)), kv_out)?,
                            vector(src, format!("{}.bias", n(Role::V)), kv_out)?,
                        ],
                        0,
                    )?
                };
                Some(reorder(b, qkv_rows.as_deref())?)
            } else {
                None
            };
            let qk_norm = if c.switches.qk_norm {
                // The norm weights follow the reordered head.
                let head_norm = |src: &mut S, role| -> Result<Tensor> {
                    let w = norm(src, format!("{}.weight", n(role)), c.head_dim)?;
                    reorder(w, head_order.as_deref())
                };
                Some((head_norm(src, Role::QNorm)?, head_norm(src, Role::KNorm)?))
            } else {
                None
            };
            let qkv = if c.switches.fused_qkv {
                Projections::Stacked(linear(
                    src,
                    n(Role::Qkv),
                    [qkv_width, hidden],
                    qkv_rows.as_deref(),
                )?)
            } else {
                Projections::new(vec![
                    linear(src, n(Role::Q), [q_out, hidden], q_rows.as_deref())?,
                    linear(src, n(Role::K), [kv_out, hidden], k_rows.as_deref())?,
                    linear(src, n(Role::V), [kv_out, hidden], None)?,
                ])?
            };
            let (post_attn_norm, ffn_role, post_ffn_norm) = if c.switches.sandwich_norms {
                (
                    Some(norm(
                        src,
                        format!("{}.weight", n(Role::PostAttnNorm)),
                        hidden,
                    )?),
                    Role::PreFfnNorm,
                    Some(norm(
                        src,
                        format!("{}.weight", n(Role::PostFfnNorm)),
                        hidden,
                    )?),
                )
            } else {
                (None, Role::FfnNorm, None)
            };
            let window = c.layer_window(i).and_then(NonZeroUsize::new);
            layers.push(Layer {
                attn_norm: norm(src, format!("{}.weight", n(Role::AttnNorm)), hidden)?,
                attn: Attention {
                    qkv,
                    o: linear(src, n(Role::O), [hidden, q_out], None)?,
                    bias,
                    qk_norm,
                    window,
                    local_rope: window.is_some()
                        && c.switches
                            .sliding_window
                            .is_some_and(|w| w.rope_theta.is_some()),
                },
                post_attn_norm,
                ffn_norm: norm(src, format!("{}.weight", n(ffn_role)), hidden)?,
                mlp: Mlp {
                    gate_up: if c.switches.fused_gate_up {
                        Projections::Stacked(linear(
                            src,
                            n(Role::GateUp),
                            [2 * inter, hidden],
                            None,
                        )?)
                    } else {
                        Projections::new(vec![
                            linear(src, n(Role::Gate), [inter, hidden], None)?,
                            linear(src, n(Role::Up), [inter, hidden], None)?,
                        ])?
                    },
                    down: linear(src, n(Role::Down), [hidden, inter], None)?,
                },
                post_ffn_norm,
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
        let tables = |theta: f32, scaled: bool| -> Result<RopeTables> {
            let (cos, sin) = config.rope_tables_for(theta, scaled, device)?;
            Ok(RopeTables {
                cos: cos.to_dtype(dtype)?,
                sin: sin.to_dtype(dtype)?,
            })
        };
        let rope = tables(config.rope_theta, true)?;
        let rope_local = match config.switches.sliding_window {
            Some(w) if layers.iter().any(|l| l.attn.local_rope) => {
                Some(tables(w.rope_theta.unwrap_or(config.rope_theta), false)?)
            }
            _ => None,
        };
        Ok(Self {
            attn_scale: config
                .switches
                .attention_scale
                .unwrap_or(1.0 / (config.head_dim as f32).sqrt()),
            embedding_scale: config
                .switches
                .scale_embeddings
                .then(|| (config.hidden_size as f64).sqrt()),
            config,
            device: device.clone(),
            dtype,
            embedding,
            layers,
            final_norm,
            head,
            rope,
            rope_local,
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

impl Model for Decoder {
    fn forward(&self, input: &BatchInputs, kv: &mut PagedKvCache) -> Result<Tensor> {
        Ok(self.forward_outputs(input, kv, false)?.0)
    }

    fn forward_pooled(
        &self,
        input: &BatchInputs,
        kv: &mut PagedKvCache,
    ) -> Result<(Tensor, Tensor)> {
        let (logits, pooled) = self.forward_outputs(input, kv, true)?;
        let pooled = pooled.ok_or_else(|| Error::InvalidBatch("no pooled output".into()))?;
        Ok((logits, pooled))
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

impl Decoder {
    /// The logits, and with `pool` the pooled hidden states.
    fn forward_outputs(
        &self,
        input: &BatchInputs,
        kv: &mut PagedKvCache,
        pool: bool,
    ) -> Result<(Tensor, Option<Tensor>)> {
        if self.device.is_cpu() {
            // Run the whole step on a pool worker, with the other workers kept awake for it.
            // From outside the pool (the engine thread), every parallel op of the step (about
            // ten per layer) would inject its job and sleep on a latch until a worker finished
            // it; on a worker with the others asleep, each op would wake one. Either way,
            // hundreds of thread wake-ups per decode step.
            return candela_kernels::team::with_workers_awake(|| {
                self.forward_on_pool(input, kv, pool)
            });
        }
        self.forward_on_pool(input, kv, pool)
    }

    fn forward_on_pool(
        &self,
        input: &BatchInputs,
        kv: &mut PagedKvCache,
        pool: bool,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let t = self.check_inputs(input, kv)?;
        let c = &self.config;
        let (h, kvh, d) = (c.num_heads, c.num_kv_heads, c.head_dim);
        let eps = c.rms_norm_eps as f32;

        let half = d / 2;
        let select = |tables: &RopeTables| -> Result<(Tensor, Tensor)> {
            Ok((
                tables.cos.index_select(&input.positions, 0)?,
                tables.sin.index_select(&input.positions, 0)?,
            ))
        };
        let global_rope = select(&self.rope)?;
        let local_rope = self.rope_local.as_ref().map(select).transpose()?;
        debug_assert_eq!(global_rope.0.dims(), [t, half]);
        let kv_dtype = kv.dtype();
        let rope_style = match c.rope_style {
            RopeStyle::Interleaved => FusedRope::Interleaved,
            RopeStyle::Half => FusedRope::Half,
        };

        // Each residual add is fused with the norm after it: the attention output's with the
        // layer's MLP norm, the MLP output's with the next layer's attention norm (the final
        // norm after the last layer). On a GPU that halves the launches of the small ops.
        let mut x = self.embedding.index_select(&input.token_ids, 0)?;
        if let Some(scale) = self.embedding_scale {
            x = x.affine(scale, 0.0)?;
        }
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
            if let Some((q_norm, k_norm)) = &a.qk_norm {
                // Per-head RMSNorm of q and k before rope; v passes through.
                let heads = qkv.reshape((t, h + 2 * kvh, d))?;
                let q =
                    candle_nn::ops::rms_norm(&heads.narrow(1, 0, h)?.contiguous()?, q_norm, eps)?;
                let k =
                    candle_nn::ops::rms_norm(&heads.narrow(1, h, kvh)?.contiguous()?, k_norm, eps)?;
                let v = heads.narrow(1, h + kvh, kvh)?;
                qkv = Tensor::cat(&[q, k, v], 1)?.reshape((t, (h + 2 * kvh) * d))?;
            }
            let (cos, sin) = match (&local_rope, a.local_rope) {
                (Some(local), true) => local,
                _ => &global_rope,
            };
            // `[t, h + 2 kvh, d]`: q and k rotated, v copied, in one pass over the row.
            let mut qkv = rope_qkv(&qkv, cos, sin, h, kvh, d, rope_style)?;
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
            // A windowed layer of a hybrid cache keeps its KV in the window pool, through its
            // own slots and block tables.
            let meta = match (&input.attn_window, a.window) {
                (Some(window_meta), Some(_)) => window_meta,
                _ => &input.attn,
            };
            let (key_cache, value_cache) = kv.layer(i);
            write_kv(&k, &v, key_cache, value_cache, &meta.slot_mapping)?;
            let o = paged_attention_windowed(
                &q,
                key_cache,
                value_cache,
                meta,
                self.attn_scale,
                a.window,
            )?;
            let mut attn_out = a.o.forward(&o.reshape((t, h * d))?.to_dtype(x.dtype())?)?;
            if let Some(post) = &layer.post_attn_norm {
                attn_out = candle_nn::ops::rms_norm(&attn_out, post, eps)?;
            }
            let (sum, normed) = add_rms_norm(&x, &attn_out, &layer.ffn_norm, eps)?;

            let m = &layer.mlp;
            let gate_up = m.gate_up.forward(&normed)?;
            let inter = c.intermediate_size;
            let act = match c.switches.activation {
                Activation::Silu => silu_mul(&gate_up, inter)?,
                Activation::GeluTanh => gelu_tanh_mul(&gate_up, inter)?,
            };
            let mut mlp_out = m.down.forward(&act)?;
            if let Some(post) = &layer.post_ffn_norm {
                mlp_out = candle_nn::ops::rms_norm(&mlp_out, post, eps)?;
            }
            let next_norm = self
                .layers
                .get(i + 1)
                .map_or(&self.final_norm, |next| &next.attn_norm);
            (x, hs) = add_rms_norm(&sum, &mlp_out, next_norm, eps)?;
        }
        // `hs` is the final norm of every row now; the head runs only on the sampled rows.
        let pooled = if pool {
            Some(self.pool(&hs, input)?)
        } else {
            None
        };
        if input.sample_rows.dims1()? == 0 {
            // A step of non-final prefill chunks (or of embeddings only) samples nothing.
            let none = Tensor::zeros((0, c.vocab_size), DType::F32, &self.device)?;
            return Ok((none, pooled));
        }
        // Sampled rows are increasing, so all `t` of them means every row in order (a step of
        // decodes only): no gather needed.
        let rows = if input.sample_rows.dims1()? == t {
            hs
        } else {
            hs.index_select(&input.sample_rows, 0)?
        };
        let logits = self.head.forward(&rows)?.to_dtype(DType::F32)?;
        let logits = match c.switches.final_logit_softcap {
            Some(cap) => {
                let cap = f64::from(cap);
                logits.affine(1.0 / cap, 0.0)?.tanh()?.affine(cap, 0.0)?
            }
            None => logits,
        };
        Ok((logits, pooled))
    }

    /// `[num_pools, hidden]` f32: row `p` sums the rows of `hs` that `input` assigns to pool `p`.
    fn pool(&self, hs: &Tensor, input: &BatchInputs) -> Result<Tensor> {
        let hidden = self.config.hidden_size;
        let rows = input.pool_rows.dims1()?;
        if input.num_pools == 0 {
            return Ok(Tensor::zeros((0, hidden), DType::F32, &self.device)?);
        }
        let selected = hs.index_select(&input.pool_rows, 0)?.to_dtype(DType::F32)?;
        if rows == input.num_pools {
            // One row per pool (last-token pooling), in pool order: nothing to add up.
            return Ok(selected);
        }
        let sums = Tensor::zeros((input.num_pools, hidden), DType::F32, &self.device)?;
        Ok(sums.index_add(&input.pool_index, &selected, 0)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotary_head_order_matches_the_diagram() {
        assert_eq!(rotary_head_order(8, 8), None);
        assert_eq!(rotary_head_order(8, 4), Some(vec![0, 1, 4, 5, 2, 3, 6, 7]));
        let order = rotary_head_order(16, 12).expect("partial");
        let mut sorted = order.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..16).collect::<Vec<_>>(), "a permutation");
    }

    /// The kernel's whole-head half-split rope on the reordered head equals transformers'
    /// partial rope (`rotate_half` on the first `r` dimensions, the rest passed) on the stored
    /// head, reordered.
    #[test]
    fn reordered_heads_get_transformers_partial_rope() -> Result<()> {
        let (d, r) = (16usize, 12usize);
        let order = rotary_head_order(d, r).expect("partial");
        let x: Vec<f32> = (0..d).map(|i| ((i * 37 % 11) as f32 - 5.0) / 3.0).collect();
        let angles: Vec<f64> = (0..r / 2).map(|i| 0.7 + i as f64 * 0.9).collect();
        // transformers, on the stored head.
        let mut want = x.clone();
        for (j, a) in angles.iter().enumerate() {
            let (x0, x1) = (x[j] as f64, x[j + r / 2] as f64);
            want[j] = (x0 * a.cos() - x1 * a.sin()) as f32;
            want[j + r / 2] = (x1 * a.cos() + x0 * a.sin()) as f32;
        }
        // The kernel, on the reordered head (q and k alike; v copied).
        let dev = Device::Cpu;
        let reordered: Vec<f32> = order.iter().map(|&j| x[j]).collect();
        let row: Vec<f32> = reordered.iter().cycle().take(3 * d).copied().collect();
        let qkv = Tensor::from_vec(row, (1, 3 * d), &dev)?;
        let mut cos: Vec<f32> = angles.iter().map(|a| a.cos() as f32).collect();
        let mut sin: Vec<f32> = angles.iter().map(|a| a.sin() as f32).collect();
        cos.resize(d / 2, 1.0);
        sin.resize(d / 2, 0.0);
        let cos = Tensor::from_vec(cos, (1, d / 2), &dev)?;
        let sin = Tensor::from_vec(sin, (1, d / 2), &dev)?;
        let out = rope_qkv(&qkv, &cos, &sin, 1, 1, d, FusedRope::Half)?.to_vec3::<f32>()?;
        let want_reordered: Vec<f32> = order.iter().map(|&j| want[j]).collect();
        // q and k.
        for head in &out[0][..2] {
            for (a, b) in head.iter().zip(&want_reordered) {
                assert!((a - b).abs() < 1e-5, "{head:?} vs {want_reordered:?}");
            }
        }
        assert_eq!(out[0][2], reordered, "v is copied");
        Ok(())
    }
}

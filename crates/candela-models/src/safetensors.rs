//! Hugging Face checkpoints: a directory with `config.json` and `*.safetensors` (f32/f16/bf16).
//!
//! The safetensors files are memory-mapped; each tensor is copied out (and converted to
//! the activation dtype) as the model is built, so the maps can be dropped after loading.

use std::path::{Path, PathBuf};

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};
use serde::Deserialize;

use crate::config::{invalid, FamilySwitches, ModelConfig, RopeScaling, RopeStyle};
use crate::error::{Error, Result};
use crate::families;
use crate::linear::{Linear, Quantize};
use crate::model::WeightSource;

/// The fields of `config.json` we read. Everything else is ignored.
#[derive(Deserialize)]
struct HfConfig {
    #[serde(default)]
    model_type: Option<String>,
    #[serde(default)]
    architectures: Vec<String>,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    #[serde(default)]
    num_key_value_heads: Option<usize>,
    #[serde(default)]
    head_dim: Option<usize>,
    vocab_size: usize,
    max_position_embeddings: usize,
    #[serde(default)]
    rope_theta: Option<f64>,
    rms_norm_eps: f64,
    #[serde(default)]
    bos_token_id: Option<OneOrMany>,
    #[serde(default)]
    eos_token_id: Option<OneOrMany>,
    #[serde(default)]
    rope_scaling: Option<HfRopeScaling>,
    /// Phi-3 keeps LongRoPE's pre-training length here rather than in `rope_scaling`.
    #[serde(default)]
    original_max_position_embeddings: Option<usize>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(u32),
    Many(Vec<u32>),
}

impl OneOrMany {
    fn into_vec(self) -> Vec<u32> {
        match self {
            Self::One(x) => vec![x],
            Self::Many(v) => v,
        }
    }
}

#[derive(Deserialize)]
struct HfRopeScaling {
    #[serde(default, alias = "type")]
    rope_type: Option<String>,
    #[serde(default)]
    factor: Option<f32>,
    #[serde(default)]
    low_freq_factor: Option<f32>,
    #[serde(default)]
    high_freq_factor: Option<f32>,
    #[serde(default)]
    original_max_position_embeddings: Option<usize>,
    #[serde(default)]
    short_factor: Option<Vec<f32>>,
    #[serde(default)]
    long_factor: Option<Vec<f32>>,
    #[serde(default)]
    attention_factor: Option<f32>,
}

#[derive(Deserialize)]
struct GenerationConfig {
    #[serde(default)]
    eos_token_id: Option<OneOrMany>,
}

/// A checkpoint directory: its configuration and memory-mapped tensors.
pub struct SafetensorsModel {
    dir: PathBuf,
    config: ModelConfig,
    tensors: MmapedSafetensors,
}

impl std::fmt::Debug for SafetensorsModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SafetensorsModel")
            .field("dir", &self.dir)
            .field("config", &self.config)
            .finish()
    }
}

impl SafetensorsModel {
    /// Opens `dir/config.json` and every `dir/*.safetensors`.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref().to_path_buf();
        let config_path = dir.join("config.json");
        let config = read_config(&config_path)?;
        let files = safetensors_files(&dir)?;
        if files.is_empty() {
            return Err(Error::NoWeights {
                dir,
                reason: "config.json without *.safetensors".into(),
            });
        }
        // SAFETY: memory-mapping is unsafe if another process truncates or rewrites the
        // file while it is mapped. Model files are not written while a server loads them,
        // and every tensor is copied out of the map during loading.
        let tensors =
            unsafe { MmapedSafetensors::multi(&files) }.map_err(|e| Error::InvalidConfig {
                path: files[0].clone(),
                reason: format!("cannot read safetensors: {e}"),
            })?;
        Ok(Self {
            dir,
            config,
            tensors,
        })
    }

    /// The checkpoint directory (where `tokenizer.json` and `tokenizer_config.json` live).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The model configuration from `config.json` (and `generation_config.json`).
    pub fn model_config(&self) -> &ModelConfig {
        &self.config
    }

    fn load(&self, name: &str, device: &Device, dtype: DType) -> Result<Tensor> {
        let view = self.tensors.get(name).map_err(|_| Error::MissingTensor {
            name: name.to_string(),
        })?;
        let stored = format!("{:?}", view.dtype());
        let t = self.tensors.load(name, device)?;
        match t.dtype() {
            DType::F32 | DType::F16 | DType::BF16 => Ok(t.to_dtype(dtype)?),
            _ => Err(Error::UnsupportedTensorType {
                name: name.to_string(),
                dtype: stored,
            }),
        }
    }
}

/// `rows` as a u32 index tensor, each checked against the `stored` row count.
fn row_indices(rows: &[usize], stored: usize, name: &str, device: &Device) -> Result<Tensor> {
    let indices = rows
        .iter()
        .map(|&r| u32::try_from(r).ok().filter(|_| r < stored))
        .collect::<Option<Vec<u32>>>()
        .ok_or_else(|| Error::ShapeMismatch {
            name: name.to_string(),
            expected: vec![rows.iter().max().map_or(0, |m| m + 1)],
            got: vec![stored],
        })?;
    Ok(Tensor::new(indices, device)?)
}

/// `*.safetensors` in `dir`, sorted so sharded checkpoints load in a stable order.
fn safetensors_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let io = |source| Error::Io {
        path: dir.to_path_buf(),
        source,
    };
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io)? {
        let path = entry.map_err(io)?.path();
        if path.extension().is_some_and(|e| e == "safetensors") {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

fn read_config(path: &Path) -> Result<ModelConfig> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let invalid_config = |e: serde_json::Error| Error::InvalidConfig {
        path: path.to_path_buf(),
        reason: e.to_string(),
    };
    let json: serde_json::Value = serde_json::from_str(&text).map_err(invalid_config)?;
    let hf: HfConfig = serde_json::from_value(json.clone()).map_err(invalid_config)?;
    let model_type = hf
        .model_type
        .clone()
        .or_else(|| hf.architectures.first().cloned())
        .ok_or_else(|| Error::MissingMetadata {
            key: "model_type".into(),
        })?;
    let family = families::by_hf_name(&model_type)?;
    if hf.num_attention_heads == 0 {
        return Err(invalid("num_attention_heads", "is zero"));
    }
    let rope_scaling = match hf.rope_scaling {
        None => None,
        Some(rs) => rope_scaling(rs, hf.original_max_position_embeddings)?,
    };
    let mut eos_token_ids = hf.eos_token_id.map(OneOrMany::into_vec).unwrap_or_default();
    let gen_path = path.with_file_name("generation_config.json");
    if let Ok(text) = std::fs::read_to_string(&gen_path) {
        let gen: GenerationConfig =
            serde_json::from_str(&text).map_err(|e| Error::InvalidConfig {
                path: gen_path.clone(),
                reason: e.to_string(),
            })?;
        for id in gen
            .eos_token_id
            .map(OneOrMany::into_vec)
            .unwrap_or_default()
        {
            if !eos_token_ids.contains(&id) {
                eos_token_ids.push(id);
            }
        }
    }
    let mut config = ModelConfig {
        architecture: family.architecture,
        num_layers: hf.num_hidden_layers,
        num_heads: hf.num_attention_heads,
        num_kv_heads: hf.num_key_value_heads.unwrap_or(hf.num_attention_heads),
        head_dim: hf
            .head_dim
            .unwrap_or(hf.hidden_size / hf.num_attention_heads),
        hidden_size: hf.hidden_size,
        intermediate_size: hf.intermediate_size,
        vocab_size: hf.vocab_size,
        max_position: hf.max_position_embeddings,
        rope_theta: hf.rope_theta.unwrap_or(10_000.0) as f32,
        rope_style: RopeStyle::Half,
        rope_scaling,
        rms_norm_eps: hf.rms_norm_eps,
        attention_bias: families::hf_field(&json, "attention_bias")
            .and_then(serde_json::Value::as_bool)
            .unwrap_or(false),
        switches: FamilySwitches::default(),
        bos_token_id: hf.bos_token_id.and_then(|b| b.into_vec().first().copied()),
        eos_token_ids,
    };
    (family.from_hf)(&json, &mut config)?;
    config.validate()?;
    Ok(config)
}

/// `rope_scaling` of config.json; `original_max_position` is the top-level
/// `original_max_position_embeddings` (where Phi-3 keeps it).
fn rope_scaling(
    rs: HfRopeScaling,
    original_max_position: Option<usize>,
) -> Result<Option<RopeScaling>> {
    let kind = rs.rope_type.as_deref().unwrap_or("default");
    let factor = || {
        rs.factor
            .filter(|f| *f > 0.0)
            .ok_or_else(|| invalid("rope_scaling.factor", "needs a positive factor"))
    };
    match kind {
        "default" => Ok(None),
        "linear" => Ok(Some(RopeScaling::Linear { factor: factor()? })),
        "llama3" => {
            let need = |x: Option<f32>, key: &str| {
                x.ok_or_else(|| Error::MissingMetadata {
                    key: format!("rope_scaling.{key}"),
                })
            };
            let low = need(rs.low_freq_factor, "low_freq_factor")?;
            let high = need(rs.high_freq_factor, "high_freq_factor")?;
            if high <= low {
                return Err(invalid(
                    "rope_scaling.high_freq_factor",
                    "must exceed low_freq_factor",
                ));
            }
            Ok(Some(RopeScaling::Llama3 {
                factor: factor()?,
                low_freq_factor: low,
                high_freq_factor: high,
                original_max_position: rs.original_max_position_embeddings.ok_or_else(|| {
                    Error::MissingMetadata {
                        key: "rope_scaling.original_max_position_embeddings".into(),
                    }
                })?,
            }))
        }
        // "su" is the name of LongRoPE in the first Phi-3 128k configs; transformers reads it
        // as "longrope".
        "longrope" | "su" => {
            let need = |x: Option<Vec<f32>>, key: &str| {
                x.ok_or_else(|| Error::MissingMetadata {
                    key: format!("rope_scaling.{key}"),
                })
            };
            Ok(Some(RopeScaling::LongRope {
                short_factors: need(rs.short_factor, "short_factor")?,
                long_factors: need(rs.long_factor, "long_factor")?,
                // transformers reads the top-level field first, as Phi-3 writes it.
                original_max_position: original_max_position
                    .or(rs.original_max_position_embeddings)
                    .ok_or_else(|| Error::MissingMetadata {
                        key: "original_max_position_embeddings".into(),
                    })?,
                attention_factor: rs.attention_factor,
            }))
        }
        other => Err(Error::UnsupportedFeature(format!(
            "rope scaling type `{other}`"
        ))),
    }
}

impl WeightSource for SafetensorsModel {
    fn contains(&self, name: &str) -> bool {
        self.tensors.get(name).is_ok()
    }

    fn dims(&self, name: &str) -> Result<Vec<usize>> {
        self.tensors
            .get(name)
            .map(|v| v.shape().to_vec())
            .map_err(|_| Error::MissingTensor {
                name: name.to_string(),
            })
    }

    fn linear(
        &mut self,
        name: &str,
        device: &Device,
        dtype: DType,
        quantize: Option<Quantize>,
    ) -> Result<Linear> {
        Linear::from_float(self.load(name, device, dtype)?, dtype, quantize)
    }

    fn linear_rows(
        &mut self,
        name: &str,
        rows: &[usize],
        device: &Device,
        dtype: DType,
        quantize: Option<Quantize>,
    ) -> Result<Linear> {
        let w = self.load(name, device, dtype)?;
        let rows = row_indices(rows, w.dims().first().copied().unwrap_or(0), name, device)?;
        Linear::from_float(w.index_select(&rows, 0)?, dtype, quantize)
    }

    fn dense(&mut self, name: &str, device: &Device, dtype: DType) -> Result<Tensor> {
        self.load(name, device, dtype)
    }

    fn embedding_and_tied_head(
        &mut self,
        name: &str,
        device: &Device,
        dtype: DType,
    ) -> Result<(Tensor, Linear)> {
        let table = self.load(name, device, dtype)?;
        Ok((table.clone(), Linear::Dense(table)))
    }
}

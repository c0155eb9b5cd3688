//! The model interface the engine drives, and the loader that picks files and family.
//!
//! **API Boundary:** the engine sees only [`Model`] (one `forward` per step for the whole
//! batch), [`ModelConfig`] (to size the KV cache) and [`LoadedModel`]'s side data (the
//! files and GGUF metadata the tokenizer and chat template are built from).

use std::collections::HashMap;

use candela_kernels::kv_cache::PagedKvCache;
use candle_core::quantized::gguf_file::Value;
use candle_core::{DType, Device, Tensor};

use crate::batch::BatchInputs;
use crate::config::ModelConfig;
use crate::error::Result;
use crate::gguf::GgufFile;
use crate::hub::{self, ModelFiles};
use crate::linear::Linear;
use crate::llama::Llama;
use crate::safetensors::SafetensorsModel;

/// A decoder-only language model over flattened variable-length batches.
pub trait Model: Send {
    /// Runs one step: writes this step's keys/values into `kv` and returns the logits
    /// `[num_sampled, vocab]` (f32) of `input.sample_rows`, in that order.
    fn forward(&self, input: &BatchInputs, kv: &mut PagedKvCache) -> Result<Tensor>;
    /// Shape and hyper-parameters.
    fn config(&self) -> &ModelConfig;
    /// Device the weights live on.
    fn device(&self) -> &Device;
    /// Activation dtype, also the dtype the KV cache must have.
    fn dtype(&self) -> DType;
}

/// A model with what was learnt while loading it.
pub struct LoadedModel {
    /// The model.
    pub model: Box<dyn Model>,
    /// Where it was read from (the directory also holds `tokenizer.json` when present).
    pub files: ModelFiles,
    /// GGUF metadata (tokenizer vocabulary, merges, chat template), for GGUF models.
    pub gguf_metadata: Option<HashMap<String, Value>>,
}

impl std::fmt::Debug for LoadedModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedModel")
            .field("config", self.model.config())
            .field("files", &self.files)
            .finish()
    }
}

impl LoadedModel {
    /// Shape and hyper-parameters of the model.
    pub fn config(&self) -> &ModelConfig {
        self.model.config()
    }
}

/// Loads a model from a path (a `.gguf` file, or a directory with `config.json` and
/// `*.safetensors`) or a Hugging Face model id found in the local hub cache.
pub fn load_model(path_or_id: &str, device: &Device) -> Result<LoadedModel> {
    load_files(hub::resolve(path_or_id)?, device)
}

/// Loads a model from files already located (see [`hub::resolve_with_cache`]).
pub fn load_files(files: ModelFiles, device: &Device) -> Result<LoadedModel> {
    // f32 activations everywhere for now: the CPU kernels require it, and f16/bf16
    // checkpoints are widened once at load.
    let dtype = DType::F32;
    match &files {
        ModelFiles::Gguf { path } => {
            let mut gguf = GgufFile::open(path)?;
            let config = gguf.model_config()?;
            let model = Llama::load(&mut gguf, config, device, dtype, LlamaNames::Gguf)?;
            Ok(LoadedModel {
                model: Box::new(model),
                gguf_metadata: Some(gguf.into_metadata()),
                files,
            })
        }
        ModelFiles::Safetensors { dir } => {
            let mut st = SafetensorsModel::open(dir)?;
            let config = st.model_config().clone();
            let model = Llama::load(&mut st, config, device, dtype, LlamaNames::HuggingFace)?;
            Ok(LoadedModel {
                model: Box::new(model),
                gguf_metadata: None,
                files,
            })
        }
    }
}

/// Tensor naming scheme of a weight source.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum LlamaNames {
    /// llama.cpp's: `blk.N.attn_q.weight`, `token_embd.weight`, ...
    Gguf,
    /// transformers': `model.layers.N.self_attn.q_proj.weight`, ...
    HuggingFace,
}

/// Where the model builder gets its tensors from (a GGUF file, safetensors).
pub(crate) trait WeightSource {
    /// Whether a tensor exists.
    fn contains(&self, name: &str) -> bool;
    /// Stored shape (`[out, in]` for matrices).
    fn dims(&self, name: &str) -> Result<Vec<usize>>;
    /// A matrix as a linear layer, in its fastest stored form.
    fn linear(&mut self, name: &str, device: &Device, dtype: DType) -> Result<Linear>;
    /// A tensor made dense in `dtype` (norm weights, biases).
    fn dense(&mut self, name: &str, device: &Device, dtype: DType) -> Result<Tensor>;
    /// The embedding table (dense, for row lookups) and the same matrix as an LM head.
    fn embedding_and_tied_head(
        &mut self,
        name: &str,
        device: &Device,
        dtype: DType,
    ) -> Result<(Tensor, Linear)>;
}

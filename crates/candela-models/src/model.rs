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
use crate::decoder::Decoder;
use crate::error::Result;
use crate::gguf::GgufFile;
use crate::hub::{self, ModelFiles};
use crate::linear::{Linear, Quantize};
use crate::safetensors::SafetensorsModel;

/// A decoder-only language model over flattened variable-length batches.
pub trait Model: Send {
    /// Runs one step: writes this step's keys/values into `kv` and returns the logits
    /// `[num_sampled, vocab]` (f32) of `input.sample_rows`, in that order.
    fn forward(&self, input: &BatchInputs, kv: &mut PagedKvCache) -> Result<Tensor>;
    /// [`Self::forward`] that also returns the pooled final hidden states (embeddings):
    /// `(logits, pooled)`, `pooled` being `[input.num_pools, hidden]` f32 whose row `p` is the
    /// sum of the final-norm outputs (what the LM head reads) of the rows of pool `p`.
    fn forward_pooled(
        &self,
        input: &BatchInputs,
        kv: &mut PagedKvCache,
    ) -> Result<(Tensor, Tensor)>;
    /// Shape and hyper-parameters.
    fn config(&self) -> &ModelConfig;
    /// Device the weights live on.
    fn device(&self) -> &Device;
    /// Activation dtype, also the dtype the KV cache must have.
    fn dtype(&self) -> DType;
    /// `(tensor, storage and matmul)` of every weight matrix, as printed at load.
    fn weight_paths(&self) -> &[(String, String)];
}

/// Choices made while loading, beyond what the files say.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LoadOptions {
    /// `--quantize`: pack float linear weights into int8/int4.
    pub quantize: Option<Quantize>,
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

/// [`load_model`] with options (`--quantize`).
pub fn load_model_with(
    path_or_id: &str,
    device: &Device,
    options: &LoadOptions,
) -> Result<LoadedModel> {
    load_files_with(hub::resolve(path_or_id)?, device, options)
}

/// Loads a model from files already located (see [`hub::resolve_with_cache`]).
pub fn load_files(files: ModelFiles, device: &Device) -> Result<LoadedModel> {
    load_files_with(files, device, &LoadOptions::default())
}

/// [`load_files`] with options. Logs which storage and matmul every weight matrix got: a
/// summary at `info` (counted by kind) and each tensor at `debug`.
pub fn load_files_with(
    files: ModelFiles,
    device: &Device,
    options: &LoadOptions,
) -> Result<LoadedModel> {
    let loaded = load_files_inner(files, device, options.quantize)?;
    let paths = loaded.model.weight_paths();
    report_weight_paths(paths);
    if let Some(q) = options.quantize {
        if !paths.iter().any(|(_, p)| p.contains("--quantize")) {
            tracing::warn!(
                "--quantize {:?} applies to float weights; this model has none, so its weights \
                 keep their stored types",
                q.bits
            );
        }
    }
    Ok(loaded)
}

fn report_weight_paths(paths: &[(String, String)]) {
    let mut kinds: Vec<(&str, usize, &str)> = Vec::new();
    for (name, path) in paths {
        tracing::debug!(tensor = %name, "{path}");
        match kinds.iter_mut().find(|(p, _, _)| *p == path.as_str()) {
            Some((_, count, _)) => *count += 1,
            None => kinds.push((path, 1, name)),
        }
    }
    for (path, count, first) in kinds {
        tracing::info!("weights: {count} x {path} (first: {first})");
    }
}

fn load_files_inner(
    files: ModelFiles,
    device: &Device,
    quantize: Option<Quantize>,
) -> Result<LoadedModel> {
    // f32 activations everywhere for now: the CPU kernels require it, and f16/bf16
    // checkpoints are widened once at load.
    let dtype = DType::F32;
    match &files {
        ModelFiles::Gguf { path } => {
            let mut gguf = GgufFile::open(path)?;
            let config = gguf.model_config()?;
            let model = Decoder::load(
                &mut gguf,
                config,
                device,
                dtype,
                TensorNames::Gguf,
                quantize,
            )?;
            Ok(LoadedModel {
                model: Box::new(model),
                gguf_metadata: Some(gguf.into_metadata()),
                files,
            })
        }
        ModelFiles::Safetensors { dir } => {
            let mut st = SafetensorsModel::open(dir)?;
            let config = st.model_config().clone();
            let names = TensorNames::HuggingFace;
            let model = Decoder::load(&mut st, config, device, dtype, names, quantize)?;
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
pub(crate) enum TensorNames {
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
    /// A matrix as a linear layer, in its fastest stored form; float weights are packed
    /// when `quantize` asks for it.
    fn linear(
        &mut self,
        name: &str,
        device: &Device,
        dtype: DType,
        quantize: Option<Quantize>,
    ) -> Result<Linear>;
    /// [`Self::linear`] of a matrix's rows in another order: row `i` of the result is stored
    /// row `rows[i]`. Each index is below the stored row count (the decoder builds them from
    /// the shape it has checked).
    fn linear_rows(
        &mut self,
        name: &str,
        rows: &[usize],
        device: &Device,
        dtype: DType,
        quantize: Option<Quantize>,
    ) -> Result<Linear>;
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

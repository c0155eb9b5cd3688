//! GGUF files: metadata, model configuration and tensors, through candle's `gguf_file`.
//!
//! The header is parsed once; every tensor's extent is then checked against the file
//! size so a truncated download fails at open with [`Error::Truncated`] instead of
//! halfway through loading. Tensors are read on demand (each one seek + read).

use std::collections::HashMap;
use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};

use candle_core::quantized::ggml_file::qtensor_from_ggml;
use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};

use crate::config::{invalid, FamilySwitches, ModelConfig, RopeScaling, RopeStyle};
use crate::error::{Error, Result};
use crate::families;
use crate::linear::{Linear, Quantize};
use crate::model::WeightSource;

/// An open GGUF file.
pub struct GgufFile {
    path: PathBuf,
    content: Content,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("tensors", &self.content.tensor_infos.len())
            .field("metadata_keys", &self.content.metadata.len())
            .finish()
    }
}

impl GgufFile {
    /// Opens `path`, parses the header and checks that every tensor lies inside the file.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let io = |source| Error::Io {
            path: path.clone(),
            source,
        };
        let file = File::open(&path).map_err(io)?;
        let file_bytes = file.metadata().map_err(io)?.len();
        let mut reader = BufReader::new(file);
        let content = Content::read(&mut reader).map_err(|e| Error::InvalidGguf {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        for (name, info) in &content.tensor_infos {
            let dtype = info.ggml_dtype;
            let elems = info.shape.elem_count() as u64;
            let block = dtype.block_size() as u64;
            if !elems.is_multiple_of(block) {
                return Err(Error::InvalidGguf {
                    path,
                    reason: format!(
                        "tensor `{name}` has {elems} elements, not a multiple of its {dtype:?} block of {block}"
                    ),
                });
            }
            let bytes = elems / block * dtype.type_size() as u64;
            let needed_bytes = content
                .tensor_data_offset
                .saturating_add(info.offset)
                .saturating_add(bytes);
            if needed_bytes > file_bytes {
                return Err(Error::Truncated {
                    path,
                    tensor: name.clone(),
                    needed_bytes,
                    file_bytes,
                });
            }
        }
        Ok(Self { path, content })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// All metadata key/values (architecture, hyper-parameters, tokenizer, chat template).
    pub fn metadata(&self) -> &HashMap<String, Value> {
        &self.content.metadata
    }

    /// The parsed header (what the tokenizer is built from).
    pub(crate) fn content(&self) -> &Content {
        &self.content
    }

    /// Gives up the file, keeping its metadata (for the tokenizer and chat template).
    pub fn into_metadata(self) -> HashMap<String, Value> {
        self.content.metadata
    }

    /// Names of all tensors.
    pub fn tensor_names(&self) -> impl Iterator<Item = &str> {
        self.content.tensor_infos.keys().map(String::as_str)
    }

    /// `general.architecture`.
    pub fn architecture(&self) -> Result<&str> {
        self.str("general.architecture")
    }

    fn get(&self, key: &str) -> Result<&Value> {
        self.content
            .metadata
            .get(key)
            .ok_or_else(|| Error::MissingMetadata {
                key: key.to_string(),
            })
    }

    pub(crate) fn str(&self, key: &str) -> Result<&str> {
        match self.get(key)? {
            Value::String(s) => Ok(s),
            v => Err(invalid(key, format!("expected a string, got {v:?}"))),
        }
    }

    pub(crate) fn uint(&self, key: &str) -> Result<usize> {
        let v = self.get(key)?;
        value_as_u64(v)
            .and_then(|x| usize::try_from(x).ok())
            .ok_or_else(|| invalid(key, format!("expected a non-negative integer, got {v:?}")))
    }

    pub(crate) fn uint_opt(&self, key: &str) -> Result<Option<usize>> {
        match self.content.metadata.get(key) {
            None => Ok(None),
            Some(_) => self.uint(key).map(Some),
        }
    }

    pub(crate) fn float_opt(&self, key: &str) -> Result<Option<f64>> {
        match self.content.metadata.get(key) {
            None => Ok(None),
            Some(Value::F32(x)) => Ok(Some(*x as f64)),
            Some(Value::F64(x)) => Ok(Some(*x)),
            Some(v) => Err(invalid(key, format!("expected a float, got {v:?}"))),
        }
    }

    /// Reads the model configuration from the metadata (and the shapes of a few tensors).
    pub fn model_config(&self) -> Result<ModelConfig> {
        let arch_name = self.architecture()?.to_string();
        let family = families::by_gguf_name(&arch_name)?;
        let a = arch_name.as_str();
        let hidden_size = self.uint(&format!("{a}.embedding_length"))?;
        let num_heads = self.uint(&format!("{a}.attention.head_count"))?;
        let num_kv_heads = self
            .uint_opt(&format!("{a}.attention.head_count_kv"))?
            .unwrap_or(num_heads);
        if num_heads == 0 {
            return Err(invalid(&format!("{a}.attention.head_count"), "is zero"));
        }
        let head_dim = self
            .uint_opt(&format!("{a}.attention.key_length"))?
            .unwrap_or(hidden_size / num_heads);
        // Fewer rotated dimensions than the head has: partial rotation (Phi-3.5, Phi-4-mini).
        let rotary_dim = self
            .uint_opt(&format!("{a}.rope.dimension_count"))?
            .filter(|&rope_dim| rope_dim != head_dim);
        let vocab_size = match self.uint_opt(&format!("{a}.vocab_size"))? {
            Some(v) => v,
            None => self.tensor_dims("token_embd.weight")?[0],
        };
        let rope_theta = self
            .float_opt(&format!("{a}.rope.freq_base"))?
            .unwrap_or(10_000.0) as f32;
        let rms_norm_eps = self
            .float_opt(&format!("{a}.attention.layer_norm_rms_epsilon"))?
            .ok_or_else(|| Error::MissingMetadata {
                key: format!("{a}.attention.layer_norm_rms_epsilon"),
            })?;
        let rope_scaling = self.rope_scaling(a)?;
        let eos = self.uint_opt("tokenizer.ggml.eos_token_id")?;
        let eot = self.uint_opt("tokenizer.ggml.eot_token_id")?;
        let mut eos_token_ids = Vec::new();
        for id in [eos, eot].into_iter().flatten() {
            let id = u32::try_from(id)
                .map_err(|_| invalid("tokenizer.ggml.eos_token_id", "too large"))?;
            if !eos_token_ids.contains(&id) {
                eos_token_ids.push(id);
            }
        }
        let bos_token_id = self
            .uint_opt("tokenizer.ggml.bos_token_id")?
            .map(|id| {
                u32::try_from(id).map_err(|_| invalid("tokenizer.ggml.bos_token_id", "too large"))
            })
            .transpose()?;
        let mut config = ModelConfig {
            architecture: family.architecture,
            num_layers: self.uint(&format!("{a}.block_count"))?,
            num_heads,
            num_kv_heads,
            head_dim,
            hidden_size,
            intermediate_size: self.uint(&format!("{a}.feed_forward_length"))?,
            vocab_size,
            max_position: self.uint(&format!("{a}.context_length"))?,
            rope_theta,
            rope_style: RopeStyle::Half,
            rope_scaling,
            rms_norm_eps,
            attention_bias: false,
            switches: FamilySwitches {
                rotary_dim,
                ..FamilySwitches::default()
            },
            bos_token_id,
            eos_token_ids,
        };
        (family.from_gguf)(self, a, &mut config)?;
        config.validate()?;
        Ok(config)
    }

    fn rope_scaling(&self, a: &str) -> Result<Option<RopeScaling>> {
        // llama.cpp stores Llama 3.1's scaling as precomputed per-frequency divisors.
        if self.content.tensor_infos.contains_key("rope_freqs.weight") {
            let factors = self.vector_f32("rope_freqs.weight")?;
            return Ok(Some(RopeScaling::FreqFactors(factors)));
        }
        // llama.cpp's Phi-3 converter stores LongRoPE's two sets of divisors as tensors, with
        // the pre-training length and the attention factor in the metadata.
        let (long, short) = ("rope_factors_long.weight", "rope_factors_short.weight");
        let infos = &self.content.tensor_infos;
        if infos.contains_key(long) || infos.contains_key(short) {
            let original_key = format!("{a}.rope.scaling.original_context_length");
            return Ok(Some(RopeScaling::LongRope {
                short_factors: self.vector_f32(short)?,
                long_factors: self.vector_f32(long)?,
                original_max_position: self
                    .uint_opt(&original_key)?
                    .ok_or(Error::MissingMetadata { key: original_key })?,
                attention_factor: self
                    .float_opt(&format!("{a}.rope.scaling.attn_factor"))?
                    .map(|f| f as f32),
            }));
        }
        let key = format!("{a}.rope.scaling.type");
        let kind = match self.content.metadata.get(&key) {
            None => return Ok(None),
            Some(Value::String(s)) => s.as_str(),
            Some(v) => return Err(invalid(&key, format!("expected a string, got {v:?}"))),
        };
        let factor = self.float_opt(&format!("{a}.rope.scaling.factor"))?;
        match (kind, factor) {
            ("none", _) => Ok(None),
            ("linear", Some(f)) if f > 0.0 => Ok(Some(RopeScaling::Linear { factor: f as f32 })),
            ("linear", _) => Err(invalid(
                &format!("{a}.rope.scaling.factor"),
                "linear rope scaling needs a positive factor",
            )),
            (other, _) => Err(Error::UnsupportedFeature(format!(
                "rope scaling type `{other}`"
            ))),
        }
    }

    /// A small tensor's values as f32 (rope factors).
    fn vector_f32(&self, name: &str) -> Result<Vec<f32>> {
        let t = self.read_qtensor(name, &Device::Cpu)?;
        Ok(t.dequantize(&Device::Cpu)?
            .flatten_all()?
            .to_vec1::<f32>()?)
    }

    /// Shape of a tensor (`[rows, cols]` for a matrix: out features first).
    pub fn tensor_dims(&self, name: &str) -> Result<Vec<usize>> {
        self.content
            .tensor_infos
            .get(name)
            .map(|i| i.shape.dims().to_vec())
            .ok_or_else(|| Error::MissingTensor {
                name: name.to_string(),
            })
    }

    /// Reads one tensor in its stored GGML type.
    pub fn read_qtensor(&self, name: &str, device: &Device) -> Result<QTensor> {
        let info = self
            .content
            .tensor_infos
            .get(name)
            .ok_or_else(|| Error::MissingTensor {
                name: name.to_string(),
            })?;
        // A fresh handle (with its own offset) per read keeps `&self` reads independent;
        // opening is cheap next to reading megabytes of weights.
        let file = File::open(&self.path).map_err(|source| Error::Io {
            path: self.path.clone(),
            source,
        })?;
        let mut reader = BufReader::new(file);
        Ok(info.read(&mut reader, self.content.tensor_data_offset, device)?)
    }
}

fn value_as_u64(v: &Value) -> Option<u64> {
    match *v {
        Value::U8(x) => Some(x as u64),
        Value::U16(x) => Some(x as u64),
        Value::U32(x) => Some(x as u64),
        Value::U64(x) => Some(x),
        Value::I8(x) => u64::try_from(x).ok(),
        Value::I16(x) => u64::try_from(x).ok(),
        Value::I32(x) => u64::try_from(x).ok(),
        Value::I64(x) => u64::try_from(x).ok(),
        _ => None,
    }
}

/// A weight read on the CPU, as the linear layer that runs it best on `device`.
fn linear_of(
    q: QTensor,
    device: &Device,
    dtype: DType,
    quantize: Option<Quantize>,
) -> Result<Linear> {
    // `--quantize` is for float tensors; GGML-quantized ones keep their own (lossless) form.
    if quantize.is_some() && matches!(q.dtype(), GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16)
    {
        let w = q.dequantize(&Device::Cpu)?.to_device(device)?;
        return Linear::from_float(w, dtype, quantize);
    }
    if device.is_cuda() {
        return Linear::for_cuda(q, device);
    }
    if device.is_cpu() {
        return Linear::from_qtensor(q);
    }
    let (n, k) = q.shape().dims2()?;
    Linear::from_qtensor(qtensor_from_ggml(
        q.dtype(),
        &q.data()?,
        vec![n, k],
        device,
    )?)
}

/// Rows `rows` of a 2-D GGML tensor, in that order. GGML blocks run along a row, so a row is a
/// whole number of blocks and rows are moved as bytes, without dequantizing.
fn select_rows(q: &QTensor, rows: &[usize], name: &str) -> Result<QTensor> {
    let (n, k) = q.shape().dims2()?;
    let dtype = q.dtype();
    if !k.is_multiple_of(dtype.block_size()) {
        return Err(Error::UnsupportedTensorType {
            name: name.to_string(),
            dtype: format!("{dtype:?} with rows of {k}, not whole blocks"),
        });
    }
    let row_bytes = k / dtype.block_size() * dtype.type_size();
    let data = q.data()?;
    let mut bytes = Vec::with_capacity(rows.len() * row_bytes);
    for &r in rows {
        if r >= n {
            return Err(Error::ShapeMismatch {
                name: name.to_string(),
                expected: vec![r + 1, k],
                got: vec![n, k],
            });
        }
        bytes.extend_from_slice(&data[r * row_bytes..(r + 1) * row_bytes]);
    }
    Ok(qtensor_from_ggml(
        dtype,
        &bytes,
        vec![rows.len(), k],
        &Device::Cpu,
    )?)
}

impl WeightSource for GgufFile {
    fn contains(&self, name: &str) -> bool {
        self.content.tensor_infos.contains_key(name)
    }

    fn dims(&self, name: &str) -> Result<Vec<usize>> {
        self.tensor_dims(name)
    }

    fn linear(
        &mut self,
        name: &str,
        device: &Device,
        dtype: DType,
        quantize: Option<Quantize>,
    ) -> Result<Linear> {
        // Only a plain CPU load reads the tensor where it runs; the rest go through the CPU.
        if quantize.is_some() || device.is_cuda() {
            return linear_of(
                self.read_qtensor(name, &Device::Cpu)?,
                device,
                dtype,
                quantize,
            );
        }
        Linear::from_qtensor(self.read_qtensor(name, device)?)
    }

    fn linear_rows(
        &mut self,
        name: &str,
        rows: &[usize],
        device: &Device,
        dtype: DType,
        quantize: Option<Quantize>,
    ) -> Result<Linear> {
        let q = select_rows(&self.read_qtensor(name, &Device::Cpu)?, rows, name)?;
        linear_of(q, device, dtype, quantize)
    }

    fn dense(&mut self, name: &str, device: &Device, dtype: DType) -> Result<Tensor> {
        let t = self.read_qtensor(name, device)?.dequantize(device)?;
        Ok(t.to_dtype(dtype)?)
    }

    fn embedding_and_tied_head(
        &mut self,
        name: &str,
        device: &Device,
        dtype: DType,
    ) -> Result<(Tensor, Linear)> {
        let q = self.read_qtensor(name, device)?;
        let table = q.dequantize(device)?.to_dtype(dtype)?;
        // The tied head keeps the stored type (Q8_0 for SmolLM2): a quarter of f32's bytes
        // to stream per step.
        if device.is_cuda() {
            let head = Linear::for_cuda(self.read_qtensor(name, &Device::Cpu)?, device)?;
            return Ok((table, head));
        }
        Ok((table, Linear::from_qtensor(q)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Rows move as whole blocks: selecting rows of a quantized tensor equals selecting the
    /// rows of its dequantized form, bit for bit.
    #[test]
    fn select_rows_moves_quantized_rows_whole() -> Result<()> {
        let dev = Device::Cpu;
        let values: Vec<f32> = (0..4 * 64)
            .map(|i| ((i * 29 % 23) as f32 - 11.0) / 7.0)
            .collect();
        let w = Tensor::from_vec(values, (4, 64), &dev)?;
        for dtype in [GgmlDType::Q8_0, GgmlDType::Q4_1, GgmlDType::F16] {
            let q = QTensor::quantize(&w, dtype)?;
            let picked = select_rows(&q, &[2, 0, 3], "w")?;
            assert_eq!(picked.shape().dims(), &[3, 64]);
            let got = picked.dequantize(&dev)?.to_vec2::<f32>()?;
            let all = q.dequantize(&dev)?.to_vec2::<f32>()?;
            assert_eq!(got, vec![all[2].clone(), all[0].clone(), all[3].clone()]);
        }
        let q = QTensor::quantize(&w, GgmlDType::Q8_0)?;
        assert!(matches!(
            select_rows(&q, &[4], "w"),
            Err(Error::ShapeMismatch { .. })
        ));
        Ok(())
    }
}

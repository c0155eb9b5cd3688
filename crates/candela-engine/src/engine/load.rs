//! Loading the engine: the model, the KV cache layout and the scheduler, and the warm-up
//! forwards that run before the engine says ready.

use super::step::{copy_logits_to_host, logits_to_host};
use super::*;

/// Tokens of the warm-up sequence of a GPU's KV sizing probe: enough to run every kernel of a
/// prefill.
#[cfg(feature = "cuda")]
pub(super) const WARMUP_TOKENS: usize = 8;
/// Most tokens of the warm-up prefill chunk (more adds start-up time, not warmth).
pub(super) const WARMUP_PREFILL_TOKENS: usize = 256;
/// Most sequences of the warm-up decode step.
pub(super) const WARMUP_DECODE_SEQS: usize = 16;

impl EngineCore {
    pub(super) fn load(
        config: &EngineConfig,
        shared: Arc<SharedState>,
    ) -> Result<Self, EngineError> {
        let device = match config.device {
            EngineDevice::Cpu => Device::Cpu,
            EngineDevice::Cuda(ordinal) => open_cuda(ordinal)
                .map_err(|e| EngineError::Load(format!("CUDA device {ordinal}: {e}")))?,
        };
        let files = candela_models::hub::resolve(&config.model)
            .map_err(|e| EngineError::Load(e.to_string()))?;
        let text = Arc::new(TextTools::load(&files, config.chat_template.as_deref())?);
        let options = candela_models::LoadOptions {
            quantize: config.quantize,
        };
        let loaded = candela_models::load_files_with(files, &device, &options)
            .map_err(|e| EngineError::Load(e.to_string()))?;
        let model_config = loaded.config().clone();
        let model = loaded.model;

        let vocab_size = model_config.vocab_size;
        let model_len_max = match config.model_len_max {
            Some(limit) => limit.min(model_config.max_position),
            None => model_config.max_position,
        };
        let block_size = config.kv_block_size_tokens;
        let kv_dtype = config.kv_cache_dtype.resolve(model.dtype(), &device);
        let kv_cache_memory_bytes = match config.gpu_memory_utilization {
            Some(fraction) if device.is_cuda() => {
                gpu_kv_cache_bytes(&*model, &device, fraction, block_size, kv_dtype)?
            }
            _ => config.kv_cache_memory_bytes,
        };
        let layout = kv_layout(
            &model_config,
            &KvBudget {
                bytes: kv_cache_memory_bytes,
                block_size,
                dtype: kv_dtype,
                seqs_max: config.seqs_running_max,
                batch_tokens_max: config.batch_tokens_max,
                model_len_max,
                hybrid: config.hybrid_kv_cache,
            },
        )
        .map_err(EngineError::Config)?;
        let num_blocks = layout.num_blocks;
        let to_u32 = |name: &str, value: usize| {
            u32::try_from(value)
                .map_err(|_| EngineError::Config(format!("{name} ({value}) is too large")))
        };
        let scheduler = Scheduler::new(SchedulerConfig {
            max_num_seqs: to_u32("seqs_running_max", config.seqs_running_max)?,
            max_num_batched_tokens: to_u32("batch_tokens_max", config.batch_tokens_max)?,
            block_size: to_u32("kv_block_size_tokens", block_size)?,
            num_blocks: to_u32("KV blocks", num_blocks)?,
            policy: Policy::Priority,
            enable_prefix_caching: config.enable_prefix_caching,
            window: layout.window,
        })
        .map_err(|e| EngineError::Config(e.to_string()))?;
        let kv = PagedKvCache::with_layer_blocks(
            &layout.layer_blocks,
            block_size,
            model_config.num_kv_heads,
            model_config.head_dim,
            kv_dtype,
            &device,
        )
        .map_err(|e| EngineError::Load(format!("allocating the KV cache: {e}")))?;
        tracing::info!(
            model = %config.model,
            kv_cache_memory_bytes,
            num_blocks,
            block_size,
            kv_cache_tokens = num_blocks * block_size,
            window = ?layout.window,
            model_len_max,
            kv_dtype = ?kv_dtype,
            "engine loaded"
        );

        let mut eos_token_ids = text.eos_token_ids();
        for id in &model_config.eos_token_ids {
            if !eos_token_ids.contains(id) {
                eos_token_ids.push(*id);
            }
        }
        let name = config.served_model_name.clone().unwrap_or_else(|| {
            std::path::Path::new(&config.model).file_stem().map_or_else(
                || config.model.clone(),
                |s| s.to_string_lossy().into_owned(),
            )
        });
        shared.metrics.set_info(
            &crate::metrics::CacheConfigLabels {
                block_size,
                num_gpu_blocks: num_blocks,
                cache_dtype: match kv_dtype {
                    DType::F16 => "float16",
                    DType::BF16 => "bfloat16",
                    _ => "float32",
                }
                .to_owned(),
                enable_prefix_caching: config.enable_prefix_caching,
            },
            &name,
        );
        let greedy_on_device = config.greedy_on_device.unwrap_or(true);
        Ok(Self {
            model,
            kv,
            scheduler,
            device,
            block_size,
            info: ModelInfo {
                name,
                model_len_max,
                vocab_size,
                eos_token_ids,
            },
            text,
            shared,
            requests: HashMap::new(),
            seq_owner: HashMap::new(),
            embeddings: Embeddings::default(),
            next_seq_id: 0,
            seed_rng: ChaCha12Rng::seed_from_u64(config.seed),
            shutdown_deadline: None,
            commands_closed: false,
            stats_exported: SchedulerStats::default(),
            scratch: SamplerScratch::default(),
            greedy_on_device,
            rows_on_device: Vec::new(),
            device_tokens: Vec::new(),
            logits_host: Vec::new(),
            step_times: StepTimes::default(),
            block_tables_host: Vec::new(),
            window_tables_host: Vec::new(),
            batch_builder: BatchBuilder::default(),
            step_outputs: Vec::new(),
            speculative: config.speculative,
            drafts: Vec::new(),
            #[cfg(feature = "fault-injection")]
            faults: crate::fault::FaultCounter::new(config.fault),
        })
    }

    /// Real forwards at the shapes the loop will run, before the engine says ready, so the first
    /// requests do not pay for lazy initialisation (thread pools and their stacks, kernel
    /// compilation on a GPU, scratch buffers, allocator growth, first touches of cache pages):
    /// a prefill chunk (up to `batch_tokens_max`, at most 256 tokens) and a decode step of up
    /// to 16 sequences, each followed by both ways of bringing logits to the host. They write
    /// blocks of the cache that hold no sequence yet (every block is free before the loop
    /// starts) and allocate nothing in the scheduler, so nothing is left to free. Logs how long
    /// it took.
    pub(super) fn warm_up(&mut self) -> Result<(), EngineError> {
        assert_eq!(self.scheduler.block_manager().num_used(), 0);
        let started = Instant::now();
        let stats = self.scheduler.stats();
        // Blocks every pool has (the window pool may be the smaller).
        let blocks = match stats.window_blocks_total {
            0 => stats.blocks_total,
            window => window.min(stats.blocks_total),
        } as usize;
        let bs = self.block_size;
        let vocab = self.info.vocab_size;
        let prefill = WARMUP_PREFILL_TOKENS
            .min(self.scheduler.config().max_num_batched_tokens as usize)
            .min(blocks * bs)
            .min(self.info.model_len_max)
            .max(1);
        let decode = WARMUP_DECODE_SEQS
            .min(self.scheduler.config().max_num_seqs as usize)
            .min(blocks)
            .max(1);
        let prefill_ids: Vec<u32> = (0..prefill).map(|i| (i % vocab) as u32).collect();
        let prefill_table: Vec<u32> = (0..prefill.div_ceil(bs) as u32).collect();
        let decode_tables: Vec<[u32; 1]> = (0..decode as u32).map(|b| [b]).collect();
        let decode_ids: Vec<[u32; 1]> = (0..decode).map(|i| [(i % vocab) as u32]).collect();
        let windowed = stats.window_blocks_total > 0;
        fn chunk<'a>(ids: &'a [u32], table: &'a [u32], windowed: bool) -> SeqChunk<'a> {
            SeqChunk {
                token_ids: ids,
                tokens_cached: 0,
                block_table: table,
                // Same ids in the window pool: both pools are empty.
                window_block_table: windowed.then_some(table),
                sample: true,
                extra_logit_rows: 0,
            }
        }
        let steps: [Vec<SeqChunk<'_>>; 2] = [
            vec![chunk(&prefill_ids, &prefill_table, windowed)],
            decode_ids
                .iter()
                .zip(&decode_tables)
                .map(|(ids, table)| chunk(ids, table, windowed))
                .collect(),
        ];
        let warm = |e: &dyn std::fmt::Display| EngineError::Warmup(e.to_string());
        for seqs in &steps {
            let inputs = BatchInputs::from_seqs(seqs, bs, &self.device).map_err(|e| warm(&e))?;
            let logits = self
                .model
                .forward(&inputs, &mut self.kv)
                .map_err(|e| warm(&e))?;
            let dims = logits.dims().to_vec();
            if dims != [seqs.len(), vocab] {
                return Err(EngineError::Warmup(format!(
                    "the model returned logits of shape {dims:?}, expected [{}, {vocab}]",
                    seqs.len()
                )));
            }
            // Both ways to the host, so the first request compiles no kernel.
            if self.greedy_on_device {
                logits_to_host(
                    &logits,
                    &vec![true; seqs.len()],
                    &mut self.device_tokens,
                    &mut self.logits_host,
                )
                .map_err(|e| warm(&e))?;
            }
            copy_logits_to_host(&logits, &mut self.logits_host).map_err(|e| warm(&e))?;
        }
        tracing::info!(
            prefill_tokens = prefill,
            decode_seqs = decode,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "engine warmed up"
        );
        Ok(())
    }
}

/// Opens CUDA device `ordinal` for the engine (see `candela_kernels::cuda::open_device`).
pub(super) fn open_cuda(ordinal: usize) -> candle_core::Result<Device> {
    #[cfg(feature = "cuda")]
    {
        candela_kernels::cuda::open_device(ordinal)
    }
    #[cfg(not(feature = "cuda"))]
    {
        Device::new_cuda(ordinal)
    }
}

/// KV-cache bytes on a CUDA device, as vLLM's `--gpu-memory-utilization`: the engine may use
/// `fraction` of the device's total memory, so the cache gets what is free after the weights
/// loaded and one warm-up forward ran (through a one-block cache, dropped after), less the
/// `1 - fraction` of the total left to other processes and to step activations.
pub(super) fn gpu_kv_cache_bytes(
    model: &dyn Model,
    device: &Device,
    fraction: f64,
    block_size: usize,
    kv_dtype: DType,
) -> Result<u64, EngineError> {
    #[cfg(feature = "cuda")]
    {
        let c = model.config();
        let probe = |e: &dyn std::fmt::Display| EngineError::Warmup(format!("KV sizing: {e}"));
        let mut kv = PagedKvCache::new(
            c.num_layers,
            1,
            block_size,
            c.num_kv_heads,
            c.head_dim,
            kv_dtype,
            device,
        )
        .map_err(|e| probe(&e))?;
        let tokens = WARMUP_TOKENS.min(block_size).min(c.vocab_size);
        let token_ids: Vec<u32> = (0..tokens as u32).collect();
        let chunk = SeqChunk {
            token_ids: &token_ids,
            tokens_cached: 0,
            block_table: &[0],
            window_block_table: None,
            sample: true,
            extra_logit_rows: 0,
        };
        let inputs = BatchInputs::from_seqs(&[chunk], block_size, device).map_err(|e| probe(&e))?;
        let logits = model.forward(&inputs, &mut kv).map_err(|e| probe(&e))?;
        drop((logits, inputs, kv));
        let (free, total) = candela_kernels::cuda::memory_info(device).map_err(|e| probe(&e))?;
        let reserved = (total as f64 * (1.0 - fraction)) as u64;
        let bytes = (free as u64).saturating_sub(reserved);
        tracing::info!(
            free,
            total,
            fraction,
            kv_cache_memory_bytes = bytes,
            "GPU memory after warm-up"
        );
        Ok(bytes)
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (model, fraction, block_size, kv_dtype);
        Err(EngineError::Config(format!(
            "{device:?}: this build has no CUDA support (build with --features cuda)"
        )))
    }
}

//! How the KV cache's memory budget is split into blocks: one pool for every layer, or, for a
//! model with sliding-window layers, a hybrid cache (`candela_scheduler::window`) where the
//! windowed layers get a pool of their own that holds only the last window of each sequence
//! and the global layers get the rest of the budget.

use candela_models::ModelConfig;
use candela_scheduler::WindowConfig;
use candle_core::DType;

/// The blocks of each pool and of each layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct KvLayout {
    /// Blocks of the main pool (the global layers; every layer without a window pool).
    pub(crate) num_blocks: usize,
    /// The windowed layers' own pool, when the cache is hybrid.
    pub(crate) window: Option<WindowConfig>,
    /// Blocks of each layer's cache tensors.
    pub(crate) layer_blocks: Vec<usize>,
}

/// The limits the layout is computed for.
#[derive(Debug, Clone, Copy)]
pub(crate) struct KvBudget {
    pub(crate) bytes: u64,
    pub(crate) block_size: usize,
    pub(crate) dtype: DType,
    pub(crate) seqs_max: usize,
    pub(crate) batch_tokens_max: usize,
    pub(crate) model_len_max: usize,
    /// Whether a hybrid cache may be used at all (`EngineConfig::hybrid_kv_cache`).
    pub(crate) hybrid: bool,
}

/// Splits `budget.bytes` into blocks. `Err` names what is too small.
pub(crate) fn kv_layout(config: &ModelConfig, budget: &KvBudget) -> Result<KvLayout, String> {
    let layers = config.num_layers;
    // K and V of one block of one layer.
    let layer_block_bytes = 2
        * (budget.block_size * config.num_kv_heads * config.head_dim) as u64
        * budget.dtype.size_in_bytes() as u64;
    if layer_block_bytes == 0 || layers == 0 {
        return Err("the model has no KV cache to size".into());
    }
    let windowed: Vec<bool> = (0..layers)
        .map(|i| config.layer_window(i).is_some())
        .collect();
    let num_windowed = windowed.iter().filter(|&&w| w).count();
    let window = (0..layers).filter_map(|i| config.layer_window(i)).min();
    let single = |why: Option<&str>| -> Result<KvLayout, String> {
        if let Some(why) = why {
            tracing::warn!("one KV pool for every layer: {why}");
        }
        let num_blocks = usize::try_from(budget.bytes / (layer_block_bytes * layers as u64))
            .unwrap_or(usize::MAX);
        if num_blocks == 0 {
            return Err(format!(
                "kv_cache_memory_bytes ({}) is too small for one KV block",
                budget.bytes
            ));
        }
        Ok(KvLayout {
            num_blocks,
            window: None,
            layer_blocks: vec![num_blocks; layers],
        })
    };
    let Some(window) = window.filter(|_| budget.hybrid) else {
        return single(None);
    };
    if window >= budget.model_len_max {
        // The window covers every context: nothing would ever be released.
        return single(None);
    }
    let (bs, batch) = (budget.block_size as u32, budget.batch_tokens_max as u32);
    let window_u32 = u32::try_from(window).unwrap_or(u32::MAX);
    let min = WindowConfig::blocks_min(window_u32, bs, batch);
    let never_short =
        WindowConfig::blocks_never_short(window_u32, bs, budget.seqs_max as u32, batch);
    let window_block_bytes = layer_block_bytes * num_windowed as u64;
    let num_global = layers - num_windowed;
    let (window_blocks, num_blocks) = if num_global == 0 {
        // Every layer is windowed (Mistral): the whole budget is the window pool, and the main
        // pool only counts positions (it has no memory), enough for every sequence at full
        // length.
        let window_blocks = budget.bytes / window_block_bytes;
        if window_blocks < min {
            return single(Some(&format!(
                "kv_cache_memory_bytes ({}) holds {window_blocks} window blocks, fewer than \
                 the {min} one sequence needs",
                budget.bytes
            )));
        }
        let per_seq = budget.model_len_max.div_ceil(budget.block_size) as u64;
        let positions_max = u64::from(u32::MAX) / u64::from(bs);
        (
            window_blocks,
            (per_seq * budget.seqs_max as u64).min(positions_max),
        )
    } else {
        // As much as never preempts for the window, up to half the budget; the global layers
        // take the rest.
        let window_blocks = never_short.min(budget.bytes / 2 / window_block_bytes);
        if window_blocks < min {
            return single(Some(&format!(
                "half of kv_cache_memory_bytes ({}) holds {window_blocks} window blocks, \
                 fewer than the {min} one sequence needs",
                budget.bytes
            )));
        }
        let rest = budget.bytes - window_blocks * window_block_bytes;
        (
            window_blocks,
            rest / (layer_block_bytes * num_global as u64),
        )
    };
    let to_usize = |n: u64| usize::try_from(n).unwrap_or(usize::MAX);
    let (window_blocks, num_blocks) = (to_usize(window_blocks), to_usize(num_blocks));
    if num_blocks == 0 {
        return single(Some("no room for the global layers"));
    }
    Ok(KvLayout {
        num_blocks,
        window: Some(WindowConfig {
            window: window_u32,
            num_blocks: u32::try_from(window_blocks).unwrap_or(u32::MAX),
        }),
        layer_blocks: windowed
            .iter()
            .map(|&w| if w { window_blocks } else { num_blocks })
            .collect(),
    })
}

#[cfg(test)]
mod tests {
    use candela_models::{Architecture, FamilySwitches, RopeStyle, SlidingWindow, WindowLayers};

    use super::*;

    /// Gemma 3 270M's KV shape: 18 layers, every 6th global, 1 KV head of 256, window 512.
    fn gemma(layers: WindowLayers) -> ModelConfig {
        ModelConfig {
            architecture: Architecture::Gemma3,
            num_layers: 18,
            num_heads: 4,
            num_kv_heads: 1,
            head_dim: 256,
            hidden_size: 640,
            intermediate_size: 2048,
            vocab_size: 262_144,
            max_position: 32_768,
            rope_theta: 1e6,
            rope_style: RopeStyle::Half,
            rope_scaling: None,
            rms_norm_eps: 1e-6,
            attention_bias: false,
            switches: FamilySwitches {
                sliding_window: Some(SlidingWindow {
                    size: 512,
                    layers,
                    rope_theta: None,
                }),
                ..FamilySwitches::default()
            },
            bos_token_id: None,
            eos_token_ids: vec![],
        }
    }

    fn budget(bytes: u64, seqs_max: usize, hybrid: bool) -> KvBudget {
        KvBudget {
            bytes,
            block_size: 16,
            dtype: DType::F16,
            seqs_max,
            batch_tokens_max: 2048,
            model_len_max: 32_768,
            hybrid,
        }
    }

    const LAYER_BLOCK: u64 = 2 * 16 * 256 * 2;

    #[test]
    fn gemma_gets_a_window_pool_and_more_global_context() {
        let c = gemma(WindowLayers::GlobalEvery(6));
        let single = kv_layout(&c, &budget(512 << 20, 16, false)).unwrap();
        assert_eq!(single.window, None);
        assert_eq!(single.num_blocks as u64, (512 << 20) / (18 * LAYER_BLOCK));
        let hybrid = kv_layout(&c, &budget(512 << 20, 16, true)).unwrap();
        let w = hybrid.window.expect("a window pool");
        // 16 sequences at their worst fit in the window pool (well under half the budget).
        assert_eq!(
            u64::from(w.num_blocks),
            WindowConfig::blocks_never_short(512, 16, 16, 2048)
        );
        let window_bytes = u64::from(w.num_blocks) * 15 * LAYER_BLOCK;
        assert_eq!(
            hybrid.num_blocks as u64,
            ((512 << 20) - window_bytes) / (3 * LAYER_BLOCK)
        );
        assert!(hybrid.num_blocks > 4 * single.num_blocks);
        assert_eq!(hybrid.layer_blocks[5], hybrid.num_blocks);
        assert_eq!(hybrid.layer_blocks[0], w.num_blocks as usize);
        // 64 sequences: the window pool is capped at half the budget.
        let capped = kv_layout(&c, &budget(512 << 20, 64, true)).unwrap();
        let w = capped.window.expect("a window pool");
        assert_eq!(u64::from(w.num_blocks), (256 << 20) / (15 * LAYER_BLOCK));
    }

    #[test]
    fn all_windowed_layers_put_the_whole_budget_in_the_window_pool() {
        let c = gemma(WindowLayers::All);
        let l = kv_layout(&c, &budget(64 << 20, 8, true)).unwrap();
        let w = l.window.expect("a window pool");
        assert_eq!(u64::from(w.num_blocks), (64 << 20) / (18 * LAYER_BLOCK));
        assert_eq!(l.num_blocks, 8 * 32_768 / 16);
        assert!(l.layer_blocks.iter().all(|&b| b == w.num_blocks as usize));
    }

    #[test]
    fn too_small_a_budget_falls_back_to_one_pool_or_fails() {
        let c = gemma(WindowLayers::GlobalEvery(6));
        let min = WindowConfig::blocks_min(512, 16, 2048);
        // Half of it cannot hold one sequence's window: one pool.
        let bytes = 2 * (min - 1) * 15 * LAYER_BLOCK;
        assert_eq!(kv_layout(&c, &budget(bytes, 4, true)).unwrap().window, None);
        assert!(kv_layout(&c, &budget(LAYER_BLOCK, 4, true)).is_err());
        // A window as long as the context releases nothing: one pool.
        let mut long = budget(512 << 20, 4, true);
        long.model_len_max = 512;
        assert_eq!(kv_layout(&c, &long).unwrap().window, None);
    }
}

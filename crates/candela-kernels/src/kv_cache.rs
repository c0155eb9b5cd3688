//! The paged KV cache: per layer, one key and one value tensor of shape
//! `[num_blocks, block_size, num_kv_heads, head_dim]`, allocated once at startup. With a hybrid
//! cache (`candela_scheduler::window`) the sliding-window layers have fewer blocks than the
//! global ones: their own pool, indexed by their own block tables.
//!
//! **Invariant:** the tensors are never reallocated or resized; [`crate::attention::write_kv`]
//! writes into them in place, and block ids handed out by the scheduler's block manager index
//! their first dimension for the whole life of the engine.

use candle_core::{DType, Device, Result, Tensor};

use crate::error::KernelError;

/// Key and value caches of every layer of one model, sharing one block shape.
#[derive(Debug, Clone)]
pub struct PagedKvCache {
    layers: Vec<(Tensor, Tensor)>,
    /// Blocks of each layer.
    layer_blocks: Vec<usize>,
    block_size: usize,
    num_kv_heads: usize,
    head_dim: usize,
    dtype: DType,
}

impl PagedKvCache {
    /// Allocates (zeroed) caches for `num_layers` layers. Every size must be non-zero and the
    /// dtype one the attention kernels read (F32, F16 or BF16).
    pub fn new(
        num_layers: usize,
        num_blocks: usize,
        block_size: usize,
        num_kv_heads: usize,
        head_dim: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        Self::with_layer_blocks(
            &vec![num_blocks; num_layers],
            block_size,
            num_kv_heads,
            head_dim,
            dtype,
            device,
        )
    }

    /// Allocates (zeroed) caches with `layer_blocks[i]` blocks for layer `i`, as
    /// [`Self::new`] does for one count.
    pub fn with_layer_blocks(
        layer_blocks: &[usize],
        block_size: usize,
        num_kv_heads: usize,
        head_dim: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let op = "PagedKvCache::new";
        let num_blocks = layer_blocks.iter().copied().min().unwrap_or(0);
        for (param, value) in [
            ("num_layers", layer_blocks.len()),
            ("num_blocks", num_blocks),
            ("block_size", block_size),
            ("num_kv_heads", num_kv_heads),
            ("head_dim", head_dim),
        ] {
            if value == 0 {
                return Err(KernelError::Param {
                    op,
                    param,
                    expected: "must be > 0".to_string(),
                    got: value.to_string(),
                }
                .into());
            }
        }
        if !matches!(dtype, DType::F32 | DType::F16 | DType::BF16) {
            return Err(KernelError::Param {
                op,
                param: "dtype",
                expected: "must be F32, F16 or BF16".to_string(),
                got: format!("{dtype:?}"),
            }
            .into());
        }
        let layers = layer_blocks
            .iter()
            .map(|&num_blocks| {
                let shape = (num_blocks, block_size, num_kv_heads, head_dim);
                Ok((
                    Tensor::zeros(shape, dtype, device)?,
                    Tensor::zeros(shape, dtype, device)?,
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            layers,
            layer_blocks: layer_blocks.to_vec(),
            block_size,
            num_kv_heads,
            head_dim,
            dtype,
        })
    }

    /// Blocks that fit in `bytes` of memory for this shape (both K and V, all layers).
    /// Zero when a single block does not fit, or when a size is zero.
    pub fn num_blocks_for_bytes(
        bytes: u64,
        num_layers: usize,
        block_size: usize,
        num_kv_heads: usize,
        head_dim: usize,
        dtype: DType,
    ) -> usize {
        let block_bytes = [
            num_layers,
            block_size,
            num_kv_heads,
            head_dim,
            dtype.size_in_bytes(),
        ]
        .iter()
        .try_fold(2u64, |acc, &n| acc.checked_mul(n as u64));
        match block_bytes {
            Some(0) | None => 0,
            Some(block_bytes) => usize::try_from(bytes / block_bytes).unwrap_or(usize::MAX),
        }
    }

    /// The `(key_cache, value_cache)` of layer `i`.
    ///
    /// # Panics
    /// If `i >= self.num_layers()`: layer indices come from the model's own loop, not from input.
    pub fn layer(&self, i: usize) -> (&Tensor, &Tensor) {
        let (k, v) = &self.layers[i];
        (k, v)
    }

    /// Number of layers.
    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// Blocks of the largest layer (of every layer without a hybrid cache).
    pub fn num_blocks(&self) -> usize {
        self.layer_blocks.iter().copied().max().unwrap_or(0)
    }

    /// Blocks of layer `i` (the first dimension of its cache tensors).
    ///
    /// # Panics
    /// If `i >= self.num_layers()`, as [`Self::layer`].
    pub fn layer_num_blocks(&self, i: usize) -> usize {
        self.layer_blocks[i]
    }

    /// Tokens per block.
    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// KV heads per token.
    pub fn num_kv_heads(&self) -> usize {
        self.num_kv_heads
    }

    /// Elements per head.
    pub fn head_dim(&self) -> usize {
        self.head_dim
    }

    /// Element type of the caches.
    pub fn dtype(&self) -> DType {
        self.dtype
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocates_every_layer_with_the_paged_shape() {
        let cache = PagedKvCache::new(3, 10, 16, 3, 64, DType::F32, &Device::Cpu).unwrap();
        assert_eq!(cache.num_layers(), 3);
        assert_eq!((cache.num_blocks(), cache.block_size()), (10, 16));
        for i in 0..3 {
            let (k, v) = cache.layer(i);
            assert_eq!(k.dims(), [10, 16, 3, 64]);
            assert_eq!(v.dims(), [10, 16, 3, 64]);
        }
    }

    #[test]
    fn a_hybrid_cache_gives_each_layer_its_own_block_count() {
        let cache = PagedKvCache::with_layer_blocks(&[4, 9, 4], 16, 1, 8, DType::F32, &Device::Cpu)
            .unwrap();
        assert_eq!(cache.num_blocks(), 9);
        assert_eq!(cache.layer(1).0.dims(), [9, 16, 1, 8]);
        assert_eq!(cache.layer(2).1.dims(), [4, 16, 1, 8]);
        assert_eq!(cache.layer_num_blocks(0), 4);
        assert!(
            PagedKvCache::with_layer_blocks(&[4, 0], 16, 1, 8, DType::F32, &Device::Cpu).is_err()
        );
    }

    #[test]
    fn rejects_zero_sizes_and_integer_dtypes() {
        assert!(PagedKvCache::new(1, 0, 16, 3, 64, DType::F32, &Device::Cpu).is_err());
        assert!(PagedKvCache::new(1, 4, 16, 3, 64, DType::U32, &Device::Cpu).is_err());
    }

    #[test]
    fn num_blocks_for_bytes_counts_k_and_v_of_all_layers() {
        // SmolLM2: 30 layers, 3 KV heads of 64, f32, 16-token blocks: 2*30*16*3*64*4 = 737,280 B.
        let per_block = 737_280u64;
        let n = PagedKvCache::num_blocks_for_bytes(per_block * 100 + 5, 30, 16, 3, 64, DType::F32);
        assert_eq!(n, 100);
        assert_eq!(
            PagedKvCache::num_blocks_for_bytes(per_block - 1, 30, 16, 3, 64, DType::F32),
            0
        );
        assert_eq!(
            PagedKvCache::num_blocks_for_bytes(1 << 30, 30, 16, 3, 64, DType::F16),
            (1u64 << 30) as usize / (per_block as usize / 2)
        );
        assert_eq!(
            PagedKvCache::num_blocks_for_bytes(1 << 30, 0, 16, 3, 64, DType::F32),
            0
        );
    }
}

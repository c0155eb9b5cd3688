//! One step's inputs to the model: every scheduled token of every sequence, flattened.
//!
//! No padding. Sequences are laid end to end in `token_ids`; `cu_seqlens_q` marks
//! where each starts. Example with three sequences, block size 4:
//!
//! ```text
//! seq     new tokens         start pos   context after   block table
//! 0       a0 a1 a2 (prefill) 0           3               [7]
//! 1       b5 (decode)        5           6               [2, 9]
//! 2       c4 c5 (chunk 2)    4           6               [4, 1]
//!
//! token_ids     a0 a1 a2 b5 c4 c5          (T = 6)
//! positions      0  1  2  5  4  5
//! cu_seqlens_q  [0, 3, 4, 6]
//! slot_mapping  28 29 30 37 4  5           (block_table[pos / 4] * 4 + pos % 4)
//! sample_rows   [2, 3, 5]                  (last new token of each sequence that samples)
//! ```
//!
//! A chunk with `extra_logit_rows = 1` (seq 2 verifying one draft, c5) would give
//! `sample_rows [2, 3, 4, 5]`: the logits of every row whose next token is checked.
//!
//! A sequence whose chunk does not reach the end of its prompt is not sampled,
//! so `sample_rows` can be shorter than the number of sequences.
//!
//! Embeddings ([`BatchBuilder::build_pooled`]) want final hidden states instead of logits: each
//! [`PoolChunk`] names rows of one chunk, and the forward returns one row per pool, the sum of
//! those rows' final hidden states. In the example above, pooling all of `a` and the last row
//! of `c` (`[PoolChunk { chunk: 0, rows: 0..3 }, PoolChunk { chunk: 2, rows: 1..2 }]`) gives
//!
//! ```text
//! pool_rows     [0, 1, 2, 5]               (rows of token_ids)
//! pool_index    [0, 0, 0, 1]               (the pool each row adds to)
//! ```
//!
//! With a hybrid KV cache (`candela_scheduler::window`) every sequence also brings the block
//! table of its sliding-window layers, and the step carries a second [`AttentionMetadata`]
//! (`attn_window`: its own slots and tables, the same lengths) that those layers use.

use std::ops::Range;

use candela_kernels::attention::AttentionMetadata;
use candle_core::{Device, Tensor};

use crate::error::{Error, Result};

/// The new tokens of one sequence in a step, as the engine knows them on the host.
#[derive(Clone, Copy, Debug)]
pub struct SeqChunk<'a> {
    /// Tokens to compute this step (a prefill chunk, or one decode token).
    pub token_ids: &'a [u32],
    /// Tokens of this sequence already in the KV cache: the position of `token_ids[0]`.
    pub tokens_cached: usize,
    /// KV blocks of the sequence, in order; must cover `tokens_cached + token_ids.len()` tokens.
    pub block_table: &'a [u32],
    /// With a hybrid KV cache, the sliding-window layers' blocks, as long as `block_table`;
    /// entries before the window are never read. Either every sequence of a step has one or
    /// none has.
    pub window_block_table: Option<&'a [u32]>,
    /// Whether the logits of the last token are wanted (false for a non-final prefill chunk).
    pub sample: bool,
    /// With `sample`, how many rows before the last also want logits (speculative decoding
    /// verifies one draft token with each): the chunk's last `extra_logit_rows + 1` rows are
    /// returned, in order. Must be less than the chunk's length; 0 without drafts.
    pub extra_logit_rows: usize,
}

/// Rows of one chunk whose final hidden states the forward returns, summed into one row: all
/// of a prompt chunk for a mean, the last row of the last chunk for last-token pooling.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PoolChunk {
    /// Index of the chunk in the step's chunks.
    pub chunk: usize,
    /// Rows within the chunk's `token_ids`; not empty.
    pub rows: Range<usize>,
}

/// The model's input for one step.
#[derive(Debug)]
pub struct BatchInputs {
    /// `[T]` u32: the new tokens of all sequences, end to end.
    pub token_ids: Tensor,
    /// `[T]` u32: the absolute position of each token in its sequence.
    pub positions: Tensor,
    /// Where each token's K/V goes and what each query attends to.
    pub attn: AttentionMetadata,
    /// The same for the sliding-window layers of a hybrid KV cache (their own pool).
    pub attn_window: Option<AttentionMetadata>,
    /// `[S]` u32: rows of `token_ids` whose logits are returned, in output order: increasing
    /// (the last token of each sampling sequence), so `S == T` means every row in order.
    pub sample_rows: Tensor,
    /// `[H]` u32: rows of `token_ids` whose final hidden states are pooled.
    pub pool_rows: Tensor,
    /// `[H]` u32: the pool (row of the pooled output, `0..num_pools`) each of `pool_rows` adds to.
    pub pool_index: Tensor,
    /// Rows of the pooled output (P); 0 when the step pools nothing.
    pub num_pools: usize,
}

/// Host buffers for building [`BatchInputs`], kept across steps so a step only allocates the
/// tensors themselves (candle tensors own their storage, so those are new each step).
///
/// The index arrays travel to the device as one buffer, and the step's tensors are views of it:
/// on a GPU that is one host-to-device copy per step instead of seven (or nine).
#[derive(Debug, Default)]
pub struct BatchBuilder {
    token_ids: Vec<u32>,
    positions: Vec<u32>,
    slots: Vec<u32>,
    cu: Vec<u32>,
    context_lens: Vec<u32>,
    tables: Vec<u32>,
    sample_rows: Vec<u32>,
    window_slots: Vec<u32>,
    window_tables: Vec<u32>,
    pool_rows: Vec<u32>,
    pool_index: Vec<u32>,
    /// All of the above, end to end, as uploaded.
    packed: Vec<u32>,
}

impl BatchBuilder {
    /// Builds the step's tensors from per-sequence chunks (see the module doc for the layout).
    pub fn build(
        &mut self,
        seqs: &[SeqChunk<'_>],
        block_size: usize,
        device: &Device,
    ) -> Result<BatchInputs> {
        self.build_pooled(seqs, &[], block_size, device)
    }

    /// [`Self::build`] for a step that also pools final hidden states: `pools` in output order,
    /// each naming rows of one chunk (see the module doc).
    pub fn build_pooled(
        &mut self,
        seqs: &[SeqChunk<'_>],
        pools: &[PoolChunk],
        block_size: usize,
        device: &Device,
    ) -> Result<BatchInputs> {
        if seqs.is_empty() {
            return Err(Error::InvalidBatch("no sequences".into()));
        }
        if block_size == 0 {
            return Err(Error::InvalidBatch("block size 0".into()));
        }
        let max_blocks = seqs.iter().map(|s| s.block_table.len()).max().unwrap_or(0);
        let windowed = seqs[0].window_block_table.is_some();
        let Self {
            token_ids,
            positions,
            slots,
            cu,
            context_lens,
            tables,
            sample_rows,
            window_slots,
            window_tables,
            pool_rows,
            pool_index,
            packed,
        } = self;
        for v in [
            &mut *token_ids,
            positions,
            slots,
            cu,
            context_lens,
            tables,
            sample_rows,
            window_slots,
            window_tables,
            pool_rows,
            pool_index,
            packed,
        ] {
            v.clear();
        }
        let (mut max_q, mut max_ctx) = (0usize, 0usize);
        cu.push(0u32);
        for (i, s) in seqs.iter().enumerate() {
            let n = s.token_ids.len();
            if n == 0 {
                return Err(Error::InvalidBatch(format!(
                    "sequence {i} has no new tokens"
                )));
            }
            let end = s.tokens_cached + n;
            if end > s.block_table.len() * block_size {
                return Err(Error::InvalidBatch(format!(
                    "sequence {i}: {} blocks of {block_size} cannot hold {end} tokens",
                    s.block_table.len()
                )));
            }
            let window_table = match (windowed, s.window_block_table) {
                (false, None) => None,
                (true, Some(t)) if t.len() == s.block_table.len() => Some(t),
                _ => {
                    return Err(Error::InvalidBatch(format!(
                        "sequence {i}: window block tables must be given for every sequence \
                         or none, as long as the block table"
                    )))
                }
            };
            for (j, &t) in s.token_ids.iter().enumerate() {
                let pos = s.tokens_cached + j;
                let block = s.block_table[pos / block_size] as usize;
                token_ids.push(t);
                positions.push(to_u32(pos)?);
                slots.push(to_u32(block * block_size + pos % block_size)?);
                if let Some(wt) = window_table {
                    let block = wt[pos / block_size] as usize;
                    window_slots.push(to_u32(block * block_size + pos % block_size)?);
                }
            }
            if s.sample {
                if s.extra_logit_rows >= n {
                    return Err(Error::InvalidBatch(format!(
                        "sequence {i}: {} extra logit rows of a chunk of {n} tokens",
                        s.extra_logit_rows
                    )));
                }
                let last = token_ids.len() - 1;
                for row in last - s.extra_logit_rows..=last {
                    sample_rows.push(to_u32(row)?);
                }
            } else if s.extra_logit_rows > 0 {
                return Err(Error::InvalidBatch(format!(
                    "sequence {i}: extra logit rows without sampling"
                )));
            }
            cu.push(to_u32(token_ids.len())?);
            context_lens.push(to_u32(end)?);
            tables.extend_from_slice(s.block_table);
            // Rows are padded to the widest table; the kernels read only the blocks a
            // sequence's context needs.
            tables.extend(std::iter::repeat_n(0u32, max_blocks - s.block_table.len()));
            if let Some(wt) = window_table {
                window_tables.extend_from_slice(wt);
                window_tables.extend(std::iter::repeat_n(0u32, max_blocks - wt.len()));
            }
            max_q = max_q.max(n);
            max_ctx = max_ctx.max(end);
        }
        for (p, pool) in pools.iter().enumerate() {
            let rows = &pool.rows;
            let chunk_rows = cu.get(pool.chunk).zip(cu.get(pool.chunk + 1));
            let Some((&first, &end)) = chunk_rows.filter(|_| !rows.is_empty()) else {
                return Err(Error::InvalidBatch(format!(
                    "pool {p}: rows {rows:?} of chunk {} of {}",
                    pool.chunk,
                    seqs.len()
                )));
            };
            if rows.end > (end - first) as usize {
                return Err(Error::InvalidBatch(format!(
                    "pool {p}: rows {rows:?} of a chunk of {} tokens",
                    end - first
                )));
            }
            for row in rows.clone() {
                pool_rows.push(first + to_u32(row)?);
                pool_index.push(to_u32(p)?);
            }
        }
        let parts = [
            &*token_ids,
            positions,
            slots,
            tables,
            context_lens,
            cu,
            sample_rows,
            window_slots,
            window_tables,
            pool_rows,
            pool_index,
        ];
        let mut starts = [0usize; 11];
        for (start, part) in starts.iter_mut().zip(parts) {
            *start = packed.len();
            packed.extend_from_slice(part);
        }
        let all = Tensor::new(packed.as_slice(), device)?;
        // Each view is a contiguous 1-D range of `all` (offset and length), as the kernels and
        // candle's index ops require.
        let view = |i: usize| all.narrow(0, starts[i], parts[i].len());
        let attn = AttentionMetadata {
            slot_mapping: view(2)?,
            block_tables: view(3)?.reshape((seqs.len(), max_blocks))?,
            context_lens: view(4)?,
            cu_seqlens_q: view(5)?,
            max_seqlen_q: max_q,
            max_context_len: max_ctx,
        };
        let attn_window = if windowed {
            Some(AttentionMetadata {
                slot_mapping: view(7)?,
                block_tables: view(8)?.reshape((seqs.len(), max_blocks))?,
                context_lens: attn.context_lens.clone(),
                cu_seqlens_q: attn.cu_seqlens_q.clone(),
                max_seqlen_q: max_q,
                max_context_len: max_ctx,
            })
        } else {
            None
        };
        Ok(BatchInputs {
            token_ids: view(0)?,
            positions: view(1)?,
            attn,
            attn_window,
            sample_rows: view(6)?,
            pool_rows: view(9)?,
            pool_index: view(10)?,
            num_pools: pools.len(),
        })
    }
}

impl BatchInputs {
    /// Builds the step's tensors from per-sequence chunks (see the module doc for the layout);
    /// a loop that builds one batch a step keeps a [`BatchBuilder`] instead.
    pub fn from_seqs(seqs: &[SeqChunk<'_>], block_size: usize, device: &Device) -> Result<Self> {
        BatchBuilder::default().build(seqs, block_size, device)
    }

    /// Tokens in the step (T).
    pub fn num_tokens(&self) -> usize {
        self.token_ids.dims1().unwrap_or(0)
    }

    /// Rows of logits the forward pass returns (S).
    pub fn num_sampled(&self) -> usize {
        self.sample_rows.dims1().unwrap_or(0)
    }
}

fn to_u32(x: usize) -> Result<u32> {
    u32::try_from(x).map_err(|_| Error::InvalidBatch(format!("{x} does not fit in u32")))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A chunk of one sequence that samples its last token, without window blocks or drafts:
    /// what most cases below vary from.
    fn chunk<'a>(
        token_ids: &'a [u32],
        tokens_cached: usize,
        block_table: &'a [u32],
    ) -> SeqChunk<'a> {
        SeqChunk {
            token_ids,
            tokens_cached,
            block_table,
            window_block_table: None,
            sample: true,
            extra_logit_rows: 0,
        }
    }

    #[test]
    fn a_reused_builder_gives_what_a_fresh_one_gives() -> Result<()> {
        let big = [
            chunk(&[1, 2, 3, 4, 5], 0, &[3, 8]),
            chunk(&[6], 9, &[0, 1, 2]),
        ];
        let small = [SeqChunk {
            sample: false,
            ..chunk(&[7], 2, &[5])
        }];
        let mut builder = BatchBuilder::default();
        let dev = Device::Cpu;
        for seqs in [&big[..], &small[..], &big[..]] {
            let reused = builder.build(seqs, 4, &dev)?;
            let fresh = BatchInputs::from_seqs(seqs, 4, &dev)?;
            let pairs = [
                (&reused.token_ids, &fresh.token_ids),
                (&reused.positions, &fresh.positions),
                (&reused.sample_rows, &fresh.sample_rows),
                (&reused.attn.slot_mapping, &fresh.attn.slot_mapping),
                (&reused.attn.context_lens, &fresh.attn.context_lens),
                (&reused.attn.cu_seqlens_q, &fresh.attn.cu_seqlens_q),
            ];
            for (a, b) in pairs {
                assert_eq!(a.to_vec1::<u32>()?, b.to_vec1::<u32>()?);
            }
            assert_eq!(
                reused.attn.block_tables.to_vec2::<u32>()?,
                fresh.attn.block_tables.to_vec2::<u32>()?
            );
            assert_eq!(reused.attn.max_context_len, fresh.attn.max_context_len);
        }
        Ok(())
    }

    #[test]
    fn module_doc_example() -> Result<()> {
        let seqs = [
            chunk(&[10, 11, 12], 0, &[7]),
            chunk(&[20], 5, &[2, 9]),
            chunk(&[30, 31], 4, &[4, 1]),
        ];
        let b = BatchInputs::from_seqs(&seqs, 4, &Device::Cpu)?;
        assert_eq!(b.num_tokens(), 6);
        assert_eq!(b.positions.to_vec1::<u32>()?, [0, 1, 2, 5, 4, 5]);
        assert_eq!(b.attn.cu_seqlens_q.to_vec1::<u32>()?, [0, 3, 4, 6]);
        assert_eq!(
            b.attn.slot_mapping.to_vec1::<u32>()?,
            [28, 29, 30, 37, 4, 5]
        );
        assert_eq!(b.attn.context_lens.to_vec1::<u32>()?, [3, 6, 6]);
        assert_eq!(
            b.attn.block_tables.to_vec2::<u32>()?,
            [[7, 0], [2, 9], [4, 1]]
        );
        assert_eq!(b.sample_rows.to_vec1::<u32>()?, [2, 3, 5]);
        assert_eq!((b.attn.max_seqlen_q, b.attn.max_context_len), (3, 6));
        Ok(())
    }

    #[test]
    fn extra_logit_rows_return_the_chunk_tail() -> Result<()> {
        let mut seqs = [
            chunk(&[10, 11, 12], 0, &[7]),
            SeqChunk {
                extra_logit_rows: 1,
                ..chunk(&[30, 31], 4, &[4, 1])
            },
        ];
        let b = BatchInputs::from_seqs(&seqs, 4, &Device::Cpu)?;
        assert_eq!(b.sample_rows.to_vec1::<u32>()?, [2, 3, 4]);
        seqs[1].extra_logit_rows = 2;
        assert!(BatchInputs::from_seqs(&seqs, 4, &Device::Cpu).is_err());
        seqs[1].extra_logit_rows = 1;
        seqs[1].sample = false;
        assert!(BatchInputs::from_seqs(&seqs, 4, &Device::Cpu).is_err());
        Ok(())
    }

    #[test]
    fn module_doc_pooling_example() -> Result<()> {
        let seqs = [
            SeqChunk {
                sample: false,
                ..chunk(&[10, 11, 12], 0, &[7])
            },
            chunk(&[20], 5, &[2, 9]),
            SeqChunk {
                sample: false,
                ..chunk(&[30, 31], 4, &[4, 1])
            },
        ];
        let pools = [
            PoolChunk {
                chunk: 0,
                rows: 0..3,
            },
            PoolChunk {
                chunk: 2,
                rows: 1..2,
            },
        ];
        let mut builder = BatchBuilder::default();
        let b = builder.build_pooled(&seqs, &pools, 4, &Device::Cpu)?;
        assert_eq!(b.pool_rows.to_vec1::<u32>()?, [0, 1, 2, 5]);
        assert_eq!(b.pool_index.to_vec1::<u32>()?, [0, 0, 0, 1]);
        assert_eq!(b.num_pools, 2);
        assert_eq!(b.sample_rows.to_vec1::<u32>()?, [3]);
        // The same builder without pools pools nothing.
        let b = builder.build(&seqs, 4, &Device::Cpu)?;
        assert_eq!((b.pool_rows.dims1()?, b.num_pools), (0, 0));
        // Rows outside the chunk, empty rows, or a chunk that is not there are refused.
        for bad in [
            PoolChunk {
                chunk: 1,
                rows: 0..2,
            },
            PoolChunk {
                chunk: 0,
                rows: 1..1,
            },
            PoolChunk {
                chunk: 3,
                rows: 0..1,
            },
        ] {
            assert!(matches!(
                builder.build_pooled(&seqs, &[bad], 4, &Device::Cpu),
                Err(Error::InvalidBatch(_))
            ));
        }
        Ok(())
    }

    #[test]
    fn window_tables_give_the_windowed_layers_their_own_slots() -> Result<()> {
        let released = u32::MAX;
        let seqs = [
            SeqChunk {
                window_block_table: Some(&[released, 2, 6]),
                ..chunk(&[10, 11], 9, &[7, 3, 5])
            },
            SeqChunk {
                window_block_table: Some(&[4]),
                ..chunk(&[20], 0, &[1])
            },
        ];
        let b = BatchInputs::from_seqs(&seqs, 4, &Device::Cpu)?;
        assert_eq!(b.attn.slot_mapping.to_vec1::<u32>()?, [21, 22, 4]);
        let w = b.attn_window.as_ref().expect("window tables given");
        assert_eq!(w.slot_mapping.to_vec1::<u32>()?, [25, 26, 16]);
        assert_eq!(
            w.block_tables.to_vec2::<u32>()?,
            [[released, 2, 6], [4, 0, 0]]
        );
        assert_eq!(
            w.context_lens.to_vec1::<u32>()?,
            b.attn.context_lens.to_vec1::<u32>()?
        );
        // All or none, and as long as the block table.
        let mixed = [
            seqs[0],
            SeqChunk {
                window_block_table: None,
                ..seqs[1]
            },
        ];
        assert!(BatchInputs::from_seqs(&mixed, 4, &Device::Cpu).is_err());
        let short = [SeqChunk {
            window_block_table: Some(&[2, 6]),
            ..seqs[0]
        }];
        assert!(BatchInputs::from_seqs(&short, 4, &Device::Cpu).is_err());
        Ok(())
    }

    #[test]
    fn rejects_short_block_table_and_empty_chunks() {
        let short = [chunk(&[1, 2, 3], 2, &[0])];
        assert!(matches!(
            BatchInputs::from_seqs(&short, 4, &Device::Cpu),
            Err(Error::InvalidBatch(_))
        ));
        let empty = [chunk(&[], 0, &[0])];
        assert!(matches!(
            BatchInputs::from_seqs(&empty, 4, &Device::Cpu),
            Err(Error::InvalidBatch(_))
        ));
        assert!(BatchInputs::from_seqs(&[], 4, &Device::Cpu).is_err());
    }
}

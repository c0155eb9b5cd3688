//! `write_kv` + `paged_attention` against plain dense causal attention (f64 loops), on random
//! mixed batches of prefills, prefill chunks with earlier tokens already cached, and decodes,
//! over shuffled non-contiguous block tables; the same with a sliding window
//! (`paged_attention_windowed`), including blocks before every window that are stale; and the
//! errors bad inputs must give.

use std::num::NonZeroUsize;

use candela_kernels::{
    paged_attention, paged_attention_windowed, write_kv, AttentionMetadata, PagedKvCache,
};
use candle_core::{DType, Device, IndexOp, Tensor};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

/// One sequence of a step: `context_len` keys after the step, the last `n_q` of them new.
#[derive(Debug, Clone, Copy)]
struct Seq {
    context_len: usize,
    n_q: usize,
}

#[derive(Debug, Clone, Copy)]
struct Shape {
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
    block_size: usize,
}

/// A step, built on the host, with the whole (dense) history of each sequence for the reference.
struct Step {
    shape: Shape,
    seqs: Vec<Seq>,
    /// `[context_len, num_kv_heads, head_dim]` per sequence.
    k_full: Vec<Vec<f32>>,
    v_full: Vec<Vec<f32>>,
    /// `[T, num_heads, head_dim]`.
    q: Vec<f32>,
    /// Per sequence, its blocks in position order.
    tables: Vec<Vec<u32>>,
    num_blocks: usize,
}

fn random_vec(rng: &mut StdRng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect()
}

impl Step {
    fn new(rng: &mut StdRng, shape: Shape, seqs: Vec<Seq>) -> Self {
        let row = shape.num_kv_heads * shape.head_dim;
        let k_full = seqs
            .iter()
            .map(|s| random_vec(rng, s.context_len * row))
            .collect();
        let v_full = seqs
            .iter()
            .map(|s| random_vec(rng, s.context_len * row))
            .collect();
        let num_tokens: usize = seqs.iter().map(|s| s.n_q).sum();
        let q = random_vec(rng, num_tokens * shape.num_heads * shape.head_dim);
        // Hand out blocks from a shuffled pool with spare blocks, so tables are neither
        // contiguous nor ordered and some blocks belong to no one.
        let blocks_needed: usize = seqs
            .iter()
            .map(|s| s.context_len.div_ceil(shape.block_size))
            .sum();
        let num_blocks = blocks_needed + 5;
        let mut pool: Vec<u32> = (0..num_blocks as u32).collect();
        pool.shuffle(rng);
        let mut tables = Vec::new();
        for s in &seqs {
            let n = s.context_len.div_ceil(shape.block_size);
            tables.push(pool.drain(..n).collect());
        }
        Self {
            shape,
            seqs,
            k_full,
            v_full,
            q,
            tables,
            num_blocks,
        }
    }

    fn num_tokens(&self) -> usize {
        self.seqs.iter().map(|s| s.n_q).sum()
    }

    /// Leading blocks of sequence `seq` that lie wholly before the window of each of its
    /// queries (those the kernels must not read).
    fn blocks_before_window(&self, seq: usize, window: Option<NonZeroUsize>) -> usize {
        let s = self.seqs[seq];
        let first_pos = s.context_len - s.n_q;
        window.map_or(0, |w| {
            (first_pos + 1).saturating_sub(w.get()) / self.shape.block_size
        })
    }

    /// A block no sequence owns (there are spare ones).
    fn spare_block(&self) -> u32 {
        (0..self.num_blocks as u32)
            .find(|b| self.tables.iter().all(|t| !t.contains(b)))
            .expect("a spare block")
    }

    fn slot(&self, seq: usize, pos: usize) -> u32 {
        let bs = self.shape.block_size;
        self.tables[seq][pos / bs] * bs as u32 + (pos % bs) as u32
    }

    /// K/V rows `positions` of each sequence, flattened, with their slots.
    fn rows(
        &self,
        positions: impl Fn(&Seq) -> std::ops::Range<usize>,
    ) -> (Vec<f32>, Vec<f32>, Vec<u32>) {
        let row = self.shape.num_kv_heads * self.shape.head_dim;
        let (mut k, mut v, mut slots) = (Vec::new(), Vec::new(), Vec::new());
        for (i, s) in self.seqs.iter().enumerate() {
            for pos in positions(s) {
                k.extend_from_slice(&self.k_full[i][pos * row..(pos + 1) * row]);
                v.extend_from_slice(&self.v_full[i][pos * row..(pos + 1) * row]);
                slots.push(self.slot(i, pos));
            }
        }
        (k, v, slots)
    }

    fn metadata(&self, device: &Device, pad_blocks: usize) -> AttentionMetadata {
        let max_blocks = self.tables.iter().map(Vec::len).max().unwrap_or(0) + pad_blocks;
        // Padding entries are out of range on purpose: the kernel must never read them.
        let mut tables = Vec::new();
        for t in &self.tables {
            tables.extend_from_slice(t);
            tables.extend(std::iter::repeat_n(u32::MAX, max_blocks - t.len()));
        }
        let mut cu = vec![0u32];
        for s in &self.seqs {
            cu.push(cu[cu.len() - 1] + s.n_q as u32);
        }
        let (_, _, slots) = self.rows(|s| s.context_len - s.n_q..s.context_len);
        let context_lens: Vec<u32> = self.seqs.iter().map(|s| s.context_len as u32).collect();
        let b = self.seqs.len();
        AttentionMetadata {
            slot_mapping: Tensor::from_vec(slots, self.num_tokens(), device).unwrap(),
            block_tables: Tensor::from_vec(tables, (b, max_blocks), device).unwrap(),
            context_lens: Tensor::from_vec(context_lens, b, device).unwrap(),
            cu_seqlens_q: Tensor::from_vec(cu, b + 1, device).unwrap(),
            max_seqlen_q: self.seqs.iter().map(|s| s.n_q).max().unwrap_or(0),
            max_context_len: self.seqs.iter().map(|s| s.context_len).max().unwrap_or(0),
        }
    }

    /// Runs the step as the engine would: earlier tokens were cached by an earlier step, this
    /// step writes its own keys/values and then attends. Returns `[T * num_heads * head_dim]`.
    fn run(&self, dtype: DType) -> Vec<f32> {
        self.run_mixed(dtype, dtype)
    }

    /// The step with the caches in `dtype` and q/k/v (and the output) in `act`.
    fn run_mixed(&self, dtype: DType, act: DType) -> Vec<f32> {
        self.try_run(&Run {
            dtype,
            act,
            ..Run::default()
        })
        .unwrap()
    }

    /// The step through `paged_attention_windowed` with `window`, caches and activations in
    /// `dtype`.
    fn run_windowed(&self, dtype: DType, window: Option<NonZeroUsize>) -> Vec<f32> {
        self.try_run(&Run {
            dtype,
            act: dtype,
            api: Api::Windowed(window),
            stale: None,
        })
        .unwrap()
    }

    fn try_run(&self, run: &Run) -> candle_core::Result<Vec<f32>> {
        let Run {
            dtype,
            act,
            api,
            stale,
        } = *run;
        let dev = Device::Cpu;
        let sh = self.shape;
        let cache = PagedKvCache::new(
            1,
            self.num_blocks,
            sh.block_size,
            sh.num_kv_heads,
            sh.head_dim,
            dtype,
            &dev,
        )
        .unwrap();
        let (kc, vc) = cache.layer(0);
        let kv_tensor = |data: Vec<f32>| {
            let t = data.len() / (sh.num_kv_heads * sh.head_dim);
            Tensor::from_vec(data, (t, sh.num_kv_heads, sh.head_dim), &dev)
                .unwrap()
                .to_dtype(act)
                .unwrap()
        };
        let (k_old, v_old, slots_old) = self.rows(|s| 0..s.context_len - s.n_q);
        let n_old = slots_old.len();
        write_kv(
            &kv_tensor(k_old),
            &kv_tensor(v_old),
            kc,
            vc,
            &Tensor::from_vec(slots_old, n_old, &dev).unwrap(),
        )
        .unwrap();
        let mut meta = self.metadata(&dev, 2);
        let (k_new, v_new, _) = self.rows(|s| s.context_len - s.n_q..s.context_len);
        write_kv(
            &kv_tensor(k_new),
            &kv_tensor(v_new),
            kc,
            vc,
            &meta.slot_mapping,
        )
        .unwrap();
        if let Some(stale) = stale {
            meta.block_tables = self.make_stale(stale, api.window(), &meta, kc, vc);
        }
        let q = Tensor::from_vec(
            self.q.clone(),
            (self.num_tokens(), sh.num_heads, sh.head_dim),
            &dev,
        )
        .unwrap()
        .to_dtype(act)
        .unwrap();
        let scale = 1.0 / (sh.head_dim as f32).sqrt();
        let out = match api {
            Api::Plain => paged_attention(&q, kc, vc, &meta, scale)?,
            Api::Windowed(window) => paged_attention_windowed(&q, kc, vc, &meta, scale, window)?,
        };
        assert_eq!(out.dims(), [self.num_tokens(), sh.num_heads, sh.head_dim]);
        assert_eq!(out.dtype(), act);
        Ok(out
            .to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap())
    }

    /// Makes the blocks wholly before every window of each sequence stale, as if the engine had
    /// freed them and other sequences had reused them: their slots are overwritten with NaN,
    /// and their table entries point at `stale.entries`. With `stale.one_more`, the first
    /// block inside the window of the first query is treated the same (so the output must show
    /// it). Returns the new block tables.
    fn make_stale(
        &self,
        stale: Stale,
        window: Option<NonZeroUsize>,
        meta: &AttentionMetadata,
        kc: &Tensor,
        vc: &Tensor,
    ) -> Tensor {
        let sh = self.shape;
        let bs = sh.block_size;
        let row = sh.num_kv_heads * sh.head_dim;
        let (b, max_blocks) = meta.block_tables.dims2().unwrap();
        let mut tables: Vec<u32> = meta.block_tables.flatten_all().unwrap().to_vec1().unwrap();
        let spare = self.spare_block();
        let mut nan_slots: Vec<u32> = (0..bs as u32).map(|o| spare * bs as u32 + o).collect();
        let mut blocks_made_stale = 0;
        for (i, table) in self.tables.iter().enumerate() {
            let n = self.blocks_before_window(i, window) + usize::from(stale.one_more);
            for (j, &block) in table.iter().enumerate().take(n) {
                nan_slots.extend((0..bs as u32).map(|o| block * bs as u32 + o));
                tables[i * max_blocks + j] = match stale.entries {
                    StaleEntries::OutOfRange => u32::MAX - j as u32,
                    StaleEntries::NanBlock => spare,
                };
                blocks_made_stale += 1;
            }
        }
        assert!(
            blocks_made_stale > 0,
            "a stale-block case with no stale block cannot fail"
        );
        let dev = Device::Cpu;
        let nan = Tensor::full(
            f32::NAN,
            (nan_slots.len(), sh.num_kv_heads, sh.head_dim),
            &dev,
        )
        .unwrap()
        .to_dtype(kc.dtype())
        .unwrap();
        assert_eq!(nan.elem_count(), nan_slots.len() * row);
        let n = nan_slots.len();
        write_kv(
            &nan,
            &nan,
            kc,
            vc,
            &Tensor::from_vec(nan_slots, n, &dev).unwrap(),
        )
        .unwrap();
        Tensor::from_vec(tables, (b, max_blocks), &dev).unwrap()
    }

    /// Dense causal attention in f64, one query at a time.
    fn reference(&self) -> Vec<f32> {
        self.reference_windowed(None)
    }

    /// Dense attention in f64 with llama.cpp's sliding-window mask: the query at position `p`
    /// sees key `k` iff `k <= p` and `p - k < window`.
    fn reference_windowed(&self, window: Option<NonZeroUsize>) -> Vec<f32> {
        let sh = self.shape;
        let (d, group) = (sh.head_dim, sh.num_heads / sh.num_kv_heads);
        let scale = 1.0 / (d as f64).sqrt();
        let mut out = Vec::with_capacity(self.q.len());
        let mut token = 0;
        for (i, s) in self.seqs.iter().enumerate() {
            for j in 0..s.n_q {
                let pos = s.context_len - s.n_q + j;
                for h in 0..sh.num_heads {
                    let kv = h / group;
                    let q = &self.q[(token * sh.num_heads + h) * d..][..d];
                    let key = |p: usize| &self.k_full[i][(p * sh.num_kv_heads + kv) * d..][..d];
                    let val = |p: usize| &self.v_full[i][(p * sh.num_kv_heads + kv) * d..][..d];
                    let seen = |p: usize| p <= pos && window.is_none_or(|w| pos - p < w.get());
                    let scores: Vec<f64> = (0..=pos)
                        .map(|p| {
                            let k = key(p);
                            let dot = (0..d).map(|x| q[x] as f64 * k[x] as f64).sum::<f64>();
                            if seen(p) {
                                dot * scale
                            } else {
                                f64::NEG_INFINITY
                            }
                        })
                        .collect();
                    let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                    let weights: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                    let total: f64 = weights.iter().sum();
                    for x in 0..d {
                        let o: f64 = (0..=pos)
                            .filter(|&p| seen(p))
                            .map(|p| weights[p] * val(p)[x] as f64)
                            .sum();
                        out.push((o / total) as f32);
                    }
                }
                token += 1;
            }
        }
        out
    }
}

/// How one step is run.
#[derive(Debug, Clone, Copy)]
struct Run {
    /// Cache dtype.
    dtype: DType,
    /// q/k/v and output dtype.
    act: DType,
    api: Api,
    /// Make the blocks before every window stale first.
    stale: Option<Stale>,
}

impl Default for Run {
    fn default() -> Self {
        Self {
            dtype: DType::F32,
            act: DType::F32,
            api: Api::Plain,
            stale: None,
        }
    }
}

/// Which entry point a run goes through.
#[derive(Debug, Clone, Copy)]
enum Api {
    /// `paged_attention`.
    Plain,
    /// `paged_attention_windowed` with this window.
    Windowed(Option<NonZeroUsize>),
}

impl Api {
    fn window(self) -> Option<NonZeroUsize> {
        match self {
            Api::Plain => None,
            Api::Windowed(w) => w,
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Stale {
    entries: StaleEntries,
    /// Also one block that the first query's window does reach (the output must show it).
    one_more: bool,
}

/// What a stale block-table entry holds.
#[derive(Debug, Clone, Copy)]
enum StaleEntries {
    /// A block id past the cache.
    OutOfRange,
    /// A block now owned by someone else (here: filled with NaN).
    NanBlock,
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// A random mix of full prefills, prefill chunks over a cached prefix, and decodes.
fn random_seqs(rng: &mut StdRng, block_size: usize) -> Vec<Seq> {
    let n = rng.random_range(1..=6);
    (0..n)
        .map(|_| {
            // Contexts around block boundaries and past them, so most end mid-block.
            let context_len = rng.random_range(1..=4 * block_size + 7);
            let n_q = match rng.random_range(0..3) {
                0 => context_len,
                1 => rng.random_range(1..=context_len),
                _ => 1,
            };
            Seq { context_len, n_q }
        })
        .collect()
}

#[test]
fn mixed_batches_match_dense_attention() {
    let mut rng = StdRng::seed_from_u64(0x5eed);
    let mut cases = 0;
    for block_size in [8, 16, 32] {
        for group in [1, 3, 8] {
            for num_kv_heads in [1, 3] {
                for head_dim in [64, 20] {
                    let shape = Shape {
                        num_heads: num_kv_heads * group,
                        num_kv_heads,
                        head_dim,
                        block_size,
                    };
                    let seqs = random_seqs(&mut rng, block_size);
                    let step = Step::new(&mut rng, shape, seqs);
                    let diff = max_abs_diff(&step.run(DType::F32), &step.reference());
                    assert!(diff < 2e-5, "{shape:?} {:?}: max diff {diff}", step.seqs);
                    cases += 1;
                }
            }
        }
    }
    assert_eq!(cases, 36);
}

#[test]
fn chunked_prefill_decode_and_full_prefill_in_one_batch() {
    // Hand-picked: every kind of sequence, contexts ending mid-block and exactly on a boundary,
    // a chunk that starts mid-block, and a chunk longer than a CPU task's token share.
    let mut rng = StdRng::seed_from_u64(7);
    let shape = Shape {
        num_heads: 9,
        num_kv_heads: 3,
        head_dim: 64,
        block_size: 16,
    };
    let seqs = vec![
        Seq {
            context_len: 37,
            n_q: 37,
        }, // prefill, ends mid-block
        Seq {
            context_len: 100,
            n_q: 29,
        }, // chunk over a 71-token cached prefix
        Seq {
            context_len: 48,
            n_q: 1,
        }, // decode, ends on a block boundary
        Seq {
            context_len: 1,
            n_q: 1,
        }, // the first token of a prompt
        Seq {
            context_len: 65,
            n_q: 1,
        }, // decode, first slot of a new block
        Seq {
            context_len: 32,
            n_q: 16,
        }, // chunk of exactly one block
    ];
    let step = Step::new(&mut rng, shape, seqs);
    let diff = max_abs_diff(&step.run(DType::F32), &step.reference());
    assert!(diff < 2e-5, "max diff {diff}");
}

#[test]
fn default_model_decode_batch_matches_dense_attention() {
    let mut rng = StdRng::seed_from_u64(11);
    let shape = Shape {
        num_heads: 9,
        num_kv_heads: 3,
        head_dim: 64,
        block_size: 16,
    };
    let seqs = (0..16)
        .map(|_| Seq {
            context_len: rng.random_range(100..=300),
            n_q: 1,
        })
        .collect();
    let step = Step::new(&mut rng, shape, seqs);
    let diff = max_abs_diff(&step.run(DType::F32), &step.reference());
    assert!(diff < 2e-5, "max diff {diff}");
}

#[test]
fn half_caches_match_dense_attention_within_their_precision() {
    let mut rng = StdRng::seed_from_u64(3);
    let shape = Shape {
        num_heads: 6,
        num_kv_heads: 2,
        head_dim: 64,
        block_size: 16,
    };
    for (dtype, tolerance) in [(DType::F16, 5e-3), (DType::BF16, 4e-2)] {
        let seqs = random_seqs(&mut rng, 16);
        let step = Step::new(&mut rng, shape, seqs);
        let diff = max_abs_diff(&step.run(dtype), &step.reference());
        assert!(diff < tolerance, "{dtype:?}: max diff {diff}");
    }
}

#[test]
fn f32_activations_over_half_caches_equal_casting_them_to_the_cache_dtype() {
    // write_kv rounds f32 k/v as it stores them into the f16/bf16 cache; attention rounds f32 q
    // and its output to the cache's precision. That must be bit for bit what casting q/k/v to
    // the cache's dtype gives, with no cast ops in between.
    let mut rng = StdRng::seed_from_u64(4);
    let shape = Shape {
        num_heads: 9,
        num_kv_heads: 3,
        head_dim: 64,
        block_size: 16,
    };
    for dtype in [DType::F16, DType::BF16] {
        let seqs = random_seqs(&mut rng, 16);
        let step = Step::new(&mut rng, shape, seqs);
        assert_eq!(
            step.run_mixed(dtype, DType::F32),
            step.run(dtype),
            "{dtype:?}"
        );
    }
}

#[test]
fn results_do_not_depend_on_thread_scheduling() {
    let mut rng = StdRng::seed_from_u64(5);
    let shape = Shape {
        num_heads: 8,
        num_kv_heads: 2,
        head_dim: 64,
        block_size: 8,
    };
    let seqs = random_seqs(&mut rng, 8);
    let step = Step::new(&mut rng, shape, seqs);
    let first = step.run(DType::F32);
    for _ in 0..3 {
        assert_eq!(step.run(DType::F32), first);
    }
}

#[test]
fn strided_q_k_v_from_a_fused_projection() {
    // q, k, v as narrows of one [T, H + 2 * Hkv, D] tensor: strided, last dim contiguous.
    let dev = Device::Cpu;
    let mut rng = StdRng::seed_from_u64(9);
    let shape = Shape {
        num_heads: 4,
        num_kv_heads: 2,
        head_dim: 32,
        block_size: 8,
    };
    let mut step = Step::new(
        &mut rng,
        shape,
        vec![Seq {
            context_len: 13,
            n_q: 13,
        }],
    );
    let (k_new, v_new, _) = step.rows(|s| 0..s.context_len);
    let (t, d) = (13, 32);
    let q = Tensor::from_vec(step.q.clone(), (t, 4, d), &dev).unwrap();
    let k = Tensor::from_vec(k_new, (t, 2, d), &dev).unwrap();
    let v = Tensor::from_vec(v_new, (t, 2, d), &dev).unwrap();
    let qkv = Tensor::cat(&[&q, &k, &v], 1).unwrap();
    let (q, k, v) = (
        qkv.narrow(1, 0, 4).unwrap(),
        qkv.narrow(1, 4, 2).unwrap(),
        qkv.narrow(1, 6, 2).unwrap(),
    );
    assert!(!q.is_contiguous() && !k.is_contiguous());
    let cache = PagedKvCache::new(1, step.num_blocks, 8, 2, d, DType::F32, &dev).unwrap();
    let (kc, vc) = cache.layer(0);
    let meta = step.metadata(&dev, 0);
    write_kv(&k, &v, kc, vc, &meta.slot_mapping).unwrap();
    let out = paged_attention(&q, kc, vc, &meta, 1.0 / (d as f32).sqrt()).unwrap();
    let got: Vec<f32> = out.flatten_all().unwrap().to_vec1().unwrap();
    step.q.truncate(t * 4 * d);
    let diff = max_abs_diff(&got, &step.reference());
    assert!(diff < 2e-5, "max diff {diff}");
}

#[test]
fn write_kv_stores_each_token_at_its_slot() {
    let dev = Device::Cpu;
    let cache = PagedKvCache::new(1, 4, 4, 2, 3, DType::F32, &dev).unwrap();
    let (kc, vc) = cache.layer(0);
    let k = Tensor::arange(0f32, 12.0, &dev)
        .unwrap()
        .reshape((2, 2, 3))
        .unwrap();
    let v = (&k + 100.0).unwrap();
    // Token 0 -> block 3, offset 1; token 1 -> block 0, offset 2.
    let slots = Tensor::from_slice(&[13u32, 2], 2, &dev).unwrap();
    write_kv(&k, &v, kc, vc, &slots).unwrap();
    let row = |c: &Tensor, b: usize, o: usize| -> Vec<f32> {
        c.i((b, o))
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    };
    assert_eq!(row(kc, 3, 1), [0., 1., 2., 3., 4., 5.]);
    assert_eq!(row(kc, 0, 2), [6., 7., 8., 9., 10., 11.]);
    assert_eq!(row(vc, 3, 1), [100., 101., 102., 103., 104., 105.]);
    let total: f32 = kc.sum_all().unwrap().to_scalar().unwrap();
    assert_eq!(total, 66.0, "nothing but the two rows was written");
}

#[test]
fn empty_batch_is_a_no_op() {
    let dev = Device::Cpu;
    let cache = PagedKvCache::new(1, 2, 4, 1, 8, DType::F32, &dev).unwrap();
    let (kc, vc) = cache.layer(0);
    let empty = Tensor::zeros((0, 1, 8), DType::F32, &dev).unwrap();
    let slots = Tensor::zeros(0, DType::U32, &dev).unwrap();
    write_kv(&empty, &empty, kc, vc, &slots).unwrap();
    let meta = AttentionMetadata {
        slot_mapping: slots,
        block_tables: Tensor::zeros((0, 1), DType::U32, &dev).unwrap(),
        context_lens: Tensor::zeros(0, DType::U32, &dev).unwrap(),
        cu_seqlens_q: Tensor::zeros(1, DType::U32, &dev).unwrap(),
        max_seqlen_q: 0,
        max_context_len: 0,
    };
    let q = Tensor::zeros((0, 2, 8), DType::F32, &dev).unwrap();
    let out = paged_attention(&q, kc, vc, &meta, 1.0).unwrap();
    assert_eq!(out.dims(), [0, 2, 8]);
}

// ---------------------------------------------------------------------------------------------
// Sliding window.

fn window(w: usize) -> Option<NonZeroUsize> {
    NonZeroUsize::new(w)
}

/// Windows smaller than a block, equal to it and larger, around the block boundaries.
fn windows_around(block_size: usize) -> Vec<usize> {
    vec![
        1,
        2,
        block_size / 2,
        block_size - 1,
        block_size,
        block_size + 1,
        2 * block_size + 3,
    ]
}

#[test]
fn windowed_mixed_batches_match_dense_attention() {
    let mut rng = StdRng::seed_from_u64(0x5a1d);
    let mut cases = 0;
    let mut masked_somewhere = 0;
    for block_size in [8, 16] {
        for group in [1, 3] {
            for num_kv_heads in [1, 2] {
                for head_dim in [64, 20] {
                    let shape = Shape {
                        num_heads: num_kv_heads * group,
                        num_kv_heads,
                        head_dim,
                        block_size,
                    };
                    for w in windows_around(block_size) {
                        let seqs = random_seqs(&mut rng, block_size);
                        let step = Step::new(&mut rng, shape, seqs);
                        let got = step.run_windowed(DType::F32, window(w));
                        let diff = max_abs_diff(&got, &step.reference_windowed(window(w)));
                        assert!(
                            diff < 2e-5,
                            "{shape:?} window {w} {:?}: max diff {diff}",
                            step.seqs
                        );
                        cases += 1;
                        masked_somewhere +=
                            usize::from(step.seqs.iter().any(|s| s.context_len > w));
                    }
                }
            }
        }
    }
    assert_eq!(cases, 112);
    // Most cases must actually mask keys, or they only test the causal path.
    assert!(masked_somewhere > 100, "{masked_somewhere}");
}

/// Every kind of sequence in one flat batch: a prefill chunk longer than the window, a
/// chunked-prefill continuation over a cached prefix, decodes, contexts ending mid-block and
/// on a boundary, and a chunk longer than a CPU task's token share.
fn hand_picked_windowed_step(rng: &mut StdRng) -> Step {
    let shape = Shape {
        num_heads: 9,
        num_kv_heads: 3,
        head_dim: 64,
        block_size: 16,
    };
    let seqs = vec![
        Seq {
            context_len: 37,
            n_q: 37,
        }, // full prefill, ends mid-block
        Seq {
            context_len: 100,
            n_q: 29,
        }, // chunk over a 71-token cached prefix, starts mid-block
        Seq {
            context_len: 48,
            n_q: 1,
        }, // decode, ends on a block boundary
        Seq {
            context_len: 1,
            n_q: 1,
        }, // the first token of a prompt
        Seq {
            context_len: 65,
            n_q: 1,
        }, // decode, first slot of a new block
        Seq {
            context_len: 200,
            n_q: 1,
        }, // decode far past every window below
        Seq {
            context_len: 64,
            n_q: 16,
        }, // chunk of exactly one block
    ];
    Step::new(rng, shape, seqs)
}

#[test]
fn windowed_prefill_chunks_and_decodes_in_one_batch() {
    let mut rng = StdRng::seed_from_u64(17);
    let step = hand_picked_windowed_step(&mut rng);
    for w in [1, 5, 15, 16, 17, 40, 150] {
        let got = step.run_windowed(DType::F32, window(w));
        let diff = max_abs_diff(&got, &step.reference_windowed(window(w)));
        assert!(diff < 2e-5, "window {w}: max diff {diff}");
    }
}

#[test]
fn windowed_gqa_decode_batch_matches_dense_attention() {
    // Gemma 3's local layers at small scale: GQA 4:1, 1024-key window of 16-token blocks,
    // decodes over contexts on both sides of the window.
    let mut rng = StdRng::seed_from_u64(19);
    let shape = Shape {
        num_heads: 8,
        num_kv_heads: 2,
        head_dim: 64,
        block_size: 16,
    };
    let seqs = (0..8)
        .map(|_| Seq {
            context_len: rng.random_range(600..=1500),
            n_q: 1,
        })
        .collect();
    let step = Step::new(&mut rng, shape, seqs);
    let got = step.run_windowed(DType::F32, window(1024));
    let diff = max_abs_diff(&got, &step.reference_windowed(window(1024)));
    assert!(diff < 2e-5, "max diff {diff}");
}

#[test]
fn a_window_at_least_the_context_changes_nothing() {
    let mut rng = StdRng::seed_from_u64(23);
    let step = hand_picked_windowed_step(&mut rng);
    let longest = step.seqs.iter().map(|s| s.context_len).max().unwrap();
    for dtype in [DType::F32, DType::F16] {
        let plain = step.run(dtype);
        assert_eq!(
            step.run_windowed(dtype, None),
            plain,
            "{dtype:?}: no window"
        );
        for w in [longest, longest + 1, usize::MAX] {
            assert_eq!(
                step.run_windowed(dtype, window(w)),
                plain,
                "{dtype:?}: window {w}"
            );
        }
    }
    // Per sequence too: a window as long as a sequence's context is no window for it, while
    // a shorter one changes the output of a long sequence.
    let narrower = step.run_windowed(DType::F32, window(longest - 1));
    assert_ne!(narrower, step.run(DType::F32));
}

#[test]
fn windowed_half_caches_match_dense_attention_within_their_precision() {
    let mut rng = StdRng::seed_from_u64(29);
    let shape = Shape {
        num_heads: 6,
        num_kv_heads: 2,
        head_dim: 64,
        block_size: 16,
    };
    for (dtype, tolerance) in [(DType::F16, 5e-3), (DType::BF16, 4e-2)] {
        for w in [3, 16, 21] {
            let seqs = random_seqs(&mut rng, 16);
            let step = Step::new(&mut rng, shape, seqs);
            let got = step.run_windowed(dtype, window(w));
            let diff = max_abs_diff(&got, &step.reference_windowed(window(w)));
            assert!(diff < tolerance, "{dtype:?} window {w}: max diff {diff}");
            // f32 activations over the half cache: bit for bit the casts' result, as without
            // a window.
            let mixed = step
                .try_run(&Run {
                    dtype,
                    act: DType::F32,
                    api: Api::Windowed(window(w)),
                    stale: None,
                })
                .unwrap();
            assert_eq!(mixed, got, "{dtype:?} window {w}: f32 activations");
        }
    }
}

#[test]
fn blocks_before_every_window_are_never_read() {
    // Blocks wholly before the window of each query of a sequence get NaN in every slot and a
    // stale table entry (a block id past the cache, or a block reused by someone else that
    // holds NaN): the output must be finite and equal to the untouched run and the reference.
    let mut rng = StdRng::seed_from_u64(31);
    let step = hand_picked_windowed_step(&mut rng);
    for w in [1, 5, 16, 17, 40] {
        let want = step.run_windowed(DType::F32, window(w));
        let diff = max_abs_diff(&want, &step.reference_windowed(window(w)));
        assert!(diff < 2e-5, "window {w}: max diff {diff}");
        for dtype in [DType::F32, DType::F16] {
            for entries in [StaleEntries::OutOfRange, StaleEntries::NanBlock] {
                let run = |one_more| Run {
                    dtype,
                    act: dtype,
                    api: Api::Windowed(window(w)),
                    stale: Some(Stale { entries, one_more }),
                };
                let what = format!("window {w} {dtype:?} {entries:?}");
                let got = step.try_run(&run(false)).unwrap();
                assert!(got.iter().all(|x| x.is_finite()), "{what}: not finite");
                assert_eq!(got, step.run_windowed(dtype, window(w)), "{what}");
                // The same with one block more that the first query's window reaches: the
                // poison must show, so the check above can fail.
                match (entries, step.try_run(&run(true))) {
                    (StaleEntries::OutOfRange, Err(e)) => {
                        assert!(e.to_string().contains("block_tables"), "{what}: {e}")
                    }
                    (StaleEntries::NanBlock, Ok(out)) => {
                        assert!(out.iter().any(|x| x.is_nan()), "{what}: poison not seen")
                    }
                    (_, other) => panic!("{what}: one more stale block gave {other:?}"),
                }
            }
        }
    }
}

#[test]
fn windowed_strided_q_from_a_fused_projection_and_an_empty_batch() {
    // The windowed entry point takes the same inputs as the plain one.
    let f = fixture();
    write_kv(&f.k, &f.v, &f.kc, &f.vc, &f.meta.slot_mapping).unwrap();
    let plain = paged_attention(&f.q, &f.kc, &f.vc, &f.meta, 0.5).unwrap();
    let windowed = paged_attention_windowed(&f.q, &f.kc, &f.vc, &f.meta, 0.5, window(4)).unwrap();
    assert_eq!(
        windowed.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        plain.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    );
    let dev = Device::Cpu;
    let meta = AttentionMetadata {
        slot_mapping: Tensor::zeros(0, DType::U32, &dev).unwrap(),
        block_tables: Tensor::zeros((0, 1), DType::U32, &dev).unwrap(),
        context_lens: Tensor::zeros(0, DType::U32, &dev).unwrap(),
        cu_seqlens_q: Tensor::zeros(1, DType::U32, &dev).unwrap(),
        max_seqlen_q: 0,
        max_context_len: 0,
    };
    let q = Tensor::zeros((0, 2, 8), DType::F32, &dev).unwrap();
    let out = paged_attention_windowed(&q, &f.kc, &f.vc, &meta, 1.0, window(2)).unwrap();
    assert_eq!(out.dims(), [0, 2, 8]);
}

#[test]
fn windowed_argument_errors_are_the_plain_ones() {
    // Checks stay up front: a bad scale or an out-of-range block id inside the window is an
    // error with a window too.
    let f = fixture();
    let err = |f: &Fixture, w: usize| match paged_attention_windowed(
        &f.q,
        &f.kc,
        &f.vc,
        &f.meta,
        f32::NAN,
        window(w),
    ) {
        Ok(_) => panic!("bad input accepted"),
        Err(e) => e.to_string(),
    };
    assert!(err(&f, 2).contains("scale"));
    let mut f = fixture();
    // Sequence 1 (context 4, one query at position 3) reads entry 2 with any window.
    f.meta.block_tables = u32s(&[1, 9, 4, 9], (2, 2));
    for w in [1, 2, 100] {
        let msg = match paged_attention_windowed(&f.q, &f.kc, &f.vc, &f.meta, 0.5, window(w)) {
            Ok(_) => panic!("window {w}: bad block id accepted"),
            Err(e) => e.to_string(),
        };
        assert!(msg.contains("block_tables[2] = 4 is out of range"), "{msg}");
    }
}

// ---------------------------------------------------------------------------------------------
// Bad inputs: an Err that names the culprit, never a panic, and no partial write.

/// A valid two-sequence step on a 4-block cache (block size 4, 1 KV head of 8, 2 query heads).
struct Fixture {
    kc: Tensor,
    vc: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    meta: AttentionMetadata,
}

fn fixture() -> Fixture {
    let dev = Device::Cpu;
    let cache = PagedKvCache::new(1, 4, 4, 1, 8, DType::F32, &dev).unwrap();
    let (kc, vc) = cache.layer(0);
    Fixture {
        kc: kc.clone(),
        vc: vc.clone(),
        q: Tensor::ones((3, 2, 8), DType::F32, &dev).unwrap(),
        k: Tensor::ones((3, 1, 8), DType::F32, &dev).unwrap(),
        v: Tensor::ones((3, 1, 8), DType::F32, &dev).unwrap(),
        meta: AttentionMetadata {
            slot_mapping: Tensor::from_slice(&[4u32, 5, 3], 3, &dev).unwrap(),
            block_tables: Tensor::from_slice(&[1u32, 9, 0, 9], (2, 2), &dev).unwrap(),
            context_lens: Tensor::from_slice(&[2u32, 4], 2, &dev).unwrap(),
            cu_seqlens_q: Tensor::from_slice(&[0u32, 2, 3], 3, &dev).unwrap(),
            max_seqlen_q: 2,
            max_context_len: 4,
        },
    }
}

fn attention_err(f: &Fixture) -> String {
    match paged_attention(&f.q, &f.kc, &f.vc, &f.meta, 0.5) {
        Ok(_) => panic!("bad input accepted"),
        Err(e) => e.to_string(),
    }
}

fn write_err(f: &Fixture) -> String {
    match write_kv(&f.k, &f.v, &f.kc, &f.vc, &f.meta.slot_mapping) {
        Ok(()) => panic!("bad input accepted"),
        Err(e) => e.to_string(),
    }
}

fn u32s(data: &[u32], shape: impl Into<candle_core::Shape>) -> Tensor {
    Tensor::from_slice(data, shape, &Device::Cpu).unwrap()
}

#[test]
fn the_fixture_itself_is_valid() {
    let f = fixture();
    write_kv(&f.k, &f.v, &f.kc, &f.vc, &f.meta.slot_mapping).unwrap();
    paged_attention(&f.q, &f.kc, &f.vc, &f.meta, 0.5).unwrap();
}

#[test]
fn wrong_ranks_are_errors() {
    let mut f = fixture();
    f.q = f.q.flatten_from(1).unwrap();
    assert!(attention_err(&f).contains("`q` must have rank 3, got rank 2"));
    let mut f = fixture();
    f.kc = f.kc.flatten_from(2).unwrap();
    assert!(attention_err(&f).contains("`key_cache` must have rank 4"));
    assert!(write_err(&f).contains("`key_cache` must have rank 4"));
    let mut f = fixture();
    f.meta.block_tables = u32s(&[1, 9, 0, 9], 4);
    assert!(attention_err(&f).contains("`block_tables` must have rank 2"));
    let mut f = fixture();
    f.k = f.k.squeeze(1).unwrap();
    assert!(write_err(&f).contains("`k` must have rank 3"));
}

#[test]
fn wrong_dtypes_are_errors() {
    let mut f = fixture();
    f.q = f.q.to_dtype(DType::F64).unwrap();
    assert!(attention_err(&f).contains("`q` must have dtype F32 (the cache's), got F64"));
    // F16 activations over an F32 cache (only the other way round mixes).
    let mut f = fixture();
    f.q = f.q.to_dtype(DType::F16).unwrap();
    assert!(attention_err(&f).contains("`q` must have dtype F32 (the cache's), got F16"));
    let mut f = fixture();
    f.meta.context_lens = f.meta.context_lens.to_dtype(DType::I64).unwrap();
    assert!(attention_err(&f).contains("`context_lens` must have dtype U32, got I64"));
    let mut f = fixture();
    f.meta.slot_mapping = f.meta.slot_mapping.to_dtype(DType::I64).unwrap();
    assert!(write_err(&f).contains("`slot_mapping` must have dtype U32"));
    let mut f = fixture();
    f.vc = f.vc.to_dtype(DType::F16).unwrap();
    assert!(write_err(&f).contains("`value_cache` must have dtype F32, got F16"));
    let mut f = fixture();
    f.kc = f.kc.to_dtype(DType::U32).unwrap();
    assert!(attention_err(&f).contains("`key_cache` must have dtype F32, F16 or BF16"));
}

#[test]
fn mismatched_shapes_are_errors() {
    let mut f = fixture();
    f.q = Tensor::ones((3, 2, 4), DType::F32, &Device::Cpu).unwrap();
    assert!(attention_err(&f).contains("`q` must have shape [T, num_heads, 8]"));
    let mut f = fixture();
    f.v = Tensor::ones((2, 1, 8), DType::F32, &Device::Cpu).unwrap();
    assert!(write_err(&f).contains("`v` must have shape [3, 1, 8]"));
    let mut f = fixture();
    f.meta.cu_seqlens_q = u32s(&[0, 3], 2);
    assert!(attention_err(&f).contains("`cu_seqlens_q` must have shape [3]"));
    let mut f = fixture();
    f.meta.block_tables = u32s(&[1, 9, 0, 9], (2, 2)).t().unwrap();
    assert!(attention_err(&f).contains("`block_tables` must be contiguous"));
}

#[test]
fn slot_out_of_range_is_an_error_and_writes_nothing() {
    let mut f = fixture();
    f.meta.slot_mapping = u32s(&[4, 16, 3], 3);
    let msg = write_err(&f);
    assert!(
        msg.contains("slot_mapping[1] = 16 is out of range"),
        "{msg}"
    );
    for cache in [&f.kc, &f.vc] {
        let total: f32 = cache.sum_all().unwrap().to_scalar().unwrap();
        assert_eq!(total, 0.0);
    }
}

#[test]
fn block_table_entry_out_of_range_is_an_error() {
    let mut f = fixture();
    // Sequence 1 needs one block (context 4); its entry 0 is block 4 of a 4-block cache.
    f.meta.block_tables = u32s(&[1, 9, 4, 9], (2, 2));
    let msg = attention_err(&f);
    assert!(msg.contains("block_tables[2] = 4 is out of range"), "{msg}");
}

#[test]
fn context_longer_than_the_block_table_is_an_error() {
    let mut f = fixture();
    // 9 tokens need 3 blocks of 4; rows hold 2.
    f.meta.context_lens = u32s(&[2, 9], 2);
    f.meta.max_context_len = 9;
    let msg = attention_err(&f);
    assert!(msg.contains("context_lens[1] = 9 is out of range"), "{msg}");
}

#[test]
fn inconsistent_query_offsets_are_errors() {
    let mut f = fixture();
    // More query tokens than the sequence's context.
    f.meta.context_lens = u32s(&[1, 4], 2);
    assert!(attention_err(&f).contains("context_lens[0] = 1 is out of range"));
    let mut f = fixture();
    f.meta.cu_seqlens_q = u32s(&[0, 2, 2], 3);
    assert!(attention_err(&f).contains("must equal the number of query tokens T = 3"));
    let mut f = fixture();
    f.meta.cu_seqlens_q = u32s(&[0, 4, 3], 3);
    assert!(attention_err(&f).contains("cu_seqlens_q[2] = 3 is out of range"));
    let mut f = fixture();
    f.meta.max_seqlen_q = 1;
    assert!(attention_err(&f).contains("max_seqlen_q = 1"));
}

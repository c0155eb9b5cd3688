//! Pooled hidden states (embeddings) of the default model: the pooled row of the last position
//! is what the LM head reads (its product with the head's dequantized weights gives that row's
//! logits), a pool of several rows is their sum, and pools of one sequence in a batch equal
//! those of the sequence alone.

#[path = "model_support/mod.rs"]
mod support;

use candela_models::{load_model, BatchBuilder, Model, PoolChunk, SeqChunk};
use candle_core::quantized::gguf_file;
use candle_core::{DType, Device, Tensor};
use support::{new_cache, DEFAULT_MODEL};

const BLOCK_SIZE: usize = 16;

fn prompt(len: usize, base: u32) -> Vec<u32> {
    (0..len as u32).map(|i| base + (i * 37) % 2000).collect()
}

/// The head's weights dense, `[vocab, hidden]`: `output.weight`, or the tied embedding.
fn head_weights() -> Tensor {
    let mut file = std::fs::File::open(DEFAULT_MODEL).expect("the default model exists");
    let content = gguf_file::Content::read(&mut file).expect("a GGUF file");
    let name = if content.tensor_infos.contains_key("output.weight") {
        "output.weight"
    } else {
        "token_embd.weight"
    };
    content
        .tensor(&mut file, name, &Device::Cpu)
        .and_then(|q| q.dequantize(&Device::Cpu))
        .expect("the head's weights")
}

fn chunk<'a>(ids: &'a [u32], table: &'a [u32], sample: bool) -> SeqChunk<'a> {
    SeqChunk {
        token_ids: ids,
        tokens_cached: 0,
        block_table: table,
        window_block_table: None,
        sample,
        extra_logit_rows: 0,
    }
}

fn rows(t: &Tensor) -> Vec<Vec<f32>> {
    t.to_dtype(DType::F32)
        .and_then(|t| t.to_vec2::<f32>())
        .expect("a matrix")
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn pooled_rows_are_the_final_hidden_states_the_head_reads() {
    let model = load_model(DEFAULT_MODEL, &Device::Cpu).expect("loads");
    let model: &dyn Model = model.model.as_ref();
    let hidden = model.config().hidden_size;
    let a = prompt(21, 100);
    let b = prompt(9, 900);
    let table_a: Vec<u32> = (0..2).collect();
    let table_b: Vec<u32> = (2..3).collect();
    let n = a.len();
    // Every row of `a` alone, then all of them as one pool, then the last alone.
    let mut pools: Vec<PoolChunk> = (0..n)
        .map(|i| PoolChunk {
            chunk: 0,
            rows: i..i + 1,
        })
        .collect();
    pools.push(PoolChunk {
        chunk: 0,
        rows: 0..n,
    });
    pools.push(PoolChunk {
        chunk: 0,
        rows: n - 1..n,
    });
    let seqs = [chunk(&a, &table_a, true), chunk(&b, &table_b, false)];
    let mut kv = new_cache(model, 8, BLOCK_SIZE);
    let inputs = BatchBuilder::default()
        .build_pooled(&seqs, &pools, BLOCK_SIZE, &Device::Cpu)
        .expect("inputs");
    let (logits, pooled) = model.forward_pooled(&inputs, &mut kv).expect("forward");
    assert_eq!(pooled.dims(), [n + 2, hidden]);
    let pooled = rows(&pooled);
    let each = &pooled[..n];
    let (all, last) = (&pooled[n], &pooled[n + 1]);
    assert_eq!(last, &each[n - 1], "one row is the row itself");
    let sum: Vec<f32> = (0..hidden)
        .map(|j| each.iter().map(|r| r[j]).sum())
        .collect();
    let scale = sum.iter().map(|x| x.abs()).fold(0.0, f32::max);
    assert!(
        max_abs_diff(all, &sum) <= 1e-5 * scale,
        "a pool of every row is their sum"
    );

    // The last row's logits are the head applied to its pooled hidden state. The engine's head
    // multiplies with quantized activations, so they agree to that precision only, far
    // closer than to what any other row (or the pre-norm residual) would give.
    let logits = rows(&logits);
    assert_eq!(logits.len(), 1, "only `a` is sampled");
    let head = head_weights();
    let h = Tensor::from_vec(last.clone(), (hidden, 1), &Device::Cpu).expect("column");
    let from_hidden: Vec<f32> = head
        .matmul(&h)
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1::<f32>())
        .expect("head x hidden");
    let range = logits[0].iter().fold(0.0f32, |m, x| m.max(x.abs()));
    let diff = max_abs_diff(&logits[0], &from_hidden);
    assert!(
        diff < 0.02 * range,
        "logits differ by {diff} (range {range})"
    );
    let other = Tensor::from_vec(each[n - 2].clone(), (hidden, 1), &Device::Cpu).expect("column");
    let from_other: Vec<f32> = head
        .matmul(&other)
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1::<f32>())
        .expect("head x hidden");
    assert!(max_abs_diff(&logits[0], &from_other) > 10.0 * diff);

    // `a` alone, in two chunks, pools the same rows as in the batch above.
    let mut kv = new_cache(model, 8, BLOCK_SIZE);
    let mut builder = BatchBuilder::default();
    let mut alone = Vec::new();
    for (range, cached) in [(0..12, 0), (12..n, 12)] {
        let seq = SeqChunk {
            token_ids: &a[range.clone()],
            tokens_cached: cached,
            ..chunk(&a, &table_a, false)
        };
        let pools: Vec<PoolChunk> = (0..range.len())
            .map(|i| PoolChunk {
                chunk: 0,
                rows: i..i + 1,
            })
            .collect();
        let inputs = builder
            .build_pooled(&[seq], &pools, BLOCK_SIZE, &Device::Cpu)
            .expect("inputs");
        let (logits, pooled) = model.forward_pooled(&inputs, &mut kv).expect("forward");
        assert_eq!(logits.dims(), [0, model.config().vocab_size]);
        alone.extend(rows(&pooled));
    }
    // Measured equal to the bit on the CPU; components are tens in size.
    for (i, (x, y)) in alone.iter().zip(each).enumerate() {
        let d = max_abs_diff(x, y);
        assert!(d < 1e-4, "row {i} differs by {d}");
    }
}

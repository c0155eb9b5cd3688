"""Writes a synthetic Llama-architecture GGUF with random weights (driven by scripts/synth-gguf).

What it is for: measuring both engines on a model whose weights do not fit in the CPU's cache
(a 1B-class Llama is ~0.6 GB at 4.5 bits a weight), where decode is bound by memory bandwidth,
without downloading one. The output is text-free noise; speed does not depend on the values.

Quantized tensors are written as random blocks of the GGML type itself (Q4_0, or Q4_K), not
quantized from floats: the block layout is all that matters for speed, and a random block is a
valid one. Scales are chosen so each weight has a standard deviation near 1/sqrt(fan-in), so the
activations stay finite through the layers (every block also passes through RMSNorm). The
tokenizer and chat template are copied from another GGUF (the default SmolLM2), so both servers
tokenize chat prompts as they do for it.
"""

import argparse
import sys

import numpy as np

import gguf
from gguf import GGMLQuantizationType as Q

QK4_0 = 32
QK_K = 256


def q4_0_blocks(rng, rows, cols, std):
    """[rows, cols / 32 * 18] bytes: f16 d, then 16 bytes of 4-bit codes, w = (q - 8) d."""
    blocks = rows * cols // QK4_0
    # Codes uniform in 0..15 have a standard deviation of 4.6 around 8.
    d = np.full(blocks, std / 4.6, dtype=np.float16).view(np.uint8).reshape(blocks, 2)
    qs = rng.integers(0, 256, size=(blocks, 16), dtype=np.uint8)
    return np.concatenate([d, qs], axis=1).reshape(rows, -1)


def q4_k_blocks(rng, rows, cols, std):
    """[rows, cols / 256 * 144] bytes: f16 d, f16 dmin, 12 bytes of 6-bit sub-block scales and
    mins, 128 bytes of 4-bit codes; w = d sc q - dmin m per 32-weight sub-block."""
    blocks = rows * cols // QK_K
    # Scales in 16..47 (mean 32) and mins in 0..31 (the packing's high bits left zero keeps
    # them 6-bit); dmin such that the expected value of a weight is 0: d sc 7.5 = dmin m.
    sc_mean, m_mean = 31.5, 15.5
    d = std / (sc_mean * 4.6)
    dmin = d * sc_mean * 7.5 / m_mean
    head = np.array([d, dmin], dtype=np.float16).view(np.uint8)
    head = np.broadcast_to(head, (blocks, 4))
    # Bytes 0..3: scales of sub-blocks 0..3 (low 6 bits), 4..7: their mins, 8..11: the low
    # nibbles of sub-blocks 4..7's scales and high nibbles of their mins (ggml's get_scale_min_k4).
    sc = rng.integers(16, 48, size=(blocks, 8), dtype=np.uint8)
    mn = rng.integers(0, 32, size=(blocks, 8), dtype=np.uint8)
    scales = np.empty((blocks, 12), dtype=np.uint8)
    scales[:, 0:4] = sc[:, 0:4] | ((sc[:, 4:8] >> 4) << 6)
    scales[:, 4:8] = mn[:, 0:4] | ((mn[:, 4:8] >> 4) << 6)
    scales[:, 8:12] = (sc[:, 4:8] & 0x0F) | ((mn[:, 4:8] & 0x0F) << 4)
    qs = rng.integers(0, 256, size=(blocks, 128), dtype=np.uint8)
    return np.concatenate([head, scales, qs], axis=1).reshape(rows, -1)


def copy_tokenizer(writer, source):
    """The tokenizer.* keys of `source` (tokens, merges, special ids, chat template)."""
    reader = gguf.GGUFReader(source)
    copied = 0
    for name, field in reader.fields.items():
        if not name.startswith("tokenizer."):
            continue
        vtype = field.types[0]
        value = field.contents()
        if vtype == gguf.GGUFValueType.ARRAY:
            writer.add_key_value(name, value, vtype, sub_type=field.types[-1])
        else:
            writer.add_key_value(name, value, vtype)
        copied += 1
    if not copied:
        raise SystemExit(f"{source}: no tokenizer.* keys to copy")
    return len(reader.fields["tokenizer.ggml.tokens"].data)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--type", choices=["q4_0", "q4_k"], default="q4_0")
    ap.add_argument("--tokenizer-from", required=True, help="a GGUF whose tokenizer to copy")
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--ffn", type=int, default=8192)
    ap.add_argument("--context", type=int, default=8192)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    block = QK_K if args.type == "q4_k" else QK4_0
    head_dim = args.hidden // args.heads
    for name, value in (("hidden", args.hidden), ("ffn", args.ffn),
                        ("kv width", args.kv_heads * head_dim)):
        if value % block:
            raise SystemExit(f"{name} {value} is not a multiple of {args.type}'s block {block}")
    qtype, blocks = (Q.Q4_K, q4_k_blocks) if args.type == "q4_k" else (Q.Q4_0, q4_0_blocks)
    ftype = (gguf.LlamaFileType.MOSTLY_Q4_K_M if args.type == "q4_k"
             else gguf.LlamaFileType.MOSTLY_Q4_0)

    rng = np.random.default_rng(args.seed)
    w = gguf.GGUFWriter(args.out, "llama")
    w.add_name(f"synthetic-llama-{args.layers}x{args.hidden}-{args.type}")
    w.add_block_count(args.layers)
    w.add_context_length(args.context)
    w.add_embedding_length(args.hidden)
    w.add_feed_forward_length(args.ffn)
    w.add_head_count(args.heads)
    w.add_head_count_kv(args.kv_heads)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(500000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(ftype)
    vocab = copy_tokenizer(w, args.tokenizer_from)
    w.add_vocab_size(vocab)

    def weight(name, rows, cols):
        # GGUF shapes are [cols, rows] (ne0 first); the writer takes the byte shape.
        w.add_tensor(name, blocks(rng, rows, cols, cols ** -0.5), raw_dtype=qtype)

    # Tied embeddings (no output.weight), as Llama 3.2 1B: both engines use token_embd as the
    # head. Row scale 1 for the embedding, so its rows have unit RMS like a trained model's.
    w.add_tensor("token_embd.weight", blocks(rng, vocab, args.hidden, 1.0), raw_dtype=qtype)
    w.add_tensor("output_norm.weight", np.ones(args.hidden, dtype=np.float32))
    kv = args.kv_heads * head_dim
    for i in range(args.layers):
        p = f"blk.{i}."
        w.add_tensor(p + "attn_norm.weight", np.ones(args.hidden, dtype=np.float32))
        weight(p + "attn_q.weight", args.hidden, args.hidden)
        weight(p + "attn_k.weight", kv, args.hidden)
        weight(p + "attn_v.weight", kv, args.hidden)
        weight(p + "attn_output.weight", args.hidden, args.hidden)
        w.add_tensor(p + "ffn_norm.weight", np.ones(args.hidden, dtype=np.float32))
        weight(p + "ffn_gate.weight", args.ffn, args.hidden)
        weight(p + "ffn_up.weight", args.ffn, args.hidden)
        weight(p + "ffn_down.weight", args.hidden, args.ffn)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file(progress=False)
    w.close()
    print(args.out, file=sys.stderr)


if __name__ == "__main__":
    main()

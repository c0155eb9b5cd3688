"""Gemma 3 270M (GGUF Q4_K_M, from PyPI via scripts/fetch-model) served end to end through the
openai client: greedy completions, a prompt longer than its 512-token sliding window prefilled in
chunks, the same prompt again from the prefix cache, and structured outputs over its 262k-token
vocabulary."""

import json

import pytest

from conftest import REPO, Server, assert_matches_record

GEMMA = REPO / "models" / "gemma-3-270m-q4_k_m.gguf"
# llama.cpp's greedy outputs for the same file (scripts/gemma-reference made them).
REFERENCE = REPO / "testdata" / "reference" / "gemma3-270m-greedy.jsonl"
# As for SmolLM2 (tests/e2e/test_reference.py): two correct implementations of one quantized
# model part ways at near-ties; 8-bit activation rounding makes 0.1 nats too tight a margin.
NEAR_TIE_NATS = 0.25
LONG = " ".join(["The quick brown fox jumps over the lazy dog."] * 70) + " The capital of France is"


@pytest.fixture(scope="module")
def gemma():
    if not GEMMA.exists():
        pytest.fail(f"{GEMMA} is missing: run scripts/fetch-model gemma3-270m")
    # 256-token prefill chunks: the long prompt takes three steps, across the window's edge.
    s = Server("--max-num-batched-tokens", "256", "--max-model-len", "2048",
               "--served-model-name", "gemma-3-270m", model=GEMMA)
    yield s
    s.stop()


def test_greedy_completion(gemma):
    client = gemma.client()
    r = client.completions.create(model="gemma-3-270m", prompt="The Eiffel Tower is located in the city of",
                                  max_tokens=8, temperature=0)
    assert r.choices[0].text.startswith(" Paris"), r.choices[0].text
    # BOS is added, as the file says (llama.cpp does the same): <bos> + 9 pieces.
    assert r.usage.prompt_tokens == 10


def test_long_prompt_past_the_window_in_chunks_and_from_the_prefix_cache(gemma):
    client = gemma.client()
    first = client.completions.create(model="gemma-3-270m", prompt=LONG, max_tokens=6, temperature=0)
    assert first.usage.prompt_tokens > 512 + 128
    assert "Paris" in first.choices[0].text, first.choices[0].text
    again = client.completions.create(model="gemma-3-270m", prompt=LONG, max_tokens=6, temperature=0)
    assert again.choices[0].text == first.choices[0].text
    assert again.usage.prompt_tokens_details.cached_tokens > 512


def test_structured_output(gemma):
    client = gemma.client()
    r = client.completions.create(model="gemma-3-270m", prompt="The Eiffel Tower is located in the city of",
                                  max_tokens=8, temperature=0,
                                  extra_body={"guided_choice": [" London", " Paris", " Rome"]})
    assert r.choices[0].text == " Paris", r.choices[0].text


def reference_records():
    with REFERENCE.open() as f:
        return [json.loads(line) for line in f if line.strip()]


# Known divergences, measured 2026-12-04 on AMD EPYC (avx2 kernels). s15 (8-token prompt), at
# output position 2: llama.cpp ranks 56758 " algae" (-1.03) over 8075 " animals" (-1.49), we
# " animals" (-1.08) over " algae" (-1.27). s23, at position 10: llama.cpp 496 " a" (-2.39) over
# 1003 " about" (-2.73), we " about" (-2.60) over " a" (-2.63). Where from: the same decoder on
# the dequantized f32 weights (CANDLE_DEQUANTIZE_ALL=1, f32 KV cache) gives " algae" -1.15 /
# " animals" -1.26 and " a" -2.56 / " about" -2.63: the float model itself sits 0.1-0.3 nats from
# llama.cpp and has gaps of only 0.07-0.11 nats at these flat positions, and rounding the
# activations to int8 moves log-probs by about 0.2 nats there, in our kernels (per 16/32-element
# group) as in candle's (Q8_0/Q8_K, like llama.cpp; " animals" -1.11 / " algae" -1.17). Which
# records flip is therefore sensitive to 1e-7-level changes: computing the tanh GELU as
# g / (1 + exp(-2u)) instead of with tanhf turned l03 (1,180 tokens) from divergent to equal and
# s23 the other way. Strict: a change that makes these pass must drop the marks.
KNOWN_DIVERGENT = {"s15", "s23"}


def marked(record):
    if record["id"] in KNOWN_DIVERGENT:
        return pytest.param(record, marks=pytest.mark.xfail(strict=True, reason="diverges past a 0.45-0.57 nat gap"))
    return record


@pytest.mark.parametrize("record", [marked(r) for r in reference_records()], ids=lambda r: r["id"])
def test_greedy_matches_llama_cpp(gemma, record):
    assert_matches_record(gemma.client(), "gemma-3-270m", record, NEAR_TIE_NATS)


def test_the_reference_has_long_prompts():
    records = reference_records()
    assert len(records) >= 30
    assert sum(len(r["prompt_token_ids"]) > 512 for r in records) >= 5

"""Greedy outputs over HTTP match llama.cpp's on the same model file, token for token, up to
the first near-tie (see testdata/reference/README.md)."""

import json

import pytest

from conftest import REFERENCE

# The reference README says 0.1 nats, a rule only llama.cpp's exact default numerics keep:
# llama.cpp itself misses it on 5 of 42 records with flash attention off and an f32 KV cache
# (gaps up to 0.195), we on 3 (gaps up to 0.208). Measured by scripts/reference-agreement
# (bench/results/reference-agreement.md); why: candela-models/tests/reference.rs.
NEAR_TIE_NATS = 0.25


def records():
    if not REFERENCE.exists():
        return []
    with REFERENCE.open() as f:
        return [json.loads(line) for line in f if line.strip()]


def first_near_tie(record) -> int:
    """Index of the first output token whose reference top-1 and top-2 logprobs are within
    NEAR_TIE_NATS (entries are aligned by id: a split UTF-8 piece may have none)."""
    ids = record["output_token_ids"]
    tops = record.get("output_top_logprobs") or []
    j = 0
    for i, token in enumerate(ids):
        if j < len(tops) and tops[j]["id"] == token:
            top = tops[j]["top"]
            j += 1
            if len(top) >= 2 and top[0][1] - top[1][1] < NEAR_TIE_NATS:
                return i
    return len(ids)


@pytest.mark.skipif(not REFERENCE.exists(), reason=f"{REFERENCE} is not there")
@pytest.mark.parametrize("record", records(), ids=lambda r: r["id"])
def test_greedy_matches_reference(client, model_name, record):
    common = dict(model=model_name, max_tokens=record.get("max_tokens", 48), temperature=0,
                  extra_body={"return_token_ids": True})
    if record["mode"] == "completion":
        r = client.completions.create(prompt=record["prompt"], **common).to_dict()
        prompt_ids = r["choices"][0]["prompt_token_ids"]
    else:
        r = client.chat.completions.create(messages=record["messages"], **common).to_dict()
        prompt_ids = r["prompt_token_ids"]
    assert prompt_ids == record["prompt_token_ids"]
    ours = r["choices"][0]["token_ids"]
    theirs = record["output_token_ids"]
    cut = first_near_tie(record)
    # The end-of-sequence token may or may not be reported among the output ids.
    if len(theirs) <= cut and len(ours) == len(theirs) - 1 and record["finish_reason"] == "stop":
        theirs = theirs[:-1]
    assert ours[:cut] == theirs[:cut], f"diverged before the first near-tie at {cut}"

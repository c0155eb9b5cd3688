"""Greedy outputs over HTTP match llama.cpp's on the same model file, token for token, up to
the first near-tie (see testdata/reference/README.md)."""

import json

import pytest

from conftest import REFERENCE, assert_matches_record

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


@pytest.mark.skipif(not REFERENCE.exists(), reason=f"{REFERENCE} is not there")
@pytest.mark.parametrize("record", records(), ids=lambda r: r["id"])
def test_greedy_matches_reference(client, model_name, record):
    assert_matches_record(client, model_name, record, NEAR_TIE_NATS)

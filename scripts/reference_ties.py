"""Near-ties of the greedy reference records (testdata/reference/smollm2-greedy.jsonl), shared
by scripts/reference-agreement.py and scripts/gpu-e2e.py.

`output_top_logprobs` may hold fewer entries than `output_token_ids` (a token that is an
incomplete UTF-8 piece has none), so entries are aligned to positions by id, in order.
"""


def top2_gaps(record):
    """Per output position: the reference's top-1 minus top-2 logprob, or None without an entry."""
    tops = record.get("output_top_logprobs") or []
    gaps, j = [], 0
    for token in record["output_token_ids"]:
        if j < len(tops) and tops[j]["id"] == token:
            top = tops[j]["top"]
            gaps.append(top[0][1] - top[1][1] if len(top) >= 2 else None)
            j += 1
        else:
            gaps.append(None)
    return gaps


def first_near_tie(record, margin):
    """Index of the first position whose top-2 gap is below `margin`, else None."""
    return next((i for i, g in enumerate(top2_gaps(record)) if g is not None and g < margin), None)

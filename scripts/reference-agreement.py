#!/usr/bin/env python3
"""Greedy agreement of one running server with the llama.cpp reference records.

For every record of testdata/reference/smollm2-greedy.jsonl the server decodes the record's
prompt token ids greedily; the record agrees when the output ids equal the reference's up to the
first near-tie (top-1 and top-2 reference logprobs within MARGIN nats). Prints one JSON line:
{"agree": n, "records": 42, "margin": m, "diverging": [[id, position, reference gap], ...]}.

  reference-agreement.py URL (llama|openai) [MARGIN]
`llama` uses llama-server's native /completion (return_tokens), `openai` uses /v1/completions
with Candela's `return_token_ids`. Standard library only, so it runs without the test venv.
"""
import json
import os
import sys
import urllib.request

from reference_ties import first_near_tie, top2_gaps

REFERENCE = os.path.join(os.path.dirname(__file__), "..", "testdata", "reference", "smollm2-greedy.jsonl")


def post(url, body):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=300) as r:
        return json.load(r)


def decode(url, api, prompt, n):
    if api == "llama":
        body = {"prompt": prompt, "n_predict": n, "temperature": 0, "cache_prompt": False, "return_tokens": True}
        return post(f"{url}/completion", body)["tokens"]
    model = json.load(urllib.request.urlopen(f"{url}/v1/models", timeout=30))["data"][0]["id"]
    body = {"model": model, "prompt": prompt, "max_tokens": n, "temperature": 0, "return_token_ids": True}
    return post(f"{url}/v1/completions", body)["choices"][0]["token_ids"]


def main():
    url, api = sys.argv[1], sys.argv[2]
    margin = float(sys.argv[3]) if len(sys.argv) > 3 else 0.1
    records = [json.loads(line) for line in open(REFERENCE) if line.strip()]
    diverging = []
    for r in records:
        ref = r["output_token_ids"]
        tie = first_near_tie(r, margin)
        n = len(ref) if tie is None else tie
        out = decode(url, api, r["prompt_token_ids"], len(ref))
        if out[:n] != ref[:n]:
            pos = next(i for i in range(n) if i >= len(out) or out[i] != ref[i])
            gap = top2_gaps(r)[pos]
            diverging.append([r["id"], pos, None if gap is None else round(gap, 3)])
    print(json.dumps({"agree": len(records) - len(diverging), "records": len(records), "margin": margin,
                      "diverging": diverging}))


if __name__ == "__main__":
    main()

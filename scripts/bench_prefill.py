"""Prefill speed of an OpenAI-compatible server (ours or llama.cpp's llama-server).

One request at a time whose prompt is exactly N token ids, one output token, streamed: prompt
tok/s = N / time to the first streamed token, the best of a few requests. Every request a
process sends gets a prompt of its own (no two share a first token), so neither a prefix cache
nor a slot's leftover KV shortens a measured prefill. Standard library only, so any python3 runs
it. Used by scripts/bench_cost_curve.py (imported) and scripts/bench-vs-llama-server (as below):

    python3 scripts/bench_prefill.py --url http://127.0.0.1:18471 --sizes 2430,8000 --repeats 2

prints {"model": ..., "repeats": 2, "prefill_tok_s": {"2430": ...}, "ttft_s": {"2430": ...}};
`model` defaults to the first one GET /v1/models lists.
"""

import argparse
import itertools
import json
import time
import urllib.error
import urllib.request

TIMEOUT_S = 900

# Counts the prompts this process has sent: request k's prompt starts at its own offset.
_prompt_number = itertools.count()


def served_model(url):
    """The first model name the server lists (the name our server accepts in `model`)."""
    with urllib.request.urlopen(f"{url}/v1/models", timeout=30) as resp:
        return json.load(resp)["data"][0]["id"]


def time_to_first_token(url, model, prompt, label="server"):
    """Seconds from sending a streamed completion of `prompt` (token ids) to its first token."""
    body = {"model": model, "prompt": prompt, "max_tokens": 1, "temperature": 0, "stream": True}
    req = urllib.request.Request(f"{url}/v1/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    ttft = None
    start = time.monotonic()
    try:
        with urllib.request.urlopen(req, timeout=TIMEOUT_S) as resp:
            for raw in resp:
                line = raw.decode().strip()
                if ttft is None and line.startswith("data: ") and line != "data: [DONE]":
                    if json.loads(line[6:]).get("choices"):
                        ttft = time.monotonic() - start
    except urllib.error.HTTPError as e:
        raise RuntimeError(f"{label} prefill {len(prompt)}: HTTP {e.code} "
                           f"{e.read()[:200].decode(errors='replace')}") from None
    if ttft is None:
        raise RuntimeError(f"{label} prefill {len(prompt)}: no token streamed")
    return ttft


def prefill(url, n_tokens, repeats, model, label="server"):
    """Best prompt tok/s over `repeats` requests of `n_tokens` token ids, one output token."""
    rates = []
    for _ in range(repeats):
        k = next(_prompt_number)
        # Ids from the middle of the vocabulary (ordinary tokens in every tokenizer here); the
        # offset k * 131 differs mod 20000 for every k a run reaches, so does the first token.
        prompt = [1000 + (i * 7 + k * 131) % 20000 for i in range(n_tokens)]
        rates.append(n_tokens / time_to_first_token(url, model, prompt, label))
    return max(rates)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", required=True, help="the server's base URL")
    ap.add_argument("--sizes", required=True, help="comma-separated prompt lengths in tokens")
    ap.add_argument("--repeats", type=int, default=2, help="requests per size; the best counts")
    ap.add_argument("--warmup", type=int, default=64,
                    help="tokens of one unmeasured request first (pages the weights in); 0: none")
    ap.add_argument("--model", help="`model` of the requests (default: from GET /v1/models)")
    ap.add_argument("--label", default="server", help="the server's name in error messages")
    args = ap.parse_args()
    model = args.model or served_model(args.url)
    if args.warmup:
        prefill(args.url, args.warmup, 1, model, args.label)
    rates = {}
    for n in (int(s) for s in args.sizes.split(",")):
        rates[str(n)] = prefill(args.url, n, args.repeats, model, args.label)
    print(json.dumps({"model": model, "repeats": args.repeats, "prefill_tok_s": rates,
                      "ttft_s": {n: int(n) / r for n, r in rates.items()}}, indent=1))


if __name__ == "__main__":
    main()

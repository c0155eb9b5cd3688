"""Embedding throughput of one OpenAI-compatible server (scripts/bench-embeddings runs it against
candela and llama-server in turn). Standard library only.

    python3 scripts/bench_embeddings.py URL LABEL OUT.json VECTORS.json

Three loads, each over 64 texts (16 to 120 words of random words, seeded), after two warm-up
requests:
  batch 1          one input per request, one request at a time (latency bound)
  batch 64         all 64 inputs in one request, one request at a time
  64 concurrent    64 requests of one input each, all in flight at once
Each load runs ROUNDS times (default 3) back to back, every round on texts of its own: a text
seen before would be served mostly from a prefix cache (candela's, with last pooling), which
measures the cache, not the model. OUT.json holds every round; VECTORS.json the embeddings of
texts(0), so the two servers' vectors can be compared.
"""

import concurrent.futures
import json
import os
import random
import statistics
import sys
import time
import urllib.request

WORDS = ("the a of to and in is was for on that with as by at from it an be this are which or "
         "model token batch cache engine server request vector memory layer attention prefix "
         "river mountain city garden window music paper light stone water morning evening "
         "quickly slowly quietly brightly carefully rarely often always never sometimes "
         "build measure compare serve learn write read carry follow open close begin").split()
TEXT_COUNT = 64
ROUNDS = int(os.environ.get("ROUNDS", "3"))


def texts(seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = []
    for i in range(TEXT_COUNT):
        n = 16 + (i * 104) // (TEXT_COUNT - 1)  # 16 .. 120 words
        words = [rng.choice(WORDS) for _ in range(n)]
        out.append(" ".join(words).capitalize() + ".")
    return out


def post(url: str, body: dict) -> dict:
    request = urllib.request.Request(f"{url}/v1/embeddings", data=json.dumps(body).encode(),
                                     headers={"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=600) as response:
        return json.load(response)


def embed(url: str, inputs) -> tuple[dict, float]:
    started = time.perf_counter()
    reply = post(url, {"input": inputs, "encoding_format": "float"})
    elapsed = time.perf_counter() - started
    assert len(reply["data"]) == (len(inputs) if isinstance(inputs, list) else 1), reply
    return reply, elapsed


def run_load(url: str, name: str, corpus: list[str]) -> dict:
    """One round of one load over `corpus`."""
    latencies = []
    tokens = 0
    started = time.perf_counter()
    if name == "batch 1":
        for text in corpus:
            reply, elapsed = embed(url, text)
            latencies.append(elapsed)
            tokens += reply["usage"]["prompt_tokens"]
    elif name == "batch 64":
        reply, elapsed = embed(url, corpus)
        latencies.append(elapsed)
        tokens += reply["usage"]["prompt_tokens"]
    else:
        with concurrent.futures.ThreadPoolExecutor(len(corpus)) as pool:
            for reply, elapsed in pool.map(lambda t: embed(url, t), corpus):
                latencies.append(elapsed)
                tokens += reply["usage"]["prompt_tokens"]
    wall = time.perf_counter() - started
    return {
        "embeddings": len(corpus),
        "prompt_tokens": tokens,
        "wall_s": wall,
        "embeddings_per_s": len(corpus) / wall,
        "prompt_tokens_per_s": tokens / wall,
        "request_latency_ms_p50": statistics.median(latencies) * 1e3,
    }


def main():
    url, label, out, vectors_out = sys.argv[1:5]
    for seed in (1000, 1001):
        embed(url, texts(seed)[:8])
    loads = {}
    for i, name in enumerate(("batch 1", "batch 64", "64 concurrent")):
        loads[name] = [run_load(url, name, texts(1 + i * ROUNDS + r)) for r in range(ROUNDS)]
        best = max(r["embeddings_per_s"] for r in loads[name])
        print(f"{label}: {name}: {best:.1f} embeddings/s (best of {ROUNDS})", file=sys.stderr)
    vectors = [d["embedding"] for d in sorted(post(url, {"input": texts(0)})["data"], key=lambda d: d["index"])]
    json.dump({"label": label, "rounds": ROUNDS, "loads": loads}, open(out, "w"), indent=1)
    json.dump(vectors, open(vectors_out, "w"))


if __name__ == "__main__":
    main()

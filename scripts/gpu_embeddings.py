#!/usr/bin/env python3
"""`/v1/embeddings` on another device than the CPU, against the CPU's vectors.

    python3 scripts/gpu_embeddings.py --bin B --model M --device cpu --out cpu.json
    python3 scripts/gpu_embeddings.py --bin B --model M --device cuda:0 --out gpu.json \\
        --compare cpu.json

For each pooling (last, mean) it starts `candela serve --device D --embeddings --pooling P`,
embeds scripts/bench_embeddings.py's 64 texts in one request, then the first 8 one at a time
while 4 chats stream, and checks on that device: unit norms, each alone equal to its batched
vector. With --compare it reports how far the device's vectors are from the CPU's (cosine and
largest component difference) and fails below COSINE_MIN. Standard library only.

EXTRA_SERVE_ARGS (space-separated) go to `candela serve`; the environment passes through, so
`CANDLE_DEQUANTIZE_ALL=1 EXTRA_SERVE_ARGS="--kv-cache-dtype f32" COSINE_MIN=0.99999` compares
f32 dense weights and an f32 cache on both devices, where only the order of f32 sums differs.
"""
import argparse
import concurrent.futures
import json
import math
import os
import socket
import subprocess
import sys
import time
import urllib.request

from bench_embeddings import texts

# With the GGUF's quantized weights the two devices run different arithmetic: the CPU rounds
# activations to 8 bits for its int matmul and keeps an f16 KV cache, the GPU's prefill runs
# candle's f16 cuBLAS GEMM (whose tiling, and so rounding, changes with the batch's row count)
# and keeps an f32 cache. Over 30 layers that leaves vectors about 0.99 apart in cosine; a row
# pooled from the wrong position or a missing chunk is far below that.
COSINE_MIN = float(os.environ.get("COSINE_MIN", "0.99"))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url, path, body, timeout=600):
    request = urllib.request.Request(f"{url}{path}", data=json.dumps(body).encode(),
                                     headers={"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.load(response)


def norm(v):
    return math.sqrt(sum(x * x for x in v))


def cosine(a, b):
    return sum(x * y for x, y in zip(a, b)) / (norm(a) * norm(b))


def max_diff(a, b):
    return max(abs(x - y) for x, y in zip(a, b))


def serve(args, pooling):
    port = free_port()
    log = open(f"{args.out}.{pooling}.log", "w")
    extra = os.environ.get("EXTRA_SERVE_ARGS", "").split()
    proc = subprocess.Popen([args.bin, "serve", "--model", args.model, "--device", args.device,
                             "--host", "127.0.0.1", "--port", str(port), "--embeddings",
                             "--pooling", pooling, *extra], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    # The first process on a GPU machine JIT-compiles candle's PTX (a minute or more).
    deadline = time.monotonic() + 400
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"serve exited with {proc.returncode}; see {log.name}")
        try:
            with urllib.request.urlopen(f"{url}/ready", timeout=2) as r:
                if r.status == 200:
                    return proc, url
        except OSError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError("serve never became ready")


def run(args, pooling, corpus):
    proc, url = serve(args, pooling)
    try:
        batch = post(url, "/v1/embeddings", {"input": corpus})
        vectors = [d["embedding"] for d in sorted(batch["data"], key=lambda d: d["index"])]

        def chat():
            return post(url, "/v1/chat/completions", {
                "messages": [{"role": "user", "content": "Count to twenty."}],
                "max_tokens": 32, "temperature": 0})["choices"][0]["message"]["content"]

        with concurrent.futures.ThreadPoolExecutor(12) as pool:
            chats = [pool.submit(chat) for _ in range(4)]
            alone = list(pool.map(lambda t: post(url, "/v1/embeddings", {"input": t})["data"][0]["embedding"],
                                  corpus[:8]))
            chats_ok = all(c.result() for c in chats)
        metrics = urllib.request.urlopen(f"{url}/metrics", timeout=10).read().decode()
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    return {
        "vectors": vectors,
        "norm_max_error": max(abs(norm(v) - 1) for v in vectors),
        "alone_max_diff": max(max_diff(a, v) for a, v in zip(alone, vectors)),
        "alone_cosine_min": min(cosine(a, v) for a, v in zip(alone, vectors)),
        "chats_ok": chats_ok,
        "kv_usage_line": next((line for line in metrics.splitlines()
                               if line.startswith("candela:kv_cache_usage_perc")), ""),
    }


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--bin", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--device", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--compare")
    args = p.parse_args()
    corpus = texts()
    result = {"device": args.device}
    ok = True
    for pooling in ("last", "mean"):
        r = run(args, pooling, corpus)
        result[pooling] = r
        print(f"{args.device} {pooling}: norm error {r['norm_max_error']:.2e}, alone vs batched: cosine "
              f"min {r['alone_cosine_min']:.6f}, largest component difference {r['alone_max_diff']:.2e}; "
              f"chats {'ok' if r['chats_ok'] else 'FAILED'}, {r['kv_usage_line']}")
        ok &= r["norm_max_error"] < 1e-4 and r["alone_cosine_min"] >= COSINE_MIN and r["chats_ok"]
    if args.compare:
        base = json.load(open(args.compare))
        for pooling in ("last", "mean"):
            pairs = list(zip(result[pooling]["vectors"], base[pooling]["vectors"]))
            cosines = [cosine(a, b) for a, b in pairs]
            diffs = [max_diff(a, b) for a, b in pairs]
            print(f"{args.device} vs {base['device']} {pooling}: cosine min {min(cosines):.6f} mean "
                  f"{sum(cosines) / len(cosines):.6f}, largest component difference {max(diffs):.2e}")
            ok &= min(cosines) >= COSINE_MIN
    json.dump(result, open(args.out, "w"))
    print("PASS" if ok else "FAIL")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()

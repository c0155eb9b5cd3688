"""The cost curve, side by side (driven by scripts/bench-cost-curve).

For each model, `candela serve` and llama.cpp's `llama-server` in turn (same GGUF, same
threads), measured the same way:
- decode: `candela bench` at concurrency 1 / 16 / 64 (chat prompts, or completion ones for a
  model without a chat template; `ignore_eos`, so every reply is `max_tokens` long even from a
  random-weight model): output tok/s and ITL p99;
- prefill: one request at a time whose prompt is exactly N token ids (512, 2048, 8000), one
  output token, streamed: prompt tokens / time to first token (scripts/bench_prefill.py);
and, in the same run, `candela roofline`: the read bandwidth and our int8 matmul ceiling with
the same threads, so each figure also reads as a fraction of its limit (batch-1 decode reads
every weight once a token: weight bytes x tok/s against the bandwidth).

Writes OUT/cost-curve.json (everything) and prints the markdown tables.
"""

import argparse
import json
import os
import subprocess
import sys
import time

import httpx

from bench_prefill import prefill

READY_TIMEOUT_S = 600


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class Server:
    def __init__(self, kind, args, model, port, log_path):
        self.kind, self.url = kind, f"http://127.0.0.1:{port}"
        env = dict(os.environ, RAYON_NUM_THREADS=str(args.threads), RUST_LOG="warn")
        if kind == "candela":
            cmd = [args.candela, "serve", "--model", model, "--served-model-name", "m",
                   "--host", "127.0.0.1",
                   "--port", str(port), "--max-num-seqs", "64",
                   "--max-model-len", str(args.max_prompt + 64),
                   "--kv-cache-memory", str(args.kv_cache_gib)]
            self.ready = "/ready"
        else:
            # One unified KV cache shared by 64 slots, so a single 8k prompt fits as it does in
            # ours (without it each slot gets 1/64 of the context).
            cmd = [args.llama_server, "-m", model, "--host", "127.0.0.1", "--port", str(port),
                   "-c", str(max(args.max_prompt + 64, 64 * 256)), "-np", "64", "--kv-unified",
                   "-cb", "-t", str(args.threads), "-tb", str(args.threads), "--no-webui"]
            self.ready = "/health"
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{kind} exited ({self.proc.returncode}); see {log_path}")
            try:
                if httpx.get(self.url + self.ready, timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"{kind} not ready within {READY_TIMEOUT_S} s")

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def prompt_set(model):
    """`short-chat` when the GGUF carries a chat template, else `completion` (a base model such
    as gemma-3-270m: candela refuses chat requests without a template, while llama-server would
    quietly apply a default one, so neither would be measured on what the model is for)."""
    from gguf import GGUFReader  # scripts/bench-cost-curve installs it into .venv
    fields = GGUFReader(model).fields
    return "short-chat" if "tokenizer.chat_template" in fields else "completion"


def decode_levels(args, server, label, out_dir, prompts):
    path = os.path.join(out_dir, f"{label}.json")
    subprocess.run([args.candela, "bench", "--url", server.url, "--label", label,
                    "--concurrency", args.concurrency, "--requests", args.requests,
                    "--max-tokens", str(args.max_tokens), "--prompts", prompts,
                    "--ignore-eos", "--json-out", path],
                   check=True, stdout=subprocess.DEVNULL)
    with open(path) as f:
        levels = json.load(f)["levels"]
    # A level with no output at all measured nothing (say, a chat prompt refused): stop rather
    # than report 0 tok/s. Occasional failures are counted in the table instead.
    dead = [lv for lv in levels if lv["output_tokens_per_s"] == 0]
    if dead:
        raise RuntimeError(f"{label}: no output at concurrency {dead[0]['concurrency']} "
                           f"({dead[0]['errors']} failed requests; see {path})")
    return [{"concurrency": lv["concurrency"], "output_tok_s": lv["output_tokens_per_s"],
             "itl_p99_ms": lv["itl_ms"]["p99"], "ttft_p99_ms": lv["ttft_ms"]["p99"],
             "errors": lv["errors"]} for lv in levels]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--candela", required=True)
    ap.add_argument("--llama-server", required=True)
    ap.add_argument("--models", required=True, help="comma-separated GGUF paths")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--concurrency", default="1,16,64")
    ap.add_argument("--requests", default="8,32,64")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--prefill", default="512,2048,8000")
    ap.add_argument("--prefill-repeats", type=int, default=2)
    ap.add_argument("--kv-cache-gib", type=float, default=1.0)
    ap.add_argument("--servers", default="candela,llama-server")
    ap.add_argument("--port", type=int, default=18480)
    ap.add_argument("--out", required=True, help="folder for cost-curve.json and raw results")
    args = ap.parse_args()
    prefill_sizes = [int(n) for n in args.prefill.split(",")]
    args.max_prompt = max(prefill_sizes)
    os.makedirs(args.out, exist_ok=True)

    roof = json.loads(subprocess.run(
        [args.candela, "roofline", "--threads", str(args.threads)], check=True,
        capture_output=True, text=True).stdout)
    log(f"roofline: {roof}")
    results = {"roofline": roof, "threads": args.threads, "models": {}}
    for model in args.models.split(","):
        name = os.path.basename(model)
        entry = {"bytes": os.path.getsize(model), "prompts": prompt_set(model), "servers": {}}
        for kind in args.servers.split(","):
            log(f"{name}: {kind}")
            label = f"{os.path.splitext(name)[0]}-{kind}"
            server = Server(kind, args, model, args.port,
                            os.path.join(args.out, f"{label}.log"))
            try:
                load = open("/proc/loadavg").read().split()[:3]
                # A short warm-up: the first forward passes page the weights in.
                prefill(server.url, 64, 1, "m", server.kind)
                decode = decode_levels(args, server, label, args.out, entry["prompts"])
                pre = {n: prefill(server.url, n, args.prefill_repeats, "m", server.kind)
                       for n in prefill_sizes}
            finally:
                server.stop()
            entry["servers"][kind] = {"decode": decode, "prefill_tok_s": pre,
                                      "load_before": load}
            log(f"{name} {kind}: {entry['servers'][kind]}")
        results["models"][name] = entry
        with open(os.path.join(args.out, "cost-curve.json"), "w") as f:
            json.dump(results, f, indent=1)
    report(results)


def report(results):
    roof = results["roofline"]
    bw = roof["read_gb_per_s"]
    print(f"Machine ({roof['cpu']}, {roof['threads']} threads, `candela roofline`): read "
          f"bandwidth {bw:.1f} GB/s; int8 matmul ceiling in cache "
          + ", ".join(f"{k} {v:.0f}" for k, v in roof["int8_gmacs_per_s"])
          + " GMAC/s (64 rows)"
          # Fields added later: results files written before them lack them.
          + (f", {roof['int8_gmacs_per_s_512_rows']:.0f} at 512 rows"
             if "int8_gmacs_per_s_512_rows" in roof else "")
          + (f"; f32 FMA {roof['f32_gfmas_per_s']:.0f} G/s"
             if roof.get("f32_gfmas_per_s") else "")
          + f"; the engine's kernel: {roof['kernel_selected']}.")
    print()
    for name, entry in results["models"].items():
        servers = entry["servers"]
        gb = entry["bytes"] / 1e9
        print(f"### {name} ({gb:.2f} GB)")
        print()
        print(f"Decode prompts: `{entry.get('prompts', 'short-chat')}`.")
        print()
        print("| server | " + " | ".join(
            f"out tok/s @{lv['concurrency']}" for lv in next(iter(servers.values()))["decode"])
              + " | ITL p99 ms @1 | batch-1 bytes/s vs bandwidth | "
              + " | ".join(f"prefill tok/s @{n}" for n in next(iter(servers.values()))
                           ["prefill_tok_s"]) + " |")
        print("|---|" + "---:|" * (len(next(iter(servers.values()))["decode"]) + 2
                                  + len(next(iter(servers.values()))["prefill_tok_s"])))
        for kind, s in servers.items():
            d1 = s["decode"][0]
            frac = d1["output_tok_s"] * gb / bw
            print(f"| {kind} | " + " | ".join(
                f"{lv['output_tok_s']:.1f}" + (f" ({lv['errors']} failed)" if lv["errors"] else "")
                for lv in s["decode"])
                  + f" | {d1['itl_p99_ms']:.1f} | {frac:.0%} | "
                  + " | ".join(f"{v:.0f}" for v in s["prefill_tok_s"].values()) + " |")
        if len(servers) == 2:
            ours, peer = servers["candela"], servers["llama-server"]
            print("| ratio | " + " | ".join(
                f"{a['output_tok_s'] / b['output_tok_s']:.2f}" if b["output_tok_s"] else "n/a"
                for a, b in zip(ours["decode"], peer["decode"]))
                  + f" | {ours['decode'][0]['itl_p99_ms'] / peer['decode'][0]['itl_p99_ms']:.2f}"
                  + " | | " + " | ".join(
                      f"{ours['prefill_tok_s'][n] / peer['prefill_tok_s'][n]:.2f}"
                      for n in ours["prefill_tok_s"]) + " |")
        print()


if __name__ == "__main__":
    main()

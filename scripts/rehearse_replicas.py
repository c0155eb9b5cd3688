"""Replicas behind vLLM's router, rehearsed on loopback (driven by scripts/rehearse-replicas).

Starts N `candela serve` replicas and `vllm-router` in front of them, then runs scenarios under
a steady closed-loop load of streaming completions through the router and prints one table row
per scenario: requests sent, succeeded, failed, hung (no answer within the per-request bound),
TTFT p50/p99, and the replicas' prefix-cache hit rate over the scenario.

- prefix-aware (cache_aware) vs round_robin routing on a shared-prefix workload;
- SIGKILL of one replica: in-flight requests on it fail cleanly, the router stops sending to it;
- SIGSTOP of one replica (a hang): the health check ejects it;
- rolling restart (SIGTERM, wait, start, wait for ready) of every replica under load.

Every wait is bounded; every process is killed on exit.
"""

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time

import httpx

REQUEST_TIMEOUT_S = 120.0
READY_TIMEOUT_S = 180.0

# A shared-prefix workload: a few long "documents", many short questions about each.
DOCS = [
    " ".join(f"Section {d}.{i}: the {w} of the {n} was recorded in the ledger." for i, (w, n) in
             enumerate(zip(["height", "colour", "age", "weight", "price", "origin"] * 6,
                           ["tower", "bridge", "river", "market", "ship", "garden"] * 6)))
    for d in range(4)
]
QUESTIONS = [f"Question {q}: summarise point {q % 7} in one sentence." for q in range(64)]


def wait_ok(url, timeout_s, proc, what):
    """Polls `url` until it answers 200, within `timeout_s`; fails at once if `proc` exits."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{what} not ready within {timeout_s} s")


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class Replica:
    def __init__(self, binary, model, port, threads, extra):
        self.binary, self.model, self.port, self.threads, self.extra = binary, model, port, threads, extra
        self.proc = None

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}"

    def start(self):
        env = dict(os.environ, RAYON_NUM_THREADS=str(self.threads), RUST_LOG="warn")
        self.proc = subprocess.Popen(
            [self.binary, "serve", "--model", self.model, "--served-model-name", "m",
             "--host", "127.0.0.1", "--port", str(self.port), "--drain-timeout-s", "60", *self.extra],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def wait_ready(self):
        wait_ok(f"{self.url}/ready", READY_TIMEOUT_S, self.proc, f"replica {self.port}")

    def stop(self, sig=signal.SIGTERM, wait_s=90):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(wait_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def prefix_counters(self):
        """(hits, queries) of the prefix cache, in tokens; None when unreachable."""
        try:
            text = httpx.get(f"{self.url}/metrics", timeout=2).text
        except httpx.HTTPError:
            return None
        values = {}
        for line in text.splitlines():
            for name in ("candela:prefix_cache_hits_total", "candela:prefix_cache_queries_total"):
                if line.startswith(name + " "):
                    values[name] = float(line.split()[1])
        return (values.get("candela:prefix_cache_hits_total", 0.0),
                values.get("candela:prefix_cache_queries_total", 0.0))


class Router:
    def __init__(self, binary, port, workers, policy):
        self.proc = subprocess.Popen(
            # Its own metrics port next to its port: the default (29000) may be taken.
            [binary, "--host", "127.0.0.1", "--port", str(port), "--policy", policy,
             "--prometheus-host", "127.0.0.1", "--prometheus-port", str(port + 1),
             "--worker-urls", *[w.url for w in workers],
             "--health-check-endpoint", "/health", "--health-check-interval-secs", "1",
             "--health-check-timeout-secs", "5", "--health-failure-threshold", "2",
             "--health-success-threshold", "1", "--retry-max-retries", "3",
             "--request-timeout-secs", str(int(REQUEST_TIMEOUT_S)), "--log-level", "warning"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.url = f"http://127.0.0.1:{port}"
        wait_ok(f"{self.url}/health", 60, self.proc, "vllm-router")

    def remove_worker(self, worker):
        httpx.post(f"{self.url}/remove_worker", params={"url": worker.url}, timeout=10).raise_for_status()

    def add_worker(self, worker):
        httpx.post(f"{self.url}/add_worker", params={"url": worker.url}, timeout=60).raise_for_status()

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


class Load:
    """A closed loop of `concurrency` clients streaming completions until stopped."""

    def __init__(self, url, concurrency, max_tokens):
        self.url, self.concurrency, self.max_tokens = url, concurrency, max_tokens
        self.results = []  # (outcome, ttft_s) with outcome in ok / failed / hung
        self.lock = threading.Lock()
        self.stop_flag = threading.Event()
        self.count = 0
        self.reasons = {}
        self.threads = [threading.Thread(target=self.client, args=(i,), daemon=True)
                        for i in range(concurrency)]

    def next_prompt(self):
        with self.lock:
            n = self.count
            self.count += 1
        return DOCS[n % len(DOCS)] + "\n" + QUESTIONS[(n * 7) % len(QUESTIONS)]

    def one(self, client):
        body = {"model": "m", "prompt": self.next_prompt(), "max_tokens": self.max_tokens,
                "temperature": 0, "stream": True}
        start = time.monotonic()
        ttft = None
        try:
            with client.stream("POST", f"{self.url}/v1/completions", json=body) as r:
                if r.status_code != 200:
                    r.read()
                    self.note(f"HTTP {r.status_code}: {r.text[:80]}")
                    return ("failed", None)
                done = False
                for line in r.iter_lines():
                    if time.monotonic() - start > REQUEST_TIMEOUT_S:
                        return ("hung", None)
                    if not line.startswith("data: "):
                        continue
                    data = line[6:]
                    if data == "[DONE]":
                        done = True
                        break
                    chunk = json.loads(data)
                    if "error" in chunk:
                        self.note(f"error event: {str(chunk['error'])[:80]}")
                        return ("failed", None)
                    if ttft is None and chunk.get("choices") and chunk["choices"][0].get("text"):
                        ttft = time.monotonic() - start
                if not done:
                    self.note("stream ended without [DONE]")
                return ("ok", ttft) if done else ("failed", None)
        except httpx.TimeoutException:
            return ("hung", None)
        except (httpx.HTTPError, json.JSONDecodeError) as e:
            self.note(f"{type(e).__name__}: {str(e)[:80]}")
            return ("failed", None)

    def note(self, reason):
        with self.lock:
            self.reasons[reason] = self.reasons.get(reason, 0) + 1

    def client(self, _):
        with httpx.Client(timeout=httpx.Timeout(REQUEST_TIMEOUT_S, connect=5)) as c:
            while not self.stop_flag.is_set():
                outcome = self.one(c)
                with self.lock:
                    self.results.append(outcome)

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop_flag.set()
        for t in self.threads:
            t.join(REQUEST_TIMEOUT_S + 10)
        hung_threads = sum(t.is_alive() for t in self.threads)
        with self.lock:
            self.results.extend([("hung", None)] * hung_threads)


def summarize(name, load, before, after):
    ok = [t for o, t in load.results if o == "ok" and t is not None]
    row = {
        "scenario": name,
        "sent": len(load.results),
        "succeeded": sum(o == "ok" for o, _ in load.results),
        "failed": sum(o == "failed" for o, _ in load.results),
        "hung": sum(o == "hung" for o, _ in load.results),
        "ttft_p50_ms": round(statistics.median(ok) * 1000) if ok else None,
        "ttft_p99_ms": round(sorted(ok)[max(0, int(len(ok) * 0.99) - 1)] * 1000) if ok else None,
    }
    # A replica restarted during the scenario starts its counters again: count it from zero.
    pairs = [(a, b if b and a[1] >= b[1] else (0.0, 0.0)) for a, b in zip(after, before) if a]
    hits = sum(a[0] - b[0] for a, b in pairs)
    queries = sum(a[1] - b[1] for a, b in pairs)
    row["prefix_hit_rate"] = round(hits / queries, 3) if queries else None
    row["failures"] = load.reasons
    log(json.dumps(row))
    return row


def counters(replicas):
    return [r.prefix_counters() for r in replicas]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--candela", required=True)
    ap.add_argument("--router", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--replicas", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--concurrency", type=int, default=6)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--phase-s", type=float, default=40.0)
    ap.add_argument("--base-port", type=int, default=18600)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    replicas = [Replica(args.candela, args.model, args.base_port + i, args.threads, [])
                for i in range(args.replicas)]
    router = None
    rows = []
    try:
        for r in replicas:
            r.start()
        for r in replicas:
            r.wait_ready()
        log(f"{len(replicas)} replicas ready")
        router_port = args.base_port + 50

        for policy in ("round_robin", "cache_aware"):
            router = Router(args.router, router_port, replicas, policy)
            before = counters(replicas)
            with Load(router.url, args.concurrency, args.max_tokens) as load:
                time.sleep(args.phase_s)
            rows.append(summarize(f"steady, {policy}", load, before, counters(replicas)))
            router.stop()
            router = None

        router = Router(args.router, router_port, replicas, "cache_aware")
        # SIGKILL one replica mid-load, then bring it back.
        victim = replicas[-1]
        before = counters(replicas)
        with Load(router.url, args.concurrency, args.max_tokens) as load:
            time.sleep(args.phase_s / 3)
            victim.proc.send_signal(signal.SIGKILL)
            victim.proc.wait()
            time.sleep(args.phase_s * 2 / 3)
        rows.append(summarize("SIGKILL one replica", load, before, counters(replicas)))
        victim.start()
        victim.wait_ready()
        time.sleep(3)

        # SIGSTOP one replica (a hang), resume it after the phase.
        before = counters(replicas)
        with Load(router.url, args.concurrency, args.max_tokens) as load:
            time.sleep(args.phase_s / 3)
            victim.proc.send_signal(signal.SIGSTOP)
            time.sleep(args.phase_s * 2 / 3)
        victim.proc.send_signal(signal.SIGCONT)
        rows.append(summarize("SIGSTOP one replica", load, before, counters(replicas)))
        time.sleep(3)

        # Rolling restarts under load: as a Kubernetes rollout does it (the replica leaves the
        # router's set before SIGTERM, drains, restarts, and rejoins once ready), and with the
        # router left to notice on its own through its health checks.
        for deregister in (True, False):
            before = counters(replicas)
            with Load(router.url, args.concurrency, args.max_tokens) as load:
                time.sleep(3)
                for r in replicas:
                    if deregister:
                        router.remove_worker(r)
                    r.stop(signal.SIGTERM)
                    r.start()
                    r.wait_ready()
                    if deregister:
                        router.add_worker(r)
                    # Let the router's health check see it healthy before the next one goes.
                    time.sleep(3)
            name = "rolling restart, deregistered first" if deregister else \
                "rolling restart, health checks only"
            rows.append(summarize(name, load, before, counters(replicas)))
    finally:
        if router:
            router.stop()
        for r in replicas:
            if r.proc and r.proc.poll() is None:
                r.proc.send_signal(signal.SIGCONT)
                r.stop(signal.SIGKILL, 10)

    with open(args.out, "w") as f:
        json.dump(rows, f, indent=1)
    print("| scenario | sent | succeeded | failed | hung | TTFT p50 ms | TTFT p99 ms | prefix hit rate |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['scenario']} | {r['sent']} | {r['succeeded']} | {r['failed']} | {r['hung']} | "
              f"{r['ttft_p50_ms']} | {r['ttft_p99_ms']} | {r['prefix_hit_rate']} |")


if __name__ == "__main__":
    main()

"""The rehearsal's client load: a closed loop of streaming completions on a shared-prefix
workload, each request classified as ok, failed (an error status, an error event, a stream cut
short) or hung (no answer within REQUEST_TIMEOUT_S), and the per-scenario summary row."""

import json
import random
import statistics
import threading
import time

import httpx

from .procs import log

REQUEST_TIMEOUT_S = 120.0



def documents(count):
    """A shared-prefix workload's long "documents" (640 tokens each with SmolLM2's tokenizer,
    40 KV blocks of 16), which differ from their first words on, so a router that matches
    prefixes tells them apart at once."""
    return [
        " ".join(f"Section {d}.{i}: the {w} of the {n} was recorded in the ledger." for i, (w, n)
                 in enumerate(zip(["height", "colour", "age", "weight", "price", "origin"] * 6,
                                  ["tower", "bridge", "river", "market", "ship", "garden"] * 6)))
        for d in range(count)
    ]


# The workload of every scenario but the routing comparison: 4 documents, which every
# replica's cache holds, many short questions about each.
DOCS = documents(4)
QUESTIONS = [f"Question {q}: summarise point {q % 7} in one sentence." for q in range(64)]


class Load:
    """A closed loop of `concurrency` clients streaming completions until stopped."""

    def __init__(self, url, concurrency, max_tokens, docs=None, seed=None):
        """`docs`: the documents (default DOCS, taken in turn); with `seed`, each request
        picks its document at random from that seed instead, so that round robin over the
        replicas does not line up with the documents' order (with 3 replicas and 18 documents
        taken in turn, replica i would only ever see documents i, i + 3, ...: prefix affinity
        by accident)."""
        self.url, self.concurrency, self.max_tokens = url, concurrency, max_tokens
        self.docs = docs or DOCS
        self.rng = random.Random(seed) if seed is not None else None
        # (outcome, ttft_s, end) with outcome in ok / failed / hung, end a time.monotonic().
        self.results = []
        self.lock = threading.Lock()
        self.stop_flag = threading.Event()
        self.count = 0
        self.reasons = {}
        self.threads = [threading.Thread(target=self.client, daemon=True)
                        for _ in range(concurrency)]

    def next_prompt(self):
        with self.lock:
            n = self.count
            self.count += 1
            doc = self.rng.choice(self.docs) if self.rng else self.docs[n % len(self.docs)]
        return doc + "\n" + QUESTIONS[(n * 7) % len(QUESTIONS)]

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

    def client(self):
        with httpx.Client(timeout=httpx.Timeout(REQUEST_TIMEOUT_S, connect=5)) as c:
            while not self.stop_flag.is_set():
                outcome, ttft = self.one(c)
                with self.lock:
                    self.results.append((outcome, ttft, time.monotonic()))

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop_flag.set()
        # Each client finishes its request in flight; a request bound is REQUEST_TIMEOUT_S.
        deadline = time.monotonic() + REQUEST_TIMEOUT_S + 10
        for t in self.threads:
            t.join(max(0.0, deadline - time.monotonic()))
        hung_threads = sum(t.is_alive() for t in self.threads)
        with self.lock:
            self.results.extend([("hung", None, time.monotonic())] * hung_threads)

    def failures_after(self, t):
        """Requests that failed or hung and ended after time.monotonic() `t`."""
        with self.lock:
            return sum(o != "ok" and end > t for o, _, end in self.results)


def warm_up(replicas):
    """Every document once on every replica, directly: the first measured phase then does not
    also measure cold starts (a later one never would), and each policy starts warm."""

    done = []

    def one(replica):
        for doc in DOCS:
            r = httpx.post(f"{replica.url}/v1/completions", timeout=REQUEST_TIMEOUT_S,
                           json={"model": "m", "prompt": doc + "\n" + QUESTIONS[0],
                                 "max_tokens": 1})
            if r.status_code != 200:
                return
        done.append(replica)

    threads = [threading.Thread(target=one, args=(r,), daemon=True) for r in replicas]
    for t in threads:
        t.start()
    deadline = time.monotonic() + REQUEST_TIMEOUT_S * len(DOCS)
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    if len(done) != len(replicas):
        raise RuntimeError(f"warm-up: {len(replicas) - len(done)} replica(s) did not answer 200")


def summarize(router, name, load, before, after, retries=None, notes=None):
    """One table row. `before`/`after`: the replicas' prefix-cache counters around the scenario;
    `retries`: the router's own retries during it (requests it re-sent to another replica)."""
    outcomes = [o for o, _, _ in load.results]
    ok = [t for o, t, _ in load.results if o == "ok" and t is not None]
    row = {
        "router": router,
        "scenario": name,
        "sent": len(outcomes),
        "succeeded": outcomes.count("ok"),
        "failed": outcomes.count("failed"),
        "hung": outcomes.count("hung"),
        "ttft_p50_ms": round(statistics.median(ok) * 1000) if ok else None,
        "ttft_p99_ms": round(sorted(ok)[max(0, int(len(ok) * 0.99) - 1)] * 1000) if ok else None,
        "router_retries": retries,
    }
    hits = sum(a[0] - b[0] for a, b in zip(after, before))
    queries = sum(a[1] - b[1] for a, b in zip(after, before))
    row["prefix_hit_rate"] = round(hits / queries, 3) if queries else None
    row["failures"] = load.reasons
    if notes:
        row["notes"] = notes
    log(json.dumps(row))
    return row

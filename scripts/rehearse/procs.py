"""Processes of the rehearsal: `candela serve` replicas, and the start, wait and stop that every
other process (routers, Prometheus) goes through too, so that no wait is unbounded and nothing
outlives the run.

Each process writes to its own log file under the run's log folder, so a failed rehearsal can be
read afterwards (a router's log says why it answered 503, a replica's why it exited).
"""

import os
import signal
import subprocess
import sys
import time

import httpx

READY_TIMEOUT_S = 180.0
# SIGTERM gives a replica --drain-timeout-s (60) to finish its requests, plus exit time.
STOP_TIMEOUT_S = 90.0


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def spawn(args, log_path, env=None):
    """Starts `args` with stdout and stderr appended to `log_path` (a restart adds to the log)."""
    with open(log_path, "ab") as out:
        return subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env,
                                stdin=subprocess.DEVNULL)


def stop(proc, sig=signal.SIGTERM, wait_s=STOP_TIMEOUT_S):
    """Sends `sig` and waits up to `wait_s`, then SIGKILL. A stopped (SIGSTOP) process gets
    SIGCONT first: otherwise a SIGTERM would wait, pending, for the whole bound."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGCONT)
    proc.send_signal(sig)
    try:
        proc.wait(wait_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def wait_until(check, timeout_s, what, interval_s=0.2):
    """Calls `check` until it returns something true, within `timeout_s`; returns that."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise RuntimeError(f"{what}: not within {timeout_s:.0f} s")
        time.sleep(interval_s)


def wait_ok(url, timeout_s, proc, what):
    """Polls `url` until it answers 200, within `timeout_s`; fails at once if `proc` exits."""

    def ok():
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        try:
            return httpx.get(url, timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    wait_until(ok, timeout_s, f"{what} ready at {url}")


def metric_values(text, name):
    """{labels: value} of metric `name` in a Prometheus text page (labels as written)."""
    values = {}
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            series, _, value = line.rpartition(" ")
            values[series[len(name):]] = float(value)
    return values


class Replica:
    """One `candela serve` on a loopback port; restarts keep the port (and the scrape target)."""

    def __init__(self, binary, model, port, threads, log_dir, kv_cache_memory=None):
        self.binary, self.model, self.port, self.threads = binary, model, port, threads
        # GiB (`--kv-cache-memory`); None: the server's default.
        self.kv_cache_memory = kv_cache_memory
        self.log_path = os.path.join(log_dir, f"replica-{port}.log")
        self.proc = None
        self.fault = None
        # Prefix-cache counters of this port's earlier processes, so that totals run on
        # across restarts: (hits, queries) in tokens.
        self.banked = (0.0, 0.0)

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}"

    @property
    def address(self):
        """How Prometheus labels it (`instance`)."""
        return f"127.0.0.1:{self.port}"

    def start(self, fault=None):
        """`fault` is a CANDELA_FAULT_INJECT value (a binary built with `fault-injection`)."""
        env = dict(os.environ, RAYON_NUM_THREADS=str(self.threads), RUST_LOG="warn")
        env.pop("CANDELA_FAULT_INJECT", None)
        if fault:
            env["CANDELA_FAULT_INJECT"] = fault
        self.fault = fault
        self.proc = spawn(
            [self.binary, "serve", "--model", self.model, "--served-model-name", "m",
             "--host", "127.0.0.1", "--port", str(self.port), "--drain-timeout-s", "60"]
            + (["--kv-cache-memory", str(self.kv_cache_memory)] if self.kv_cache_memory else []),
            self.log_path, env)

    def wait_ready(self):
        wait_ok(f"{self.url}/ready", READY_TIMEOUT_S, self.proc, f"replica {self.port}")

    def stop(self, sig=signal.SIGTERM, wait_s=STOP_TIMEOUT_S):
        self.bank()
        stop(self.proc, sig, wait_s)

    def kill(self):
        """SIGKILL, as a crash: no drain."""
        self.bank()
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def bank(self):
        """Adds the running process's counters to the port's total before the process goes
        (what it counts between this and its end is lost: a request or two)."""
        now = self._process_counters()
        if now and self.proc and self.proc.poll() is None:
            self.banked = (self.banked[0] + now[0], self.banked[1] + now[1])

    def _process_counters(self):
        try:
            text = httpx.get(f"{self.url}/metrics", timeout=2).text
        except httpx.HTTPError:
            return None
        hits = metric_values(text, "candela:prefix_cache_hits_total").get("", 0.0)
        queries = metric_values(text, "candela:prefix_cache_queries_total").get("", 0.0)
        return hits, queries

    def prefix_counters(self):
        """(hits, queries) of the prefix cache on this port since the rehearsal began, in
        tokens (a process that is down or stopped adds nothing)."""
        now = self._process_counters() or (0.0, 0.0)
        return self.banked[0] + now[0], self.banked[1] + now[1]

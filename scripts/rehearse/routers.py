"""The two routers the rehearsal puts in front of the replicas, behind one interface so the
scenarios run unchanged through either: vLLM's router (vllm-router, PyPI) and HAProxy.

Both: `url`, `take_out(replica)` / `put_back(replica)` (the graceful path of a rolling restart:
no new requests before SIGTERM, back once ready), `wait_in_rotation(replica)`, `retries()`
(requests the router re-sent to another replica so far), `settle_s` (how long after a fault
the router needs before every healthy replica takes requests again), and `stop()`.
"""

import csv
import io
import os
import socket
import string
import subprocess

import httpx

from . import procs
from .procs import log, metric_values, spawn, wait_ok, wait_until

ROTATION_TIMEOUT_S = 30.0
HAPROXY_TEMPLATE = os.path.join(os.path.dirname(__file__), "haproxy.cfg.in")


class VllmRouter:
    """vllm-router with health checks every second on /health, retries that outlast them, and
    a circuit breaker whose open state lasts `cb_timeout_s`.

    Why the retries are spread over 5 s (6 retries, 100 ms doubling, at most 2 s apart): a
    retry goes through the routing policy again, and cache_aware picks the same replica (it
    holds the prefix) until the health check has marked it unhealthy, two failed checks a
    second apart after it began draining or died, later on a loaded machine. The router's
    default backoff (50 ms, x1.5) spends its retries within a quarter second, all on that
    replica: a draining replica's 503 or a dead one's refused connection reached the client
    (measured: 2 requests lost in a health-check-only rolling restart; 1 still with 3 s of
    retries).

    Why the breaker setting matters: vllm-router (like SGLang's router it comes from) keeps a
    circuit breaker per worker, apart from its health checks. It opens after 10 consecutive
    failed attempts (under load, a killed replica's refused connections get there before the
    health check ejects it), and only time closes it: after its open duration the next
    routing decision makes it half-open, and 3 successes close it. A passing health check does
    not, and meanwhile `/workers` reports the worker `is_healthy: true` (only the metric
    `vllm_router_cb_state` shows the breaker, and it keeps a removed and re-added worker's
    last value). With the default duration (60 s) a replica that crashed and came back is
    skipped for a minute; a rolling restart that deregisters the other replica meanwhile
    leaves the router no available worker, and it answers 503 "No available workers (all
    circuits open or unhealthy)" until that one is back. A duration of a few health-check
    intervals keeps the breaker's quick ejection without outliving the outage.
    """

    name = "vllm-router"

    def __init__(self, binary, port, workers, policy, cb_timeout_s, log_dir, settle_s=None):
        self.url = f"http://127.0.0.1:{port}"
        self.metrics_url = f"http://127.0.0.1:{port + 1}/metrics"
        self.cb_timeout_s = cb_timeout_s
        # An open breaker goes half-open at the first routing decision after its duration.
        # (`settle_s` shorter than that reproduces the 503s described above.)
        self.settle_s = settle_s if settle_s is not None else max(3.0, cb_timeout_s + 1.0)
        self.proc = spawn(
            # Its own metrics port next to its port: the default (29000) may be taken.
            [binary, "--host", "127.0.0.1", "--port", str(port), "--policy", policy,
             "--prometheus-host", "127.0.0.1", "--prometheus-port", str(port + 1),
             "--worker-urls", *[w.url for w in workers],
             "--health-check-endpoint", "/health", "--health-check-interval-secs", "1",
             "--health-check-timeout-secs", "5", "--health-failure-threshold", "2",
             "--health-success-threshold", "1",
             "--retry-max-retries", "6", "--retry-initial-backoff-ms", "100",
             "--retry-backoff-multiplier", "2", "--retry-max-backoff-ms", "2000",
             "--cb-timeout-duration-secs", str(cb_timeout_s),
             "--request-timeout-secs", "120", "--log-level", "info"],
            os.path.join(log_dir, f"vllm-router-{policy}.log"))
        wait_ok(f"{self.url}/health", 60, self.proc, "vllm-router")

    def take_out(self, worker):
        httpx.post(f"{self.url}/remove_worker", params={"url": worker.url},
                   timeout=10).raise_for_status()

    def put_back(self, worker):
        httpx.post(f"{self.url}/add_worker", params={"url": worker.url},
                   timeout=60).raise_for_status()

    def workers(self):
        return httpx.get(f"{self.url}/workers", timeout=5).json()["workers"]

    def wait_in_rotation(self, worker):
        wait_until(lambda: any(w["url"] == worker.url and w["is_healthy"] for w in self.workers()),
                   ROTATION_TIMEOUT_S, f"vllm-router: {worker.url} healthy")

    def _metrics(self, name):
        try:
            return metric_values(httpx.get(self.metrics_url, timeout=5).text, name)
        except httpx.HTTPError:
            return {}

    def retries(self):
        return int(sum(self._metrics("vllm_router_retries_total").values()))

    def breaker_transitions(self):
        """{'{worker=...,from=...,to=...}': count}, the breakers' history so far."""
        return self._metrics("vllm_router_cb_state_transitions_total")

    def stop(self):
        procs.stop(self.proc, wait_s=10)


class Haproxy:
    """HAProxy from scripts/rehearse/haproxy.cfg.in, driven through its runtime API socket."""

    name = "haproxy"
    backend = "replicas"

    def __init__(self, binary, port, workers, log_dir):
        self.url = f"http://127.0.0.1:{port}"
        self.socket_path = os.path.join(log_dir, "haproxy.sock")
        self.workers = workers
        self.settle_s = 3.0
        with open(HAPROXY_TEMPLATE) as f:
            template = string.Template(f.read())
        servers = "\n".join(f"    server {self.server(w)} {w.address} check" for w in workers)
        config = os.path.join(log_dir, "haproxy.cfg")
        with open(config, "w") as f:
            f.write(template.substitute(port=port, socket=self.socket_path, servers=servers))
        check = subprocess.run([binary, "-c", "-f", config], capture_output=True, text=True,
                               timeout=30)
        if check.returncode != 0:
            raise RuntimeError(f"haproxy rejects {config}:\n{check.stdout}{check.stderr}")
        self.proc = spawn([binary, "-db", "-f", config], os.path.join(log_dir, "haproxy.log"))
        wait_ok(f"{self.url}/haproxy-health", 30, self.proc, "haproxy")
        for w in workers:
            self.wait_in_rotation(w)

    @staticmethod
    def server(worker):
        return f"r{worker.port}"

    def api(self, command):
        """One runtime API command; its answer."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(5)
            s.connect(self.socket_path)
            s.sendall(command.encode() + b"\n")
            chunks = []
            while chunk := s.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode()

    def stats(self):
        """The backend's `show stat` rows by server name (BACKEND is the backend's own)."""
        text = self.api("show stat").lstrip("# ")
        return {row["svname"]: row for row in csv.DictReader(io.StringIO(text))
                if row["pxname"] == self.backend}

    def set_state(self, worker, state):
        answer = self.api(f"set server {self.backend}/{self.server(worker)} state {state}")
        if answer.strip():
            raise RuntimeError(f"haproxy refused `state {state}`: {answer.strip()}")

    def take_out(self, worker):
        """Drain: no new requests; waits until its in-flight ones are done (the replica's drain
        would finish them too, but then the router would still be offering it new ones)."""
        self.set_state(worker, "drain")
        wait_until(lambda: self.stats()[self.server(worker)]["scur"] == "0",
                   procs.STOP_TIMEOUT_S, f"haproxy: {self.server(worker)} drained")

    def put_back(self, worker):
        self.set_state(worker, "ready")

    def wait_in_rotation(self, worker):
        wait_until(lambda: self.stats()[self.server(worker)]["status"].startswith("UP"),
                   ROTATION_TIMEOUT_S, f"haproxy: {self.server(worker)} UP")

    def retries(self):
        row = self.stats()["BACKEND"]
        return int(row["wretr"] or 0) + int(row["wredis"] or 0)

    def stop(self):
        procs.stop(self.proc, wait_s=10)
        log("haproxy stopped")

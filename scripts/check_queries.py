"""Runs every PromQL query in deploy/ against a real Prometheus scraping a real `candela serve`
(driven by scripts/check-queries; by hand, not in scripts/test: it needs the `prometheus` binary).

scripts/check-deploy proves each query parses and names exported series; this proves they
return what the panels, KEDA and the analysis expect. Everything is on loopback: two servers, a
"stable" one (--max-num-seqs 8) and a "canary" one made slower to first token
(--max-num-seqs 1: a burst queues behind one sequence), Prometheus scraping both every second
with the target labels the ServiceMonitor's targets carry in a cluster (namespace, service,
pod, rollouts_pod_template_hash), a bounded burst of requests to each, then each query with
Grafana's variables and Argo's args filled in.

- Every dashboard query and KEDA trigger returns a result.
- The analysis with the stable pod as both canary and stable passes (each ratio is 1).
- The analysis of the slow canary against the stable pod fails its TTFT metric: the abort path
  is reachable with real series, not only written down.

Prints one line per query; exits 1 when any of these does not hold.
"""

import concurrent.futures
import json
import math
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import check_deploy as cd  # noqa: E402

BINARY = Path(os.environ.get("CANDELA_BIN", ROOT / "target/release/candela"))
MODEL = ROOT / "models/SmolLM2-135M-Instruct.Q4_1.gguf"
PROMETHEUS = os.environ.get("PROMETHEUS", "prometheus")
# (hash, --max-num-seqs): the canary queues a burst of 8 behind one running sequence.
SERVERS = (("stable", "8"), ("canary", "1"))
LABELS = {"namespace": "candela", "service": "candela"}
WAIT_S = 120


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(url: str, what: str):
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"{what} not ready within {WAIT_S} s")


def fill(expr: str, args: dict = None) -> str:
    expr = re.sub(r"\{\{\s*args\.([\w-]+)\s*\}\}", lambda m: args[m.group(1)], expr)
    expr = expr.replace("$__rate_interval", "30s").replace("$namespace", LABELS["namespace"])
    return expr.replace("$pod", ".*")


def query(prometheus: str, expr: str) -> list:
    r = httpx.get(f"{prometheus}/api/v1/query", params={"query": expr}, timeout=10)
    body = r.json()
    if body.get("status") != "success":
        raise ValueError(body.get("error", r.text))
    return [float(sample["value"][1]) for sample in body["data"]["result"]]


def burst(server: str, model: str):
    """Two rounds of 8 concurrent chat requests (16 tokens each): with 2 running, 6 wait."""
    def one(i):
        httpx.post(f"{server}/v1/chat/completions", timeout=120, json={
            "model": model, "max_tokens": 16,
            "messages": [{"role": "user", "content": f"Count to {i}."}]}).raise_for_status()
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        for _ in range(2):
            list(pool.map(one, range(8)))


def main() -> int:
    ports = {hash_: free_port() for hash_, _ in SERVERS}
    prometheus_port = free_port()
    prometheus = f"http://127.0.0.1:{prometheus_port}"
    procs = []
    with tempfile.TemporaryDirectory(prefix="candela-queries-") as tmp:
        config = Path(tmp) / "prometheus.yml"
        targets = ""
        for hash_, port in ports.items():
            labels = {**LABELS, "pod": f"candela-{hash_}", "rollouts_pod_template_hash": hash_}
            targets += f"""      - targets: ["127.0.0.1:{port}"]
        labels: {json.dumps(labels)}
"""
        config.write_text(f"""global:
  scrape_interval: 1s
scrape_configs:
  - job_name: candela
    static_configs:
{targets}""")
        try:
            for hash_, seqs in SERVERS:
                procs.append(subprocess.Popen(
                    [str(BINARY), "serve", "--model", str(MODEL), "--host", "127.0.0.1",
                     "--port", str(ports[hash_]), "--max-num-seqs", seqs,
                     "--served-model-name", "smollm2"],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            procs.append(subprocess.Popen(
                [PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={tmp}/data",
                 f"--web.listen-address=127.0.0.1:{prometheus_port}"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            for hash_, port in ports.items():
                wait_for(f"http://127.0.0.1:{port}/ready", f"candela serve ({hash_})")
            wait_for(f"{prometheus}/-/ready", "prometheus")
            time.sleep(3)
            for port in ports.values():
                burst(f"http://127.0.0.1:{port}", "smollm2")
            time.sleep(3)  # a few scrapes after the bursts
            return run_queries(prometheus)
        finally:
            for proc in procs:
                proc.terminate()
            for proc in procs:
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()


def run_queries(prometheus: str) -> int:
    version = httpx.get(f"{prometheus}/api/v1/status/buildinfo", timeout=5).json()["data"]["version"]
    print(f"Prometheus {version}; servers {dict(SERVERS)} (hash: --max-num-seqs)")
    failures = 0
    docs = cd.render_python(ROOT / "deploy/overlays/canary")
    dashboard = json.loads((ROOT / cd.DASHBOARD).read_text())
    for where, expr in cd.dashboard_queries(dashboard) + [
            (w, e) for w, e in cd.manifest_queries(docs) if w.startswith("ScaledObject")]:
        values = evaluate(prometheus, where, fill(expr))
        ok = bool(values)
        print(f"{'ok  ' if ok else 'FAIL'} {where}: {shown(values)}")
        failures += not ok
    metrics = [(f"metric {m['name']}", m["successCondition"], m["provider"]["prometheus"]["query"])
               for d in docs if d["kind"] == "AnalysisTemplate" for m in d["spec"]["metrics"]]
    same = {"namespace": "candela", "canary-hash": "stable", "stable-hash": "stable"}
    slow = {"namespace": "candela", "canary-hash": "canary", "stable-hash": "stable"}
    print("analysis, stable pod against itself: every metric must pass")
    for name, condition, expr in metrics:
        values = evaluate(prometheus, name, fill(expr, same))
        ok = values is not None and analysis_passes(condition, values)
        print(f"{'ok  ' if ok else 'FAIL'} {name}: {shown(values)} ({condition})")
        failures += not ok
    print("analysis, slow canary (--max-num-seqs 1) against stable: TTFT must fail")
    for name, condition, expr in metrics:
        values = evaluate(prometheus, name, fill(expr, slow))
        passes = values is not None and analysis_passes(condition, values)
        must_fail = "ttft" in name
        ok = values is not None and (not passes if must_fail else True)
        verdict = "fails, as it must" if must_fail and not passes else (
            "passes" if passes else "fails")
        print(f"{'ok  ' if ok else 'FAIL'} {name}: {shown(values)} -> {verdict}")
        failures += not ok
    print(f"{failures} failed")
    return 1 if failures else 0


def evaluate(prometheus: str, where: str, expr: str):
    try:
        return query(prometheus, expr)
    except (ValueError, httpx.HTTPError) as e:
        print(f"FAIL {where}: {e}")
        return None


def shown(values) -> str:
    if values is None:
        return "error"
    return "[" + (", ".join(f"{v:.4g}" for v in values[:4]) or "empty") + "]"


def analysis_passes(condition: str, values: list) -> bool:
    """Our successConditions' one shape: `len(result) == 0 || isNaN(result[0]) || result[0] <= X`."""
    match = re.fullmatch(r"len\(result\) == 0 \|\| isNaN\(result\[0\]\) \|\| result\[0\] <= ([\d.]+)",
                         condition)
    if match is None:
        raise SystemExit(f"successCondition {condition!r} is not the shape this script evaluates")
    return not values or math.isnan(values[0]) or values[0] <= float(match.group(1))


if __name__ == "__main__":
    sys.exit(main())

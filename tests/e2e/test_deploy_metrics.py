"""deploy/ against a real `candela serve`: the metric names every query reads, the probe routes,
and the Deployment's flags.

scripts/check-deploy checks the same queries offline against deploy/exported-metrics.txt; the
first test here keeps that file equal to what the server really exports, the second checks every
query against the live /metrics directly.
"""

import json
import sys
from pathlib import Path

import httpx

from conftest import Server

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

import check_deploy as cd  # noqa: E402

# Flags the Server fixture sets itself (to a loopback port and the test's model).
FIXTURE_FLAGS = ("--model", "--host", "--port")


def live_families(server, client, model_name) -> dict:
    """name -> type of every metric family on /metrics after one request (so labelled counters
    such as request_success_total have a series)."""
    client.chat.completions.create(model=model_name, max_tokens=4,
                                   messages=[{"role": "user", "content": "Hi"}])
    response = httpx.get(f"{server.url}/metrics", timeout=10)
    assert response.status_code == 200
    return cd.parse_exposition(response.text)


def all_queries() -> list:
    queries = []
    for kustomization in cd.KUSTOMIZATIONS:
        queries += [(f"{kustomization} {what}", expr)
                    for what, expr in cd.manifest_queries(cd.render_python(ROOT / kustomization))]
    dashboard = json.loads((ROOT / cd.DASHBOARD).read_text())
    return queries + [(f"{cd.DASHBOARD} {what}", expr)
                      for what, expr in cd.dashboard_queries(dashboard)]


def deployment_container() -> dict:
    docs = cd.render_python(ROOT / "deploy/base")
    return cd.pod_spec(cd.find(docs, "Deployment", "candela"))["containers"][0]


def test_exported_metrics_file_is_what_the_server_exports(server, client, model_name):
    live = live_families(server, client, model_name)
    listed = cd.read_exported(ROOT)
    assert live == listed, (
        f"{cd.EXPORTED_METRICS} is out of date: only on the server "
        f"{sorted(set(live.items()) - set(listed.items()))}, only in the file "
        f"{sorted(set(listed.items()) - set(live.items()))}")


def test_every_query_reads_metrics_the_server_exports(server, client, model_name):
    live = live_families(server, client, model_name)
    queries = all_queries()
    # 2 KEDA triggers (production and canary) + 3 analysis metrics + the dashboard's panels.
    assert len(queries) >= 2 + 2 + 3 + 15, [w for w, _ in queries]
    problems = [f"{what}: {p}" for what, expr in queries for p in cd.promql_problems(expr, live)]
    assert problems == []


def test_probe_and_scrape_paths_answer_on_a_ready_server(server):
    container = deployment_container()
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        path = container[probe]["httpGet"]["path"]
        response = httpx.get(f"{server.url}{path}", timeout=5)
        assert response.status_code == 200, (probe, path, response.text)
    monitor = cd.find(cd.render_python(ROOT / "deploy/overlays/production"), "ServiceMonitor")
    path = monitor["spec"]["endpoints"][0]["path"]
    response = httpx.get(f"{server.url}{path}", timeout=5)
    assert response.status_code == 200 and "vllm:num_requests_waiting" in response.text


def test_the_deployments_flags_start_a_server_that_drains_on_sigterm():
    """The Deployment's args (less the flags the fixture sets) are flags `candela serve` takes:
    the server comes up ready with them, serves, and exits 0 on SIGTERM."""
    args = [str(a) for a in deployment_container()["args"]]
    kept = []
    i = 0
    while i < len(args):
        if args[i] in FIXTURE_FLAGS:
            i += 2
            continue
        kept.append(args[i])
        i += 1
    assert "--served-model-name" in kept and "--drain-timeout-s" in kept
    s = Server(*kept)
    try:
        served = cd.flag_value(kept, "--served-model-name")
        models = httpx.get(f"{s.url}/v1/models", timeout=5).json()
        assert [m["id"] for m in models["data"]] == [served]
        reply = s.client().chat.completions.create(
            model=served, max_tokens=4, messages=[{"role": "user", "content": "Hi"}])
        assert reply.choices[0].finish_reason in ("stop", "length")
    finally:
        code = s.stop()
    assert code == 0, s.log_tail()


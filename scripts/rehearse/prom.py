"""Prometheus for the rehearsal, and the canonical queries it proves.

Our own `prometheus` on a loopback port with a temporary data folder (never the system
service), scraping every replica's /metrics each second; queries go through `promtool query
instant`, the way an operator would check them by hand. The query strings come from
deploy/prometheus/queries.yaml, the one place they are written.
"""

import json
import math
import os
import subprocess

import yaml

from . import procs
from .procs import spawn, wait_ok, wait_until

QUERY_TIMEOUT_S = 30


def load_queries(path):
    """{name: {expr, meaning, threshold, ...}} from queries.yaml, checked for its fields."""
    with open(path) as f:
        document = yaml.safe_load(f)
    queries = {}
    for q in document["queries"]:
        missing = {"name", "expr", "meaning", "threshold"} - q.keys()
        if missing:
            raise ValueError(f"{path}: query {q.get('name')} lacks {sorted(missing)}")
        queries[q["name"]] = q
    return queries


class Prometheus:
    def __init__(self, binary, promtool, port, targets, log_dir, labels=None):
        """`labels`: {target: {label: value}} added to that target's series (the labels a
        cluster's service discovery would give it; see manifests.py)."""
        self.promtool = promtool
        self.url = f"http://127.0.0.1:{port}"
        self.targets = targets
        config = os.path.join(log_dir, "prometheus.yml")
        with open(config, "w") as f:
            # The rehearsal's phases last seconds: a 1 s scrape gives rate() windows of 30 s
            # thirty points (a deployment scrapes every 10-30 s and queries longer windows).
            f.write("# Written by scripts/rehearse/prom.py for one rehearsal run.\n")
            f.write(yaml.safe_dump({
                "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                "scrape_configs": [{"job_name": "candela",
                                    "static_configs": [
                                        {"targets": [t], "labels": (labels or {}).get(t, {})}
                                        for t in targets]}],
            }))
        self.proc = spawn(
            [binary, f"--config.file={config}",
             f"--storage.tsdb.path={os.path.join(log_dir, 'prometheus-data')}",
             f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
            os.path.join(log_dir, "prometheus.log"))
        wait_ok(f"{self.url}/-/ready", 60, self.proc, "prometheus")

    def query(self, expr):
        """{instance (or '' for a label-free result): value} of an instant query."""
        out = subprocess.run([self.promtool, "query", "instant", "-o", "json", self.url, expr],
                             capture_output=True, text=True, timeout=QUERY_TIMEOUT_S)
        if out.returncode != 0:
            raise RuntimeError(f"promtool query instant {expr!r}: {out.stderr.strip()}")
        # An empty result prints nothing; a vector prints a JSON list.
        samples = json.loads(out.stdout) if out.stdout.strip() else []
        return {s["metric"].get("instance", ""): float(s["value"][1]) for s in samples}

    def scalar(self, expr):
        """The one value of a query that sums over replicas; NaN when it has none."""
        values = self.query(expr)
        return values.get("", math.nan)

    def wait_scraping(self, timeout_s=30):
        """Until every target has been scraped up for a few seconds."""
        wait_until(lambda: self.scalar(
            'count(count_over_time(up{job="candela"}[5s]) >= 3'
            ' and min_over_time(up{job="candela"}[5s]) == 1)')
                   == len(self.targets), timeout_s, "prometheus scraping every replica",
                   interval_s=1)

    def stop(self):
        procs.stop(self.proc, wait_s=10)

"""Replicas behind two routers, rehearsed on loopback (driven by scripts/rehearse-replicas).

Starts N `candela serve` replicas and Prometheus scraping them, puts vLLM's router
(vllm-router) and then HAProxy in front, runs the same scenarios through each under a steady
closed-loop load of streaming completions, and prints one table row per scenario: requests
sent, succeeded, failed, hung (no answer within the per-request bound), TTFT p50/p99, the
router's own retries, and the replicas' prefix-cache hit rate over the scenario.

- steady load (vllm-router: round robin and cache-aware on a shared-prefix workload of more
  documents than one replica's KV cache holds, each policy on freshly restarted replicas;
  HAProxy: least connections);
- SIGKILL of one replica: in-flight requests on it fail cleanly, and none fail once the
  router has noticed;
- SIGSTOP of one replica (a hang, resumed later): the health check ejects it, nothing fails;
- rolling restart (SIGTERM, wait, start, wait for ready) of every replica, gracefully (the
  router stops sending to it first: vllm-router `/remove_worker` + `/add_worker`, HAProxy
  `state drain` + `state ready`) and with the router left to notice through its health checks;
- canary: one replica restarted with a fault that slows every forward pass; the canonical
  queries of deploy/prometheus/queries.yaml, run with `promtool query instant`, must flag it
  and no healthy one, and the autoscaling query must rise under the load and fall after it;
  so must the manifests' own queries (rehearse/manifests.py): the AnalysisTemplate, each
  replica taken as the canary, aborts for the slowed one only, and the ScaledObject's
  triggers rise under the load and come back to idle.

Checks (any failing one makes the exit status 1, after the results are written): no request
hangs anywhere; no request fails in steady, SIGSTOP, graceful rolling-restart and canary
scenarios; after a SIGKILL nothing fails later than KILL_FAILURE_WINDOW_S; the Prometheus checks
above; in the full run, cache-aware routing has a higher prefix hit rate and a lower TTFT p50
than round robin. Failures in a health-check-only rolling restart are reported, not checked. `--short`
runs a subset (the steady load through both routers, SIGKILL and the deregistered rolling
restart through vllm-router, the canary) for scripts/test.

Every wait is bounded; every process is killed on exit.
"""

import argparse
import json
import math
import os
import signal
import sys
import tempfile
import time

from rehearse import manifests
from rehearse.load import Load, documents, summarize, warm_up
from rehearse.procs import Replica, log, wait_until
from rehearse.prom import Prometheus, load_queries
from rehearse.routers import Haproxy, VllmRouter

# After a SIGKILL the routers must stop sending to the dead replica within this: health checks
# every 1 s, out after 2 failures, plus the requests in flight on it when it died.
KILL_FAILURE_WINDOW_S = 10.0
# The autoscaling query averages over 30 s: back near 0 within that plus scrape slack.
AUTOSCALE_FALL_TIMEOUT_S = 60.0
IDLE_IN_FLIGHT_MAX = 0.5
# The repository root: the manifests' queries are read from deploy/.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The routing comparison's document sequence (the same for both policies).
ROUTING_SEED = 17


class Rehearsal:
    """The replicas, routers and Prometheus of one run, and the rows and checks it produces."""

    def __init__(self, args, log_dir):
        self.args = args
        self.log_dir = log_dir
        self.replicas = [Replica(args.candela, args.model, args.base_port + i, args.threads, log_dir,
                                 args.kv_cache_memory)
                         for i in range(args.replicas)]
        self.queries = load_queries(args.queries)
        self.routers = []
        self.prometheus = None
        self.rows = []
        self.checks = []  # (passed, what)
        self.prom_results = {}
        self.breakers = {}

    def check(self, passed, what):
        self.checks.append((bool(passed), what))
        log(f"check {'PASS' if passed else 'FAIL'}: {what}")

    def counters(self):
        return [r.prefix_counters() for r in self.replicas]

    def start(self):
        for r in self.replicas:
            r.start()
        for r in self.replicas:
            r.wait_ready()
        log(f"{len(self.replicas)} replicas ready; logs in {self.log_dir}")
        if not self.args.short:
            # The short run compares no routing; its checks do not depend on warm caches.
            warm_up(self.replicas)
        self.prometheus = Prometheus(self.args.prometheus, self.args.promtool,
                                     self.args.base_port + 70,
                                     [r.address for r in self.replicas], self.log_dir,
                                     {r.address: manifests.target_labels(r.port)
                                      for r in self.replicas})
        self.prometheus.wait_scraping()
        in_flight = self.autoscale_signal()
        self.check(in_flight <= IDLE_IN_FLIGHT_MAX,
                   f"autoscale query idle before any load: {in_flight:.2f} <= {IDLE_IN_FLIGHT_MAX}")

    def restart_all_cold(self):
        """Every replica restarted (SIGTERM, start, ready), so that a phase starts with empty
        prefix caches whatever the phase before it left (there is no route that empties one)."""
        for r in self.replicas:
            r.stop()
        for r in self.replicas:
            r.start()
        for r in self.replicas:
            r.wait_ready()

    def routing_checks(self):
        """Cache-aware routing beats round robin on the routing workload: a higher prefix-cache
        hit rate and a lower TTFT p50 (p99 is reported, not checked: one cold prefill behind
        another on a loaded machine decides it)."""
        rr, ca = self.rows[-2], self.rows[-1]
        self.check(ca["prefix_hit_rate"] is not None and rr["prefix_hit_rate"] is not None
                   and ca["prefix_hit_rate"] > rr["prefix_hit_rate"],
                   f"prefix hit rate: cache_aware {ca['prefix_hit_rate']} > round_robin "
                   f"{rr['prefix_hit_rate']}")
        self.check(ca["ttft_p50_ms"] is not None and rr["ttft_p50_ms"] is not None
                   and ca["ttft_p50_ms"] < rr["ttft_p50_ms"],
                   f"TTFT p50: cache_aware {ca['ttft_p50_ms']} ms < round_robin "
                   f"{rr['ttft_p50_ms']} ms")

    def autoscale_signal(self):
        return self.prometheus.scalar(self.queries["autoscale_requests_in_flight"]["expr"])

    def router(self, router):
        self.routers.append(router)
        return router

    def stop_router(self, router):
        router.stop()
        self.routers.remove(router)

    def scenario(self, router, name, body, healthy=True, docs=None, seed=None):
        """Runs `body(load)` under load through `router` and adds its row. `healthy`: no
        request may fail (nothing is broken in it, or what breaks must be invisible). `docs`
        and `seed`: the load's documents and random pick (see `Load`)."""
        before = self.counters()
        retries_before = router.retries()
        with Load(router.url, self.args.concurrency, self.args.max_tokens, docs, seed) as load:
            notes = body(load)
        row = summarize(router.name, name, load, before, self.counters(),
                        retries=router.retries() - retries_before, notes=notes)
        self.rows.append(row)
        self.check(row["hung"] == 0, f"{router.name}, {name}: no request hangs ({row['hung']})")
        if healthy:
            self.check(row["failed"] == 0,
                       f"{router.name}, {name}: no request fails ({row['failed']})")
        return load

    # Scenarios. Each leaves every replica running, ready and back in the router's rotation;
    # a scenario's body may return notes for its row.

    def steady(self, router, name, docs=None, seed=None):
        self.scenario(router, name, lambda load: time.sleep(self.args.phase_s), docs=docs,
                      seed=seed)

    def sigkill(self, router):
        victim = self.replicas[-1]
        killed_at = {}

        def body(_):
            time.sleep(self.args.phase_s / 3)
            victim.kill()
            killed_at["t"] = time.monotonic()
            time.sleep(self.args.phase_s * 2 / 3)

        load = self.scenario(router, "SIGKILL one replica", body, healthy=False)
        # Counted once every client is done: a request cut late ends after the phase.
        late = load.failures_after(killed_at["t"] + KILL_FAILURE_WINDOW_S)
        self.rows[-1]["notes"] = {"failed_later_than_window": late}
        self.check(late == 0, f"{router.name}, SIGKILL: no failure later than "
                              f"{KILL_FAILURE_WINDOW_S:.0f} s after the kill ({late})")
        self.restart(router, victim)

    def sigstop(self, router):
        victim = self.replicas[-1]

        def body(_):
            time.sleep(self.args.phase_s / 3)
            victim.proc.send_signal(signal.SIGSTOP)
            # The hang outlasts every health check; then it resumes, and the requests stuck
            # on it finish while the load still runs (late, but they are not lost).
            time.sleep(self.args.phase_s / 2)
            victim.proc.send_signal(signal.SIGCONT)
            time.sleep(self.args.phase_s / 6)

        self.scenario(router, "SIGSTOP one replica", body)
        router.wait_in_rotation(victim)
        time.sleep(router.settle_s)

    def restart(self, router, replica, fault=None):
        replica.stop()
        replica.start(fault)
        replica.wait_ready()
        router.wait_in_rotation(replica)
        time.sleep(router.settle_s)

    def rolling_restart(self, router, graceful):
        def body(_):
            time.sleep(3)
            for r in self.replicas:
                if graceful:
                    router.take_out(r)
                r.stop(signal.SIGTERM)
                r.start()
                r.wait_ready()
                if graceful:
                    router.put_back(r)
                router.wait_in_rotation(r)
                # Taken out gracefully, a replica comes back with nothing held against it;
                # one the router saw fail may still be skipped for settle_s.
                time.sleep(1.0 if graceful else router.settle_s)

        how = {("vllm-router", True): "deregistered first",
               ("haproxy", True): "drained first (runtime API)"}.get(
            (router.name, graceful), "health checks only")
        # The graceful restart must lose nothing. Left to its health checks, a router can send
        # a request to the replica in the second or two before it notices; its retries mask
        # that, mostly: measured and reported, not required.
        self.scenario(router, f"rolling restart, {how}", body, healthy=graceful)

    def canary(self, router):
        """One replica slowed by fault injection, load for a full query window, then the
        canonical queries; then the autoscaling signal must fall once the load stops."""
        q = {name: self.queries[name]["expr"] for name in self.queries}
        slow = self.replicas[-1]
        fault = f"forward-delay:1:{self.args.canary_delay_ms}"
        self.restart(router, slow, fault)
        # Every replica holds every document first, so that what the queries compare is the
        # fault, not cold prefills: a healthy replica restarted by an earlier scenario holds
        # only the documents its router sent it, and one cold 400-token prefill on a loaded
        # CPU took 17 s, which made p99 (with tens of requests, the slowest one) flag it.
        warm_up(self.replicas)
        # The queries' rate() windows are 30 s: fill one with the slow replica in rotation.
        window_s = max(self.args.phase_s, 35.0)
        results = {}

        def body(_):
            time.sleep(window_s)
            for name in ("canary_ttft_p99_ratio", "ttft_p99_by_replica", "error_rate_by_replica"):
                results[name] = self.prometheus.query(q[name])
            results["autoscale_requests_in_flight"] = self.autoscale_signal()
            results["manifests_under_load"] = self.manifest_queries(slow)
            return {"slow_replica": slow.address, "fault": fault}

        self.scenario(router, f"canary: one replica +{self.args.canary_delay_ms} ms per forward",
                      body)
        self.prom_results.update(results)
        self.canary_checks(results, slow)
        # The load has stopped: the averaged signal must drain back to idle.
        start = time.monotonic()
        samples = []

        def idle():
            samples.append(self.autoscale_signal())
            return samples[-1] <= IDLE_IN_FLIGHT_MAX

        try:
            wait_until(idle, AUTOSCALE_FALL_TIMEOUT_S, "autoscale query back to idle", interval_s=1)
        except RuntimeError:
            pass
        self.prom_results["manifests_after_load"] = self.manifest_queries(slow, analysis=False)
        self.manifest_checks(self.prom_results["manifests_under_load"],
                             self.prom_results["manifests_after_load"], slow)
        self.prom_results["autoscale_after"] = samples[-1]
        self.prom_results["autoscale_after_s"] = round(time.monotonic() - start, 1)
        self.check(samples[-1] <= IDLE_IN_FLIGHT_MAX,
                   f"autoscale query falls after the load: {samples[-1]:.2f} <= "
                   f"{IDLE_IN_FLIGHT_MAX} within {AUTOSCALE_FALL_TIMEOUT_S:.0f} s")

    def manifest_queries(self, slow, analysis=True):
        """The ScaledObject's trigger values and the replica count KEDA would ask for; with
        `analysis`, the AnalysisTemplate's metrics for each replica taken as the canary against
        a healthy other one as stable, and whether its successCondition holds."""
        low, high, triggers = manifests.scaledobject(ROOT)
        # The triggers are instant gauges (KEDA polls them): under load, the largest of five
        # samples a second apart, as one sample can fall between a client's requests.
        samples = []
        for i in range(5 if analysis else 1):
            if i:
                time.sleep(1)
            samples.append([self.prometheus.scalar(query) for _, query, _ in triggers])
        values = [max(column) for column in zip(*samples)]
        out = {"triggers": {name: v for (name, _, _), v in zip(triggers, values)},
               "desired_replicas": manifests.desired_replicas(values, triggers, low, high),
               "min_replicas": low}
        if not analysis:
            return out
        out["analysis"] = {}
        for canary in self.replicas:
            # A healthy other replica as stable; with two replicas a healthy canary has only
            # the slowed one to compare with (it then passes by a wide margin).
            others = [r for r in self.replicas if r is not canary]
            stable = next((r for r in others if r is not slow), others[0])
            verdicts = {}
            for name, template, condition in manifests.analysis_metrics(ROOT):
                query = manifests.render(template, "30s", **{
                    "namespace": manifests.NAMESPACE,
                    "canary-hash": manifests.pod_hash(canary.port),
                    "stable-hash": manifests.pod_hash(stable.port)})
                values = list(self.prometheus.query(query).values())
                verdicts[name] = {"result": values, "passed": manifests.success(condition, values)}
            out["analysis"][canary.address] = {"stable": stable.address, "metrics": verdicts}
        return out

    def manifest_checks(self, under_load, after_load, slow):
        in_flight = under_load["triggers"].get("in-flight", math.nan)
        self.check(in_flight >= self.args.concurrency / 2,
                   f"ScaledObject in-flight trigger under load of {self.args.concurrency} "
                   f"clients: {in_flight:.2f} >= {self.args.concurrency / 2}")
        idle = after_load["triggers"]
        self.check(all(v <= IDLE_IN_FLIGHT_MAX for v in idle.values())
                   and after_load["desired_replicas"] == after_load["min_replicas"],
                   f"ScaledObject triggers back to idle after the load ({idle}), KEDA would ask "
                   f"for minReplicaCount ({after_load['desired_replicas']})")
        failed = {canary for canary, a in under_load["analysis"].items()
                  if not all(m["passed"] for m in a["metrics"].values())}
        self.check(failed == {slow.address},
                   f"AnalysisTemplate fails exactly the slowed replica as canary "
                   f"{slow.address} (failed: {sorted(failed)})")
        slow_metrics = under_load["analysis"][slow.address]["metrics"]
        self.check(not slow_metrics["ttft-p99-vs-stable"]["passed"]
                   and slow_metrics["error-rate"]["passed"],
                   "the slowed canary fails on its TTFT ratio, not on errors")

    def canary_checks(self, results, slow):
        everyone = {r.address for r in self.replicas}
        ratio = results["canary_ttft_p99_ratio"]
        limit = self.queries["canary_ttft_p99_ratio"]["threshold"]
        self.check(set(ratio) == everyone and all(math.isfinite(v) for v in ratio.values()),
                   f"canary ratio has a value for every replica ({ratio})")
        flagged = {i for i, v in ratio.items() if v > limit}
        self.check(flagged == {slow.address},
                   f"canary ratio > {limit} flags exactly the slow replica {slow.address} "
                   f"(flagged: {sorted(flagged)})")
        errors = results["error_rate_by_replica"]
        limit = self.queries["error_rate_by_replica"]["threshold"]
        self.check(set(errors) == everyone and all(v <= limit for v in errors.values()),
                   f"error rate has a value for every replica and flags none at > {limit} ({errors})")
        in_flight = results["autoscale_requests_in_flight"]
        self.check(in_flight >= self.args.concurrency / 2,
                   f"autoscale query under load of {self.args.concurrency} clients: "
                   f"{in_flight:.2f} >= {self.args.concurrency / 2}")

    def stop(self):
        for router in list(self.routers):
            router.stop()
        if self.prometheus:
            self.prometheus.stop()
        for r in self.replicas:
            r.stop(signal.SIGKILL, 10)


def run(rehearsal, args):
    rehearsal.start()
    vllm_port, haproxy_port = args.base_port + 50, args.base_port + 60
    policies = ("cache_aware",) if args.short else ("round_robin", "cache_aware")
    # The routing comparison: more documents than one replica's KV cache holds (each replica
    # has `--kv-cache-memory` GiB), fewer than all replicas hold together, picked at random
    # from one seed, the same sequence for both policies. Round robin sends every document to
    # every replica, which evicts and prefills them again; a prefix-aware router keeps each
    # document on one replica. The short run keeps the 4-document workload (its checks are
    # about failures, not hit rates).
    routing_docs = None if args.short else documents(args.routing_docs)
    for policy in policies:
        router = rehearsal.router(VllmRouter(args.vllm_router, vllm_port, rehearsal.replicas,
                                             policy, args.cb_timeout_s, rehearsal.log_dir,
                                             args.vllm_router_settle_s))
        if routing_docs:
            rehearsal.restart_all_cold()
            rehearsal.steady(router, f"steady, {policy}, {len(routing_docs)} documents",
                             docs=routing_docs, seed=ROUTING_SEED)
        else:
            rehearsal.steady(router, f"steady, {policy}")
        if policy != "cache_aware":
            rehearsal.stop_router(router)
    if routing_docs:
        rehearsal.routing_checks()
        # The fault scenarios below use the 4-document workload: start them warm.
        warm_up(rehearsal.replicas)
    # The fault scenarios run in sequence on one router, as they would hit a real one: what
    # one leaves behind (an open circuit breaker, say) meets the next.
    rehearsal.sigkill(router)
    if not args.short:
        rehearsal.sigstop(router)
    rehearsal.rolling_restart(router, graceful=True)
    if not args.short:
        rehearsal.rolling_restart(router, graceful=False)
    rehearsal.breakers = router.breaker_transitions()
    rehearsal.stop_router(router)

    router = rehearsal.router(Haproxy(args.haproxy, haproxy_port, rehearsal.replicas,
                                      rehearsal.log_dir))
    if not args.short:
        # The replicas restarted above hold only the documents cache_aware sent them: start
        # HAProxy's phase warm too, as vllm-router's first phase was.
        warm_up(rehearsal.replicas)
    rehearsal.steady(router, "steady, leastconn")
    if not args.short:
        rehearsal.sigkill(router)
        rehearsal.sigstop(router)
        rehearsal.rolling_restart(router, graceful=True)
        rehearsal.rolling_restart(router, graceful=False)
    rehearsal.canary(router)


def report_manifests(rehearsal, under_load, after_load):
    print()
    print("The manifests' own queries (deploy/overlays/canary/analysistemplate.yaml with its "
          "args filled in and `[5m]` windows as `[30s]`; deploy/overlays/production/"
          "scaledobject.yaml), against the same Prometheus, each replica labelled as a pod "
          "would be:")
    print()
    metrics = next(iter(under_load["analysis"].values()))["metrics"]
    print("| canary | stable | " + " | ".join(metrics) + " | analysis |")
    print("|---|---|" + "---:|" * len(metrics) + "---|")
    for canary, a in under_load["analysis"].items():
        slow = " (slowed)" if any(r.fault and r.address == canary for r in rehearsal.replicas) \
            else ""
        cells = []
        for m in a["metrics"].values():
            value = f"{m['result'][0]:.2f}" if m["result"] else "none"
            cells.append(f"{value} {'pass' if m['passed'] else '**fail**'}")
        verdict = "passes" if all(m["passed"] for m in a["metrics"].values()) else "**aborts**"
        print(f"| {canary}{slow} | {a['stable']} | " + " | ".join(cells) + f" | {verdict} |")
    print()
    triggers = ", ".join(f"{k} {v:.2f}" for k, v in under_load["triggers"].items())
    idle = ", ".join(f"{k} {v:.2f}" for k, v in after_load["triggers"].items())
    print(f"ScaledObject triggers under the load: {triggers} (KEDA would ask for "
          f"{under_load['desired_replicas']} replicas); after it: {idle} "
          f"({after_load['desired_replicas']}, its minReplicaCount).")


def report(rehearsal, args):
    rows, results = rehearsal.rows, rehearsal.prom_results
    with open(args.out, "w") as f:
        json.dump({"rows": rows, "prometheus": results,
                   "vllm_router_breaker_transitions": rehearsal.breakers,
                   "checks": [{"passed": p, "check": c} for p, c in rehearsal.checks]},
                  f, indent=1)
    print("| router | scenario | sent | succeeded | failed | hung | TTFT p50 ms | TTFT p99 ms "
          "| router retries | prefix hit rate |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['router']} | {r['scenario']} | {r['sent']} | {r['succeeded']} | "
              f"{r['failed']} | {r['hung']} | {r['ttft_p50_ms']} | {r['ttft_p99_ms']} | "
              f"{r['router_retries']} | {r['prefix_hit_rate']} |")
    if "canary_ttft_p99_ratio" in results:
        queries = rehearsal.queries
        print()
        print("Prometheus (deploy/prometheus/queries.yaml, `promtool query instant`), at the end "
              "of the canary load:")
        print()
        print("| replica | TTFT p99 s | canary ratio | error rate |")
        print("|---|---:|---:|---:|")
        for r in rehearsal.replicas:
            a = r.address
            slow = " (slowed)" if r.fault else ""
            print(f"| {a}{slow} | {results['ttft_p99_by_replica'].get(a, math.nan):.3f} | "
                  f"{results['canary_ttft_p99_ratio'].get(a, math.nan):.2f} | "
                  f"{results['error_rate_by_replica'].get(a, math.nan):.3f} |")
        in_flight = results["autoscale_requests_in_flight"]
        target = queries["autoscale_requests_in_flight"]["threshold"]
        print()
        print(f"Autoscaling signal (`autoscale_requests_in_flight`): {in_flight:.2f} under the "
              f"load of {args.concurrency} clients (KEDA with threshold {target}: "
              f"{math.ceil(in_flight / target)} replicas), {results['autoscale_after']:.2f} "
              f"{results['autoscale_after_s']} s after it stopped.")
    if "manifests_under_load" in results:
        report_manifests(rehearsal, results["manifests_under_load"],
                         results["manifests_after_load"])
    print()
    print("Checks:")
    print()
    for passed, what in rehearsal.checks:
        print(f"- {'pass' if passed else '**FAIL**'}: {what}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--candela", required=True)
    ap.add_argument("--vllm-router", required=True)
    ap.add_argument("--haproxy", required=True)
    ap.add_argument("--prometheus", required=True)
    ap.add_argument("--promtool", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--queries", required=True, help="deploy/prometheus/queries.yaml")
    ap.add_argument("--replicas", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--concurrency", type=int, default=6)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--phase-s", type=float, default=40.0)
    ap.add_argument("--base-port", type=int, default=18600)
    ap.add_argument("--cb-timeout-s", type=int, default=5,
                    help="vllm-router's circuit-breaker open time (its default, 60, reproduces "
                         "the 503s of a deregistered rolling restart after a SIGKILL)")
    ap.add_argument("--vllm-router-settle-s", type=float,
                    help="wait after a fault before the next scenario (default: the breaker's "
                         "open time + 1 s); with --cb-timeout-s 60 and 3 here, the deregistered "
                         "rolling restart after a SIGKILL gets 503s")
    ap.add_argument("--canary-delay-ms", type=int, default=500)
    ap.add_argument("--kv-cache-memory", type=float,
                    help="each replica's --kv-cache-memory in GiB (default: the server's)")
    ap.add_argument("--routing-docs", type=int, default=18,
                    help="documents of the round robin vs cache-aware comparison")
    ap.add_argument("--short", action="store_true")
    ap.add_argument("--log-dir")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    assert args.replicas >= 2, "a rehearsal of failover needs two replicas"

    # `timeout` and Ctrl-C end the run through the cleanup below, not around it.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    log_dir = args.log_dir or tempfile.mkdtemp(prefix="rehearse-replicas-")
    os.makedirs(log_dir, exist_ok=True)
    rehearsal = Rehearsal(args, log_dir)
    error = None
    try:
        run(rehearsal, args)
    except Exception as e:  # noqa: BLE001 - reported as a failed check, after the cleanup
        error = e
        rehearsal.check(False, f"the rehearsal ran to the end ({type(e).__name__}: {e})")
    finally:
        rehearsal.stop()
    report(rehearsal, args)
    if error or not all(p for p, _ in rehearsal.checks):
        log(f"rehearsal FAILED; logs in {log_dir}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

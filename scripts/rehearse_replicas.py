"""Replicas behind two routers, rehearsed on loopback (driven by scripts/rehearse-replicas).

Starts N `candela serve` replicas and Prometheus scraping them, puts vLLM's router
(vllm-router) and then HAProxy in front, runs the same scenarios through each under a steady
closed-loop load of streaming completions, and prints one table row per scenario: requests
sent, succeeded, failed, hung (no answer within the per-request bound), TTFT p50/p99, the
router's own retries, and the replicas' prefix-cache hit rate over the scenario.

- steady load (vllm-router: round robin and cache-aware on a shared-prefix workload; HAProxy:
  least connections);
- SIGKILL of one replica: in-flight requests on it fail cleanly, and none fail once the
  router has noticed;
- SIGSTOP of one replica (a hang, resumed later): the health check ejects it, nothing fails;
- rolling restart (SIGTERM, wait, start, wait for ready) of every replica, gracefully (the
  router stops sending to it first: vllm-router `/remove_worker` + `/add_worker`, HAProxy
  `state drain` + `state ready`) and with the router left to notice through its health checks;
- canary: one replica restarted with a fault that slows every forward pass; the canonical
  queries of deploy/prometheus/queries.yaml, run with `promtool query instant`, must flag it
  and no healthy one, and the autoscaling query must rise under the load and fall after it.

Checks (any failing one makes the exit status 1, after the results are written): no request
hangs anywhere; no request fails in steady, SIGSTOP, graceful rolling-restart and canary
scenarios; after a SIGKILL nothing fails later than KILL_FAILURE_WINDOW_S; the Prometheus checks
above. Failures in a health-check-only rolling restart are reported, not checked. `--short`
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

from rehearse.load import Load, summarize, warm_up
from rehearse.procs import Replica, log, wait_until
from rehearse.prom import Prometheus, load_queries
from rehearse.routers import Haproxy, VllmRouter

# After a SIGKILL the routers must stop sending to the dead replica within this: health checks
# every 1 s, out after 2 failures, plus the requests in flight on it when it died.
KILL_FAILURE_WINDOW_S = 10.0
# The autoscaling query averages over 30 s: back near 0 within that plus scrape slack.
AUTOSCALE_FALL_TIMEOUT_S = 60.0
IDLE_IN_FLIGHT_MAX = 0.5


class Rehearsal:
    """The replicas, routers and Prometheus of one run, and the rows and checks it produces."""

    def __init__(self, args, log_dir):
        self.args = args
        self.log_dir = log_dir
        self.replicas = [Replica(args.candela, args.model, args.base_port + i, args.threads, log_dir)
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
                                     [r.address for r in self.replicas], self.log_dir)
        self.prometheus.wait_scraping()
        in_flight = self.autoscale_signal()
        self.check(in_flight <= IDLE_IN_FLIGHT_MAX,
                   f"autoscale query idle before any load: {in_flight:.2f} <= {IDLE_IN_FLIGHT_MAX}")

    def autoscale_signal(self):
        return self.prometheus.scalar(self.queries["autoscale_requests_in_flight"]["expr"])

    def router(self, router):
        self.routers.append(router)
        return router

    def stop_router(self, router):
        router.stop()
        self.routers.remove(router)

    def scenario(self, router, name, body, healthy=True):
        """Runs `body(load)` under load through `router` and adds its row. `healthy`: no
        request may fail (nothing is broken in it, or what breaks must be invisible)."""
        before = self.counters()
        retries_before = router.retries()
        with Load(router.url, self.args.concurrency, self.args.max_tokens) as load:
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

    def steady(self, router, name):
        self.scenario(router, name, lambda load: time.sleep(self.args.phase_s))

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
        self.prom_results["autoscale_after"] = samples[-1]
        self.prom_results["autoscale_after_s"] = round(time.monotonic() - start, 1)
        self.check(samples[-1] <= IDLE_IN_FLIGHT_MAX,
                   f"autoscale query falls after the load: {samples[-1]:.2f} <= "
                   f"{IDLE_IN_FLIGHT_MAX} within {AUTOSCALE_FALL_TIMEOUT_S:.0f} s")

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
    for policy in policies:
        router = rehearsal.router(VllmRouter(args.vllm_router, vllm_port, rehearsal.replicas,
                                             policy, args.cb_timeout_s, rehearsal.log_dir,
                                             args.vllm_router_settle_s))
        rehearsal.steady(router, f"steady, {policy}")
        if policy != "cache_aware":
            rehearsal.stop_router(router)
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

"""The Prometheus queries of the Kubernetes manifests themselves, as the rehearsal runs them.

deploy/overlays/production/scaledobject.yaml (KEDA's triggers) and
deploy/overlays/canary/analysistemplate.yaml (Argo Rollouts' analysis) each carry their own
query strings and thresholds. The rehearsal's Prometheus gives every replica the labels those
queries select on in a cluster (`namespace`, `service`, and `rollouts_pod_template_hash`, a
hash per replica here), so the strings run unchanged but for two things: the analysis
template's `{{args.*}}` are filled in, and its `[5m]` rate windows become the rehearsal's
phase-long window (the phases last tens of seconds; a 5-minute window would mostly see the
scenarios before the canary, cold prefills and restarts included).
"""

import math
import os
import re

import yaml

NAMESPACE = "candela"
SERVICE = "candela"
SCALEDOBJECT = os.path.join("deploy", "overlays", "production", "scaledobject.yaml")
ANALYSIS = os.path.join("deploy", "overlays", "canary", "analysistemplate.yaml")


def target_labels(replica_port):
    """The labels a replica's series carry in a cluster (the ServiceMonitor's target labels and
    the canary overlay's podTargetLabels)."""
    return {"namespace": NAMESPACE, "service": SERVICE,
            "rollouts_pod_template_hash": pod_hash(replica_port)}


def pod_hash(replica_port):
    return f"r{replica_port}"


def scaledobject(root):
    """(min replicas, max replicas, [(trigger name, query, threshold)])."""
    with open(os.path.join(root, SCALEDOBJECT)) as f:
        spec = yaml.safe_load(f)["spec"]
    triggers = [(t["name"], t["metadata"]["query"], float(t["metadata"]["threshold"]))
                for t in spec["triggers"] if t["type"] == "prometheus"]
    if not triggers:
        raise ValueError(f"{SCALEDOBJECT}: no prometheus trigger")
    return spec["minReplicaCount"], spec["maxReplicaCount"], triggers


def desired_replicas(values, triggers, low, high):
    """What KEDA's HPA asks for: per trigger ceil(value / threshold) (an AverageValue target),
    the largest over the triggers, within the min and max counts."""
    wanted = [math.ceil(v / threshold) if math.isfinite(v) else 0
              for v, (_, _, threshold) in zip(values, triggers)]
    return min(high, max([low] + wanted))


def analysis_metrics(root):
    """[(metric name, query template, successCondition)] of the AnalysisTemplate."""
    with open(os.path.join(root, ANALYSIS)) as f:
        spec = yaml.safe_load(f)["spec"]
    return [(m["name"], m["provider"]["prometheus"]["query"], m["successCondition"])
            for m in spec["metrics"]]


def render(template, window, **args):
    """The query with `{{args.name}}` filled in (dashes in names as the template writes them)
    and every `[5m]` rate window replaced by `window`."""
    def arg(match):
        name = match.group(1)
        if name not in args:
            raise KeyError(f"analysis query needs args.{name}")
        return args[name]

    query = re.sub(r"\{\{\s*args\.([\w-]+)\s*\}\}", arg, template)
    return query.replace("[5m]", f"[{window}]")


def success(condition, result):
    """Argo Rollouts' successCondition (an expr-lang expression over `result`, the query's
    values) for the forms the template uses: `len(...)`, `isNaN(...)`, comparisons, `||` and
    `&&`. Written here rather than depending on a Go expression engine; the translation is
    checked to use only those names, so another form fails loudly instead of misjudging."""
    python = condition.replace("||", " or ").replace("&&", " and ")
    names = set(re.findall(r"[A-Za-z_]\w*", python)) - {"or", "and", "not"}
    unknown = names - {"len", "isNaN", "result"}
    if unknown:
        raise ValueError(f"successCondition {condition!r} uses {sorted(unknown)}")
    # The expression comes from this repository's own manifest, and only the names checked
    # above are in scope.
    return bool(eval(python, {"__builtins__": {}},  # noqa: S307
                     {"len": len, "isNaN": math.isnan, "result": list(result)}))

"""Offline checks of deploy/ (driven by scripts/check-deploy; tests/deploy tests each check).

1. Render every kustomization (deploy/base and deploy/overlays/*) with `kubectl kustomize` when
   kubectl is installed, and always with `render_python`, a loader for the few kustomize features
   these manifests use (resources, namespace, images, JSON 6902 patches; anything else is an
   error). With kubectl both renders must agree, which is what makes the fallback trustworthy on
   a machine without it.
2. Validate each rendered object: core kinds with kubernetes-validate (strict: unknown fields are
   errors) for K8S_VERSION; custom resources with jsonschema against the CRDs' own OpenAPI v3
   schemas in deploy/schemas/, made as strict as the API server (see `strict_schema`). A kind
   with neither schema is an error, never skipped.
3. Cross-check the manifests with each other and with the server: probe paths are GET routes of
   crates/candela-server/src/app.rs, ports and selectors line up, the grace period outlasts the
   preStop sleep plus --drain-timeout-s, the startup probe outlasts --ready-timeout-s.
4. Parse every PromQL expression (KEDA triggers, the canary analysis, the Grafana dashboard) with
   promql-parser and check each metric it names against deploy/exported-metrics.txt (the names
   and types `candela serve` exports; tests/e2e/test_deploy_metrics.py keeps that file equal to
   a real server's /metrics): histogram series only with _bucket/_sum/_count, rate() only over
   counters and histogram series, histogram_quantile() only over _bucket.
5. The Containerfile: every COPY source is a tracked file or a named build output, the ENTRYPOINT
   is `candela serve`, the user is not root, EXPOSE and HEALTHCHECK match the Deployment; then
   hadolint, when installed.
"""

import copy
import json
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
K8S_VERSION = "1.34.0"
KUSTOMIZATIONS = ("deploy/base", "deploy/overlays/production", "deploy/overlays/canary")
DASHBOARD = "deploy/grafana/candela.json"
EXPORTED_METRICS = "deploy/exported-metrics.txt"
SCHEMAS = "deploy/schemas"
APP_ROUTES = "crates/candela-server/src/app.rs"
CONTAINERFILE = "deploy/Containerfile"
# COPY sources that are built, not tracked, and the command that makes each.
BUILD_OUTPUTS = {
    "target/release/candela": "cargo build --release -p candela-cli",
    "models/SmolLM2-135M-Instruct.Q4_1.gguf": "scripts/fetch-default-model",
}
# Kinds that kustomize's namespace transformer leaves without a namespace.
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition",
                  "PersistentVolume", "StorageClass", "PriorityClass"}
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


class RenderError(Exception):
    """A kustomization this checker cannot render faithfully."""


@dataclass
class Report:
    """Problems found, each prefixed by where; `ok` when there are none."""

    problems: list = field(default_factory=list)

    def add(self, where: str, message: str):
        self.problems.append(f"{where}: {message}")

    @property
    def ok(self) -> bool:
        return not self.problems


# ---------------------------------------------------------------------------------------------
# 1. Rendering


def load_yaml_docs(path: Path) -> list:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def render_python(directory: Path) -> list:
    """The objects `kubectl kustomize directory` prints, for the features these manifests use."""
    path = directory / "kustomization.yaml"
    if not path.is_file():
        raise RenderError(f"{directory}: no kustomization.yaml")
    spec = yaml.safe_load(path.read_text())
    unknown = set(spec) - {"apiVersion", "kind", "namespace", "resources", "patches", "images"}
    if unknown:
        raise RenderError(f"{path}: kustomize fields the Python renderer does not implement: "
                          f"{sorted(unknown)} (render with kubectl, or extend render_python)")
    docs = []
    for resource in spec.get("resources", []):
        target = (directory / resource).resolve()
        docs += render_python(target) if target.is_dir() else load_yaml_docs(target)
    for patch in spec.get("patches", []):
        apply_patch(docs, patch, path)
    if "namespace" in spec:
        for doc in docs:
            if doc["kind"] not in CLUSTER_SCOPED:
                doc.setdefault("metadata", {})["namespace"] = spec["namespace"]
    for image in spec.get("images", []):
        set_image(docs, image, path)
    return docs


def apply_patch(docs: list, patch: dict, where: Path):
    if set(patch) != {"target", "patch"}:
        raise RenderError(f"{where}: only inline JSON 6902 patches with a target are implemented")
    target = patch["target"]
    if set(target) - {"group", "version", "kind", "name"}:
        raise RenderError(f"{where}: patch target fields {sorted(target)} not implemented")
    ops = yaml.safe_load(patch["patch"])
    if not isinstance(ops, list):
        raise RenderError(f"{where}: only JSON 6902 patches (a list of operations) are implemented")
    matched = [doc for doc in docs if matches(doc, target)]
    if not matched:
        raise RenderError(f"{where}: patch target {target} matches no resource")
    for doc in matched:
        for op in ops:
            json_patch_op(doc, op, where)


def matches(doc: dict, target: dict) -> bool:
    group, _, version = doc["apiVersion"].rpartition("/")
    return (target.get("kind", doc["kind"]) == doc["kind"]
            and target.get("name", doc["metadata"]["name"]) == doc["metadata"]["name"]
            and target.get("group", group) == group
            and target.get("version", version) == version)


def json_patch_op(doc: dict, op: dict, where: Path):
    """One RFC 6902 add/remove/replace."""
    parts = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].split("/")[1:]]
    parent = doc
    for part in parts[:-1]:
        parent = parent[int(part)] if isinstance(parent, list) else parent[part]
    last = parts[-1]
    kind = op["op"]
    if isinstance(parent, list):
        index = len(parent) if last == "-" else int(last)
        if kind == "add":
            parent.insert(index, copy.deepcopy(op["value"]))
        elif kind == "remove":
            del parent[index]
        elif kind == "replace":
            parent[index] = copy.deepcopy(op["value"])
        else:
            raise RenderError(f"{where}: JSON patch op {kind!r} not implemented")
        return
    if kind in ("add", "replace"):
        if kind == "replace" and last not in parent:
            raise RenderError(f"{where}: replace of missing {op['path']}")
        parent[last] = copy.deepcopy(op["value"])
    elif kind == "remove":
        if last not in parent:
            raise RenderError(f"{where}: remove of missing {op['path']}")
        del parent[last]
    else:
        raise RenderError(f"{where}: JSON patch op {kind!r} not implemented")


def set_image(docs: list, image: dict, where: Path):
    if set(image) - {"name", "newName", "newTag"}:
        raise RenderError(f"{where}: image fields {sorted(image)} not implemented")
    for container in containers_of_all(docs):
        name, tag = split_image(container["image"])
        if name == image["name"]:
            new_tag = image.get("newTag", tag)
            container["image"] = image.get("newName", name) + (f":{new_tag}" if new_tag else "")


def split_image(ref: str) -> tuple:
    slash = ref.rfind("/")
    colon = ref.rfind(":")
    if colon > slash:
        return ref[:colon], ref[colon + 1:]
    return ref, None


def containers_of_all(docs: list):
    for doc in docs:
        pod = pod_spec(doc)
        if pod:
            for key in ("initContainers", "containers"):
                yield from pod.get(key, [])


def pod_spec(doc: dict):
    return doc.get("spec", {}).get("template", {}).get("spec")


def render_kubectl(directory: Path):
    """`kubectl kustomize` output, or None when kubectl is not installed."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        return None
    out = subprocess.run([kubectl, "kustomize", str(directory)], capture_output=True, text=True,
                         timeout=120)
    if out.returncode != 0:
        raise RenderError(f"kubectl kustomize {directory}: {out.stderr.strip()}")
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc is not None]


def keyed(docs: list) -> dict:
    return {(d["apiVersion"], d["kind"], d["metadata"].get("namespace"), d["metadata"]["name"]): d
            for d in docs}


def compare_renders(python_docs: list, kubectl_docs: list, where: str, report: Report):
    ours, theirs = keyed(python_docs), keyed(kubectl_docs)
    for key in sorted(set(ours) | set(theirs), key=str):
        if key not in ours:
            report.add(where, f"kubectl renders {key}, the Python renderer does not")
        elif key not in theirs:
            report.add(where, f"the Python renderer renders {key}, kubectl does not")
        elif ours[key] != theirs[key]:
            report.add(where, f"{key} differs between kubectl and the Python renderer")


# ---------------------------------------------------------------------------------------------
# 2. Schemas


def load_crd_schemas(root: Path) -> dict:
    """(apiVersion, kind) -> the strict schema of that custom resource."""
    schemas = {}
    for path in sorted((root / SCHEMAS).glob("*.json")):
        record = json.loads(path.read_text())
        schemas[(record["apiVersion"], record["kind"])] = strict_schema(record["schema"])
    return schemas


def strict_schema(node):
    """A structural CRD schema made as strict as `kubectl apply` (strict field validation) is:
    an object with `properties` admits no other field unless it says
    x-kubernetes-preserve-unknown-fields; x-kubernetes-int-or-string admits an integer or a
    string; `nullable` admits null. CEL rules (x-kubernetes-validations) are not evaluated."""
    if isinstance(node, list):
        return [strict_schema(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {}
    for key, value in node.items():
        if key == "properties":
            out[key] = {name: strict_schema(sub) for name, sub in value.items()}
        else:
            out[key] = strict_schema(value)
    if (out.get("type") == "object" and "properties" in out and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    if out.pop("x-kubernetes-int-or-string", False):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if out.pop("nullable", False) and "type" in out:
        out["type"] = [out["type"], "null"]
    return out


NAME_RE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


def validate_object(doc: dict, crd_schemas: dict) -> list:
    """Every schema violation of one rendered object, as strings (empty when valid)."""
    import jsonschema
    import kubernetes_validate

    key = (doc.get("apiVersion"), doc.get("kind"))
    if key in crd_schemas:
        errors = [f"{'.'.join(map(str, e.absolute_path)) or '(root)'}: {e.message}"
                  for e in jsonschema.Draft4Validator(crd_schemas[key]).iter_errors(doc)]
        meta = doc.get("metadata", {})
        if not isinstance(meta.get("name"), str) or not NAME_RE.match(meta["name"]):
            errors.append(f"metadata.name: {meta.get('name')!r} is not a DNS-1123 subdomain")
        for map_name in ("labels", "annotations"):
            for k, v in (meta.get(map_name) or {}).items():
                if not isinstance(v, str):
                    errors.append(f"metadata.{map_name}.{k}: {v!r} is not a string")
        return errors
    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except kubernetes_validate.SchemaNotFoundError:
        return [f"no schema for {key[0]} {key[1]}: neither Kubernetes {K8S_VERSION} nor "
                f"{SCHEMAS}/ has it (add the CRD's schema with {SCHEMAS}/extract.py)"]
    except kubernetes_validate.ValidationError as e:
        # kubernetes-validate stops at the first error (jsonschema's best match).
        return [f"{'.'.join(map(str, e.absolute_path)) or '(root)'}: {e.message}"]
    return []


# ---------------------------------------------------------------------------------------------
# 3. Consistency with each other and with the server


def server_get_routes(root: Path) -> set:
    text = (root / APP_ROUTES).read_text()
    return set(re.findall(r'\.route\(\s*"([^"]+)"\s*,\s*get\(', text))


def flag_value(args: list, flag: str):
    if flag in args:
        index = args.index(flag)
        if index + 1 < len(args):
            return args[index + 1]
    return None


def find(docs: list, kind: str, name: str = None):
    for doc in docs:
        if doc["kind"] == kind and (name is None or doc["metadata"]["name"] == name):
            return doc
    return None


def selected(selector: dict, labels: dict) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def check_consistency(docs: list, routes: set, where: str, report: Report):
    deployment = find(docs, "Deployment", "candela")
    if deployment is None:
        report.add(where, "no Deployment candela")
        return
    pod = pod_spec(deployment)
    pod_labels = deployment["spec"]["template"]["metadata"].get("labels", {})
    container = next((c for c in pod["containers"] if c["name"] == "candela"), None)
    if container is None:
        report.add(where, "the Deployment has no container named candela")
        return
    args = [str(a) for a in container.get("args", [])]
    ports = {p.get("name"): p["containerPort"] for p in container.get("ports", [])}
    server_port = int(flag_value(args, "--port") or 8000)
    if ports.get("http") != server_port:
        report.add(where, f"containerPort http {ports.get('http')} != --port {server_port}")
    if flag_value(args, "--host") in (None, "127.0.0.1", "localhost"):
        report.add(where, "--host must be 0.0.0.0 (or ::) for probes and Services to reach it")

    expected_paths = {"startupProbe": {"/health", "/ready"}, "readinessProbe": {"/ready"},
                      "livenessProbe": {"/health"}}
    for probe_name, paths in expected_paths.items():
        probe = container.get(probe_name)
        if probe is None:
            report.add(where, f"no {probe_name}")
            continue
        get = probe.get("httpGet", {})
        if get.get("path") not in routes:
            report.add(where, f"{probe_name} path {get.get('path')!r} is not a GET route of "
                              f"the server ({sorted(routes)})")
        elif get.get("path") not in paths:
            report.add(where, f"{probe_name} should probe {' or '.join(sorted(paths))}, "
                              f"not {get.get('path')}")
        port = get.get("port")
        if (ports.get(port) if isinstance(port, str) else port) != server_port:
            report.add(where, f"{probe_name} port {port!r} is not the server's port {server_port}")
    startup = container.get("startupProbe", {})
    startup_budget_s = startup.get("periodSeconds", 10) * startup.get("failureThreshold", 3)
    ready_timeout_s = int(flag_value(args, "--ready-timeout-s") or 600)
    if startup_budget_s < ready_timeout_s:
        report.add(where, f"startupProbe allows {startup_budget_s} s, less than --ready-timeout-s "
                          f"{ready_timeout_s}: the kubelet would kill a pod still loading")

    drain_s = int(flag_value(args, "--drain-timeout-s") or 30)
    pre_stop = container.get("lifecycle", {}).get("preStop", {})
    pre_stop_s = pre_stop.get("sleep", {}).get("seconds", 0)
    grace_s = pod.get("terminationGracePeriodSeconds", 30)
    if grace_s <= pre_stop_s + drain_s:
        report.add(where, f"terminationGracePeriodSeconds {grace_s} <= preStop {pre_stop_s} s + "
                          f"--drain-timeout-s {drain_s}: the drain would be cut by SIGKILL")
    resources = container.get("resources", {})
    for bound in ("requests", "limits"):
        for resource in ("cpu", "memory"):
            if resource not in resources.get(bound, {}):
                report.add(where, f"no {bound}.{resource}")

    service = find(docs, "Service", "candela")
    if service is None:
        report.add(where, "no Service candela")
    else:
        if not selected(service["spec"].get("selector", {}), pod_labels):
            report.add(where, "the Service's selector does not select the pods")
        for port in service["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            if (ports.get(target) if isinstance(target, str) else target) != server_port:
                report.add(where, f"Service targetPort {target!r} is not the server's port")
    pdb = find(docs, "PodDisruptionBudget")
    if pdb is None or not selected(pdb["spec"]["selector"].get("matchLabels", {}), pod_labels):
        report.add(where, "no PodDisruptionBudget selecting the pods")

    for monitor in (d for d in docs if d["kind"] == "ServiceMonitor"):
        if service is None or not selected(monitor["spec"]["selector"].get("matchLabels", {}),
                                           service["metadata"].get("labels", {})):
            report.add(where, "the ServiceMonitor does not select the Service")
        names = {p.get("name") for p in (service or {}).get("spec", {}).get("ports", [])}
        for endpoint in monitor["spec"]["endpoints"]:
            if endpoint.get("port") not in names:
                report.add(where, f"ServiceMonitor port {endpoint.get('port')!r} is not a "
                                  f"Service port name {sorted(names)}")
            if endpoint.get("path", "/metrics") not in routes:
                report.add(where, f"ServiceMonitor path {endpoint.get('path')!r} is not a route")
    for pool in (d for d in docs if d["kind"] == "InferencePool"):
        if not selected(pool["spec"]["selector"]["matchLabels"], pod_labels):
            report.add(where, "the InferencePool does not select the pods")
        if [p["number"] for p in pool["spec"]["targetPorts"]] != [server_port]:
            report.add(where, "the InferencePool's targetPorts are not the server's port")
    for scaled in (d for d in docs if d["kind"] == "ScaledObject"):
        ref = scaled["spec"]["scaleTargetRef"]
        target = find(docs, ref.get("kind", "Deployment"), ref["name"])
        if target is None or target["apiVersion"] != ref.get("apiVersion", "apps/v1"):
            report.add(where, f"ScaledObject scales {ref}, which is not rendered here")
        elif target["kind"] == "Deployment" and find(docs, "Rollout") is not None:
            report.add(where, "ScaledObject scales the Deployment, but a Rollout owns the pods")
        elif "replicas" in target["spec"] and target["kind"] == "Deployment":
            report.add(where, "the scaled Deployment sets replicas: each apply resets KEDA's count")
    for rollout in (d for d in docs if d["kind"] == "Rollout"):
        check_rollout(rollout, docs, deployment, where, report)


def check_rollout(rollout: dict, docs: list, deployment: dict, where: str, report: Report):
    ref = rollout["spec"].get("workloadRef")
    if ref is None or (ref["kind"], ref["name"]) != ("Deployment", deployment["metadata"]["name"]):
        report.add(where, "the Rollout does not reference the Deployment by workloadRef")
    if rollout["spec"]["selector"] != deployment["spec"]["selector"]:
        report.add(where, "the Rollout's selector differs from the Deployment's")
    analysis = rollout["spec"]["strategy"].get("canary", {}).get("analysis")
    if analysis is None:
        report.add(where, "the Rollout's canary has no analysis")
        return
    given = {arg["name"] for arg in analysis.get("args", [])}
    for ref in analysis["templates"]:
        template = find(docs, "AnalysisTemplate", ref["templateName"])
        if template is None:
            report.add(where, f"AnalysisTemplate {ref['templateName']} is not rendered here")
            continue
        declared = {arg["name"] for arg in template["spec"].get("args", [])}
        needed = {arg["name"] for arg in template["spec"].get("args", []) if "value" not in arg}
        if needed - given:
            report.add(where, f"the Rollout does not pass {sorted(needed - given)}")
        used = set(re.findall(r"\{\{\s*args\.([\w-]+)\s*\}\}", json.dumps(template)))
        if used - declared:
            report.add(where, f"the AnalysisTemplate uses undeclared args {sorted(used - declared)}")


# ---------------------------------------------------------------------------------------------
# 4. PromQL and metric names


def read_exported(root: Path) -> dict:
    """name -> type from deploy/exported-metrics.txt."""
    exported = {}
    for line in (root / EXPORTED_METRICS).read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name, kind = line.split()
            exported[name] = kind
    return exported


def parse_exposition(text: str) -> dict:
    """name -> type of every family in a Prometheus text exposition that has samples."""
    types, sampled = {}, set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            types[name] = kind
        elif line and not line.startswith("#"):
            sampled.add(re.match(r"[a-zA-Z_:][a-zA-Z0-9_:]*", line).group(0))
    families = {}
    for series in sampled:
        family = series
        if series not in types:
            family = next((series[: -len(s)] for s in HISTOGRAM_SUFFIXES
                           if series.endswith(s) and types.get(series[: -len(s)]) == "histogram"),
                          None)
        if family is None:
            raise ValueError(f"sample {series} belongs to no declared family")
        families[family] = types[family]
    return families


def series_kind(name: str, exported: dict):
    """What a series name is, given the exported families: 'counter', 'gauge', 'bucket' or
    'histogram-part' (_sum/_count), or None when the server exports no such series."""
    if name in exported:
        return None if exported[name] == "histogram" else exported[name]
    for suffix in HISTOGRAM_SUFFIXES:
        base = name[: -len(suffix)]
        if name.endswith(suffix) and exported.get(base) == "histogram":
            return "bucket" if suffix == "_bucket" else "histogram-part"
    return None


def substitute_templating(expr: str) -> str:
    """Argo's {{args.x}} and Grafana's $variables, replaced so the text parses as PromQL."""
    expr = re.sub(r"\{\{\s*args\.([\w-]+)\s*\}\}", lambda m: "ARG_" + m.group(1).replace("-", "_"),
                  expr)
    expr = re.sub(r"\$\{?__(rate_)?interval\}?", "5m", expr)
    expr = re.sub(r"\$\{?__range\}?", "1h", expr)
    return re.sub(r"\$\{?(\w+)(:\w+)?\}?", r"VAR_\1", expr)


def promql_problems(expr: str, exported: dict) -> list:
    """Why `expr` does not parse or names a series the server does not export (empty if fine)."""
    import promql_parser

    try:
        tree = promql_parser.parse(substitute_templating(expr))
    except ValueError as e:
        return [f"does not parse as PromQL: {e}"]
    problems = []

    def names_under(node) -> list:
        found = []

        def visit(n):
            if isinstance(n, promql_parser.VectorSelector):
                found.append(n.name)
        promql_parser.walk(node, visit)
        return found

    def visit(node):
        if isinstance(node, promql_parser.VectorSelector):
            if node.name is None:
                problems.append("a selector without a metric name")
            elif series_kind(node.name, exported) is None:
                problems.append(f"{node.name} is not a series the server exports")
        elif isinstance(node, promql_parser.Call):
            function = node.func.name
            if function in ("rate", "irate", "increase"):
                for name in names_under(node.args[0]):
                    if series_kind(name, exported) == "gauge":
                        problems.append(f"{function}() over the gauge {name}")
            elif function == "histogram_quantile":
                for name in names_under(node.args[1]):
                    if series_kind(name, exported) not in ("bucket", None):
                        problems.append(f"histogram_quantile() over {name}, not a _bucket series")
    promql_parser.walk(tree, visit)
    return problems


def manifest_queries(docs: list) -> list:
    """(where, PromQL) of every Prometheus query in the rendered manifests."""
    queries = []
    for doc in docs:
        name = f"{doc['kind']}/{doc['metadata']['name']}"
        if doc["kind"] == "ScaledObject":
            for trigger in doc["spec"]["triggers"]:
                if trigger["type"] == "prometheus":
                    queries.append((f"{name} trigger {trigger.get('name')}",
                                    trigger["metadata"]["query"]))
        elif doc["kind"] == "AnalysisTemplate":
            for metric in doc["spec"]["metrics"]:
                prometheus = metric["provider"].get("prometheus")
                if prometheus:
                    queries.append((f"{name} metric {metric['name']}", prometheus["query"]))
    return queries


def dashboard_queries(dashboard: dict) -> list:
    """(where, PromQL) of every panel target and every query variable of a Grafana dashboard."""
    queries = []
    for panel in all_panels(dashboard):
        for target in panel.get("targets", []):
            queries.append((f"panel {panel.get('title')!r} {target.get('refId')}", target["expr"]))
    for variable in dashboard.get("templating", {}).get("list", []):
        if variable.get("type") == "query":
            query = variable["query"]
            query = query.get("query", "") if isinstance(query, dict) else query
            inner = re.fullmatch(r"label_values\((.*),\s*\w+\)", query.strip())
            queries.append((f"variable {variable['name']}", inner.group(1) if inner else query))
    return queries


def all_panels(dashboard: dict):
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panel.get("panels", [])


def check_namespace_literals(docs: list, queries: list, where: str, report: Report):
    namespaces = {d["metadata"].get("namespace") for d in docs if d["kind"] == "ScaledObject"}
    for what, expr in queries:
        for literal in re.findall(r'namespace="([^"{}$]+)"', expr):
            if literal not in namespaces:
                report.add(where, f"{what} filters on namespace {literal!r}, but the manifests "
                                  f"are rendered into {sorted(namespaces)}")


def check_dashboard(dashboard: dict, report: Report):
    where = DASHBOARD
    if not dashboard.get("uid") or not dashboard.get("title"):
        report.add(where, "the dashboard needs a uid and a title")
    variables = {v["name"] for v in dashboard.get("templating", {}).get("list", [])}
    if "datasource" not in variables:
        report.add(where, "no datasource variable: the dashboard would be tied to one Prometheus")
    ids = [p.get("id") for p in all_panels(dashboard)]
    if len(ids) != len(set(ids)) or None in ids:
        report.add(where, "panel ids must be present and unique")
    for panel in all_panels(dashboard):
        if panel.get("type") == "row":
            continue
        if "gridPos" not in panel:
            report.add(where, f"panel {panel.get('title')!r} has no gridPos")
        if panel.get("datasource", {}).get("uid") != "${datasource}":
            report.add(where, f"panel {panel.get('title')!r} does not use ${{datasource}}")
        for target in panel.get("targets", []):
            used = set(re.findall(r"\$\{?(\w+)", target.get("expr", "")))
            unknown = used - variables - {"__rate_interval", "__interval", "__range"}
            if unknown:
                report.add(where, f"panel {panel.get('title')!r} uses undefined {sorted(unknown)}")
        if not panel.get("targets"):
            report.add(where, f"panel {panel.get('title')!r} has no query")


# ---------------------------------------------------------------------------------------------
# 5. The Containerfile


def containerfile_instructions(text: str) -> list:
    """(INSTRUCTION, argument text) with continuation lines joined and comments dropped."""
    lines, current = [], ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        current += stripped
        instruction, _, rest = current.partition(" ")
        lines.append((instruction.upper(), rest.strip()))
        current = ""
    return lines


def check_containerfile(root: Path, text: str, deployment_docs: list, routes: set, report: Report):
    where = CONTAINERFILE
    tracked = set(subprocess.run(["git", "ls-files"], cwd=root, capture_output=True, text=True)
                  .stdout.split())
    instructions = containerfile_instructions(text)
    kinds = [i for i, _ in instructions]
    if "FROM" not in kinds:
        report.add(where, "no FROM")
    for instruction, rest in instructions:
        if instruction in ("COPY", "ADD"):
            parts = [p for p in rest.split() if not p.startswith("--")]
            for source in parts[:-1]:
                if source not in tracked and source not in BUILD_OUTPUTS:
                    report.add(where, f"COPY source {source} is neither tracked nor a known build "
                                      f"output ({sorted(BUILD_OUTPUTS)})")
    entrypoint = [json.loads(r) for i, r in instructions if i == "ENTRYPOINT"]
    if not entrypoint or Path(entrypoint[-1][0]).name != "candela" or entrypoint[-1][1:] != ["serve"]:
        report.add(where, f"ENTRYPOINT must be [.../candela, serve] (exec form), got {entrypoint}")
    users = [r for i, r in instructions if i == "USER"]
    if not users or users[-1].split(":")[0] in ("root", "0"):
        report.add(where, "the image must run as a non-root USER")
    deployment = find(deployment_docs, "Deployment", "candela")
    if deployment is not None:
        pod = pod_spec(deployment)
        run_as = pod.get("securityContext", {}).get("runAsUser")
        if users and run_as is not None and users[-1].split(":")[0] != str(run_as):
            report.add(where, f"USER {users[-1]} is not the Deployment's runAsUser {run_as}")
        port = pod["containers"][0]["ports"][0]["containerPort"]
        if [r for i, r in instructions if i == "EXPOSE"] != [str(port)]:
            report.add(where, f"EXPOSE must be the Deployment's containerPort {port}")
    for instruction, rest in instructions:
        if instruction == "HEALTHCHECK":
            paths = re.findall(r"GET (/\S*) HTTP", rest)
            if not paths or any(p not in routes for p in paths):
                report.add(where, f"HEALTHCHECK must GET a server route, got {paths}")
    if "HEALTHCHECK" not in kinds:
        report.add(where, "no HEALTHCHECK")
    hadolint = shutil.which("hadolint") or _venv_tool(root, "hadolint")
    if hadolint:
        out = subprocess.run([hadolint, "-"], input=text, capture_output=True, text=True)
        if out.returncode != 0:
            report.add(where, f"hadolint: {out.stdout.strip() or out.stderr.strip()}")
    return bool(hadolint)


def _venv_tool(root: Path, name: str):
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else None


# ---------------------------------------------------------------------------------------------


def check_all(root: Path = ROOT, log=print) -> Report:
    """Every check above over the tree at `root`; `log` gets one line per step."""
    report = Report()
    crd_schemas = load_crd_schemas(root)
    routes = server_get_routes(root)
    exported = read_exported(root)
    if not routes:
        report.add(APP_ROUTES, "found no GET routes")
    rendered = {}
    for kustomization in KUSTOMIZATIONS:
        directory = root / kustomization
        try:
            docs = render_python(directory)
            kubectl_docs = render_kubectl(directory)
        except (RenderError, OSError, yaml.YAMLError, KeyError) as e:
            report.add(kustomization, f"render failed: {e}")
            continue
        if kubectl_docs is None:
            log(f"{kustomization}: rendered with the Python renderer (kubectl is not installed)")
        else:
            before = len(report.problems)
            compare_renders(docs, kubectl_docs, kustomization, report)
            agree = len(report.problems) == before
            log(f"{kustomization}: rendered with kubectl kustomize; the Python renderer "
                + (f"agrees on all {len(docs)} objects" if agree else "differs"))
            docs = kubectl_docs
        before = len(report.problems)
        for doc in docs:
            for error in validate_object(doc, crd_schemas):
                report.add(f"{kustomization} {doc['kind']}/{doc['metadata'].get('name')}", error)
        if len(report.problems) > before:
            # The cross-checks below assume well-typed objects.
            log(f"{kustomization}: schema errors; cross-checks skipped until they are fixed")
            continue
        rendered[kustomization] = docs
        log(f"{kustomization}: validated {', '.join(sorted(d['kind'] for d in docs))} "
            f"(Kubernetes {K8S_VERSION} strict; CRDs against {SCHEMAS}/)")
        check_consistency(docs, routes, kustomization, report)
        queries = manifest_queries(docs)
        check_namespace_literals(docs, queries, kustomization, report)
        for what, expr in queries:
            for problem in promql_problems(expr, exported):
                report.add(f"{kustomization} {what}", problem)
    dashboard = json.loads((root / DASHBOARD).read_text())
    check_dashboard(dashboard, report)
    dashboard_exprs = dashboard_queries(dashboard)
    for what, expr in dashboard_exprs:
        for problem in promql_problems(expr, exported):
            report.add(f"{DASHBOARD} {what}", problem)
    log(f"{DASHBOARD}: {len(dashboard_exprs)} queries parsed and checked against "
        f"{EXPORTED_METRICS}")
    base = rendered.get("deploy/base", [])
    linted = check_containerfile(root, (root / CONTAINERFILE).read_text(), base, routes, report)
    log(f"{CONTAINERFILE}: checked" + (" and linted with hadolint" if linted else
                                       " (hadolint not installed: not linted)"))
    return report


def main() -> int:
    report = check_all()
    if report.ok:
        print("check-deploy: all checks passed")
        return 0
    print("check-deploy: problems:", file=sys.stderr)
    for problem in report.problems:
        print(f"  {problem}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())

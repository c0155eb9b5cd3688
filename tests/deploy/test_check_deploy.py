"""Each check of scripts/check_deploy.py rejects what it exists to reject (run by scripts/check-deploy).

Every test starts from the real rendered manifests (which pass: test_the_repository_passes),
breaks one thing, and asserts the check names it. A check that cannot fail would pass here too,
so each test also asserts the unbroken object was accepted first.
"""

import copy
import json
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

import check_deploy as cd  # noqa: E402


@pytest.fixture(scope="module")
def crd_schemas():
    return cd.load_crd_schemas(ROOT)


@pytest.fixture(scope="module")
def rendered():
    """The canary overlay (every kind there is), rendered by the Python renderer."""
    return cd.render_python(ROOT / "deploy/overlays/canary")


@pytest.fixture(scope="module")
def exported():
    return cd.read_exported(ROOT)


@pytest.fixture(scope="module")
def routes():
    return cd.server_get_routes(ROOT)


def obj(docs, kind):
    found = cd.find(docs, kind)
    assert found is not None, kind
    return copy.deepcopy(found)


def rejected(doc, crd_schemas, *needles):
    errors = cd.validate_object(doc, crd_schemas)
    assert errors, f"{doc['kind']} was accepted"
    text = "\n".join(errors)
    for needle in needles:
        assert needle in text, text
    return text


def test_the_repository_passes():
    report = cd.check_all(ROOT, log=lambda line: None)
    assert report.ok, report.problems


@pytest.mark.parametrize("kind", ["Deployment", "Service", "PodDisruptionBudget", "Namespace",
                                  "ServiceMonitor", "ScaledObject", "InferencePool", "Rollout",
                                  "AnalysisTemplate"])
def test_every_rendered_kind_is_valid_as_is(rendered, crd_schemas, kind):
    assert cd.validate_object(obj(rendered, kind), crd_schemas) == []


def test_core_kind_wrong_probe_field_type(rendered, crd_schemas):
    doc = obj(rendered, "Deployment")
    doc["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["periodSeconds"] = "5"
    rejected(doc, crd_schemas, "periodSeconds", "'5' is not of type 'integer'")


def test_core_kind_unknown_field(rendered, crd_schemas):
    doc = obj(rendered, "Deployment")
    doc["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["httpGet"]["pth"] = "/health"
    rejected(doc, crd_schemas, "pth")


def test_core_kind_missing_required_field(rendered, crd_schemas):
    doc = obj(rendered, "Service")
    del doc["spec"]["ports"][0]["port"]
    rejected(doc, crd_schemas, "'port' is a required property")


def test_crd_unknown_field_in_spec(rendered, crd_schemas):
    doc = obj(rendered, "ScaledObject")
    doc["spec"]["maxReplicas"] = 8  # HPA's spelling; KEDA's is maxReplicaCount
    rejected(doc, crd_schemas, "maxReplicas")


def test_crd_missing_required_field(rendered, crd_schemas):
    doc = obj(rendered, "ScaledObject")
    del doc["spec"]["scaleTargetRef"]
    rejected(doc, crd_schemas, "'scaleTargetRef' is a required property")


def test_crd_keda_threshold_must_be_a_string(rendered, crd_schemas):
    doc = obj(rendered, "ScaledObject")
    doc["spec"]["triggers"][0]["metadata"]["threshold"] = 2
    rejected(doc, crd_schemas, "triggers.0.metadata.threshold", "is not of type 'string'")


def test_crd_inference_pool_port_out_of_range(rendered, crd_schemas):
    doc = obj(rendered, "InferencePool")
    doc["spec"]["targetPorts"][0]["number"] = 70000
    rejected(doc, crd_schemas, "targetPorts.0.number")


def test_crd_inference_pool_needs_target_ports(rendered, crd_schemas):
    doc = obj(rendered, "InferencePool")
    del doc["spec"]["targetPorts"]
    rejected(doc, crd_schemas, "'targetPorts' is a required property")


def test_crd_rollout_weight_must_be_an_integer(rendered, crd_schemas):
    doc = obj(rendered, "Rollout")
    doc["spec"]["strategy"]["canary"]["steps"][0]["setWeight"] = "20"
    rejected(doc, crd_schemas, "setWeight", "is not of type 'integer'")


def test_crd_rollout_unknown_step(rendered, crd_schemas):
    doc = obj(rendered, "Rollout")
    doc["spec"]["strategy"]["canary"]["steps"].append({"setWieght": 50})
    rejected(doc, crd_schemas, "setWieght")


def test_crd_analysis_metric_needs_a_provider(rendered, crd_schemas):
    doc = obj(rendered, "AnalysisTemplate")
    del doc["spec"]["metrics"][0]["provider"]
    rejected(doc, crd_schemas, "metrics.0", "'provider' is a required property")


def test_crd_service_monitor_unknown_endpoint_field(rendered, crd_schemas):
    doc = obj(rendered, "ServiceMonitor")
    doc["spec"]["endpoints"][0]["targetPortName"] = "http"
    rejected(doc, crd_schemas, "targetPortName")


def test_crd_metadata_name_must_be_dns(rendered, crd_schemas):
    doc = obj(rendered, "ServiceMonitor")
    doc["metadata"]["name"] = "Candela_Monitor"
    rejected(doc, crd_schemas, "DNS-1123")


def test_unknown_kind_is_an_error_not_a_skip(crd_schemas):
    doc = {"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}}
    rejected(doc, crd_schemas, "no schema for example.com/v1 Widget")


def consistency_problems(docs, routes):
    report = cd.Report()
    cd.check_consistency(docs, routes, "test", report)
    return report.problems


def test_consistency_passes_as_is(rendered, routes):
    assert consistency_problems(rendered, routes) == []


@pytest.mark.parametrize("probe,path,needle", [
    ("readinessProbe", "/healthz", "is not a GET route"),
    ("livenessProbe", "/ready", "livenessProbe should probe /health"),
    ("readinessProbe", "/health", "readinessProbe should probe /ready"),
])
def test_probe_paths_must_be_the_servers(rendered, routes, probe, path, needle):
    docs = copy.deepcopy(rendered)
    container = cd.pod_spec(cd.find(docs, "Deployment"))["containers"][0]
    container[probe]["httpGet"]["path"] = path
    assert any(needle in p for p in consistency_problems(docs, routes))


def test_probe_port_must_be_the_servers(rendered, routes):
    docs = copy.deepcopy(rendered)
    container = cd.pod_spec(cd.find(docs, "Deployment"))["containers"][0]
    container["startupProbe"]["httpGet"]["port"] = 8080
    assert any("startupProbe port 8080" in p for p in consistency_problems(docs, routes))


def test_grace_period_must_outlast_the_drain(rendered, routes):
    docs = copy.deepcopy(rendered)
    cd.pod_spec(cd.find(docs, "Deployment"))["terminationGracePeriodSeconds"] = 40
    assert any("drain would be cut" in p for p in consistency_problems(docs, routes))


def test_startup_probe_must_outlast_loading(rendered, routes):
    docs = copy.deepcopy(rendered)
    container = cd.pod_spec(cd.find(docs, "Deployment"))["containers"][0]
    container["startupProbe"]["failureThreshold"] = 3
    assert any("kill a pod still loading" in p for p in consistency_problems(docs, routes))


def test_keda_must_scale_what_owns_the_pods(rendered, routes):
    docs = copy.deepcopy(rendered)
    cd.find(docs, "ScaledObject")["spec"]["scaleTargetRef"] = {
        "apiVersion": "apps/v1", "kind": "Deployment", "name": "candela"}
    assert any("a Rollout owns the pods" in p for p in consistency_problems(docs, routes))


def test_rollout_must_pass_the_analysis_args(rendered, routes):
    docs = copy.deepcopy(rendered)
    cd.find(docs, "Rollout")["spec"]["strategy"]["canary"]["analysis"]["args"].pop()
    assert any("does not pass ['stable-hash']" in p for p in consistency_problems(docs, routes))


def test_service_monitor_port_must_be_a_service_port(rendered, routes):
    docs = copy.deepcopy(rendered)
    cd.find(docs, "ServiceMonitor")["spec"]["endpoints"][0]["port"] = "metrics"
    assert any("ServiceMonitor port 'metrics'" in p for p in consistency_problems(docs, routes))


@pytest.mark.parametrize("expr,needle", [
    ("sum(vllm:num_requests_waitin)", "vllm:num_requests_waitin is not a series"),
    ("sum(vllm:num_requests_waiting_bucket)", "vllm:num_requests_waiting_bucket is not a series"),
    ("sum(vllm:generation_tokens_total_count)", "is not a series"),
    ("vllm:time_to_first_token_seconds", "vllm:time_to_first_token_seconds is not a series"),
    ("rate(vllm:num_requests_running[5m])", "rate() over the gauge"),
    ("histogram_quantile(0.9, rate(vllm:time_to_first_token_seconds_sum[5m]))", "not a _bucket"),
    ("sum(rate(vllm:prompt_tokens_total[5m])", "does not parse"),
    ('{__name__="vllm:num_requests_waiting"}', "without a metric name"),
])
def test_promql_names_must_be_exported(exported, expr, needle):
    problems = cd.promql_problems(expr, exported)
    assert any(needle in p for p in problems), problems


@pytest.mark.parametrize("expr", [
    "sum(vllm:num_requests_waiting)",
    "histogram_quantile(0.99, sum by (le) (rate(vllm:time_to_first_token_seconds_bucket[5m])))",
    "rate(vllm:e2e_request_latency_seconds_sum[5m]) / rate(vllm:e2e_request_latency_seconds_count[5m])",
    'sum(rate(candela:generation_tokens_total{pod=~"$pod"}[$__rate_interval]))',
    'sum(vllm:request_success_total{rollouts_pod_template_hash="{{args.canary-hash}}"})',
])
def test_promql_accepts_what_the_server_exports(exported, expr):
    assert cd.promql_problems(expr, exported) == []


def test_every_query_is_found(rendered):
    """The metric check sees the KEDA triggers and every analysis metric (not zero queries)."""
    where = [w for w, _ in cd.manifest_queries(rendered)]
    assert sum("ScaledObject" in w for w in where) == 2
    assert sum("AnalysisTemplate" in w for w in where) == 3


def test_dashboard_covers_what_the_issue_asks():
    dashboard = json.loads((ROOT / cd.DASHBOARD).read_text())
    exprs = " ".join(e for _, e in cd.dashboard_queries(dashboard))
    for metric in ("time_to_first_token_seconds_bucket", "inter_token_latency_seconds_bucket",
                   "e2e_request_latency_seconds_bucket", "num_requests_waiting",
                   "num_requests_running", "kv_cache_usage_perc", "prefix_cache_hits_total",
                   "num_preemptions_total", "generation_tokens_total"):
        assert metric in exprs, metric
    for quantile in ("0.5", "0.9", "0.99"):
        assert f"histogram_quantile({quantile}," in exprs


def test_dashboard_undefined_variable_is_caught():
    dashboard = json.loads((ROOT / cd.DASHBOARD).read_text())
    panel = next(p for p in cd.all_panels(dashboard) if p.get("targets"))
    panel["targets"][0]["expr"] = panel["targets"][0]["expr"].replace("$pod", "$replica")
    report = cd.Report()
    cd.check_dashboard(dashboard, report)
    assert any("undefined ['replica']" in p for p in report.problems), report.problems


def containerfile_problems(text, rendered, routes):
    report = cd.Report()
    cd.check_containerfile(ROOT, text, rendered, routes, report)
    return report.problems


def test_containerfile_passes_as_is(rendered, routes):
    text = (ROOT / cd.CONTAINERFILE).read_text()
    assert containerfile_problems(text, rendered, routes) == []


@pytest.mark.parametrize("old,new,needle", [
    ('ENTRYPOINT ["/usr/local/bin/candela", "serve"]', 'ENTRYPOINT ["/usr/local/bin/candela"]',
     "ENTRYPOINT must be"),
    ("COPY models/SmolLM2-135M-Instruct.Q4_1.gguf", "COPY models/other.gguf",
     "COPY source models/other.gguf"),
    ("USER 10001:10001", "USER root", "non-root USER"),
    ("EXPOSE 8000", "EXPOSE 8080", "EXPOSE must be"),
    ("GET /health HTTP", "GET /healthz HTTP", "HEALTHCHECK must GET a server route"),
])
def test_containerfile_breakage_is_caught(rendered, routes, old, new, needle):
    text = (ROOT / cd.CONTAINERFILE).read_text()
    assert old in text
    problems = containerfile_problems(text.replace(old, new), rendered, routes)
    assert any(needle in p for p in problems), problems


def test_python_renderer_refuses_what_it_does_not_implement(tmp_path):
    (tmp_path / "kustomization.yaml").write_text("resources: []\ncommonLabels: {a: b}\n")
    with pytest.raises(cd.RenderError, match="commonLabels"):
        cd.render_python(tmp_path)


def test_a_broken_manifest_file_fails_the_whole_check(tmp_path):
    """End to end, through the files: a copy of the tree with one YAML file broken fails
    check_all, with both renderers (kubectl's when it is installed)."""
    tree = tmp_path / "tree"
    for part in ("deploy", "scripts", "crates/candela-server/src"):
        shutil.copytree(ROOT / part, tree / part)
    shutil.copy(ROOT / ".dockerignore", tree / ".dockerignore")
    deployment = tree / "deploy/base/deployment.yaml"
    text = deployment.read_text()
    assert "failureThreshold: 120" in text
    deployment.write_text(text.replace("failureThreshold: 120", "failureThreshold: many"))
    report = cd.check_all(tree, log=lambda line: None)
    assert any("startupProbe.failureThreshold" in p and "'many' is not of type 'integer'" in p
               for p in report.problems), report.problems


def test_renderers_disagreeing_is_caught(monkeypatch):
    """With kubectl installed, check_all compares both renders object by object; a difference
    (here: kubectl seen to render another image tag) is a problem, not a silent pick of one."""
    def other_render(directory):
        docs = cd.render_python(directory)
        for container in cd.containers_of_all(docs):
            container["image"] = container["image"].replace(":0.1.0", ":0.2.0")
        return docs
    monkeypatch.setattr(cd, "render_kubectl", other_render)
    report = cd.check_all(ROOT, log=lambda line: None)
    assert any("Deployment" in p and "differs between kubectl and the Python renderer" in p
               for p in report.problems), report.problems


def test_without_kubectl_the_python_render_is_still_validated(monkeypatch):
    lines = []
    monkeypatch.setattr(cd, "render_kubectl", lambda directory: None)
    assert cd.check_all(ROOT, log=lines.append).ok
    assert sum("rendered with the Python renderer" in line for line in lines) == 3
    assert sum(line.startswith("deploy/") and ": validated " in line for line in lines) == 3

"""Builds the image from deploy/Containerfile and runs it as the Deployment in deploy/base would
(driven by scripts/container-smoke; not part of scripts/test: it needs podman or docker, a
bookworm base image and a built binary).

Run as the kubelet would: the Deployment's args, read-only root filesystem, all capabilities
dropped, no privilege escalation, its uid, its memory and CPU limits, RAYON_NUM_THREADS from the
CPU limit, the port published on loopback only. Then, in the kubelet's order: the startup probe
every periodSeconds until it passes (at most failureThreshold tries), the readiness and liveness
probes, the image's own HEALTHCHECK, one completion; and termination: a streaming request in
flight, the preStop sleep, SIGTERM, /ready turning 503 while the stream still runs, the stream
finishing, the container exiting 0 within the grace period. Prints one line per step; exits 1
on the first failure. Every wait is bounded; the container is removed at the end.
"""

import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import check_deploy as cd  # noqa: E402

ENGINE = os.environ.get("CONTAINER_ENGINE", "podman")
BUILD_FLAGS = shlex.split(os.environ.get("BUILD_FLAGS", ""))
RUN_FLAGS = shlex.split(os.environ.get("RUN_FLAGS", ""))
BASE = os.environ.get("BASE")
TAG = os.environ.get("IMAGE", "localhost/candela:smoke")
BINARY = Path(os.environ.get("CANDELA_BIN", ROOT / "target/release/candela"))
NAME = f"candela-smoke-{os.getpid()}"


def step(message: str):
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def fail(message: str):
    step(f"FAILED: {message}")
    logs = subprocess.run([ENGINE, "logs", "--tail", "20", NAME], capture_output=True, text=True)
    print(logs.stdout + logs.stderr, file=sys.stderr)
    raise SystemExit(1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def memory_flag(quantity: str) -> str:
    units = {"Ki": "k", "Mi": "m", "Gi": "g"}
    for suffix, flag in units.items():
        if quantity.endswith(suffix):
            return quantity[: -len(suffix)] + flag
    return quantity


def build(context: Path):
    (context / "deploy").mkdir()
    shutil.copy(ROOT / "deploy/Containerfile", context / "deploy/Containerfile")
    shutil.copy(ROOT / ".dockerignore", context / ".dockerignore")
    for source in cd.BUILD_OUTPUTS:
        origin = BINARY if source == "target/release/candela" else ROOT / source
        if not origin.is_file():
            fail(f"{origin} is missing: {cd.BUILD_OUTPUTS[source]}")
        (context / source).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(origin, context / source)
    command = [ENGINE, "build", "-f", "deploy/Containerfile", "-t", TAG, *BUILD_FLAGS]
    if ENGINE == "podman":
        command += ["--format", "docker"]  # keeps HEALTHCHECK, which OCI images drop
    if BASE:
        command += ["--build-arg", f"BASE={BASE}"]
    step("build: " + " ".join(command + ["."]))
    started = time.monotonic()
    out = subprocess.run(command + ["."], cwd=context, capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        fail(f"build exited {out.returncode}:\n{out.stdout[-2000:]}{out.stderr[-2000:]}")
    step(f"build: ok in {time.monotonic() - started:.1f} s")


def get(url: str) -> int:
    try:
        return httpx.get(url, timeout=5).status_code
    except httpx.HTTPError:
        return 0


def main() -> int:
    deployment = cd.find(cd.render_python(ROOT / "deploy/base"), "Deployment", "candela")
    pod = cd.pod_spec(deployment)
    container = pod["containers"][0]
    port = container["ports"][0]["containerPort"]
    limits = container["resources"]["limits"]
    security = pod.get("securityContext", {})
    pre_stop_s = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    grace_s = pod["terminationGracePeriodSeconds"]
    with tempfile.TemporaryDirectory(prefix="candela-smoke-") as context:
        build(Path(context))

    host_port = free_port()
    url = f"http://127.0.0.1:{host_port}"
    run = [ENGINE, "run", "-d", "--name", NAME, *RUN_FLAGS,
           "--read-only", "--cap-drop", "ALL", "--security-opt", "no-new-privileges",
           "--user", f"{security['runAsUser']}:{security['runAsGroup']}",
           "--memory", memory_flag(limits["memory"]), "--cpus", str(limits["cpu"]),
           "-e", f"RAYON_NUM_THREADS={limits['cpu']}", "-e", "RUST_LOG=info",
           "-p", f"127.0.0.1:{host_port}:{port}", TAG, *map(str, container["args"])]
    step("run: " + " ".join(run))
    out = subprocess.run(run, capture_output=True, text=True, timeout=120)
    if out.returncode != 0:
        fail(f"run exited {out.returncode}: {out.stderr.strip()}")
    try:
        probe_and_terminate(container, url, pre_stop_s, grace_s)
    finally:
        subprocess.run([ENGINE, "rm", "-f", NAME], capture_output=True, timeout=120)
    step("all steps passed")
    return 0


def probe_and_terminate(container: dict, url: str, pre_stop_s: int, grace_s: int):
    startup = container["startupProbe"]
    started = time.monotonic()
    for attempt in range(1, startup["failureThreshold"] + 1):
        if get(url + startup["httpGet"]["path"]) == 200:
            break
        time.sleep(startup["periodSeconds"])
    else:
        fail(f"startupProbe {startup['httpGet']['path']} never 200")
    step(f"startupProbe GET {startup['httpGet']['path']}: 200 on try {attempt} "
         f"({time.monotonic() - started:.1f} s after start)")
    for probe in ("readinessProbe", "livenessProbe"):
        path = container[probe]["httpGet"]["path"]
        code = get(url + path)
        if code != 200:
            fail(f"{probe} GET {path}: {code}")
        step(f"{probe} GET {path}: 200")
    if ENGINE == "podman":
        health = subprocess.run([ENGINE, "healthcheck", "run", NAME], capture_output=True,
                                text=True, timeout=30)
        if health.returncode != 0:
            fail(f"HEALTHCHECK exited {health.returncode}: {health.stdout}{health.stderr}")
        step("image HEALTHCHECK (podman healthcheck run): healthy")
    metrics = httpx.get(url + "/metrics", timeout=5)
    if metrics.status_code != 200 or "vllm:num_requests_waiting" not in metrics.text:
        fail("/metrics does not export vllm:num_requests_waiting")
    step("GET /metrics: 200, vllm:num_requests_waiting exported")
    model = httpx.get(url + "/v1/models", timeout=5).json()["data"][0]["id"]
    reply = httpx.post(url + "/v1/chat/completions", timeout=120, json={
        "model": model, "max_tokens": 16, "messages": [{"role": "user", "content": "Hi"}]})
    if reply.status_code != 200:
        fail(f"chat completion: {reply.status_code} {reply.text}")
    step(f"POST /v1/chat/completions (model {model}): 200, "
         f"{reply.json()['usage']['completion_tokens']} tokens")

    # The kubelet runs preStop first: the server must still serve normally all through it.
    step(f"termination: preStop sleep {pre_stop_s} s")
    time.sleep(pre_stop_s)
    if get(url + "/ready") != 200:
        fail("/ready was not 200 at the end of the preStop sleep")
    step("end of preStop: /ready 200")

    # A request in flight when SIGTERM arrives (max_tokens 400 runs for seconds on a CPU).
    stream = {"chunks": 0, "finish_reason": None, "error": None}
    first_token = threading.Event()

    def stream_one():
        body = {"model": model, "prompt": "Once upon a time", "max_tokens": 400,
                "temperature": 0, "stream": True, "ignore_eos": True}
        try:
            with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as r:
                for line in r.iter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    choice = json.loads(line[6:])["choices"][0]
                    stream["chunks"] += 1
                    first_token.set()
                    stream["finish_reason"] = choice.get("finish_reason") or stream["finish_reason"]
        except (httpx.HTTPError, ValueError, KeyError) as e:
            stream["error"] = repr(e)
        first_token.set()

    thread = threading.Thread(target=stream_one, daemon=True)
    thread.start()
    if not first_token.wait(60):
        fail("the streaming request got no token in 60 s")
    subprocess.run([ENGINE, "kill", "--signal", "TERM", NAME], capture_output=True, timeout=30)
    signalled = time.monotonic()
    in_flight = thread.is_alive()
    code = get(url + "/ready")
    step(f"SIGTERM with a stream in flight ({in_flight}); /ready right after: {code}")
    if not in_flight:
        fail("the stream had finished before SIGTERM: nothing was drained")
    if code != 503:
        fail(f"/ready answered {code} while draining, not 503")
    thread.join(timeout=grace_s - pre_stop_s)
    if thread.is_alive() or stream["error"] or stream["finish_reason"] is None:
        fail(f"the in-flight stream did not finish cleanly: {stream}")
    step(f"in-flight stream finished during the drain: {stream['chunks']} chunks, "
         f"finish_reason {stream['finish_reason']}")
    waited = subprocess.run([ENGINE, "wait", NAME], capture_output=True, text=True,
                            timeout=grace_s - pre_stop_s + 10)
    exit_code = waited.stdout.strip().splitlines()[-1] if waited.stdout.strip() else "?"
    elapsed = time.monotonic() - signalled
    if exit_code != "0":
        fail(f"exit code {exit_code} after SIGTERM")
    step(f"container exited {exit_code}, {elapsed:.1f} s after SIGTERM "
         f"(grace period {grace_s} s, of which preStop {pre_stop_s} s)")


if __name__ == "__main__":
    sys.exit(main())

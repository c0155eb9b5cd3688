"""Serving behaviour: concurrency, disconnects, admission control, metrics, shutdown."""

import concurrent.futures
import re
import threading
import time

import httpx
import pytest

from conftest import API_KEY, Server

PROMPTS = [
    "The capital of France is",
    "Once upon a time",
    "def fibonacci(n):",
    "The best way to learn a language is",
    "Water boils at",
    "My favourite colour is",
    "In 1969, humans",
    "The recipe for pancakes:",
    "Dear Sir or Madam,",
    "A haiku about the sea:",
    "The three laws of robotics",
    "Photosynthesis is",
    "Rust is a programming language that",
    "The weather today is",
    "Ten facts about cats: 1.",
    "To be or not to be,",
]
METRICS_WAIT_S = 30


def metric(text: str, name: str) -> float:
    m = re.search(rf"^{re.escape(name)}(?:{{[^}}]*}})? ([0-9.eE+-]+)$", text, re.MULTILINE)
    assert m, f"{name} not in /metrics"
    return float(m.group(1))


def wait_idle(url: str):
    """Polls /metrics (bounded) until nothing runs and the KV cache is empty."""
    deadline = time.monotonic() + METRICS_WAIT_S
    text = ""
    while time.monotonic() < deadline:
        text = httpx.get(f"{url}/metrics", timeout=10).text
        if metric(text, "candela:num_requests_running") == 0 and metric(text, "candela:kv_cache_usage_perc") == 0:
            return text
        time.sleep(0.1)
    pytest.fail(f"the engine did not go idle within {METRICS_WAIT_S} s:\n{text}")


def test_concurrent_streams_match_sequential(client, model_name):
    def stream(prompt):
        chunks = client.completions.create(model=model_name, prompt=prompt, max_tokens=16, temperature=0,
                                           stream=True)
        return "".join(c.choices[0].text for c in chunks if c.choices)

    alone = [stream(p) for p in PROMPTS]
    start = threading.Barrier(len(PROMPTS), timeout=60)

    def together(prompt):
        start.wait()
        return stream(prompt)

    with concurrent.futures.ThreadPoolExecutor(len(PROMPTS)) as pool:
        batched = list(pool.map(together, PROMPTS, timeout=300))
    assert batched == alone


def test_disconnect_mid_stream_frees_the_request(server, model_name):
    body = {"model": model_name, "prompt": "Tell me a very long story.", "max_tokens": 2000,
            "ignore_eos": True, "stream": True}
    running = None
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        lines = 0
        for line in r.iter_lines():
            lines += bool(line.startswith("data: "))
            if lines >= 3:
                # Read while the generator is still alive: leaving it (break) lets httpx close
                # the connection, which is the disconnect this test is about.
                running = metric(httpx.get(f"{server.url}/metrics", timeout=10).text,
                                 "candela:num_requests_running")
                break
    assert running is not None and running >= 1
    # Leaving the block closed the connection mid-stream.
    text = wait_idle(server.url)
    assert 'candela:request_success_total{finished_reason="abort"}' in text


def test_metrics_content(server, client, model_name):
    """Counters move by exactly what one request did (the server is idle before and after)."""
    before = wait_idle(server.url)
    r = client.completions.create(model=model_name, prompt="Hello", max_tokens=3,
                                  extra_body={"ignore_eos": True})
    after = wait_idle(server.url)
    assert r.usage.completion_tokens == 3
    for name in ("candela:num_requests_running", "candela:num_requests_waiting", "candela:kv_cache_usage_perc",
                 "candela:prompt_tokens_total", "candela:generation_tokens_total"):
        metric(after, name)
    delta = lambda name: metric(after, name) - metric(before, name)
    assert delta("candela:generation_tokens_total") == 3
    assert delta("candela:prompt_tokens_total") == r.usage.prompt_tokens
    assert delta("candela:time_to_first_token_seconds_count") == 1


def test_metrics_under_vllms_names_for_routers(server, client, model_name):
    """Routers and autoscalers (Gateway API Inference Extension, production-stack, KEDA) read
    vllm:* names: each series is there under both prefixes, plus the info gauges."""
    client.completions.create(model=model_name, prompt="Hi", max_tokens=2)
    text = wait_idle(server.url)
    for name in ("num_requests_waiting", "num_requests_running", "kv_cache_usage_perc",
                 "prefix_cache_hits_total", "prefix_cache_queries_total", "generation_tokens_total",
                 "time_to_first_token_seconds_count"):
        assert metric(text, f"vllm:{name}") == metric(text, f"candela:{name}"), name
    assert metric(text, "vllm:gpu_cache_usage_perc") == metric(text, "vllm:kv_cache_usage_perc")
    assert metric(text, "vllm:gpu_prefix_cache_hits_total") == metric(text, "vllm:prefix_cache_hits_total")
    assert metric(text, "vllm:gpu_prefix_cache_queries_total") == metric(text, "vllm:prefix_cache_queries_total")
    info = re.search(r'^vllm:cache_config_info\{([^}]*)\} 1$', text, re.MULTILINE)
    assert info, text
    labels = dict(re.findall(r'(\w+)="([^"]*)"', info.group(1)))
    assert labels["block_size"] == "16" and int(labels["num_gpu_blocks"]) > 0, labels
    build = re.search(r'^candela:build_info\{([^}]*)\} 1$', text, re.MULTILINE)
    assert build, text
    labels = dict(re.findall(r'(\w+)="([^"]*)"', build.group(1)))
    assert labels["model"] == model_name and labels["version"] and labels["revision"], labels


def test_full_queue_is_429_with_retry_after(keyed_server):
    """One running and one waiting slot: of 6 simultaneous long requests, some are refused."""
    headers = {"authorization": f"Bearer {API_KEY}"}
    body = {"prompt": "Write a long essay.", "max_tokens": 64, "ignore_eos": True}
    start = threading.Barrier(6, timeout=60)

    def send(_):
        start.wait()
        return httpx.post(f"{keyed_server.url}/v1/completions", json=body, headers=headers, timeout=300)

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        replies = list(pool.map(send, range(6), timeout=600))
    statuses = sorted(r.status_code for r in replies)
    assert 200 in statuses and 429 in statuses, statuses
    for r in replies:
        if r.status_code == 429:
            assert r.headers["retry-after"].isdigit()
            assert r.json()["error"]["type"] == "rate_limit_error"

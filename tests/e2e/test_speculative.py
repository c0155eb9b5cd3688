"""`candela serve --speculative ngram`: greedy output through the official `openai` client equals
a server without speculation (chat, completions, streaming, several choices), drafts are
accepted on a prompt the model copies (the `vllm:spec_decode_*` metrics move), and bad flag
values are clear CLI errors."""

import subprocess

import httpx
import pytest

from conftest import BINARY, MODEL, Server

PROMPTS = [
    "Repeat exactly, word for word: The quick brown fox jumps over the lazy dog. "
    "The quick brown fox jumps over the lazy dog. The quick brown fox jumps over the lazy dog.",
    "Copy this Python function exactly:\n```python\ndef factorial(n):\n    if n == 0:\n"
    "        return 1\n    return n * factorial(n - 1)\n```",
    "What is the capital of France?",
]


@pytest.fixture(scope="module")
def spec_server():
    s = Server("--speculative", "ngram", "--num-speculative-tokens", "5", "--ngram-max", "4",
               "--ngram-min", "1")
    yield s
    s.stop()


def metric(server: Server, name: str) -> float:
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"no {name} in /metrics")


def chat(client, model, prompt, **kw):
    r = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": prompt}], temperature=0, **kw)
    return [(c.message.content, c.finish_reason) for c in r.choices], r.usage.completion_tokens


def test_greedy_output_equals_a_server_without_speculation(client, model_name, spec_server):
    spec = spec_server.client()
    accepted_before = metric(spec_server, "vllm:spec_decode_num_accepted_tokens_total")
    for prompt in PROMPTS:
        for max_tokens in (1, 7, 64):
            assert chat(spec, model_name, prompt, max_tokens=max_tokens) == \
                chat(client, model_name, prompt, max_tokens=max_tokens), (prompt, max_tokens)
    # Two choices, and a stop string inside the copied text.
    assert chat(spec, model_name, PROMPTS[0], max_tokens=48, n=2) == \
        chat(client, model_name, PROMPTS[0], max_tokens=48, n=2)
    assert chat(spec, model_name, PROMPTS[0], max_tokens=64, stop=["lazy dog. The"]) == \
        chat(client, model_name, PROMPTS[0], max_tokens=64, stop=["lazy dog. The"])
    # Completions, streamed: the pieces join to the same text.
    def streamed(c):
        stream = c.completions.create(model=model_name, prompt=PROMPTS[1], max_tokens=48,
                                      temperature=0, stream=True)
        return "".join(chunk.choices[0].text for chunk in stream if chunk.choices)
    assert streamed(spec) == streamed(client)
    assert metric(spec_server, "vllm:spec_decode_num_accepted_tokens_total") > accepted_before
    drafts = metric(spec_server, "vllm:spec_decode_num_draft_tokens_total")
    assert drafts >= metric(spec_server, "vllm:spec_decode_num_accepted_tokens_total")


@pytest.mark.parametrize("args, message", [
    (["--speculative", "ngram", "--num-speculative-tokens", "0"], "num-speculative-tokens"),
    (["--speculative", "ngram", "--num-speculative-tokens", "17"], "num-speculative-tokens"),
    (["--speculative", "eagle"], "speculative"),
    (["--speculative", "ngram", "--ngram-min", "5", "--ngram-max", "3"], "ngram-min"),
    (["--num-speculative-tokens", "3"], "speculative"),
])
def test_bad_speculative_flags_are_cli_errors(args, message):
    r = subprocess.run([str(BINARY), "serve", "--model", str(MODEL), "--port", "1", *args],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    assert message in r.stderr, r.stderr

"""Fixtures for the end-to-end tests: real `candela serve` processes on loopback ports.

The binary is `target/release/candela` (override with CANDELA_BIN); `scripts/test` builds it
first. Each server is started once per session, waited for on `/ready` with a bounded timeout,
and stopped with SIGTERM at the end (SIGKILL if it does not exit in time).
"""

import os
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import httpx
import openai
import pytest

REPO = Path(__file__).resolve().parents[2]
BINARY = Path(os.environ.get("CANDELA_BIN", REPO / "target" / "release" / "candela"))
MODEL = Path(os.environ.get("CANDELA_MODEL", REPO / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"))
REFERENCE = REPO / "testdata" / "reference" / "smollm2-greedy.jsonl"
READY_TIMEOUT_S = 180
STOP_TIMEOUT_S = 30
API_KEY = "e2e-secret-key"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """One `candela serve` process."""

    def __init__(self, *extra_args: str, env: dict | None = None, model: Path = MODEL):
        if not BINARY.exists():
            pytest.fail(f"{BINARY} is missing: build it with `cargo build --release -p candela-cli`")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.NamedTemporaryFile(prefix="candela-e2e-", suffix=".log", delete=False)
        args = [str(BINARY), "serve", "--model", str(model), "--host", "127.0.0.1",
                "--port", str(self.port), *extra_args]
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT,
                                     env={**os.environ, **(env or {})})
        self._wait_ready()

    def log_tail(self, lines: int = 40) -> str:
        text = Path(self.log.name).read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def _wait_ready(self):
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"candela serve exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/ready", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        pytest.fail(f"candela serve was not ready within {READY_TIMEOUT_S} s:\n{self.log_tail()}")

    def client(self, api_key: str = "unused") -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=api_key, max_retries=0, timeout=120)

    def stop(self) -> int:
        """SIGTERM, then SIGKILL after STOP_TIMEOUT_S; returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=STOP_TIMEOUT_S)
        return self.proc.returncode


@pytest.fixture(scope="session")
def server():
    s = Server()
    yield s
    s.stop()


@pytest.fixture(scope="session")
def client(server):
    return server.client()


@pytest.fixture(scope="session")
def model_name(client):
    return client.models.list().data[0].id


@pytest.fixture(scope="session")
def keyed_server():
    """A second server with an API key and a tiny queue (one running, one waiting)."""
    s = Server("--api-key", API_KEY, "--max-num-seqs", "1", "--max-waiting", "1")
    yield s
    s.stop()


def first_near_tie(record: dict, margin: float) -> int:
    """Index of the first output token whose reference top-1 and top-2 logprobs are within
    `margin` nats (entries are aligned by id: a split UTF-8 piece may have none)."""
    ids = record["output_token_ids"]
    tops = record.get("output_top_logprobs") or []
    j = 0
    for i, token in enumerate(ids):
        if j < len(tops) and tops[j]["id"] == token:
            top = tops[j]["top"]
            j += 1
            if len(top) >= 2 and top[0][1] - top[1][1] < margin:
                return i
    return len(ids)


def assert_matches_record(client, model: str, record: dict, margin: float):
    """Prompt ids equal llama.cpp's exactly; greedy output ids equal its up to the first
    near-tie, and at least one token is compared."""
    common = dict(model=model, max_tokens=record.get("max_tokens", 48), temperature=0,
                  extra_body={"return_token_ids": True})
    if record["mode"] == "completion":
        r = client.completions.create(prompt=record["prompt"], **common).to_dict()
        prompt_ids = r["choices"][0]["prompt_token_ids"]
    else:
        r = client.chat.completions.create(messages=record["messages"], **common).to_dict()
        prompt_ids = r["prompt_token_ids"]
    assert prompt_ids == record["prompt_token_ids"]
    ours = r["choices"][0]["token_ids"]
    theirs = record["output_token_ids"]
    cut = first_near_tie(record, margin)
    # The end-of-sequence token may or may not be reported among the output ids.
    if len(theirs) <= cut and len(ours) == len(theirs) - 1 and record["finish_reason"] == "stop":
        theirs = theirs[:-1]
    if cut == 0:
        # A near-tie at the very first token: ours must be one of the tied candidates.
        top = record["output_top_logprobs"][0]["top"]
        tied = [t for t, lp in top if top[0][1] - lp < margin]
        assert ours[:1] and ours[0] in tied, f"first token {ours[:1]} not among {tied}"
    else:
        assert ours[:cut] == theirs[:cut], f"diverged before the first near-tie at {cut}"

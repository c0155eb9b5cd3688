"""/health tells the truth: 200 only while the engine can serve. A fault injected into the real
engine's forward pass (the binary is built with the `fault-injection` feature; the fault is off
unless CANDELA_FAULT_INJECT names one) ends every in-flight request with an error the client
sees, turns /health and /ready to 503 and refuses new requests with 503, without a hang or a
crash. SIGTERM drains: the in-flight stream finishes while probes and new requests get 503."""

import concurrent.futures
import json
import threading
import time

import httpx
import openai
import pytest

from conftest import Server

WAIT_S = 60


def error_body(r: httpx.Response) -> dict:
    body = r.json()
    assert set(body["error"]) >= {"message", "type", "param", "code"}, body
    return body["error"]


def test_health_is_200_while_serving(server):
    r = httpx.get(f"{server.url}/health", timeout=10)
    assert r.status_code == 200
    assert r.json() == {"status": "ok"}


@pytest.mark.parametrize("fault,words", [("forward-error:40", "forward pass 40 failed"),
                                         ("forward-panic:40", "forward pass 40 panicked")])
def test_engine_fault_fails_requests_and_health(fault, words):
    s = Server(env={"CANDELA_FAULT_INJECT": fault})
    try:
        client = s.client()
        model = client.models.list().data[0].id
        long = {"max_tokens": 300, "temperature": 0, "extra_body": {"ignore_eos": True}}

        def stream():
            got = []
            with pytest.raises(openai.APIError) as err:
                for chunk in client.chat.completions.create(
                        model=model, messages=[{"role": "user", "content": "Tell me a story."}],
                        stream=True, **long):
                    got.append(chunk.choices[0].delta.content or "" if chunk.choices else "")
            return err.value, got

        def once():
            with pytest.raises(openai.InternalServerError) as err:
                client.completions.create(model=model, prompt="Once upon a time", **long)
            return err.value

        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            streamed, blocking = pool.submit(stream), pool.submit(once)
            (stream_error, pieces), once_error = streamed.result(WAIT_S), blocking.result(WAIT_S)
        # The stream had begun, then carried the error as its last event.
        assert len(pieces) > 1
        assert words in str(stream_error), stream_error
        assert once_error.status_code == 500 and words in str(once_error), once_error

        health = httpx.get(f"{s.url}/health", timeout=10)
        assert health.status_code == 503
        assert words in error_body(health)["message"]
        assert httpx.get(f"{s.url}/ready", timeout=10).status_code == 503
        with pytest.raises(openai.APIStatusError) as refused:
            client.completions.create(model=model, prompt="Hello", max_tokens=3)
        assert refused.value.status_code == 503
        assert s.proc.poll() is None, "the server crashed:\n" + s.log_tail()
    finally:
        s.stop()


def test_sigterm_drains_while_probes_say_503():
    s = Server()
    body = {"prompt": "Count to fifty:", "max_tokens": 200, "ignore_eos": True, "stream": True}
    code = []
    with httpx.stream("POST", f"{s.url}/v1/completions", json=body, timeout=120) as r:
        lines = r.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
        stopper = threading.Thread(target=lambda: code.append(s.stop()))
        stopper.start()
        # While the stream still runs, the replica says it is going away.
        deadline = time.monotonic() + WAIT_S
        while httpx.get(f"{s.url}/health", timeout=10).status_code != 503:
            assert time.monotonic() < deadline, "/health never turned 503 after SIGTERM"
            time.sleep(0.01)
        assert "shutting down" in error_body(httpx.get(f"{s.url}/health", timeout=10))["message"]
        assert httpx.get(f"{s.url}/ready", timeout=10).status_code == 503
        refused = httpx.post(f"{s.url}/v1/completions", json={"prompt": "Hi", "max_tokens": 2}, timeout=10)
        assert refused.status_code == 503
        assert error_body(refused)["type"] == "service_unavailable_error"
        rest = [line for line in lines if line.startswith("data: ")]
        stopper.join(timeout=WAIT_S)
    assert rest and rest[-1] == "data: [DONE]", "the in-flight stream was cut"
    chunks = [json.loads(line[6:]) for line in [first, *rest[:-1]]]
    finishes = [c["choices"][0]["finish_reason"] for c in chunks if c.get("choices")]
    assert finishes[-1] == "length", finishes[-3:]
    assert code == [0], s.log_tail()

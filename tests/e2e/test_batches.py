"""The OpenAI Batch API over HTTP, driven by the official `openai` client: upload, create,
poll, download the output and error files, cancel, bad inputs, and a SIGKILL mid-batch after
which a new server on the same data directory finishes the batch with every line answered
exactly once. Small max_tokens keep the whole file to well under a minute on 2 cores."""

import json
import tempfile
import time

import openai
import pytest

from conftest import Server

POLL_S = 0.2
FINISH_TIMEOUT_S = 90
FILE_BYTES_MAX = 65536


def chat_line(custom_id: str, question: str, max_tokens: int, **extra) -> dict:
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"messages": [{"role": "user", "content": question}],
                 "max_tokens": max_tokens, "temperature": 0, **extra},
    }


def jsonl(lines: list[dict]) -> bytes:
    return "".join(json.dumps(line) + "\n" for line in lines).encode()


def upload(client, lines: list[dict]):
    return client.files.create(file=("requests.jsonl", jsonl(lines)), purpose="batch")


def create(client, file_id: str):
    return client.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions",
                                 completion_window="24h")


def wait(client, batch_id: str, done, timeout_s: float = FINISH_TIMEOUT_S):
    """Polls the batch until `done(batch)`, or fails after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        batch = client.batches.retrieve(batch_id)
        if done(batch):
            return batch
        assert time.monotonic() < deadline, f"batch stuck: {batch}"
        time.sleep(POLL_S)


def records(client, file_id: str) -> dict[str, dict]:
    """The records of a result file by custom_id; fails on a custom_id answered twice."""
    text = client.files.content(file_id).text
    assert text.endswith("\n")
    by_id = {}
    for line in text.splitlines():
        record = json.loads(line)
        assert record["custom_id"] not in by_id, f"{record['custom_id']} answered twice"
        by_id[record["custom_id"]] = record
    return by_id


@pytest.fixture(scope="module")
def batch_server():
    with tempfile.TemporaryDirectory(prefix="candela-batches-") as data_dir:
        s = Server("--data-dir", data_dir, "--max-file-bytes", str(FILE_BYTES_MAX),
                   "--max-num-seqs", "8", "--batch-max-in-flight", "3")
        yield s
        s.stop()


@pytest.fixture(scope="module")
def bclient(batch_server):
    return batch_server.client()


def test_a_batch_answers_every_line_once_in_the_output_and_error_files(bclient):
    lines = [chat_line(f"q-{i}", f"Name a colour, {i}.", 6) for i in range(6)]
    # Valid framing, but the route refuses the body: a 400 record in the error file.
    lines.append(chat_line("bad-temperature", "hi", 4, temperature=-1))
    file = upload(bclient, lines)
    assert file.purpose == "batch" and file.filename == "requests.jsonl"
    assert bclient.files.retrieve(file.id).bytes == len(jsonl(lines))
    assert bclient.files.content(file.id).content == jsonl(lines)

    batch = create(bclient, file.id)
    assert batch.status == "validating" and batch.input_file_id == file.id
    # An interactive request is answered while the batch runs (batch work is bounded and
    # below it in priority).
    model = bclient.models.list().data[0].id
    reply = bclient.chat.completions.create(model=model, max_tokens=4,
                                            messages=[{"role": "user", "content": "Hi"}])
    assert reply.choices[0].message.content
    done = wait(bclient, batch.id, lambda b: b.status not in ("validating", "in_progress",
                                                              "finalizing"))
    assert done.status == "completed", done
    assert (done.request_counts.total, done.request_counts.completed,
            done.request_counts.failed) == (7, 6, 1)
    assert done.completed_at and done.in_progress_at and done.finalizing_at

    output = records(bclient, done.output_file_id)
    assert set(output) == {f"q-{i}" for i in range(6)}
    for record in output.values():
        assert record["error"] is None
        assert record["id"].startswith("batch_req_")
        response = record["response"]
        assert response["status_code"] == 200
        body = response["body"]
        assert body["object"] == "chat.completion"
        assert response["request_id"] == body["id"]
        assert 1 <= body["usage"]["completion_tokens"] <= 6
        assert body["choices"][0]["message"]["content"]
    errors = records(bclient, done.error_file_id)
    assert set(errors) == {"bad-temperature"}
    refused = errors["bad-temperature"]["response"]
    assert refused["status_code"] == 400
    assert refused["body"]["error"]["param"] == "temperature"

    assert bclient.files.retrieve(done.output_file_id).purpose == "batch_output"
    assert batch.id in [b.id for b in bclient.batches.list(limit=100).data]
    assert {file.id, done.output_file_id, done.error_file_id} <= \
        {f.id for f in bclient.files.list().data}
    # Cancelling a finished batch is refused.
    with pytest.raises(openai.BadRequestError):
        bclient.batches.cancel(batch.id)


def test_cancel_stops_a_batch_and_keeps_what_was_answered(bclient):
    total = 24
    file = upload(bclient, [chat_line(f"c-{i}", f"Count to {i}.", 24) for i in range(total)])
    batch = create(bclient, file.id)
    wait(bclient, batch.id, lambda b: b.request_counts.completed >= 1)
    cancelling = bclient.batches.cancel(batch.id)
    assert cancelling.status in ("cancelling", "cancelled")
    assert cancelling.cancelling_at
    done = wait(bclient, batch.id, lambda b: b.status == "cancelled", timeout_s=30)
    completed = done.request_counts.completed
    assert 1 <= completed < total
    output = records(bclient, done.output_file_id)
    assert len(output) == completed
    assert set(output) <= {f"c-{i}" for i in range(total)}
    # The server took nothing more from the cancelled batch, and still serves.
    time.sleep(1)
    assert bclient.batches.retrieve(batch.id).request_counts.completed == completed
    assert bclient.models.list().data


def test_bad_inputs_are_clear_4xx_errors(bclient):
    good = [chat_line("a", "Hi", 2)]
    cases = [
        (lambda: bclient.files.create(file=("x.jsonl", jsonl(good)), purpose="fine-tune"),
         openai.BadRequestError, "purpose"),
        (lambda: bclient.files.create(file=("x.jsonl", b'{"custom_id": "a"}\n{oops\n'),
                                      purpose="batch"),
         openai.BadRequestError, "file"),
        (lambda: bclient.files.create(file=("x.jsonl", jsonl(good * 2)), purpose="batch"),
         openai.BadRequestError, "file"),
        (lambda: bclient.files.create(file=("x.jsonl", b"x" * (FILE_BYTES_MAX + 1)),
                                      purpose="batch"),
         openai.APIStatusError, "file"),
        (lambda: bclient.batches.create(input_file_id="file-0123456789abcdef0123456789abcdef",
                                        endpoint="/v1/chat/completions",
                                        completion_window="24h"),
         openai.BadRequestError, "input_file_id"),
        (lambda: bclient.files.retrieve("file-nope"), openai.NotFoundError, "file_id"),
        (lambda: bclient.files.content("file-0123456789abcdef0123456789abcdef"),
         openai.NotFoundError, "file_id"),
        (lambda: bclient.batches.retrieve("batch_nope"), openai.NotFoundError, "batch_id"),
        (lambda: bclient.batches.cancel("batch_nope"), openai.NotFoundError, "batch_id"),
    ]
    file = upload(bclient, good)
    for endpoint, window, param in [("/v1/embeddings", "24h", "endpoint"),
                                    ("/v1/chat/completions", "1h", "completion_window")]:
        cases.append((lambda e=endpoint, w=window: bclient.batches.create(
            input_file_id=file.id, endpoint=e, completion_window=w),
            openai.BadRequestError, param))
    for call, error, param in cases:
        with pytest.raises(error) as raised:
            call()
        e = raised.value
        assert 400 <= e.status_code < 500, e
        body = e.body if isinstance(e.body, dict) else {}
        assert body.get("param") == param, (param, e.body)
        assert body.get("message"), e.body
    # Over the size limit is a 413 that says so.
    with pytest.raises(openai.APIStatusError) as raised:
        bclient.files.create(file=("x.jsonl", b"x" * (FILE_BYTES_MAX + 1)), purpose="batch")
    assert raised.value.status_code == 413
    assert raised.value.body["code"] == "file_too_large"
    # The server is unaffected.
    assert bclient.models.list().data
    assert bclient.batches.retrieve(create(bclient, file.id).id).endpoint == \
        "/v1/chat/completions"


def test_sigkill_mid_batch_then_a_new_server_finishes_it_exactly_once():
    total = 16
    with tempfile.TemporaryDirectory(prefix="candela-restart-") as data_dir:
        args = ("--data-dir", data_dir, "--batch-max-in-flight", "2")
        first = Server(*args)
        try:
            client = first.client()
            file = upload(client, [chat_line(f"r-{i}", f"Tell me about the number {i}.", 16)
                                   for i in range(total)])
            batch = create(client, file.id)
            partial = wait(client, batch.id, lambda b: b.request_counts.completed >= 3)
            first.proc.kill()  # SIGKILL: no drain, no shutdown, whatever was in flight is lost
            first.proc.wait(timeout=30)
        finally:
            first.stop()
        assert partial.status == "in_progress"
        assert partial.request_counts.completed < total, "the batch ended before the kill"

        second = Server(*args)
        try:
            client = second.client()
            # The batch and its input are still there, and the batch goes on by itself.
            assert client.files.retrieve(file.id).id == file.id
            done = wait(client, batch.id, lambda b: b.status == "completed")
            assert (done.request_counts.total, done.request_counts.completed,
                    done.request_counts.failed) == (total, total, 0)
            output = records(client, done.output_file_id)
            assert set(output) == {f"r-{i}" for i in range(total)}
            assert all(r["response"]["status_code"] == 200 for r in output.values())
            assert done.error_file_id is None
        finally:
            second.stop()

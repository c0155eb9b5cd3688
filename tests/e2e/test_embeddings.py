"""`/v1/embeddings` end to end with the official `openai` client: every input shape, both
encodings, last and mean pooling, embeddings beside chat traffic, bad inputs answered with 4xx
while the server keeps serving, and the route off (501) or refused (`--pooling none`)."""

import base64
import concurrent.futures
import math
import struct

import httpx
import openai
import pytest

from conftest import Server
from test_serving import wait_idle

HIDDEN = 576  # SmolLM2-135M's hidden size
TEXTS = ["The capital of France is Paris.", "Cats sleep most of the day.", "Rust has no garbage collector."]


@pytest.fixture(scope="module")
def embed_server():
    s = Server("--embeddings")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def embed_client(embed_server):
    return embed_server.client()


@pytest.fixture(scope="module")
def embed_model(embed_client):
    return embed_client.models.list().data[0].id


def norm(v):
    return math.sqrt(sum(x * x for x in v))


def cosine(a, b):
    return sum(x * y for x, y in zip(a, b)) / (norm(a) * norm(b))


def max_diff(a, b):
    assert len(a) == len(b)
    return max(abs(x - y) for x, y in zip(a, b))


def post(server, body):
    return httpx.post(f"{server.url}/v1/embeddings", json=body, timeout=120)


def test_a_string(embed_client, embed_model):
    r = embed_client.embeddings.create(model=embed_model, input="hello world")
    assert r.object == "list"
    assert r.model == embed_model
    assert len(r.data) == 1 and r.data[0].index == 0 and r.data[0].object == "embedding"
    v = r.data[0].embedding
    assert len(v) == HIDDEN
    assert abs(norm(v) - 1) < 1e-5
    assert r.usage.prompt_tokens == r.usage.total_tokens > 0


def test_a_list_in_order_and_each_as_if_alone(embed_client, embed_model):
    batch = embed_client.embeddings.create(model=embed_model, input=TEXTS + [TEXTS[0]])
    assert [d.index for d in batch.data] == [0, 1, 2, 3]
    vectors = [d.embedding for d in batch.data]
    for v in vectors:
        assert abs(norm(v) - 1) < 1e-5
    assert max_diff(vectors[0], vectors[3]) < 1e-6, "the same text twice"
    assert cosine(vectors[0], vectors[1]) < 0.999, "different texts"
    tokens = []
    for text, v in zip(TEXTS, vectors):
        alone = embed_client.embeddings.create(model=embed_model, input=text)
        assert max_diff(alone.data[0].embedding, v) < 2e-5
        tokens.append(alone.usage.prompt_tokens)
    assert batch.usage.prompt_tokens == batch.usage.total_tokens == sum(tokens) + tokens[0]


def test_token_ids_equal_the_text_they_tokenize_to(embed_server, embed_client, embed_model):
    ids = httpx.post(f"{embed_server.url}/tokenize", json={"prompt": TEXTS[1]}, timeout=30).json()["tokens"]
    from_text = embed_client.embeddings.create(model=embed_model, input=TEXTS[1]).data[0].embedding
    from_ids = embed_client.embeddings.create(model=embed_model, input=ids)
    assert from_ids.usage.prompt_tokens == len(ids)
    assert max_diff(from_ids.data[0].embedding, from_text) < 1e-6
    lists = embed_client.embeddings.create(model=embed_model, input=[ids, ids[:3]])
    assert len(lists.data) == 2
    assert max_diff(lists.data[0].embedding, from_text) < 2e-5
    assert lists.usage.prompt_tokens == len(ids) + 3


def test_base64_round_trips_to_the_float_encoding(embed_server, embed_client, embed_model):
    floats = post(embed_server, {"model": embed_model, "input": TEXTS, "encoding_format": "float"}).json()
    b64 = post(embed_server, {"model": embed_model, "input": TEXTS, "encoding_format": "base64"}).json()
    for f, b in zip(floats["data"], b64["data"]):
        raw = base64.b64decode(b["embedding"])
        assert len(raw) == 4 * HIDDEN
        decoded = struct.unpack(f"<{HIDDEN}f", raw)
        # JSON carries each f32 as its shortest decimal: back to f32 it is the same number.
        as_f32 = struct.unpack(f"<{HIDDEN}f", struct.pack(f"<{HIDDEN}f", *f["embedding"]))
        assert decoded == as_f32
    # The client asks for base64 by default and decodes it; asking for floats gives the same.
    default = embed_client.embeddings.create(model=embed_model, input=TEXTS[2]).data[0].embedding
    as_floats = embed_client.embeddings.create(model=embed_model, input=TEXTS[2],
                                               encoding_format="float").data[0].embedding
    assert max_diff(default, as_floats) < 1e-6


def test_mean_pooling_differs_from_last(embed_client, embed_model):
    mean_server = Server("--embeddings", "--pooling", "mean")
    try:
        client = mean_server.client()
        mean = client.embeddings.create(model=client.models.list().data[0].id, input=TEXTS[0]).data[0].embedding
    finally:
        mean_server.stop()
    last = embed_client.embeddings.create(model=embed_model, input=TEXTS[0]).data[0].embedding
    assert abs(norm(mean) - 1) < 1e-5
    assert cosine(mean, last) < 0.99


def test_embeddings_beside_streaming_chat_then_every_block_is_free(embed_server, embed_client, embed_model):
    def chat():
        stream = embed_client.chat.completions.create(
            model=embed_model, messages=[{"role": "user", "content": "Count to twenty."}],
            max_tokens=40, temperature=0, stream=True)
        return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)

    alone = embed_client.embeddings.create(model=embed_model, input=TEXTS).data
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        chats = [pool.submit(chat) for _ in range(4)]
        embeds = [pool.submit(embed_client.embeddings.create, model=embed_model, input=TEXTS) for _ in range(4)]
        for e in embeds:
            for a, d in zip(alone, e.result().data):
                assert max_diff(a.embedding, d.embedding) < 2e-5
        assert all(c.result() for c in chats)
    wait_idle(embed_server.url)


@pytest.mark.parametrize("body,status,param", [
    ({"input": "x", "dimensions": 64}, 400, "dimensions"),
    ({"input": ""}, 400, "input"),
    ({"input": []}, 400, "input"),
    ({"input": [[]]}, 400, "input"),
    ({"input": [1, "a"]}, 400, "input"),
    ({"input": [99_999_999]}, 400, "input"),
    ({"input": {"text": "x"}}, 400, "input"),
    ({"input": "hello " * 9000}, 400, "input"),
    ({"input": "x", "encoding_format": "int8"}, 400, "encoding_format"),
    ({"input": "x", "model": "no-such-model"}, 404, "model"),
])
def test_bad_inputs_are_4xx_naming_the_parameter(embed_server, embed_model, body, status, param):
    r = post(embed_server, {"model": embed_model, **body})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["message"]


def test_the_client_raises_and_the_server_keeps_serving(embed_client, embed_model):
    with pytest.raises(openai.BadRequestError) as e:
        embed_client.embeddings.create(model=embed_model, input="x", dimensions=64)
    assert e.value.body["param"] == "dimensions"
    with pytest.raises(openai.BadRequestError):
        embed_client.embeddings.create(model=embed_model, input=[])
    with pytest.raises(openai.NotFoundError):
        embed_client.embeddings.create(model="no-such-model", input="x")
    chat = embed_client.chat.completions.create(
        model=embed_model, messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    assert chat.choices[0].finish_reason in ("stop", "length")
    assert len(embed_client.embeddings.create(model=embed_model, input="still here").data[0].embedding) == HIDDEN


def test_without_the_flag_the_route_is_501_and_says_how_to_enable_it(server):
    r = httpx.post(f"{server.url}/v1/embeddings", json={"input": "x"}, timeout=30)
    assert r.status_code == 501, r.text
    err = r.json()["error"]
    assert err["type"] == "not_supported_error"
    assert "--embeddings" in err["message"]


def test_pooling_none_is_refused_like_llama_cpp():
    s = Server("--embeddings", "--pooling", "none")
    try:
        r = httpx.post(f"{s.url}/v1/embeddings", json={"input": "x"}, timeout=30)
        assert r.status_code == 400, r.text
        assert "Pooling type 'none' is not OAI compatible" in r.json()["error"]["message"]
        # Chat is unaffected.
        client = s.client()
        chat = client.chat.completions.create(model=client.models.list().data[0].id,
                                              messages=[{"role": "user", "content": "hi"}], max_tokens=2)
        assert chat.choices
    finally:
        s.stop()

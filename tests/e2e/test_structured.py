"""Structured outputs through the official `openai` client: OpenAI's `response_format` (the
client's own `parse` helper included), vLLM's `guided_*` parameters, streaming, bad constraints,
and constrained requests beside plain ones."""

import json
import re
from concurrent.futures import ThreadPoolExecutor
from typing import List, Literal

import httpx
import pydantic

PERSON_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
    },
    "required": ["name", "age"],
    "additionalProperties": False,
}
PERSON = [{"role": "user", "content": "Invent a person. Reply with JSON: name and age."}]


class Pet(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=12)
    kind: Literal["cat", "dog", "fish"]
    legs: int


class Household(pydantic.BaseModel):
    # Bounded, so that a small model that keeps listing pets still finishes.
    pets: List[Pet] = pydantic.Field(min_length=1, max_length=2)


def check_person(text: str):
    person = json.loads(text)
    assert set(person) == {"name", "age"}, person
    assert isinstance(person["name"], str) and len(person["name"]) <= 24
    assert isinstance(person["age"], int) and 0 <= person["age"] <= 120


def test_response_format_json_schema_non_streaming_and_streaming(client, model_name):
    response_format = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON_SCHEMA}}
    r = client.chat.completions.create(model=model_name, messages=PERSON, max_tokens=64,
                                       temperature=0, response_format=response_format)
    assert r.choices[0].finish_reason == "stop", r
    check_person(r.choices[0].message.content)
    chunks = list(client.chat.completions.create(
        model=model_name, messages=PERSON, max_tokens=64, temperature=0.8, seed=5, n=2,
        response_format=response_format, stream=True))
    texts = ["", ""]
    finish = [None, None]
    for chunk in chunks:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            finish[choice.index] = choice.finish_reason or finish[choice.index]
    assert finish == ["stop", "stop"], (finish, texts)
    for text in texts:
        check_person(text)


def test_the_clients_parse_helper_gets_its_pydantic_model(client, model_name):
    # `parse` sends the model's strict JSON schema (with $defs and $ref) and validates the reply.
    parsed = client.chat.completions.parse(
        model=model_name, max_tokens=160, temperature=0, response_format=Household,
        messages=[{"role": "user", "content": "List two pets as JSON."}])
    choice = parsed.choices[0]
    assert choice.finish_reason == "stop", choice
    household = choice.message.parsed
    assert isinstance(household, Household)
    assert 1 <= len(household.pets) <= 2
    assert all(p.kind in ("cat", "dog", "fish") and len(p.name) <= 12 for p in household.pets)


def test_json_object_and_vllm_guided_parameters(client, model_name):
    r = client.chat.completions.create(
        model=model_name, max_tokens=128, temperature=0, response_format={"type": "json_object"},
        messages=[{"role": "user", "content": "Give a JSON object with a colour and a number."}])
    text = r.choices[0].message.content
    assert text.lstrip().startswith("{"), text
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(text), dict)

    r = client.chat.completions.create(
        model=model_name, max_tokens=8, temperature=0, extra_body={"guided_choice": ["Paris", "Lyon"]},
        messages=[{"role": "user", "content": "What is the capital of France?"}])
    assert r.choices[0].message.content in ("Paris", "Lyon")
    assert r.choices[0].finish_reason == "stop"

    r = client.completions.create(model=model_name, prompt="My phone number is", max_tokens=16,
                                  temperature=0, extra_body={"guided_regex": r" [0-9]{3}-[0-9]{4}"})
    assert re.fullmatch(r" [0-9]{3}-[0-9]{4}", r.choices[0].text), r.choices[0].text
    assert r.choices[0].finish_reason == "stop"

    r = client.completions.create(
        model=model_name, prompt="Six times seven is", max_tokens=8, temperature=0,
        extra_body={"structured_outputs": {"grammar": 'start: " " NUMBER\nNUMBER: /[0-9]{1,3}/'}})
    assert re.fullmatch(r" [0-9]{1,3}", r.choices[0].text), r.choices[0].text


def test_bad_constraints_are_400_and_the_server_keeps_serving(server, client, model_name):
    def post(extra):
        body = {"model": model_name, "messages": PERSON, "max_tokens": 8, **extra}
        return httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60)

    for extra, param in [
        ({"response_format": {"type": "yaml"}}, "response_format"),
        ({"response_format": {"type": "json_schema", "json_schema": {"schema": 7}}}, "response_format"),
        ({"grammar": 'root ::= "x"'}, "grammar"),
        ({"guided_regex": "a", "guided_choice": ["b"]}, "guided_choice"),
        ({"stream": True, "guided_regex": "(unclosed"}, None),
        ({"guided_json": {"type": "no-such-type"}}, None),
        ({"guided_grammar": "start: missing_rule"}, None),
    ]:
        r = post(extra)
        assert r.status_code == 400, (extra, r.text)
        err = r.json()["error"]
        assert err["type"] == "invalid_request_error" and err["message"], err
        assert err["param"] == param, err
    r = client.chat.completions.create(model=model_name, messages=PERSON, max_tokens=4, temperature=0)
    assert r.choices[0].message.content


def test_constrained_requests_beside_plain_ones_change_nothing_for_those(client, model_name):
    plain = [[{"role": "user", "content": f"Count to {k}."}] for k in (3, 5, 7)]

    def chat(messages, **extra):
        r = client.chat.completions.create(model=model_name, messages=messages, max_tokens=24,
                                           temperature=0, **extra)
        return r.choices[0].message.content

    alone = [chat(m) for m in plain]
    jobs = [(m, {}) for m in plain] + [
        (PERSON, {"response_format": {"type": "json_schema",
                                      "json_schema": {"name": "p", "schema": PERSON_SCHEMA}}})] * 3
    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        results = list(pool.map(lambda job: chat(job[0], **job[1]), jobs))
    assert results[:3] == alone

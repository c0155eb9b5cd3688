"""The Responses API through the official `openai` client against the real server: plain
answers (string input, items with instructions), streaming (event types, sequence numbers,
deltas that join to the final text), tools (a required call, then the follow-up turn with its
output), structured output with `text.format`, and the refusals. SmolLM2 is tiny: these check
structure, not wisdom, and keep `max_output_tokens` small."""

import json
from typing import Literal

import httpx
import openai
import pydantic
import pytest

WEATHER_TOOL = {
    "type": "function",
    "name": "get_weather",
    "description": "Get the current weather of a city.",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 20}},
        "required": ["city"],
        "additionalProperties": False,
    },
    "strict": True,
}
COLOR_SCHEMA = {
    "type": "object",
    "properties": {"color": {"type": "string", "enum": ["red", "green", "blue"]}},
    "required": ["color"],
    "additionalProperties": False,
}


class Colour(pydantic.BaseModel):
    color: Literal["red", "green", "blue"]


def message_text(response) -> str:
    """The text of the response's one message (the SDK's `output_text` does the same join)."""
    messages = [item for item in response.output if item.type == "message"]
    assert len(messages) == 1, response.output
    assert messages[0].role == "assistant"
    assert [part.type for part in messages[0].content] == ["output_text"]
    return messages[0].content[0].text


def check_response(response, model_name: str):
    assert response.id.startswith("resp_")
    assert response.object == "response"
    assert response.model == model_name
    assert response.status in ("completed", "incomplete")
    if response.status == "incomplete":
        assert response.incomplete_details.reason == "max_output_tokens"
    usage = response.usage
    assert usage.input_tokens > 0 and usage.output_tokens > 0
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens
    assert usage.output_tokens_details.reasoning_tokens == 0


def test_a_string_input(client, model_name):
    r = client.responses.create(model=model_name, input="Name a colour.", max_output_tokens=16,
                                temperature=0)
    check_response(r, model_name)
    assert r.output_text == message_text(r) != ""
    assert r.max_output_tokens == 16 and r.temperature == 0
    assert r.usage.output_tokens <= 16


def test_items_with_instructions(client, model_name):
    kwargs = dict(model=model_name, max_output_tokens=16, temperature=0)
    r = client.responses.create(
        instructions="You are a helpful assistant.",
        input=[
            {"role": "user", "content": "Hi, my name is Ada."},
            {"type": "message", "role": "assistant",
             "content": [{"type": "output_text", "text": "Hello Ada!", "annotations": []}]},
            {"type": "message", "role": "user",
             "content": [{"type": "input_text", "text": "What is my name?"}]},
        ], metadata={"test": "items"}, **kwargs)
    check_response(r, model_name)
    assert r.instructions == "You are a helpful assistant."
    assert r.metadata == {"test": "items"}
    assert message_text(r)
    # Greedy: the string form of the same question is the same as its one-item form.
    as_string = client.responses.create(input="What is my name?", **kwargs)
    as_item = client.responses.create(input=[{"role": "user", "content": "What is my name?"}],
                                      **kwargs)
    assert as_string.output_text == as_item.output_text
    # The instructions reach the model (as the system message, which replaces the template's
    # default one): longer instructions, a longer prompt.
    short, long = (client.responses.create(input="What is my name?", instructions=text, **kwargs)
                   for text in ("Be brief.", "Be brief. Answer in one short English sentence."))
    assert long.usage.input_tokens > short.usage.input_tokens


def test_streaming_events(client, model_name):
    kwargs = dict(model=model_name, input="Count from one to five.", max_output_tokens=24,
                  temperature=0)
    events = list(client.responses.create(stream=True, **kwargs))
    types = [e.type for e in events]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert types[:4] == ["response.created", "response.in_progress",
                         "response.output_item.added", "response.content_part.added"]
    assert types[-4:] == ["response.output_text.done", "response.content_part.done",
                          "response.output_item.done", "response.completed"]
    assert set(types[4:-4]) == {"response.output_text.delta"}
    created, final = events[0].response, events[-1].response
    assert created.status == "in_progress" and created.output == []
    assert final.id == created.id
    check_response(final, model_name)
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    item_id = events[2].item.id
    assert all(e.item_id == item_id for e in events if e.type == "response.output_text.delta")
    assert deltas == events[-4].text == final.output_text
    assert final.output[0].id == item_id
    # Streamed or not, greedy gives the same text.
    assert client.responses.create(**kwargs).output_text == deltas


def test_the_sdk_stream_helper_gets_the_final_response(client, model_name):
    with client.responses.stream(model=model_name, input="Say hi.", max_output_tokens=8,
                                 temperature=0) as stream:
        text = "".join(e.delta for e in stream if e.type == "response.output_text.delta")
        final = stream.get_final_response()
    assert final.output_text == text


def test_a_required_tool_call_then_the_follow_up_turn(client, model_name):
    question = {"role": "user", "content": "What is the weather in Paris?"}
    common = dict(model=model_name, tools=[WEATHER_TOOL], max_output_tokens=40, temperature=0)
    r = client.responses.create(input=[question], tool_choice="required",
                                parallel_tool_calls=False, **common)
    check_response(r, model_name)
    assert r.status == "completed", r
    calls = [item for item in r.output if item.type == "function_call"]
    assert len(calls) == 1, r.output
    call = calls[0]
    assert call.name == "get_weather" and call.status == "completed"
    assert call.id.startswith("fc_") and call.call_id
    arguments = json.loads(call.arguments)
    assert isinstance(arguments.get("city"), str)
    assert r.tool_choice == "required" and r.parallel_tool_calls is False
    assert r.tools[0].name == "get_weather"

    # The follow-up: the call and its output go back as items; the model answers in text.
    follow_up = client.responses.create(
        input=[question, call.model_dump(exclude_none=True),
               {"type": "function_call_output", "call_id": call.call_id,
                "output": json.dumps({"temperature_c": 21, "sky": "sunny"})}],
        tool_choice="none", **common)
    check_response(follow_up, model_name)
    assert [item.type for item in follow_up.output] == ["message"]
    assert follow_up.output_text
    # The call and its output reached the prompt.
    alone = client.responses.create(input=[question], tool_choice="none", **common)
    assert follow_up.usage.input_tokens > alone.usage.input_tokens


def test_a_named_tool_streams_its_arguments(client, model_name):
    events = list(client.responses.create(
        model=model_name, input="Weather in Rome?", tools=[WEATHER_TOOL], stream=True,
        tool_choice={"type": "function", "name": "get_weather"}, max_output_tokens=40,
        temperature=0))
    types = [e.type for e in events]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert types[:3] == ["response.created", "response.in_progress", "response.output_item.added"]
    assert types[-3:] == ["response.function_call_arguments.done", "response.output_item.done",
                          "response.completed"]
    added = events[2].item
    assert added.type == "function_call" and added.name == "get_weather"
    assert added.arguments == ""
    pieces = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    assert pieces == events[-3].arguments
    assert isinstance(json.loads(pieces).get("city"), str)
    final = events[-1].response
    assert final.status == "completed"
    assert final.output[0].arguments == pieces


def test_text_format_json_schema(client, model_name):
    text = {"format": {"type": "json_schema", "name": "color", "schema": COLOR_SCHEMA,
                       "strict": True}}
    r = client.responses.create(model=model_name, input="Pick a colour. Reply in JSON.",
                                text=text, max_output_tokens=40, temperature=0)
    check_response(r, model_name)
    assert r.status == "completed", r
    assert json.loads(r.output_text)["color"] in ("red", "green", "blue")
    assert r.text.format.type == "json_schema" and r.text.format.name == "color"
    # The client's own helper: it sends the model's strict schema and parses the answer.
    parsed = client.responses.parse(model=model_name, input="Pick a colour.", text_format=Colour,
                                    max_output_tokens=40, temperature=0)
    assert parsed.status == "completed", parsed
    assert isinstance(parsed.output_parsed, Colour)
    # json_object, streamed.
    events = list(client.responses.create(
        model=model_name, input="Give a JSON object with a colour.", stream=True,
        text={"format": {"type": "json_object"}}, max_output_tokens=40, temperature=0))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    if events[-1].response.status == "completed":
        assert isinstance(json.loads(deltas), dict)
    else:
        assert deltas.startswith("{")


def test_previous_response_id_is_refused(client, model_name):
    r = client.responses.create(model=model_name, input="Hi.", max_output_tokens=4)
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model=model_name, input="And then?", previous_response_id=r.id,
                                max_output_tokens=4)
    assert e.value.status_code == 400
    assert e.value.body["param"] == "previous_response_id"
    assert "stores no responses" in e.value.body["message"]


@pytest.mark.parametrize("extra, param", [
    (dict(input=[]), "input"),
    (dict(input=[{"type": "input_image", "image_url": "x"}]), "input"),
    (dict(input=[{"type": "function_call_output", "call_id": "nope", "output": "x"}]), "input"),
    (dict(input="x", tools=[{"type": "web_search"}]), "tools"),
    (dict(input="x", tool_choice="required"), "tool_choice"),
    (dict(input="x", max_output_tokens=0), "max_output_tokens"),
    (dict(input="x", text={"format": {"type": "json_schema", "name": "n"}}), "text"),
    (dict(input="x", extra_body={"frequency_penalty": 1}), "frequency_penalty"),
])
def test_bad_requests_are_400s_naming_the_parameter(client, model_name, extra, param):
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model=model_name, **extra)
    assert e.value.body["param"] == param, e.value.body
    assert e.value.body["type"] == "invalid_request_error"


def test_the_server_is_unaffected_by_bad_requests(server, client, model_name):
    raw = httpx.post(f"{server.url}/v1/responses", content=b"{not json", timeout=10)
    assert raw.status_code == 400 and raw.json()["error"]["type"] == "invalid_request_error"
    raw = httpx.post(f"{server.url}/v1/responses", json={"input": "x", "seed": 1}, timeout=10)
    assert raw.status_code == 400 and raw.json()["error"]["code"] == "unsupported_parameter"
    assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200
    r = client.responses.create(model=model_name, input="Hi.", max_output_tokens=4)
    assert r.output_text

"""Tool calling through the official `openai` client and through LangChain's ChatOpenAI agent
loop, against the real server and the default SmolLM2 (generic JSON format), plus a server
whose chat template is Qwen 2.5's Hermes format (`--chat-template`).

SmolLM2-135M is tiny: these tests check the protocol (shapes, streaming pieces, finish
reasons, schema-valid arguments, determinism, errors), not the model's judgement. Each test
is bounded by small `max_tokens`.
"""

import json

import httpx
import openai
import pytest

from conftest import REPO, Server

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                       "required": ["city"]},
    },
}
TIME = {"type": "function", "function": {"name": "get_time", "description": "The current time"}}
TOOLS = [WEATHER, TIME]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


def check_call(call, names=("get_weather", "get_time")):
    """A call as OpenAI gives it: an id, type function, a known name, arguments a JSON string."""
    assert call.id.startswith("call_")
    assert call.type == "function"
    assert call.function.name in names
    assert isinstance(call.function.arguments, str)
    arguments = json.loads(call.function.arguments)
    assert isinstance(arguments, dict)
    if call.function.name == "get_weather":
        assert isinstance(arguments["city"], str)
    else:
        assert arguments == {}, "a parameterless tool gets {} (vLLM #28806)"
    return arguments


def test_required_gives_a_call_and_the_tool_calls_finish(client, model_name):
    r = client.chat.completions.create(model=model_name, messages=ASK, tools=TOOLS,
                                       tool_choice="required", parallel_tool_calls=False,
                                       max_tokens=60, temperature=0)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    assert len(choice.message.tool_calls) == 1
    check_call(choice.message.tool_calls[0])


def test_a_named_function_is_the_one_called(client, model_name):
    r = client.chat.completions.create(
        model=model_name, messages=ASK, tools=TOOLS, max_tokens=60, temperature=0,
        tool_choice={"type": "function", "function": {"name": "get_time"}})
    calls = r.choices[0].message.tool_calls
    assert r.choices[0].finish_reason == "tool_calls"
    assert [c.function.name for c in calls] == ["get_time"]
    check_call(calls[0])


def test_none_answers_in_text(client, model_name):
    r = client.chat.completions.create(model=model_name, messages=ASK, tools=TOOLS,
                                       tool_choice="none", max_tokens=12, temperature=0)
    assert r.choices[0].message.tool_calls is None
    assert r.choices[0].message.content
    assert r.choices[0].finish_reason in ("stop", "length")


def test_auto_is_either_an_answer_or_calls_never_raw_json(client, model_name):
    for messages in (ASK, [{"role": "user", "content": "Say hello."}]):
        r = client.chat.completions.create(model=model_name, messages=messages, tools=TOOLS,
                                           max_tokens=60, temperature=0)
        m, reason = r.choices[0].message, r.choices[0].finish_reason
        if m.tool_calls:
            assert reason in ("tool_calls", "length")
            for call in m.tool_calls[:-1] if reason == "length" else m.tool_calls:
                check_call(call)
        else:
            # The generic format's {"response": ...} wrapper never leaks into content.
            assert not (m.content or "").lstrip().startswith('{"response"')


def test_streamed_calls_come_in_openai_pieces(client, model_name):
    stream = client.chat.completions.create(model=model_name, messages=ASK, tools=TOOLS,
                                            tool_choice="required", parallel_tool_calls=False,
                                            max_tokens=60, temperature=0, stream=True)
    firsts, arguments, reasons = [], {}, []
    for chunk in stream:
        for choice in chunk.choices:
            if choice.finish_reason:
                reasons.append(choice.finish_reason)
            for piece in choice.delta.tool_calls or []:
                if piece.id is not None:
                    # The first piece: index, id, type, name and empty arguments (llama.cpp #22722).
                    assert piece.type == "function" and piece.function.name
                    assert piece.function.arguments == ""
                    firsts.append(piece)
                    arguments[piece.index] = ""
                else:
                    # Later pieces: only the index and more arguments.
                    assert piece.type is None and piece.function.name is None
                    arguments[piece.index] += piece.function.arguments
    assert reasons == ["tool_calls"]
    assert len(firsts) == 1
    assert isinstance(json.loads(arguments[0])["city"], str)
    # The same request unstreamed gives the same call.
    r = client.chat.completions.create(model=model_name, messages=ASK, tools=TOOLS,
                                       tool_choice="required", parallel_tool_calls=False,
                                       max_tokens=60, temperature=0)
    call = r.choices[0].message.tool_calls[0]
    assert (call.function.name, call.function.arguments) == (firsts[0].function.name, arguments[0])


def test_greedy_tool_requests_repeat_exactly(client, model_name):
    def once():
        r = client.chat.completions.create(model=model_name, messages=ASK, tools=TOOLS,
                                           tool_choice="required", max_tokens=50, temperature=0)
        calls = r.choices[0].message.tool_calls
        return [(c.function.name, c.function.arguments) for c in calls], r.choices[0].finish_reason
    assert once() == once()


def test_parallel_calls_and_several_choices(client, model_name):
    messages = [{"role": "user", "content": "Weather in Paris and in Rome?"}]
    # Greedy, this model writes two calls in one answer; without parallel calls, one.
    for parallel, count in ((True, 2), (False, 1)):
        r = client.chat.completions.create(model=model_name, messages=messages, tools=TOOLS,
                                           tool_choice="required", parallel_tool_calls=parallel,
                                           max_tokens=90, temperature=0)
        assert r.choices[0].finish_reason == "tool_calls"
        calls = r.choices[0].message.tool_calls
        assert len(calls) == count if not parallel else len(calls) >= count, calls
        for call in calls:
            check_call(call)
    r = client.chat.completions.create(model=model_name, messages=messages, tools=TOOLS,
                                       tool_choice="required", max_tokens=90, temperature=0.8,
                                       seed=7, n=2)
    assert len(r.choices) == 2
    for choice in r.choices:
        calls = choice.message.tool_calls
        assert calls, choice
        complete = calls if choice.finish_reason == "tool_calls" else calls[:-1]
        for call in complete:
            check_call(call)
        assert len({c.id for c in calls}) == len(calls)
    ids = {c.id for choice in r.choices for c in choice.message.tool_calls}
    assert len(ids) == sum(len(c.message.tool_calls) for c in r.choices), "ids are unique"


def test_the_follow_up_turn_with_tool_results(client, model_name):
    first = client.chat.completions.create(model=model_name, messages=ASK, tools=TOOLS,
                                           tool_choice="required", parallel_tool_calls=False,
                                           max_tokens=60, temperature=0)
    call = first.choices[0].message.tool_calls[0]
    messages = ASK + [
        first.choices[0].message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": "18 degrees and sunny"},
    ]
    r = client.chat.completions.create(model=model_name, messages=messages, tools=TOOLS,
                                       tool_choice="none", max_tokens=16, temperature=0)
    assert r.choices[0].message.content
    # The call and its result reached the prompt: it is longer than without the result.
    without = client.chat.completions.create(model=model_name, messages=messages[:-1], tools=TOOLS,
                                             tool_choice="none", max_tokens=1, temperature=0)
    assert r.usage.prompt_tokens > without.usage.prompt_tokens > len(ASK[0]["content"].split())


def test_bad_tool_requests_are_400s_naming_the_parameter(server, client, model_name):
    url = f"{server.url}/v1/chat/completions"

    def error(body):
        response = httpx.post(url, json={"model": model_name, "max_tokens": 4, **body}, timeout=60)
        assert response.status_code == 400, response.text
        return response.json()["error"]

    named = {"type": "function", "function": {"name": "not_a_tool"}}
    assert error({"messages": ASK, "tools": TOOLS, "tool_choice": named})["param"] == "tool_choice"
    assert error({"messages": ASK, "tool_choice": "required"})["param"] == "tool_choice"
    assert error({"messages": ASK, "tools": [{"type": "retrieval"}]})["param"] == "tools"
    unsatisfiable = {"type": "function", "function": {"name": "f", "strict": True, "parameters": {
        "type": "object", "properties": {"n": {"type": "integer", "minimum": 5, "maximum": 1}},
        "required": ["n"]}}}
    assert error({"messages": ASK, "tools": [unsatisfiable], "tool_choice": "required"})["param"] == "tools"
    orphan = ASK + [{"role": "tool", "tool_call_id": "call_nowhere", "content": "x"}]
    assert error({"messages": orphan, "tools": TOOLS})["param"] == "messages"
    bad_history = ASK + [{"role": "assistant", "tool_calls": [{"id": "c1", "type": "function"}]}]
    assert error({"messages": bad_history, "tools": TOOLS})["param"] == "messages"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=model_name, messages=ASK, tools=TOOLS,
                                       tool_choice={"type": "function", "function": {"name": "x"}})
    # The server still serves.
    ok = client.chat.completions.create(model=model_name, messages=ASK, max_tokens=2)
    assert ok.choices[0].finish_reason in ("stop", "length")


@pytest.fixture(scope="module")
def hermes_server():
    s = Server("--chat-template", str(REPO / "testdata" / "templates" / "hermes-qwen2.5.jinja"))
    yield s
    s.stop()


def test_a_hermes_template_gets_hermes_calls(hermes_server):
    client = hermes_server.client()
    model = client.models.list().data[0].id
    prompt = httpx.post(f"{hermes_server.url}/tokenize", timeout=60, json={
        "messages": ASK, "return_token_strs": False}).json()
    assert prompt["count"] > 0
    stream = client.chat.completions.create(model=model, messages=ASK, tools=TOOLS,
                                            tool_choice="required", parallel_tool_calls=False,
                                            max_tokens=60, temperature=0, stream=True)
    names, arguments, content, reasons = [], "", "", []
    for chunk in stream:
        for choice in chunk.choices:
            content += choice.delta.content or ""
            reasons += [choice.finish_reason] if choice.finish_reason else []
            for piece in choice.delta.tool_calls or []:
                if piece.function.name:
                    names.append(piece.function.name)
                arguments += piece.function.arguments or ""
    assert reasons == ["tool_calls"]
    assert len(names) == 1 and names[0] in ("get_weather", "get_time")
    assert isinstance(json.loads(arguments), dict)
    # The <tool_call> markup never reaches the client as content.
    assert "<tool_call>" not in content


def test_a_langchain_agent_runs_a_two_tool_loop(server, model_name):
    """LangChain's ChatOpenAI with bind_tools drives the loop: the model calls a tool, the
    agent runs it and sends the result back, and the model is asked again."""
    import langchain_openai  # scripts/test installs it; a missing package is a failure, not a skip
    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_core.tools import tool

    ran = []

    @tool
    def get_weather(city: str) -> str:
        """The current weather in a city."""
        ran.append(("get_weather", city))
        return f"18 degrees in {city}"

    @tool
    def get_time() -> str:
        """The current time."""
        ran.append(("get_time", None))
        return "12:00"

    by_name = {"get_weather": get_weather, "get_time": get_time}
    llm = langchain_openai.ChatOpenAI(base_url=f"{server.url}/v1", api_key="unused", model=model_name,
                                      temperature=0, max_tokens=60, max_retries=0, timeout=120)
    messages = [HumanMessage("What is the weather in Paris, and what time is it?")]
    forced = llm.bind_tools([get_weather, get_time], tool_choice="required")
    for _ in range(2):  # two tool rounds, bounded
        reply = forced.invoke(messages)
        assert reply.tool_calls, reply
        messages.append(reply)
        for call in reply.tool_calls:
            assert call["name"] in by_name and isinstance(call["args"], dict)
            result = by_name[call["name"]].invoke(call["args"])
            messages.append(ToolMessage(result, tool_call_id=call["id"]))
    final = llm.bind_tools([get_weather, get_time], tool_choice="none").invoke(messages)
    assert final.content and not final.tool_calls
    assert len(ran) >= 2

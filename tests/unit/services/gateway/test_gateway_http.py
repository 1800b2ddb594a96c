"""The gateway's HTTP side as vLLM's flags set it (CORS, root path, served names, docs,
request logs, the structured-outputs backend), over an engine client that answers with
fixed tokens."""

from __future__ import annotations

import json
import logging

from fastapi.testclient import TestClient

from tandem.engine.client import GenerationChunk, PreparedPrompt
from tandem.engine.structured_output.params import StructuredOutputsConfig
from tandem.services.gateway.app import GatewaySettings, build_app


class FixedClient:
    """An engine client that is ready at once and answers every prompt with "ok"."""

    max_model_len = 64
    vocab_size = 100
    ready = True

    def stats(self) -> dict:
        return {}

    def metrics(self) -> list[str]:
        return []

    async def start(self) -> None:
        pass

    async def submit(self, inputs):
        self.last = inputs

        async def stream():
            yield GenerationChunk("ok", [7], "stop", num_prompt_tokens=2)

        prompts = [PreparedPrompt([1, 2], "hi")] * inputs.num_prompts
        return prompts, [stream() for _ in inputs.request_ids]

    async def abort(self, request_id: str) -> None:
        pass

    async def shutdown(self) -> None:
        pass


def client(root_path: str = "", engine=None, **settings) -> TestClient:
    base = {"served_model_names": ("tiny", "alias"), "model_path": "/models/tiny"}
    app = build_app(engine or FixedClient(), GatewaySettings(**(base | settings)))
    return TestClient(app, root_path=root_path)  # as uvicorn's --root-path sets it


def test_cors_answers_preflight_before_the_api_key():
    with client(api_key="k", allowed_origins=("https://app.example",)) as http:
        pre = http.options("/v1/completions", headers={
            "Origin": "https://app.example", "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type"})  # fmt: skip
        assert pre.status_code == 200
        assert pre.headers["access-control-allow-origin"] == "https://app.example"
        denied = http.post("/v1/completions", json={"prompt": "hi"},
                           headers={"Origin": "https://app.example"})  # fmt: skip
        assert denied.status_code == 401
        assert denied.headers["access-control-allow-origin"] == "https://app.example"
        other = http.options("/v1/completions", headers={
            "Origin": "https://evil.example", "Access-Control-Request-Method": "POST"})  # fmt: skip
        assert other.status_code == 400


def test_every_served_name_is_listed_and_answered_the_first_in_responses():
    with client() as http:
        assert [m["id"] for m in http.get("/v1/models").json()["data"]] == ["tiny", "alias"]
        r = http.post("/v1/completions", json={"model": "alias", "prompt": "hi"})
        assert r.status_code == 200 and r.json()["model"] == "tiny", r.text
        assert http.post("/v1/completions", json={"model": "x", "prompt": "hi"}).status_code == 404


def test_version_is_served():
    from tandem import __version__

    with client() as http:
        assert http.get("/version").json() == {"version": __version__}


def test_root_path_and_disabled_docs():
    with client(root_path="/api") as http:
        assert http.get("/openapi.json").json()["servers"] == [{"url": "/api"}]
    with client(disable_fastapi_docs=True) as http:
        assert http.get("/openapi.json").status_code == 404
        assert http.get("/docs").status_code == 404


def test_requests_are_logged_only_when_asked(caplog):
    caplog.set_level(logging.INFO, "tandem.services.gateway.state")
    with client() as http:
        http.post("/v1/completions", json={"prompt": "hi"})
    assert "Received request" not in caplog.text
    with client(log_requests=True, max_log_len=1) as http:
        http.post("/v1/completions", json={"prompt": "hi"})
    assert "Received request cmpl-" in caplog.text and "prompt: 'h'" in caplog.text
    assert "prompt_token_ids: [1]" in caplog.text


SCHEMA = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}


def test_response_format_and_structured_outputs_reach_the_engine_checked():
    engine = FixedClient()
    with client(engine=engine) as http:
        asks = {
            "json_schema": {"response_format": {"type": "json_schema",
                            "json_schema": {"name": "n", "schema": SCHEMA, "strict": True}}},
            "json_object": {"response_format": {"type": "json_object"}},
            "choice": {"structured_outputs": {"choice": ["a", "b"]}},
            "multipleOf": {"structured_outputs": {"json": {"type": "integer", "multipleOf": 3}}},
        }  # fmt: skip
        backend = {}
        for name, body in asks.items():
            messages = [{"role": "user", "content": "hi"}]
            r = http.post("/v1/chat/completions", json={"messages": messages, **body})
            assert r.status_code == 200, r.text
            spec = engine.last.params.structured_outputs
            backend[name] = spec.backend
            assert spec.any_whitespace is False  # compact by default
        assert backend == {"json_schema": "xgrammar", "json_object": "xgrammar",
                           "choice": "xgrammar", "multipleOf": "guidance"}  # fmt: skip
        r = http.post("/v1/completions", json={"prompt": "hi", "response_format": {"type": "text"}})
        assert r.status_code == 200 and engine.last.params.structured_outputs is None


def test_bad_structured_output_requests_are_400s_naming_the_parameter():
    config = StructuredOutputsConfig(backend="xgrammar")
    with client(structured_outputs=config) as http:
        cases = [
            ({"structured_outputs": {"json": SCHEMA, "regex": "a"}}, "structured_outputs"),
            ({"structured_outputs": {"choice": []}}, "structured_outputs"),
            ({"structured_outputs": {"regex": "("}}, "structured_outputs"),
            ({"structured_outputs": {"json": {"type": "foo"}}}, "structured_outputs"),
            ({"structured_outputs": {"json": {"type": "integer", "multipleOf": 3}}},
             "structured_outputs"),
            ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
             "response_format"),
            ({"response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a"}},
             "response_format"),
            ({"response_format": {"type": "xml"}}, None),
        ]  # fmt: skip
        for body, param in cases:
            r = http.post("/v1/completions", json={"prompt": "hi", **body})
            assert r.status_code == 400, (body, r.text)
            error = r.json()["error"]
            assert set(error) == {"message", "type", "param", "code"}
            if param is not None:
                assert error["param"] == param, (body, error)
        assert http.post("/v1/completions", json={"prompt": "hi"}).status_code == 200


class ReplyClient(FixedClient):
    """Answers with a given text, in pieces of 3 characters (as a stream would)."""

    def __init__(self, reply: str) -> None:
        self.reply = reply

    async def submit(self, inputs):
        self.last = inputs
        reply = self.reply

        async def stream():
            pieces = [reply[i : i + 3] for i in range(0, len(reply), 3)]
            for k, piece in enumerate(pieces):
                last = k == len(pieces) - 1
                yield GenerationChunk(piece, [7], "stop" if last else None, num_prompt_tokens=2)

        return [PreparedPrompt([1, 2], "")], [stream() for _ in inputs.request_ids]


TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}}}}  # fmt: skip
HERMES = 'Checking.<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'


def test_auto_tool_choice_parses_calls_whole_and_streamed():
    engine = ReplyClient(HERMES)
    history = [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Weather?"}]},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
        {"role": "user", "content": "And Paris?"},
    ]  # fmt: skip
    body = {"messages": history, "tools": [TOOL], "chat_template_kwargs": {"enable_thinking": 0}}
    with client(engine=engine, enable_auto_tool_choice=True, tool_call_parser="hermes") as http:
        r = http.post("/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        assert choice["finish_reason"] == "tool_calls"
        assert choice["message"]["content"] == "Checking."
        (call,) = choice["message"]["tool_calls"]
        assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
        sent = engine.last  # the history as the chat template gets it
        assert sent.messages[2]["tool_calls"][0]["function"]["arguments"] == {"city": "Rome"}
        assert sent.messages[3] == {"role": "tool", "content": "sunny", "tool_call_id": "c1"}
        assert sent.messages[0]["role"] == "developer" and sent.messages[1]["content"] == "Weather?"
        assert sent.tools == [TOOL] and sent.chat_template_kwargs == {"enable_thinking": 0}

        with http.stream("POST", "/v1/chat/completions", json=body | {"stream": True}) as s:
            events = [json.loads(line[6:]) for line in s.iter_lines()
                      if line.startswith("data: {")]  # fmt: skip
    deltas = [e["choices"][0]["delta"] for e in events]
    content = "".join(d.get("content") or "" for d in deltas)
    assert content == "Checking."  # no markup leaks into content
    calls = [c for d in deltas for c in d.get("tool_calls", [])]
    assert calls[0]["id"] and calls[0]["function"]["name"] == "get_weather"
    assert calls[1] == {"index": 0, "function": {"arguments": '{"city": "Paris"}'}}
    assert events[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_tool_requests_vllm_refuses_are_400s():
    with client() as http:
        base = {"messages": [{"role": "user", "content": "hi"}], "tools": [TOOL]}
        for body, param in (
            (base, "tool_choice"),  # auto without --enable-auto-tool-choice
            (base | {"tool_choice": {"type": "function", "function": {"name": "x"}}},
             "tool_choice"),
            (base | {"tool_choice": "required", "response_format": {"type": "json_object"}},
             "tool_choice"),
            ({"messages": [{"role": "user", "content": None}]}, None),
            ({"messages": [{"role": "user", "content": "hi", "tool_calls": []}]}, None),
        ):  # fmt: skip
            r = http.post("/v1/chat/completions", json=body)
            assert r.status_code == 400, (body, r.text)
            if param is not None:
                assert r.json()["error"]["param"] == param
        r = http.post("/v1/chat/completions", json=base | {"tool_choice": "required"})
        assert r.status_code == 200  # FixedClient's "ok" is no call: plain content
        assert r.json()["choices"][0]["message"]["content"].endswith("ok")


def test_reasoning_goes_to_its_own_field_and_the_rest_to_tools():
    reply = "<think>Paris: call the tool.</think>" + HERMES
    engine = ReplyClient(reply)
    body = {"messages": [{"role": "user", "content": "Weather?"}], "tools": [TOOL]}
    with client(engine=engine, enable_auto_tool_choice=True, tool_call_parser="hermes",
                reasoning_parser="qwen3") as http:  # fmt: skip
        message = http.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]
        assert message["reasoning"] == message["reasoning_content"] == "Paris: call the tool."
        assert message["content"] == "Checking."
        assert message["tool_calls"][0]["function"]["name"] == "get_weather"
        with http.stream("POST", "/v1/chat/completions", json=body | {"stream": True}) as s:
            deltas = [json.loads(line[6:])["choices"][0]["delta"] for line in s.iter_lines()
                      if line.startswith("data: {")]  # fmt: skip
        # A constraint (here a required tool call's) starts where the reasoning ends.
        http.post("/v1/chat/completions", json=body | {"tool_choice": "required"})
        assert engine.last.params.structured_outputs.reasoning_parser == "qwen3"
        schema = {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}
        http.post("/v1/completions", json={"prompt": "hi", "response_format": schema})
        assert engine.last.params.structured_outputs.reasoning_parser is None  # no split there
    config = StructuredOutputsConfig(enable_in_reasoning=True)  # vLLM's: constrain it all
    with client(engine=engine, reasoning_parser="qwen3", structured_outputs=config) as http:
        http.post("/v1/chat/completions", json=body | {"tool_choice": "required"})
        assert engine.last.params.structured_outputs.reasoning_parser is None
    assert "".join(d.get("reasoning") or "" for d in deltas) == "Paris: call the tool."
    assert "".join(d.get("content") or "" for d in deltas) == "Checking."
    assert [c["function"].get("name") for d in deltas for c in d.get("tool_calls", [])] == [
        "get_weather", None]  # fmt: skip


def test_template_options_reach_the_engine_side():
    engine = ReplyClient("ok")
    messages = [{"role": "user", "content": "Say"}, {"role": "assistant", "content": "Hel"}]
    docs = [{"title": "a", "text": "b"}]
    with client(engine=engine) as http:
        body = {"messages": messages, "continue_final_message": True,
                "add_generation_prompt": False, "documents": docs,
                "chat_template_kwargs": {"enable_thinking": False}}  # fmt: skip
        assert http.post("/v1/chat/completions", json=body).status_code == 200
        want = {"enable_thinking": False, "continue_final_message": True, "documents": docs}
        assert engine.last.chat_template_kwargs == want
        assert engine.last.add_generation_prompt is False
        r = http.post("/v1/chat/completions", json=body | {"add_generation_prompt": True})
        assert r.status_code == 400 and r.json()["error"]["param"] == "continue_final_message"
        r = http.post("/v1/completions", json={"prompt": "hi", "stream_options": {}})
        assert r.status_code == 400 and r.json()["error"]["param"] == "stream_options"


def test_openai_fields_that_change_nothing_are_served_and_the_unsupported_named():
    engine = ReplyClient("ok")
    base = {"messages": [{"role": "user", "content": "hi"}]}
    served = {"metadata": {"team": "a"}, "store": False, "service_tier": "auto",
              "prompt_cache_key": "k", "safety_identifier": "u1", "modalities": ["text"],
              "reasoning_effort": "low", "user": "u"}  # fmt: skip
    with client(engine=engine) as http:
        r = http.post("/v1/chat/completions", json=base | served)
        assert r.status_code == 200, r.text
        assert engine.last.chat_template_kwargs == {"reasoning_effort": "low"}
        for field, value in (("store", True), ("service_tier", "flex"),
                             ("modalities", ["text", "audio"]), ("reasoning_effort", "max"),
                             ("audio", {"voice": "x"}), ("prediction", {"type": "content"}),
                             ("functions", []), ("suffix", "x")):  # fmt: skip
            r = http.post("/v1/chat/completions", json=base | {field: value})
            assert r.status_code == 400 and r.json()["error"]["param"] == field, (field, r.text)
        r = http.post("/v1/completions", json={"prompt": "hi", "suffix": "x"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "suffix"


class CachedClient(ReplyClient):
    """Each prompt's first 16 tokens came from the prefix cache."""

    async def submit(self, inputs):
        self.last = inputs

        async def stream():
            yield GenerationChunk("o", [7], None, num_prompt_tokens=20, num_cached_tokens=16)
            yield GenerationChunk("k", [8], "stop", num_prompt_tokens=20, num_cached_tokens=16)

        prompts = [PreparedPrompt(list(range(20)), "")] * inputs.num_prompts
        return prompts, [stream() for _ in inputs.request_ids]


def test_usage_details_and_continuous_usage_stats():
    with client(engine=CachedClient("ok"), enable_prompt_tokens_details=True) as http:
        body = {"prompt": ["a", "b"], "n": 2, "max_tokens": 2}
        usage = http.post("/v1/completions", json=body).json()["usage"]
        assert usage["prompt_tokens_details"] == {"cached_tokens": 32}  # per prompt, not sample
        assert usage["completion_tokens"] == 8
        options = {"include_usage": True, "continuous_usage_stats": True}
        stream = {"prompt": "a", "max_tokens": 2, "stream": True, "stream_options": options}
        with http.stream("POST", "/v1/completions", json=stream) as s:
            events = [json.loads(line[6:]) for line in s.iter_lines()
                      if line.startswith("data: {")]  # fmt: skip
    assert [e["usage"]["completion_tokens"] for e in events] == [1, 2, 2]
    assert events[-1]["choices"] == [] and events[0]["usage"]["prompt_tokens"] == 20
    with client(engine=CachedClient("ok")) as http:
        usage = http.post("/v1/completions", json={"prompt": "a"}).json()["usage"]
        assert "prompt_tokens_details" not in usage  # as vLLM, unless asked for


def test_responses_input_items_become_the_chat_history():
    engine = ReplyClient(HERMES)
    items = [
        {"role": "user", "content": [{"type": "input_text", "text": "Weather?"}]},
        {"type": "function_call", "call_id": "c1", "name": "get_weather",
         "arguments": '{"city": "Rome"}'},
        {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
    ]  # fmt: skip
    flat = {"type": "function", **TOOL["function"]}
    with client(engine=engine, enable_auto_tool_choice=True, tool_call_parser="hermes") as http:
        r = http.post("/v1/responses", json={"input": items, "instructions": "Be brief.",
                                             "tools": [flat], "max_output_tokens": 9})  # fmt: skip
        assert r.status_code == 200, r.text
        out = r.json()
        assert [o["type"] for o in out["output"]] == ["message", "function_call"]
        assert out["output"][0]["content"][0]["text"] == "Checking."
        assert out["output"][1]["name"] == "get_weather" and out["status"] == "completed"
        roles = [m["role"] for m in engine.last.messages]
        assert roles == ["system", "user", "assistant", "tool"]
        assert engine.last.messages[2]["tool_calls"][0]["function"]["arguments"] == {"city": "Rome"}
        assert engine.last.params.max_tokens == 9 and engine.last.tools == [TOOL]
        bad = http.post("/v1/responses", json={"input": [{"type": "web_search_call"}]})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "input"


def test_pooling_endpoints_on_a_generating_model_are_a_400():
    with client() as http:
        for path, body in (("/v1/embeddings", {"input": "hi"}), ("/pooling", {"input": "hi"}),
                           ("/v1/score", {"text_1": "a", "text_2": "b"}),
                           ("/v2/rerank", {"query": "a", "documents": ["b"]}),
                           ("/classify", {"input": "hi"})):  # fmt: skip
            r = http.post(path, json=body)
            assert r.status_code == 400 and r.json()["error"]["param"] == "model", (path, r.text)
            assert "pooling model" in r.json()["error"]["message"]
        r = http.post("/v1/embeddings", json={"input": "hi", "encoding_format": "int8"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "encoding_format"

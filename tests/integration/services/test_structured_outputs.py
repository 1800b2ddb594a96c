"""Structured outputs end to end, in both deployments: vLLM's `structured_outputs` and OpenAI's
`response_format`. On the default model, every output of a dozen JSON schemas parses and
validates, greedy and sampled; regex, choice, EBNF, Lark and JSON-object constraints hold; the
openai SDK's `parse` works unchanged. Under backend auto a schema xgrammar does not enforce
(`multipleOf`) is served by guidance, under xgrammar alone it is a 400; every invalid spec is
a 400 in OpenAI's shape. A constrained request leaves its batch's greedy tokens equal to Hugging
Face's, survives its decode worker's death (its grammar rebuilt from its tokens elsewhere), and
n seeded samples are each valid and the same twice."""

from __future__ import annotations

import json
import os
import re
import signal
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from tandem.bench.elastic import cluster_workers
from tests.helpers.cluster import assert_all_blocks_free, start_cluster, stop_cluster
from tests.helpers.hf import hf_greedy

MAX_TOKENS = 300
SEEDS = (None, 0, 1, 2)  # None: greedy; the others sample at temperature 1.0
CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"


def obj(properties: dict, required: list[str] | None = None) -> dict:
    """A closed object (its keys bounded too); every property required unless listed."""
    required = list(properties) if required is None else required
    return {"type": "object", "properties": properties, "required": required,
            "additionalProperties": False}  # fmt: skip


# Every string, number and array is bounded, so that each output ends within MAX_TOKENS.
def integer(low: int, high: int, **more) -> dict:
    return {"type": "integer", "minimum": low, "maximum": high, **more}


def string(max_len: int, **more) -> dict:
    return {"type": "string", "maxLength": max_len, **more}


def array(items: dict, min_items: int, max_items: int) -> dict:
    return {"type": "array", "items": items, "minItems": min_items, "maxItems": max_items}


NAME = string(20)
POINT = obj({"x": integer(0, 100), "y": integer(0, 100)})
SCHEMAS = {
    "flat": obj({"name": NAME, "age": integer(0, 120)}),
    "nested": obj(
        {
            "name": NAME,
            "address": obj(
                {
                    "street": string(30),
                    "city": NAME,
                    "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
                }
            ),
        }
    ),
    "array_bounds": obj({"tags": array(string(10), 1, 3)}),
    "enums": obj(
        {
            "color": {"enum": ["red", "green", "blue"]},
            "size": {"type": "string", "enum": ["S", "M", "L"]},
        }
    ),
    "ranges": obj(
        {
            "price": {"type": "number", "minimum": 0, "maximum": 1000},
            "rating": integer(1, 5),
            "celsius": integer(-40, 50),
        }
    ),
    "optional": obj(
        {"id": integer(1, 999), "nickname": string(15), "active": {"type": "boolean"}},
        required=["id"],
    ),
    "any_of": obj({"value": {"anyOf": [integer(0, 100), string(10)]}}),
    "pattern": obj({"code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{3}$"}, "name": NAME}),
    # xgrammar enforces "date"; "email" with maxLength is one for guidance (under auto)
    "formats": obj(
        {"birthday": {"type": "string", "format": "date"}, "email": string(40, format="email")}
    ),
    "refs": {
        "$defs": {"point": POINT},
        **obj({"start": {"$ref": "#/$defs/point"}, "end": {"$ref": "#/$defs/point"}}),
    },
    "array_of_objects": obj(
        {"items": array(obj({"product": NAME, "quantity": integer(1, 10)}), 1, 3)}
    ),
    "nullable": obj(
        {"done": {"type": "boolean"}, "note": {"type": ["string", "null"], "maxLength": 20}}
    ),
    "matrix": obj({"rows": array(array(integer(0, 9), 2, 3), 2, 2)}),
}
MULTIPLE_OF_7 = obj({"n": integer(0, 500, multipleOf=7)})


@dataclass(frozen=True, slots=True)
class Served:
    """A running `tandem serve`: its deployment, URL and log."""

    deployment: str
    base: str
    log: Path


@pytest.fixture(scope="module", params=["colocated", "cluster"])
def default_server(request, default_model, tmp_path_factory):
    """The default model in each deployment; the cluster with two decode workers, so that a
    request whose worker dies has another one to continue on."""
    log = tmp_path_factory.mktemp("structured") / "serve.log"
    if request.param == "colocated":
        deployment = ["--colocated"]
    else:
        deployment = ["--decode-workers", "2", "--worker-placement", "shared"]
    flags = ["--max-model-len", "1024", "--cpu-kv-cache-space", "0.5", *deployment]
    proc, base = start_cluster(default_model, *flags, log_path=log)
    try:
        yield Served(request.param, base, log)
    finally:
        stop_cluster(proc)


def post(base: str, body: dict) -> httpx.Response:
    """A chat or completion request, as its body says."""
    route = CHAT if "messages" in body else COMPLETIONS
    return httpx.post(base + route, json=body, timeout=300)


def complete_all(base: str, bodies: list[dict]) -> list[dict]:
    """Every body at once (one batch, as far as the server is concerned); each must be a 200."""

    def one(body: dict) -> dict:
        r = post(base, body)
        assert r.status_code == 200, (body, r.text)
        return r.json()

    with ThreadPoolExecutor(len(bodies)) as pool:
        return list(pool.map(one, bodies))


def request(
    prompt: str, constraint: dict, seed: int | None = None, route: str = CHAT, **extra
) -> dict:
    """A request body: greedy without a seed, else sampled at temperature 1.0."""
    if route == CHAT:
        given = {"messages": [{"role": "user", "content": prompt}]}
    else:
        given = {"prompt": prompt}
    temperature = 0.0 if seed is None else 1.0
    sampling = {"max_tokens": MAX_TOKENS, "temperature": temperature, "seed": seed}
    return given | sampling | constraint | extra


def text_of(choice: dict) -> str:
    return choice["message"]["content"] if "message" in choice else choice["text"]


# Formats as the backends enforce them: "date" is a shape (both backends admit 2023-02-30),
# every other format as jsonschema checks it.
FORMATS = jsonschema.FormatChecker()
FORMATS.checks("date")(lambda value: bool(re.fullmatch(r"\d{4}-\d{2}-\d{2}", value)))


def validate(schema: dict, text: str) -> object:
    """The output parsed, once it is valid JSON that the schema (formats included) accepts."""
    value = json.loads(text)
    jsonschema.Draft202012Validator(schema, format_checker=FORMATS).validate(value)
    return value


def assert_fixed_layout(text: str) -> None:
    """JSON in the one layout whitespace-free grammars allow: ", " and ": " between items and
    keys, no other whitespace outside strings."""
    skeleton = re.sub(r'"(?:\\.|[^"\\])*"', '""', text)  # each string emptied
    assert re.search(r"[,:](?! )|(?<![,:]) |\s\s|[\n\r\t]", skeleton) is None, text


def json_constraint(schema: dict, form: int) -> dict:
    """The same schema as vLLM's object, as vLLM's JSON text, or as OpenAI's response_format."""
    if form == 0:
        return {"structured_outputs": {"json": schema}}
    if form == 1:
        return {"structured_outputs": {"json": json.dumps(schema)}}
    named = {"name": "answer", "schema": schema, "strict": True}
    return {"response_format": {"type": "json_schema", "json_schema": named}}


def ask_for(schema: dict) -> str:
    return f"Reply with a JSON object that follows this JSON schema: {json.dumps(schema)}"


def test_every_json_output_parses_and_validates(default_server):
    cases = [(name, seed) for name in SCHEMAS for seed in SEEDS]
    bodies = [request(ask_for(SCHEMAS[name]), json_constraint(SCHEMAS[name], i % 3), seed)
              for i, (name, seed) in enumerate(cases)]  # fmt: skip
    failures = []
    for (name, seed), got in zip(cases, complete_all(default_server.base, bodies)):
        choice = got["choices"][0]
        try:
            assert choice["finish_reason"] == "stop"
            validate(SCHEMAS[name], text_of(choice))
            assert_fixed_layout(text_of(choice))
        except (AssertionError, ValueError, jsonschema.ValidationError) as e:
            failures.append((name, seed, choice["finish_reason"], text_of(choice), repr(e)[:200]))
    assert not failures, failures


GRAMMAR_CASES = [
    # (route, prompt, constraint, check of the output)
    (COMPLETIONS, "Is the sky blue? Answer:",
     {"structured_outputs": {"regex": r"(yes|no), because [a-z ]{5,30}\."}},
     lambda t: re.fullmatch(r"(yes|no), because [a-z ]{5,30}\.", t)),
    (CHAT, "Give me a phone number.",
     {"structured_outputs": {"regex": r"\(\d{3}\) \d{3}-\d{4}"}},
     lambda t: re.fullmatch(r"\(\d{3}\) \d{3}-\d{4}", t)),
    (CHAT, "What is the sentiment of: I love this film!",
     {"structured_outputs": {"choice": ["positive", "negative", "neutral"]}},
     lambda t: t in ("positive", "negative", "neutral")),
    (CHAT, "What is 6 times 7?",
     {"structured_outputs": {"grammar": 'root ::= "The answer is " digit digit "."\n'
                                        "digit ::= [0-9]"}},
     lambda t: re.fullmatch(r"The answer is \d\d\.", t)),
    (CHAT, "Write an SQL query.",
     {"structured_outputs": {"grammar": 'start: "SELECT " COL " FROM " TABLE\n'
                                        'COL: "name" | "age"\nTABLE: "users" | "items"'}},
     lambda t: re.fullmatch(r"SELECT (name|age) FROM (users|items)", t)),
    (CHAT, 'Reply with a JSON object with the keys "name" and "age" of a person.',
     {"structured_outputs": {"json_object": True}},
     lambda t: isinstance(json.loads(t), dict)),
    (CHAT, 'Reply with a JSON object with the keys "city" and "country".',
     {"response_format": {"type": "json_object"}},
     lambda t: isinstance(json.loads(t), dict)),
    (CHAT, ask_for(SCHEMAS["flat"]), json_constraint(SCHEMAS["flat"], 2),
     lambda t: validate(SCHEMAS["flat"], t)),
]  # fmt: skip


def test_regex_choice_grammar_and_json_object_hold(default_server):
    cases = [(case, seed) for case in GRAMMAR_CASES for seed in (None, 1)]
    bodies = [request(prompt, constraint, seed, route)
              for (route, prompt, constraint, _), seed in cases]  # fmt: skip
    results = complete_all(default_server.base, bodies)
    for ((_, _, constraint, check), seed), got in zip(cases, results):
        choice = got["choices"][0]
        assert choice["finish_reason"] == "stop", (constraint, seed, choice)
        assert check(text_of(choice)), (constraint, seed, text_of(choice))


class Pet(BaseModel):
    name: str = Field(max_length=20)
    species: str = Field(max_length=20)
    age: int = Field(ge=0, le=30)


class Owner(BaseModel):
    name: str = Field(max_length=20)
    pets: list[Pet] = Field(min_length=1, max_length=2)


def test_openai_sdk_parse_returns_the_pydantic_object(default_server):
    client = openai.OpenAI(base_url=default_server.base + "/v1", api_key="none", max_retries=0)
    # openai>=1.40 has it under beta; later versions under chat.completions too
    parse = getattr(client.chat.completions, "parse", None) or client.beta.chat.completions.parse
    model = client.models.list().data[0].id
    messages = [{"role": "user", "content": "Describe a pet owner and their pets as JSON."}]
    with ThreadPoolExecutor(2) as pool:
        results = [pool.submit(parse, model=model, messages=messages, response_format=Owner,
                               max_tokens=MAX_TOKENS, temperature=t, seed=3)
                   for t in (0.0, 1.0)]  # fmt: skip
        for result in results:
            choice = result.result().choices[0]
            assert choice.finish_reason == "stop"
            assert isinstance(choice.message.parsed, Owner)
            assert Owner.model_validate_json(choice.message.content) == choice.message.parsed


def test_auto_serves_multiple_of_with_guidance(default_server):
    bodies = [request(ask_for(MULTIPLE_OF_7), json_constraint(MULTIPLE_OF_7, form % 3), seed)
              for form, seed in enumerate(SEEDS)]  # fmt: skip
    for got in complete_all(default_server.base, bodies):
        choice = got["choices"][0]
        assert choice["finish_reason"] == "stop"
        value = validate(MULTIPLE_OF_7, text_of(choice))["n"]
        assert value % 7 == 0 and 0 <= value <= 500


def test_backend_xgrammar_refuses_what_it_cannot_enforce(tiny_llama):
    config = json.dumps({"backend": "xgrammar"})
    proc, base = start_cluster(tiny_llama, "--colocated", "--max-model-len", "256",
                               "--num-gpu-blocks-override", "64",
                               "--structured-outputs-config", config)  # fmt: skip
    try:
        for form, param in ((0, "structured_outputs"), (2, "response_format")):
            body = request("a number", json_constraint(MULTIPLE_OF_7, form), max_tokens=8)
            assert_bad_request(post(base, body), param, "multipleOf")
        # what xgrammar does enforce, it serves
        enum = obj({"n": {"enum": [1, 2]}})
        (got,) = complete_all(base, [request("a number", json_constraint(enum, 0), max_tokens=16)])
        choice = got["choices"][0]
        assert json.loads(text_of(choice))["n"] in (1, 2)
    finally:
        stop_cluster(proc)


def assert_bad_request(r: httpx.Response, param: str, says: str) -> None:
    """A 400 in OpenAI's error shape, naming `param`, whose message says `says`."""
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert error["type"] == "BadRequestError" and error["param"] == param, error
    assert param in error["message"] and says in error["message"], error


UNIQUE_ITEMS = {"type": "array", "items": {"type": "integer"}, "uniqueItems": True}
INVALID_SPECS = [
    # (the constraint fields of the body, the parameter the 400 names, what its message says)
    ({"structured_outputs": {"json": {"type": "object"}, "regex": "a+"}},
     "structured_outputs", "exactly one"),
    ({"response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a+"}},
     "response_format", "one constraint"),
    ({"structured_outputs": {"json": {"type": "foo"}}}, "structured_outputs", "JSON schema"),
    ({"response_format": {"type": "json_schema",
                          "json_schema": {"name": "x", "schema": {"type": "foo"}}}},
     "response_format", "JSON schema"),
    ({"structured_outputs": {"regex": "("}}, "structured_outputs", "regex"),
    ({"structured_outputs": {"choice": []}}, "structured_outputs", "choice"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
     "response_format", "schema"),
    ({"structured_outputs": {"regexp": "a+"}}, "structured_outputs", "regexp"),
    ({"structured_outputs": {}}, "structured_outputs", "exactly one"),
    ({"structured_outputs": {"grammar": "root ::= "}}, "structured_outputs", "grammar"),
    ({"structured_outputs": {"json": UNIQUE_ITEMS}}, "structured_outputs", "uniqueItems"),
    ({"response_format": {"type": "json_schema",
                          "json_schema": {"name": "x", "schema": UNIQUE_ITEMS}}},
     "response_format", "uniqueItems"),
]  # fmt: skip


def test_invalid_specs_are_400s_naming_the_parameter(default_server):
    for constraint, param, says in INVALID_SPECS:
        for route in (CHAT, COMPLETIONS):
            body = request("hi", constraint, route=route, max_tokens=4)
            assert_bad_request(post(default_server.base, body), param, says)
    # and the server goes on serving
    (got,) = complete_all(default_server.base, [request("hi", {}, max_tokens=4)])
    assert got["choices"][0]["message"]["content"]


def test_a_constrained_request_leaves_its_batch_as_hf(server, hf_llama):
    base = server[0]
    prompts = [[5, 9, 33, 71, 2, 18, 101], [40, 41, 42, 43], [7, 150, 3, 77, 12, 90, 6, 64, 8]]
    plain = [{"prompt": p, "max_tokens": 24, "temperature": 0, "return_token_ids": True}
             for p in prompts]  # fmt: skip
    regex = r"[a-z]{30}"
    constrained = [
        {"prompt": prompts[0], "max_tokens": 40, "temperature": 0,
         "structured_outputs": {"regex": regex}},
        {"prompt": prompts[1], "max_tokens": 40, "temperature": 1.0, "seed": 2,
         "structured_outputs": {"choice": ["the quick brown fox", "the lazy dog"]}},
    ]  # fmt: skip
    got = complete_all(base, [constrained[0], *plain, constrained[1]])
    for body, result in zip(plain, got[1:-1]):
        assert result["choices"][0]["token_ids"] == hf_greedy(hf_llama, body["prompt"], 24)
    first, last = got[0]["choices"][0], got[-1]["choices"][0]
    assert re.fullmatch(regex, first["text"]) and first["finish_reason"] == "stop"
    assert last["text"] in ("the quick brown fox", "the lazy dog")
    assert last["finish_reason"] == "stop"


def test_n_seeded_samples_each_valid_and_the_same_twice(default_server):
    schema = SCHEMAS["array_of_objects"]
    body = request(ask_for(schema), json_constraint(schema, 0), seed=11, n=3)
    first, again = complete_all(default_server.base, [body, body])
    texts = [text_of(c) for c in first["choices"]]
    assert [c["index"] for c in first["choices"]] == [0, 1, 2]
    for choice in first["choices"]:
        assert choice["finish_reason"] == "stop"
        validate(schema, text_of(choice))
    assert [text_of(c) for c in again["choices"]] == texts


def busy_decode_worker(base: str) -> str | None:
    workers = httpx.get(base + "/stats", timeout=5).json()["workers"]
    return next((k for k, w in sorted(workers.items())
                 if w["role"] == "decode" and w["num_running"]), None)  # fmt: skip


# Last of the cluster's tests: the killed worker is still starting again when it ends.
@pytest.mark.parametrize("default_server", ["cluster"], indirect=True)
def test_a_constrained_stream_survives_its_decode_worker_killed(default_server):
    base, log = default_server.base, default_server.log
    schema = array(integer(0, 9), 40, 40)  # long enough to be mid-stream when killed
    body = request("List forty digits as a JSON array.", json_constraint(schema, 0), stream=True)
    assert_all_blocks_free(base)  # so that a busy decode worker is this request's
    text, finish_reason, victim = "", None, None
    with httpx.stream("POST", base + CHAT, json=body, timeout=300) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            for choice in json.loads(line.removeprefix("data: "))["choices"]:
                text += choice["delta"].get("content") or ""
                finish_reason = choice["finish_reason"] or finish_reason
            if victim is None and text and (victim := busy_decode_worker(base)):
                os.kill(cluster_workers(base)[victim].pid, signal.SIGKILL)
                killed_at = len(text)
    assert victim is not None, "the request ended before a decode worker reported it"
    assert killed_at < len(text) // 2, "killed too late to continue elsewhere"
    assert finish_reason == "stop"
    validate(schema, text)
    # re-queued mid-stream: it went on elsewhere from the tokens it had, its grammar replayed
    requeued = re.search(rf"{victim} lost: \S+ re-queued after (\d+) tokens", log.read_text())
    assert requeued and int(requeued[1]) >= 1, "the request was not re-queued mid-stream"


# -- tool calling (required and named choices are structured outputs) --------------------------

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "additionalProperties": False,
            "required": ["city", "unit"],
            "properties": {
                "city": {"type": "string", "maxLength": 24},
                "unit": {"enum": ["celsius", "fahrenheit"]},
            },
        },
    },
}
TIME_TOOL = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "additionalProperties": False,
            "required": ["zone"],
            "properties": {"zone": {"type": "string", "maxLength": 12}},
        },
    },
}
TOOLS = [WEATHER_TOOL, TIME_TOOL]
ASK = [{"role": "user", "content": "What is the weather in Paris right now?"}]  # fmt: skip


def sdk(server: Served) -> tuple[openai.OpenAI, str]:
    client = openai.OpenAI(base_url=server.base + "/v1", api_key="none", max_retries=0)
    return client, client.models.list().data[0].id


def check_call(call) -> None:
    """A call to one of TOOLS with arguments valid for its schema."""
    schema = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    assert call.type == "function" and call.id
    jsonschema.validate(json.loads(call.function.arguments), schema[call.function.name])


def test_named_and_required_tool_calls_are_always_valid(default_server):
    client, model = sdk(default_server)
    named = {"type": "function", "function": {"name": "get_time"}}
    asks = [(choice, seed) for choice in ("required", named) for seed in range(10)]

    def ask(case):
        choice, seed = case
        return client.chat.completions.create(model=model, messages=ASK, tools=TOOLS,
                                              tool_choice=choice, temperature=1.0, seed=seed,
                                              max_tokens=MAX_TOKENS)  # fmt: skip

    with ThreadPoolExecutor(len(asks)) as pool:
        for (choice, _), reply in zip(asks, pool.map(ask, asks)):
            out = reply.choices[0]
            assert out.finish_reason == "tool_calls" and out.message.content is None
            assert out.message.tool_calls
            for call in out.message.tool_calls:
                check_call(call)
                if choice is named:
                    assert call.function.name == "get_time"


def test_a_streamed_tool_call_and_a_second_turn_with_its_result(default_server):
    client, model = sdk(default_server)
    with client.beta.chat.completions.stream(model=model, messages=ASK, tools=[WEATHER_TOOL],
                                             tool_choice="required", temperature=0,
                                             max_tokens=MAX_TOKENS) as stream:  # fmt: skip
        for _ in stream:
            pass
        streamed = stream.get_final_completion().choices[0]
    whole = client.chat.completions.create(model=model, messages=ASK, tools=[WEATHER_TOOL],
                                           tool_choice="required", temperature=0,
                                           max_tokens=MAX_TOKENS).choices[0]  # fmt: skip
    assert streamed.finish_reason == whole.finish_reason == "tool_calls"
    (call,) = streamed.message.tool_calls
    check_call(call)
    assert call.function.arguments == whole.message.tool_calls[0].function.arguments
    history = [*ASK, whole.message.model_dump(exclude_none=True),
               {"role": "tool", "tool_call_id": call.id, "content": '{"celsius": 21}'}]  # fmt: skip
    reply = client.chat.completions.create(model=model, messages=history, tools=[WEATHER_TOOL],
                                           tool_choice="none", temperature=0,
                                           max_tokens=40)  # fmt: skip
    answer = reply.choices[0]
    assert answer.message.content and not answer.message.tool_calls
    # the tool's result reached the model: it changes the reply
    without = client.chat.completions.create(model=model, messages=ASK, temperature=0,
                                             max_tokens=40).choices[0].message.content  # fmt: skip
    assert answer.message.content != without


# -- the Responses API ----------------------------------------------------------------------------

FLAT_WEATHER = {"type": "function", **WEATHER_TOOL["function"]}


def test_responses_text_json_and_a_function_call_round_trip(default_server):
    client, model = sdk(default_server)
    r = client.responses.create(model=model, input="Say hello.", instructions="Be brief.",
                                max_output_tokens=200, temperature=0)  # fmt: skip
    assert r.status == "completed" and r.output_text and r.usage.output_tokens > 0
    schema = {"type": "object", "additionalProperties": False, "required": ["name"],
              "properties": {"name": {"type": "string", "maxLength": 12}}}  # fmt: skip
    fmt = {"format": {"type": "json_schema", "name": "person", "schema": schema}}
    r = client.responses.create(model=model, input="A person as JSON.", text=fmt,
                                max_output_tokens=MAX_TOKENS, temperature=0)  # fmt: skip
    jsonschema.validate(json.loads(r.output_text), schema)
    r = client.responses.create(model=model, input=ASK[0]["content"], tools=[FLAT_WEATHER],
                                tool_choice="required", max_output_tokens=MAX_TOKENS,
                                temperature=0)  # fmt: skip
    (call,) = [o for o in r.output if o.type == "function_call"]
    assert call.name == "get_weather"
    jsonschema.validate(json.loads(call.arguments), WEATHER_TOOL["function"]["parameters"])
    result = {"type": "function_call_output", "call_id": call.call_id, "output": "21 C"}
    made = {"type": "function_call", "call_id": call.call_id, "name": call.name,
            "arguments": call.arguments}  # fmt: skip
    again = client.responses.create(model=model, input=[ASK[0], made, result],
                                    tools=[FLAT_WEATHER], tool_choice="none",
                                    max_output_tokens=40, temperature=0)  # fmt: skip
    assert again.output_text and not [o for o in again.output if o.type == "function_call"]


def test_responses_stream_text_and_a_call_as_the_sdk_reads_them(default_server):
    client, model = sdk(default_server)
    with client.responses.stream(model=model, input="Say hello.", max_output_tokens=200,
                                 temperature=0) as stream:  # fmt: skip
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    whole = client.responses.create(model=model, input="Say hello.", max_output_tokens=200,
                                    temperature=0)  # fmt: skip
    assert "".join(deltas) == final.output_text == whole.output_text
    with client.responses.stream(model=model, input=ASK[0]["content"], tools=[FLAT_WEATHER],
                                 tool_choice="required", max_output_tokens=MAX_TOKENS,
                                 temperature=0) as stream:  # fmt: skip
        kinds = [e.type for e in stream]
        final = stream.get_final_response()
    (call,) = final.output
    assert call.type == "function_call" and call.name == "get_weather"
    jsonschema.validate(json.loads(call.arguments), WEATHER_TOOL["function"]["parameters"])
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert "response.function_call_arguments.delta" in kinds and kinds[-1] == "response.completed"
    r = httpx.post(default_server.base + "/v1/responses", timeout=60,
                   json={"input": "hi", "previous_response_id": "resp_1"})  # fmt: skip
    assert r.status_code == 400 and r.json()["error"]["param"] == "previous_response_id"

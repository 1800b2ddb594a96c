"""Tool calling at the gateway: each parser on recorded model outputs (whole and streamed in
small pieces, never leaking markup into content), the constraint of `required` and named
choices, and the requests vLLM refuses; reasoning split from content, whole and streamed."""

from __future__ import annotations

import json

import jsonschema
import pytest

from tandem.services.gateway.protocol import ChatCompletionRequest
from tandem.services.gateway.reasoning import ReasoningStream
from tandem.services.gateway.reasoning import get_parser as get_reasoning_parser
from tandem.services.gateway.tool_parsers import PARSERS, ParsedCall, ToolParser, get_parser
from tandem.services.gateway.tools import ToolChoiceError, ToolStream, parameters_of, plan_tools

WEATHER = {"city": "Paris", "unit": "c"}
CALL = ParsedCall("get_weather", json.dumps(WEATHER))
TIME = ParsedCall("get_time", json.dumps({"tz": "UTC"}))

# recorded outputs in each format: (text, content, calls)
RECORDED = {
    "hermes": [
        ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", '
         '"unit": "c"}}\n</tool_call>', "Let me check.\n", [CALL]),
        ('<tool_call>{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}'
         '</tool_call>\n<tool_call>{"name": "get_time", "arguments": {"tz": "UTC"}}</tool_call>',
         None, [CALL, TIME]),
        ("No tools needed: it is sunny.", "No tools needed: it is sunny.", []),
        ("<tool_call>{not json</tool_call>", "<tool_call>{not json</tool_call>", []),
    ],
    "llama3_json": [
        ('{"name": "get_weather", "parameters": {"city": "Paris", "unit": "c"}}', None, [CALL]),
        ('<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris", "unit": "c"}}; '
         '{"name": "get_time", "parameters": {"tz": "UTC"}}', None, [CALL, TIME]),
        ("It is sunny in Paris.", "It is sunny in Paris.", []),
    ],
    "mistral": [
        ('[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}, '
         '{"name": "get_time", "arguments": {"tz": "UTC"}}]', None, [CALL, TIME]),
        ("Sure. [TOOL_CALLS] oops", "Sure. [TOOL_CALLS] oops", []),
    ],
    "pythonic": [
        ('[get_weather(city="Paris", unit="c"), get_time(tz="UTC")]', None, [CALL, TIME]),
        ("[1, 2, 3] are numbers", "[1, 2, 3] are numbers", []),
        ("Paris is sunny.", "Paris is sunny.", []),
    ],
}  # fmt: skip
CASES = [(name, *case) for name, cases in RECORDED.items() for case in cases]


@pytest.mark.parametrize(("name", "text", "content", "calls"), CASES)
def test_each_parser_finds_the_calls_of_recorded_outputs(name, text, content, calls):
    assert get_parser(name).extract(text) == (content, calls)


@pytest.mark.parametrize(("name", "text", "content", "calls"), CASES)
def test_streamed_in_pieces_markup_never_reaches_content(name, text, content, calls):
    body = request(tool_choice="auto")
    plan = plan_tools(body, True, name)
    for size in (1, 3, 7):
        stream, streamed = ToolStream(plan), ""
        for at in range(0, len(text), size):
            streamed += stream.content(text[at : at + size])
        rest, deltas = stream.finish()
        streamed += rest
        if calls:
            assert streamed == (content or ""), (size, streamed)
            names = [d["function"]["name"] for d in deltas if "id" in d]
            args = [d["function"]["arguments"] for d in deltas if "id" not in d]
            assert names == [c.name for c in calls]
            assert [json.loads(a) for a in args] == [json.loads(c.arguments) for c in calls]
            assert [d["index"] for d in deltas] == [i for i in range(len(calls)) for _ in "ab"]
        else:
            assert streamed == text and deltas == []


TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}},
        "required": ["city", "unit"]}}},
    {"type": "function", "function": {"name": "get_time"}},
]  # fmt: skip


def request(**fields) -> ChatCompletionRequest:
    body = {"messages": [{"role": "user", "content": "hi"}], "tools": TOOLS} | fields
    return ChatCompletionRequest.model_validate(body)


def test_required_and_named_choices_are_json_schemas_of_the_tools():
    body = request(tool_choice="required")
    plan = plan_tools(body, False, None)
    schema = json.loads(plan.constraint(parameters_of(body)).json)
    valid = [{"name": "get_weather", "parameters": WEATHER},
             {"name": "get_time", "parameters": {"anything": 1}}]  # fmt: skip
    jsonschema.validate(valid, schema)
    for bad in ([], [{"name": "get_weather", "parameters": {"city": "Paris"}}],
                [{"name": "nope", "parameters": {}}]):  # fmt: skip
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)
    assert plan.extract(json.dumps(valid))[1][0] == CALL
    single = plan_tools(request(tool_choice="required", parallel_tool_calls=False), False, None)
    assert json.loads(single.constraint(parameters_of(body)).json)["maxItems"] == 1
    named = request(tool_choice={"type": "function", "function": {"name": "get_weather"}})
    plan = plan_tools(named, False, None)
    assert (
        json.loads(plan.constraint(parameters_of(named)).json) == TOOLS[0]["function"]["parameters"]
    )
    assert plan.extract(json.dumps(WEATHER)) == (None, [CALL])
    assert plan_tools(request(tool_choice="none"), False, None).constraint({}) is None


@pytest.mark.parametrize(
    ("fields", "auto", "parser", "message"),
    [
        ({}, False, None, "--enable-auto-tool-choice"),
        ({"tool_choice": "auto"}, True, None, "--tool-call-parser"),
        ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, False, None,
         "not among the tools"),
        ({"tools": None, "tool_choice": "required"}, False, None, "must come with tools"),
    ],
)  # fmt: skip
def test_what_vllm_refuses_is_refused_naming_tool_choice(fields, auto, parser, message):
    with pytest.raises(ToolChoiceError, match=message) as e:
        plan_tools(request(**fields), auto, parser)
    assert e.value.param == "tool_choice"


def test_a_plugin_registers_its_own_parser(tmp_path):
    from tandem.services.gateway import tool_parsers

    plugin = tmp_path / "plugin.py"
    plugin.write_text(
        "import json\n"
        "from tandem.services.gateway.tool_parsers import ParsedCall, ToolParser, register\n"
        "@register\n"
        "class Calls(ToolParser):\n"
        "    name = 'calls'\n"
        "    def extract(self, text):\n"
        "        name, _, args = text.partition(' ')\n"
        "        return None, [ParsedCall(name, json.dumps({'q': args}))]\n"
    )
    tool_parsers.load_plugin(str(plugin))
    try:
        parser = get_parser("calls")
        assert isinstance(parser, ToolParser)
        assert parser.extract("search cats") == (None, [ParsedCall("search", '{"q": "cats"}')])
    finally:
        PARSERS.pop("calls", None)
    with pytest.raises(ValueError, match="--tool-call-parser must be one of"):
        get_parser("calls")


# -- reasoning ------------------------------------------------------------------------------------

THOUGHT = "<think>\nThe user wants the weather.\n</think>\n\nIt is sunny."


@pytest.mark.parametrize(
    ("name", "text", "reasoning", "content"),
    [
        ("qwen3", THOUGHT, "\nThe user wants the weather.\n", "\n\nIt is sunny."),
        ("qwen3", "It is sunny.", None, "It is sunny."),  # thinking off: no tags
        ("qwen3", "<think>unfinished", "unfinished", ""),  # cut off while thinking
        ("deepseek_r1", THOUGHT, "\nThe user wants the weather.\n", "\n\nIt is sunny."),
        ("deepseek_r1", "Weather, then.</think>Sunny.", "Weather, then.", "Sunny."),
        ("deepseek_r1", "still thinking", "still thinking", ""),
    ],
)
def test_reasoning_is_split_whole_and_streamed(name, text, reasoning, content):
    parser = get_reasoning_parser(name)
    assert parser.split(text) == (reasoning, content)
    for size in (1, 2, 5):
        stream, thought, said = ReasoningStream(parser), "", ""
        for at in range(0, len(text), size):
            r, c = stream.feed(text[at : at + size], at + size >= len(text))
            thought, said = thought + r, said + c
        if name == "qwen3" and reasoning is None:
            assert (thought, said) == ("", text)
        else:
            assert (thought, said) == (reasoning or "", content), size

"""Request preprocessing, which the tokenizer stage and the in-process client share: chat
templates, truncation, bad words, the rest of the context as max_tokens, and the 400s (each
naming its field)."""

from __future__ import annotations

import pytest

from tandem.engine.client import GenerateInput, InvalidRequest
from tandem.engine.preprocess import prepare, render_chat
from tandem.engine.request import SamplingParams
from tandem.engine.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def tokenizer(default_model):
    return load_tokenizer(default_model)


def _inputs(**kw) -> GenerateInput:
    kw.setdefault("request_ids", ["r-0"])
    kw.setdefault("params", SamplingParams(max_tokens=4))
    return GenerateInput(**kw)


def test_text_and_id_prompts_with_n_samples_and_echo(tokenizer):
    ids = tokenizer.encode("Hello there")
    inputs = _inputs(
        prompts=["Hello there", ids], request_ids=["a-0", "a-1", "b-0", "b-1"],
        return_prompt_text=True,
    )  # fmt: skip
    assert inputs.n == 2 and inputs.ids_of(1) == ["b-0", "b-1"]
    prompts, params = prepare(tokenizer, inputs, len(tokenizer), 64)
    assert [p.token_ids for p in prompts] == [ids, ids]
    assert prompts[0].text == "Hello there"  # as given
    assert prompts[1].text == tokenizer.decode(ids, skip_special_tokens=True)
    assert params == inputs.params
    plain, _ = prepare(tokenizer, _inputs(prompts=["Hello there"]), len(tokenizer), 64)
    assert plain[0].text == ""  # no echo: no text back


def test_chat_renders_the_template_and_fills_the_context(tokenizer):
    messages = [{"role": "user", "content": "Hi"}]
    inputs = _inputs(messages=messages, fill_context=True)
    (prompt,), params = prepare(tokenizer, inputs, len(tokenizer), 100)
    text, ids = render_chat(tokenizer, messages, True)
    assert prompt.token_ids == ids and "Hi" in text
    assert params.max_tokens == 100 - len(ids)
    with pytest.raises(InvalidRequest) as e:  # min_tokens past the room left
        prepare(tokenizer, _inputs(messages=messages, fill_context=True,
                                   params=SamplingParams(max_tokens=1000, min_tokens=99)),
                len(tokenizer), 100)  # fmt: skip
    assert e.value.param == "min_tokens"


def test_truncation_and_bad_words(tokenizer):
    ids = tokenizer.encode("one two three four five six")
    inputs = _inputs(prompts=[ids], truncate_prompt_tokens=3, bad_words=["seven"],
                     return_prompt_text=True)  # fmt: skip
    (prompt,), params = prepare(tokenizer, inputs, len(tokenizer), 64)
    assert prompt.token_ids == ids[-3:]
    assert prompt.text == tokenizer.decode(ids[-3:], skip_special_tokens=True)
    alone = tuple(tokenizer.encode("seven", add_special_tokens=False))
    spaced = tuple(tokenizer.encode(" seven", add_special_tokens=False))
    assert params.bad_words_token_ids == tuple(dict.fromkeys([alone, spaced]))


@pytest.mark.parametrize(
    "inputs, param, message",
    [
        (dict(prompts=[]), "prompt", "prompt must not be empty"),
        (dict(prompts=[[]]), "prompt", "prompt must not be empty"),
        (dict(prompts=[[1, 10**6]]), "prompt", "prompt token ids must be in"),
        (dict(prompts=[[1] * 64]), "prompt", "maximum context length is 64"),
        (dict(messages=[]), "messages", "messages must not be empty"),
        (dict(messages=[{"role": "user", "content": "x"}] * 40), "messages", "maximum context"),
        (dict(prompts=["a"], params=SamplingParams(stop_token_ids=(10**6,))), "stop_token_ids",
         "stop_token_ids must be"),
        (dict(prompts=["a", "b"], request_ids=["x-0"]), "request_id", "request_ids"),
    ],
)  # fmt: skip
def test_what_cannot_run_is_a_400_naming_its_field(tokenizer, inputs, param, message):
    with pytest.raises(InvalidRequest, match=message) as e:
        prepare(tokenizer, _inputs(**inputs), len(tokenizer), 64)
    assert e.value.param == param


def test_a_template_that_fails_is_a_400_on_messages(tokenizer):
    with pytest.raises(InvalidRequest, match="messages must fit") as e:
        render_chat(tokenizer, [{"content": "no role"}], True)
    assert e.value.param == "messages"


def test_tools_and_template_kwargs_reach_the_template(default_model):
    template = (
        "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}"
        "{% for c in m.get('tool_calls', []) %} call {{ c.function.name }}"
        "({{ c.function.arguments.city }}){% endfor %} | {% endfor %}"
        "{% for t in tools or [] %}tool {{ t.function.name }} | {% endfor %}"
        "{% if greeting %}{{ greeting }} | {% endif %}"
        "{% if add_generation_prompt %}[assistant]{% endif %}"
    )
    tokenizer = load_tokenizer(default_model, chat_template=template)
    messages = [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "c1", "type": "function",
             "function": {"name": "get_weather", "arguments": {"city": "Rome"}}}]},
        {"role": "tool", "content": "sunny", "tool_call_id": "c1"},
    ]  # fmt: skip
    tools = [{"type": "function", "function": {"name": "get_weather"}}]
    text, _ = render_chat(tokenizer, messages, True, tools, {"greeting": "hi", "tools": "no"})
    assert text == (
        "[user] Weather? | [assistant]  call get_weather(Rome) | [tool] sunny | "
        "tool get_weather | hi | [assistant]"
    ), text


@pytest.mark.parametrize(
    ("parser", "result"),
    [
        ("hermes", "<tool_response>\nsunny\n</tool_response>"),
        ("llama3_json", "<|im_start|>ipython\nsunny"),
        ("mistral", '[TOOL_RESULTS]{"call_id": "c1", "content": "sunny"}[/TOOL_RESULTS]'),
        ("pythonic", "<|im_start|>tool\nsunny"),
    ],
)
def test_the_example_tool_templates_render_tools_and_calls_their_parser_reads(
    default_model, parser, result
):
    """examples/tool_chat_template_<parser>.jinja: the tools, the history's calls and
    results rendered; the calls as the model is told to write them read back by the parser."""
    from pathlib import Path

    from tandem.services.gateway.tool_parsers import ParsedCall, get_parser

    path = Path(__file__).parents[3] / "examples" / f"tool_chat_template_{parser}.jinja"
    tokenizer = load_tokenizer(default_model, chat_template=str(path))
    city = {
        "type": "object",
        "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
    }
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": city}}]

    def call(i, city, days):
        arguments = {"city": city, "days": days}
        return {"id": f"c{i}", "type": "function",
                "function": {"name": "get_weather", "arguments": arguments}}  # fmt: skip

    messages = [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": "Weather in Rome and Oslo?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [call(1, "Rome", 2), call(2, "Oslo", 1)],
        },
        {"role": "tool", "content": "sunny", "tool_call_id": "c1"},
    ]
    text, ids = render_chat(tokenizer, messages, True, tools)
    assert '"name": "get_weather"' in text and "Be brief." in text and result in text
    assert text.endswith("<|im_start|>assistant\n") and ids
    turn = text.split("<|im_start|>assistant\n")[1].split("<|im_end|>")[0]
    _, calls = get_parser(parser).extract(turn)
    assert calls == [ParsedCall("get_weather", '{"city": "Rome", "days": 2}'),
                     ParsedCall("get_weather", '{"city": "Oslo", "days": 1}')]  # fmt: skip
    plain, _ = render_chat(tokenizer, messages[:2], True, None)  # without tools: no list
    assert "get_weather" not in plain and plain.endswith("<|im_start|>assistant\n")

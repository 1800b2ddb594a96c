"""`tandem serve` for real: a subprocess on a free port, driven with httpx and the openai client."""

import json
import time

import httpx
import openai
import pytest

from tests.helpers.cluster import assert_all_blocks_free
from tests.helpers.hf import hf_greedy


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="none", max_retries=0)


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == ["tiny-llama"]
    assert httpx.get(server[0] + "/health").status_code == 200


def test_greedy_completion_matches_hf(client, hf_llama, tiny_llama):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    prompt = "hello world, this is a test"
    r = client.completions.create(
        model="tiny-llama",
        prompt=prompt,
        max_tokens=20,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    expected = hf_greedy(hf_llama, tok.encode(prompt), 20)
    choice = r.choices[0]
    assert r.usage.prompt_tokens == len(tok.encode(prompt))
    assert r.usage.completion_tokens == 20 == len(expected) or choice.finish_reason == "stop"
    assert choice.text == tok.decode(expected)


def test_streaming_equals_non_streaming(client):
    kwargs = dict(
        model="tiny-llama",
        prompt=[5, 6, 7, 8, 9],
        max_tokens=16,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    full = client.completions.create(**kwargs)
    stream = client.completions.create(
        stream=True, stream_options={"include_usage": True}, **kwargs
    )
    chunks = list(stream)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == full.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 16 and not chunks[-1].choices


def test_model_may_be_omitted_and_batch_prompts(server):
    r = httpx.post(
        server[0] + "/v1/completions",
        json={"prompt": ["a b", "c d e"], "max_tokens": 3, "temperature": 0},
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert sorted(c["index"] for c in body["choices"]) == [0, 1]
    assert body["model"] == "tiny-llama"


def test_seeded_sampling_is_reproducible(client):
    kwargs = dict(
        model="tiny-llama",
        prompt="abc",
        max_tokens=12,
        temperature=1.0,
        seed=7,
        top_p=0.9,
        extra_body={"ignore_eos": True},
    )
    a = client.completions.create(**kwargs).choices[0].text
    b = client.completions.create(**kwargs).choices[0].text
    assert a == b


def _error(r: httpx.Response, status: int, param: str | None = None) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] == param, err
    return err


@pytest.mark.parametrize(
    "body,param",
    [
        ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
        ({"prompt": "x", "temperature": -1}, "temperature"),
        ({"prompt": "x", "top_p": 0}, "top_p"),
        ({"prompt": "x", "top_p": 1.5}, "top_p"),
        ({"prompt": "x", "n": "many"}, "n"),
        ({"prompt": "x", "n": -1}, "n"),
        ({"prompt": "x", "top_k": -2}, "top_k"),
        ({"prompt": "x", "min_p": 1.5}, "min_p"),
        ({"prompt": "x", "logprobs": 21}, "logprobs"),
        ({"prompt": "x", "prompt_logprobs": 21}, "prompt_logprobs"),
        ({"prompt": "x", "logit_bias": {"99999": 1.0}}, "logit_bias"),
        ({"prompt": "x", "logit_bias": {"abc": 1.0}}, "logit_bias"),
        ({"prompt": "x", "logit_bias": {"5": 200.0}}, "logit_bias"),
        ({"prompt": "x", "allowed_token_ids": [10**6]}, "allowed_token_ids"),
        ({"prompt": "x", "allowed_token_ids": []}, "allowed_token_ids"),
        ({"prompt": "x", "repetition_penalty": 0}, "repetition_penalty"),
        ({"prompt": "x", "frequency_penalty": -2.5}, "frequency_penalty"),
        ({"prompt": "x", "best_of": 3}, "best_of"),
        ({"prompt": "x", "logits_processors": ["m:C"]}, "logits_processors"),
        ({"prompt": "x", "truncate_prompt_tokens": 0}, "truncate_prompt_tokens"),
        ({"prompt": "x", "min_tokens": 5, "max_tokens": 2}, "min_tokens"),
        ({"max_tokens": 4}, "prompt"),
        ({"prompt": [10**9], "max_tokens": 4}, "prompt"),
        ({"prompt": "x " * 400, "max_tokens": 4}, "prompt"),
    ],
)
def test_bad_input_is_400_in_openai_shape(server, body, param):
    _error(httpx.post(server[0] + "/v1/completions", json=body), 400, param)


def test_unknown_model_is_404_and_bad_json_is_400(server):
    _error(
        httpx.post(server[0] + "/v1/completions", json={"model": "nope", "prompt": "x"}),
        404,
        "model",
    )
    r = httpx.post(
        server[0] + "/v1/completions",
        content=b"{not json",
        headers={"content-type": "application/json"},
    )
    _error(r, 400)
    with pytest.raises(openai.BadRequestError):
        openai.OpenAI(base_url=server[0] + "/v1", api_key="x", max_retries=0).completions.create(
            model="tiny-llama", prompt="x", max_tokens=-3
        )


def _total_steps(base: str) -> int:
    return sum(w["num_steps"] for w in httpx.get(base + "/stats").json()["workers"].values())


def test_client_disconnect_aborts_and_server_keeps_serving(server, client):
    base = server[0]
    steps_before = _total_steps(base)
    with httpx.stream(
        "POST",
        base + "/v1/completions",
        json={"prompt": "x", "max_tokens": 200, "stream": True, "ignore_eos": True},
    ) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                break  # leave after the first chunk: the server must abort the rest
    assert_all_blocks_free(base)
    # Aborted: the engines stopped stepping long before the request's 200 tokens.
    assert _total_steps(base) - steps_before < 150
    r = client.completions.create(prompt="still there?", max_tokens=4, model="tiny-llama")
    assert r.choices[0].finish_reason in ("length", "stop")


CHAT = [
    {"role": "system", "content": "be brief"},
    {
        "role": "user",
        "content": [{"type": "text", "text": "the quick"}, {"type": "text", "text": "fox"}],
    },
]


def test_chat_greedy_equals_completion_on_templated_prompt(server):
    base = server[0]
    r = httpx.post(base + "/tokenize", json={"messages": CHAT})
    assert r.status_code == 200, r.text
    ids = r.json()["tokens"]
    assert r.json()["count"] == len(ids) and r.json()["max_model_len"] == 256
    sampling = {"max_tokens": 10, "temperature": 0, "ignore_eos": True}
    chat = httpx.post(base + "/v1/chat/completions", json={"messages": CHAT, **sampling})
    assert chat.status_code == 200, chat.text
    body = chat.json()
    assert body["id"].startswith("chatcmpl-") and body["object"] == "chat.completion"
    assert body["model"] == "tiny-llama"
    [choice] = body["choices"]
    assert choice["message"]["role"] == "assistant" and choice["finish_reason"] == "length"
    assert choice["logprobs"] is None and "stop_reason" in choice
    assert body["usage"]["prompt_tokens"] == len(ids)
    assert body["usage"]["completion_tokens"] == 10
    cmpl = httpx.post(base + "/v1/completions", json={"prompt": ids, **sampling}).json()
    assert choice["message"]["content"] == cmpl["choices"][0]["text"]


def test_chat_stream_equals_non_stream(client):
    kwargs = dict(
        model="tiny-llama",
        messages=CHAT,
        max_completion_tokens=8,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    full = client.chat.completions.create(**kwargs)
    assert full.choices[0].message.content and full.usage.completion_tokens == 8
    chunks = list(
        client.chat.completions.create(
            stream=True, stream_options={"include_usage": True}, **kwargs
        )
    )
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    with_choices = [c for c in chunks if c.choices]
    text = "".join(c.choices[0].delta.content or "" for c in with_choices)
    assert text == full.choices[0].message.content
    assert with_choices[-1].choices[0].finish_reason == "length"
    assert not chunks[-1].choices and chunks[-1].usage.completion_tokens == 8


def test_chat_stream_sse_shape_without_usage(server):
    body = {"messages": CHAT, "max_tokens": 3, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", server[0] + "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(line[len("data: ") :]) for line in lines[:-1]]
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(e["choices"] for e in events)  # no usage chunk unless asked
    assert events[-1]["choices"][0]["finish_reason"] == "length"


@pytest.mark.parametrize(
    "body,param",
    [
        ({"messages": []}, "messages"),
        ({}, "messages"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages"),
        ({"messages": [{"role": "user", "content": "x " * 400}]}, "messages"),
        ({"messages": CHAT, "max_tokens": 0}, "max_tokens"),
        ({"messages": CHAT, "max_completion_tokens": 0, "max_tokens": 4}, "max_completion_tokens"),
        ({"messages": CHAT, "max_completion_tokens": 5, "max_tokens": 4}, "max_completion_tokens"),
        ({"messages": CHAT, "n": 0}, "n"),
        ({"messages": CHAT, "presence_penalty": 2.5}, "presence_penalty"),
        ({"messages": CHAT, "top_p": 0}, "top_p"),
        ({"messages": CHAT, "top_logprobs": 3}, "top_logprobs"),
        ({"messages": CHAT, "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"messages": CHAT, "logit_bias": {"99999": 1}}, "logit_bias"),
        ({"messages": CHAT, "best_of": 2}, "best_of"),
    ],
)
def test_chat_bad_input_is_400(server, body, param):
    _error(httpx.post(server[0] + "/v1/chat/completions", json=body), 400, param)


def test_chat_unknown_model_is_404(server, client):
    r = httpx.post(server[0] + "/v1/chat/completions", json={"model": "nope", "messages": CHAT})
    _error(r, 404, "model")
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=CHAT)


def test_tokenize_detokenize_round_trip(server):
    base = server[0]
    text = "the quick brown fox"
    r = httpx.post(base + "/tokenize", json={"prompt": text, "model": "tiny-llama"})
    assert r.status_code == 200, r.text
    tokens = r.json()["tokens"]
    assert tokens and r.json()["count"] == len(tokens)
    r = httpx.post(base + "/detokenize", json={"tokens": tokens})
    assert r.status_code == 200, r.text
    assert r.json() == {"prompt": text}
    _error(httpx.post(base + "/detokenize", json={"tokens": [10**9]}), 400, "tokens")
    _error(httpx.post(base + "/detokenize", json={"tokens": [-1]}), 400, "tokens")
    _error(httpx.post(base + "/tokenize", json={}), 400, "prompt")
    _error(httpx.post(base + "/tokenize", json={"messages": []}), 400, "messages")
    _error(httpx.post(base + "/tokenize", json={"prompt": "x", "model": "nope"}), 404, "model")


def test_metrics_with_vllms_names_on_both_deployments(server, client):
    from prometheus_client.parser import text_string_to_metric_families

    base, _ = server
    client.completions.create(model="tiny-llama", prompt=[5, 6, 7], max_tokens=3)

    def scrape() -> dict:
        r = httpx.get(base + "/metrics", timeout=10)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
        return {f.name: f for f in text_string_to_metric_families(r.text)}

    families = scrape()
    for name, kind in [
        ("vllm:time_to_first_token_seconds", "histogram"),
        ("vllm:inter_token_latency_seconds", "histogram"),
        ("vllm:e2e_request_latency_seconds", "histogram"),
        ("vllm:request_success", "counter"),
        ("vllm:prompt_tokens", "counter"),
        ("vllm:generation_tokens", "counter"),
    ]:
        assert families[name].type == kind, name
        for sample in families[name].samples:
            assert sample.labels["model_name"] == "tiny-llama"
    deadline = time.monotonic() + 10
    while "vllm:num_requests_running" not in families:  # the stages push once a second
        assert time.monotonic() < deadline
        time.sleep(0.2)
        families = scrape()
    for name in ("vllm:num_requests_running", "vllm:kv_cache_usage_perc",
                 "vllm:prefix_cache_queries", "vllm:num_preemptions"):  # fmt: skip
        workers = {s.labels["worker"] for s in families[name].samples}
        assert workers, name

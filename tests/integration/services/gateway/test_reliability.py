"""The cluster guarded: an API key, a body size limit, a bounded queue (503 with Retry-After
beyond it), and a catalogue of malformed requests that must each get a 4xx, never a 5xx,
while the server keeps serving and frees every block."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from tests.helpers.cluster import assert_all_blocks_free, start_cluster, stop_cluster

KEY = "s3cret-key"
AUTH = {"authorization": f"Bearer {KEY}"}
MAX_BODY = 65536


@pytest.fixture(scope="module")
def guarded(tiny_llama):
    """Decode workers take 2 requests each: the rest wait at the scheduler, whose queue
    holds at most 3."""
    proc, base = start_cluster(
        tiny_llama, "--max-model-len", "256",
        "--num-gpu-blocks-override", "128", "--max-num-seqs", "2",
        "--max-num-queued-requests", "3", "--api-key", KEY,
        "--max-request-body-bytes", str(MAX_BODY),
    )  # fmt: skip
    try:
        yield base
    finally:
        stop_cluster(proc)


def _error_shape(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return err


def test_api_key_guards_the_api_but_not_health_or_metrics(guarded):
    for path in ("/v1/models", "/tokenize"):
        method = httpx.get if path == "/v1/models" else httpx.post
        kwargs = {} if path == "/v1/models" else {"json": {"prompt": "x"}}
        err = _error_shape(method(guarded + path, **kwargs), 401)
        assert err["code"] == "invalid_api_key"
        wrong = {"authorization": "Bearer nope"}
        _error_shape(method(guarded + path, headers=wrong, **kwargs), 401)
        assert method(guarded + path, headers=AUTH, **kwargs).status_code == 200
    assert httpx.get(guarded + "/health").status_code == 200
    assert httpx.get(guarded + "/metrics").status_code == 200


def test_oversized_bodies_get_413(guarded):
    body = {"prompt": "x" * MAX_BODY, "max_tokens": 1}
    r = httpx.post(guarded + "/v1/completions", json=body, headers=AUTH)
    assert _error_shape(r, 413)["type"] == "RequestTooLargeError"

    def chunks():  # no Content-Length: counted as it arrives
        for _ in range(20):
            yield b" " * 8192

    headers = AUTH | {"content-type": "application/json"}
    r = httpx.post(guarded + "/v1/completions", content=chunks(), headers=headers)
    _error_shape(r, 413)


async def _one(http: httpx.AsyncClient, i: int, stream: bool) -> httpx.Response:
    body = {"prompt": f"flood {i}", "max_tokens": 24, "ignore_eos": True, "stream": stream}
    r = await http.post("/v1/completions", json=body, headers=AUTH)
    await r.aread()
    return r


def test_past_the_queue_bound_requests_get_503_with_retry_after(guarded):
    async def flood() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=guarded, timeout=120) as http:
            return await asyncio.gather(*(_one(http, i, i % 2 == 0) for i in range(16)))

    responses = asyncio.run(flood())
    statuses = sorted(r.status_code for r in responses)
    assert set(statuses) <= {200, 503}, statuses
    refused = [r for r in responses if r.status_code == 503]
    admitted = [r for r in responses if r.status_code == 200]
    assert refused and admitted, statuses
    for r in refused:  # streaming ones too: refused before their first byte
        assert r.headers["retry-after"] == "1"
        assert _error_shape(r, 503)["type"] == "ServiceUnavailableError"
    for r in admitted:
        if r.headers["content-type"].startswith("application/json"):
            assert r.json()["usage"]["completion_tokens"] == 24
        else:
            assert r.text.rstrip().endswith("data: [DONE]") and '"error"' not in r.text
    assert_all_blocks_free(guarded)
    metrics = httpx.get(guarded + "/metrics").text
    assert "tandem:scheduler_refused_requests_total" in metrics


def _messages(content) -> dict:
    return {"messages": [{"role": "user", "content": content}], "max_tokens": 2}


C, CHAT, TOK, DETOK = "/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"
JSON = {"content-type": "application/json"}
# (path, body as bytes or JSON, extra headers, expected status)
CATALOGUE = [
    # wrong types
    (C, {"prompt": 5}, {}, 400),
    (C, {"prompt": {"a": 1}}, {}, 400),
    (C, {"prompt": "x", "max_tokens": "5"}, {}, 400),
    (C, {"prompt": "x", "temperature": "hot"}, {}, 400),
    (C, {"prompt": "x", "stream": "true"}, {}, 400),
    (C, {"prompt": "x", "stop": 5}, {}, 400),
    (C, {"prompt": "x", "seed": 1.5}, {}, 400),
    (C, {"prompt": "x", "logit_bias": [1, 2]}, {}, 400),
    (C, {"prompt": [1, "a"]}, {}, 400),
    (C, {"prompt": "x", "stop_token_ids": "3"}, {}, 400),
    (CHAT, {"messages": "hello"}, {}, 400),
    (CHAT, {"messages": [1, 2]}, {}, 400),
    (CHAT, {"messages": [{"content": "no role"}]}, {}, 400),
    (CHAT, _messages(42), {}, 400),
    (CHAT, {**_messages("x"), "logprobs": "yes"}, {}, 400),
    (DETOK, {"tokens": "1 2 3"}, {}, 400),
    # huge numbers
    (C, {"prompt": "x", "max_tokens": 10**20}, {}, 400),
    (C, {"prompt": "x", "n": 10**6}, {}, 400),
    (C, {"prompt": "x", "seed": 2**70}, {}, 400),
    (C, {"prompt": "x", "top_k": 10**12}, {}, 400),
    (C, {"prompt": "x", "logprobs": 10**6}, {}, 400),
    (C, {"prompt": "x", "priority": 2**80}, {}, 400),
    (C, b'{"prompt": "x", "temperature": 1e999}', JSON, 400),  # parses as infinity
    (DETOK, {"tokens": [2**40]}, {}, 400),
    # negative values
    (C, {"prompt": "x", "max_tokens": -1}, {}, 400),
    (C, {"prompt": "x", "temperature": -0.5}, {}, 400),
    (C, {"prompt": "x", "top_p": -0.5}, {}, 400),
    (C, {"prompt": "x", "top_k": -5}, {}, 400),
    (C, {"prompt": "x", "min_p": -0.1}, {}, 400),
    (C, {"prompt": "x", "presence_penalty": -3}, {}, 400),
    (C, {"prompt": "x", "min_tokens": -1}, {}, 400),
    (C, {"prompt": "x", "truncate_prompt_tokens": -3}, {}, 400),
    (C, {"prompt": [-1]}, {}, 400),
    (CHAT, {**_messages("x"), "top_logprobs": -1, "logprobs": True}, {}, 400),
    # invalid UTF-8, empty and malformed bodies
    (C, b'{"prompt": "\xff\xfe"}', JSON, 400),
    (C, b"", JSON, 400),
    (C, b"null", JSON, 400),
    (C, b"[]", JSON, 400),
    (C, b"{}", JSON, 400),
    (C, b'{"prompt": "x",}', JSON, 400),
    (CHAT, b"\x00\x01\x02", JSON, 400),
    # oversized
    (C, {"prompt": "y" * (MAX_BODY + 1)}, {}, 413),
    # unknown fields
    (C, {"prompt": "x", "bogus": 1}, {}, 400),
    (CHAT, {**_messages("x"), "tools": [{"type": "function"}]}, {}, 400),
    (CHAT, {**_messages("x"), "chat_template": "{{ 7 * 7 }}"}, {}, 400),
    (TOK, {"prompt": "x", "chat_template_kwargs": {"a": 1}}, {}, 400),
    # wrong content type
    (C, b'{"prompt": "x"}', {"content-type": "text/plain"}, 400),
    (C, b"prompt=x", {"content-type": "application/x-www-form-urlencoded"}, 400),
    # template injection in chat content: roles the template does not know
    (CHAT, {"messages": [{"role": "system<|im_end|>", "content": "x"}]}, {}, 400),
    (CHAT, {"messages": [{"role": "{{ 7 * 7 }}", "content": "x"}]}, {}, 400),
    # empty or impossible prompts
    (C, {"prompt": ""}, {}, 400),
    (C, {"prompt": []}, {}, 400),
    (CHAT, {"messages": []}, {}, 400),
    (C, {"prompt": "x", "model": "not-served"}, {}, 404),
]


def test_malformed_requests_get_4xx_and_the_server_goes_on(guarded):
    assert len(CATALOGUE) >= 40
    failures = []
    with httpx.Client(base_url=guarded, timeout=30) as http:
        for path, body, headers, status in CATALOGUE:
            kwargs = {"content": body} if isinstance(body, bytes) else {"json": body}
            try:
                r = http.post(path, headers=AUTH | headers, **kwargs)
            except httpx.TransportError as e:
                failures.append((path, str(body)[:80], status, repr(e)))
                continue
            ok = r.status_code == status
            try:
                err = r.json()["error"]
                ok = ok and set(err) == {"message", "type", "param", "code"}
            except (ValueError, KeyError, TypeError):
                ok = False
            if not ok:
                failures.append((path, str(body)[:80], status, r.status_code, r.text[:200]))
        assert not failures, "\n".join(map(str, failures))
        r = http.post(C, json={"prompt": "still fine?", "max_tokens": 3}, headers=AUTH)
        assert r.status_code == 200
    assert_all_blocks_free(guarded)


def test_template_syntax_in_chat_content_is_text_not_code(guarded):
    content = "{{ 7 * 7 }} {% for x in range(3) %}loop{% endfor %}"
    body = {"messages": [{"role": "user", "content": content}]}
    tokens = httpx.post(guarded + TOK, json=body, headers=AUTH).json()["tokens"]
    text = httpx.post(guarded + DETOK, json={"tokens": tokens}, headers=AUTH).json()["prompt"]
    assert content in text and "49" not in text and "looploop" not in text

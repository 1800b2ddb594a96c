"""The gateway's HTTP side as vLLM's flags set it (CORS, root path, served names, docs,
request logs), over an engine client that answers with fixed tokens."""

from __future__ import annotations

import logging

from fastapi.testclient import TestClient

from tandem.engine.client import GenerationChunk, PreparedPrompt
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
        async def stream():
            yield GenerationChunk("ok", [7], "stop", num_prompt_tokens=2)

        prompts = [PreparedPrompt([1, 2], "hi")] * inputs.num_prompts
        return prompts, [stream() for _ in inputs.request_ids]

    async def abort(self, request_id: str) -> None:
        pass

    async def shutdown(self) -> None:
        pass


def client(root_path: str = "", **settings) -> TestClient:
    base = {"served_model_names": ("tiny", "alias"), "model_path": "/models/tiny"}
    app = build_app(FixedClient(), GatewaySettings(**(base | settings)))
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

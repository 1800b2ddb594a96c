"""Property-based fuzz of the gateway against its own OpenAPI schema (schemathesis):
valid bodies and bodies that break the schema, on every operation, never get a 5xx, and the
server still answers and has every KV block back afterwards. Bounded in examples and time."""

from __future__ import annotations

import time

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from tests.helpers.cluster import assert_all_blocks_free, start_cluster, stop_cluster

EXAMPLES_PER_MODE = 40
BUDGET_S_PER_OPERATION = 25.0


@pytest.fixture(scope="module")
def colocated(tiny_llama):
    proc, base = start_cluster(
        tiny_llama, "--colocated", "--max-model-len", "128", "--num-gpu-blocks-override", "64"
    )
    try:
        yield base
    finally:
        stop_cluster(proc)


def _operations(base: str):
    raw = httpx.get(base + "/openapi.json", timeout=10).json()
    schema = schemathesis.openapi.from_dict(raw)
    ops = [result.ok() for result in schema.get_all_operations()]
    assert any(op.path == "/v1/chat/completions" for op in ops), [op.path for op in ops]
    return ops


def _fuzz(op, base: str, mode: GenerationMode, seen: list) -> None:
    deadline = time.monotonic() + BUDGET_S_PER_OPERATION

    @settings(
        max_examples=EXAMPLES_PER_MODE,
        deadline=None,
        database=None,
        derandomize=True,  # the same cases on every run: a failure reproduces
        suppress_health_check=list(HealthCheck),
    )
    @given(case=op.as_strategy(generation_mode=mode))
    def run(case):
        if time.monotonic() > deadline:
            return
        response = case.call(base_url=base, timeout=30)
        seen.append(response.status_code)
        assert response.status_code < 500, (
            f"{case.method} {case.path} {mode.value}: {response.status_code} "
            f"{response.text[:300]} for body {case.body!r:.300}"
        )

    try:
        run()
    except Unsatisfiable:  # an operation with no input to break (GET /health): no negatives
        assert mode is GenerationMode.NEGATIVE, op.label


def test_the_gateway_fuzzed_against_its_openapi_schema_never_answers_5xx(colocated):
    seen: list[int] = []
    for op in _operations(colocated):
        if op.path == "/metrics":  # plain text, no body: nothing to fuzz
            continue
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            _fuzz(op, colocated, mode, seen)
    assert len(seen) > 100, len(seen)
    assert any(400 <= s < 500 for s in seen) and 200 in seen, sorted(set(seen))
    r = httpx.post(colocated + "/v1/completions", json={"prompt": "still", "max_tokens": 2})
    assert r.status_code == 200, r.text
    assert_all_blocks_free(colocated)

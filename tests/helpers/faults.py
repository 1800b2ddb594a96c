"""A load of completions with a fault injected while it runs, and what tests of faults
wait on (the cluster's /stats)."""

from __future__ import annotations

import asyncio
import time

import httpx

MAX_TOKENS = 200


async def complete(http: httpx.AsyncClient, prompt: str) -> dict:
    body = {"prompt": prompt, "max_tokens": MAX_TOKENS, "ignore_eos": True, "temperature": 0,
            "return_token_ids": True}  # fmt: skip
    r = await http.post("/v1/completions", json=body)
    return {"status": r.status_code, "body": r.json()}


def stats(base: str) -> dict:
    return httpx.get(base + "/stats", timeout=5).json()["workers"]


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def run_with_fault(base: str, prompts: list[str], fault) -> list[dict]:
    """The prompts concurrently; `fault()` once the load is on."""

    async def scenario():
        async with httpx.AsyncClient(base_url=base, timeout=120) as http:
            tasks = [asyncio.create_task(complete(http, p)) for p in prompts]
            await asyncio.to_thread(fault)
            return await asyncio.wait_for(asyncio.gather(*tasks), 120)

    return asyncio.run(scenario())


def reference(base: str, prompts: list[str]) -> list[list[int]]:
    results = run_with_fault(base, prompts, lambda: None)
    assert all(r["status"] == 200 for r in results), results
    return [r["body"]["choices"][0]["token_ids"] for r in results]

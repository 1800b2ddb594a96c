"""Load generation for `tandem bench serve`: prompts, arrivals, streaming requests, figures.

Every request is a streaming /v1/completions call on token ids with EOS ignored, so each one
produces exactly the asked-for number of tokens; times are taken as the client receives them.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import time
from dataclasses import dataclass, field
from itertools import accumulate
from pathlib import Path

import httpx
import numpy as np

from tandem.bench.progress import RequestBar

DEFAULT_VOCAB_SIZE = 49152  # SmolLM2's, the default model
SSE_DONE = "[DONE]"
TIMEOUT = httpx.Timeout(600.0, connect=30.0, pool=None)

# -- pure helpers ----------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100), linearly interpolated; 0.0 for no values."""
    return float(np.percentile(values, q)) if values else 0.0


def stats_ms(values_s: list[float]) -> dict[str, float]:
    """Mean, p50, p90 and p99 of durations given in seconds, in milliseconds."""
    ms = [v * 1000.0 for v in values_s]
    mean = sum(ms) / len(ms) if ms else 0.0
    return {"mean": mean, **{f"p{q}": percentile(ms, q) for q in (50, 90, 99)}}


def poisson_gaps(n: int, rate: float, seed: int) -> list[float]:
    """n exponential inter-arrival gaps for a Poisson process of `rate` per second (inf: 0)."""
    if math.isinf(rate):
        return [0.0] * n
    rng = random.Random(seed)
    return [rng.expovariate(rate) for _ in range(n)]


def arrival_offsets(n: int, rate: float, seed: int) -> list[float]:
    """When each request arrives, in seconds from the start; the first at 0."""
    return list(accumulate(poisson_gaps(n - 1, rate, seed), initial=0.0))[:n]


def arrivals_within(duration_s: float, rate: float, seed: int | str) -> list[float]:
    """Poisson arrival offsets in [0, duration_s), the first at 0 (so never none)."""
    rng, offsets, t = random.Random(seed), [], 0.0
    while t < duration_s:
        offsets.append(t)
        t += rng.expovariate(rate)
    return offsets


def random_token_ids(rng: random.Random, length: int, vocab_size: int) -> list[int]:
    """A prompt of random token ids in [10, vocab_size - 10): clear of the special ids."""
    if vocab_size <= 20:
        raise ValueError(f"vocab_size must be > 20, got {vocab_size}")
    return [rng.randrange(10, vocab_size - 10) for _ in range(length)]


def random_prompts(n: int, length: int, vocab_size: int, seed: int) -> list[list[int]]:
    """n distinct prompts of random token ids in [10, vocab_size - 10) (no shared prefixes
    in practice, so no prefix-cache hits between requests)."""
    rng = random.Random(seed)
    prompts: list[list[int]] = []
    seen: set[tuple[int, ...]] = set()
    while len(prompts) < n:
        ids = random_token_ids(rng, length, vocab_size)
        if tuple(ids) not in seen:
            seen.add(tuple(ids))
            prompts.append(ids)
    return prompts


def parse_sse_line(line: str) -> dict | str | None:
    """One line of an SSE stream: its JSON payload, SSE_DONE, or None (not a data line)."""
    if not line.startswith("data:"):
        return None
    data = line[len("data:") :].strip()
    if data == SSE_DONE:
        return SSE_DONE
    return json.loads(data) if data else None


def content_times(events: list[tuple[float, dict]]) -> list[float]:
    """Arrival times of a stream's content chunks: every event with choices (the gateway
    sends one per engine step)."""
    return [t for t, event in events if event.get("choices")]


@dataclass(slots=True)
class RequestResult:
    """One request's timings in seconds (ok) or why it failed."""

    ok: bool
    ttft: float = 0.0
    itl: list[float] = field(default_factory=list)
    e2e: float = 0.0
    output_tokens: int | None = None
    error: str | None = None


def result_from_events(
    start: float, events: list[tuple[float, dict]], end: float, done: bool, expected: int
) -> RequestResult:
    """Timings from a stream's (arrival time, event) pairs; usage gives the token count."""
    for _, event in events:
        if "error" in event:
            return RequestResult(False, error=f"stream error: {event['error'].get('message')}")
    times = content_times(events)
    usages = [event["usage"] for _, event in events if event.get("usage")]
    tokens = usages[-1].get("completion_tokens") if usages else None
    error = None
    if not done:
        error = "stream ended before [DONE]"
    elif not times:
        error = "no content chunks"
    elif tokens != expected:
        error = f"{tokens} output tokens, expected {expected}"
    if error is not None:
        return RequestResult(False, output_tokens=tokens, error=error)
    itl = [b - a for a, b in zip(times, times[1:])]
    return RequestResult(True, times[0] - start, itl, end - start, tokens)


def tpot(result: RequestResult) -> float:
    """A request's mean gap between output tokens, in seconds (0 for a single token)."""
    n = result.output_tokens or 0
    return (result.e2e - result.ttft) / (n - 1) if n > 1 else 0.0


SAMPLES = "samples"  # the key of a run's raw samples among its figures, taken out before JSON


@dataclass(frozen=True, slots=True)
class LatencySamples:
    """A run's raw latencies in seconds, for plots (the JSON report has their statistics)."""

    ttft_s: list[float]
    itl_s: list[float]


def latency_samples(results: list[RequestResult]) -> LatencySamples:
    done = [r for r in results if r.ok]
    return LatencySamples([r.ttft for r in done], [gap for r in done for gap in r.itl])


def summarize(results: list[RequestResult], duration_s: float) -> dict:
    """The run's figures: counts, throughput, latency stats in ms, per-request token counts."""
    done = [r for r in results if r.ok]
    output_tokens = sum(r.output_tokens or 0 for r in done)
    return {
        "completed": len(done),
        "failed": len(results) - len(done),
        "duration_s": duration_s,
        "request_throughput": len(done) / duration_s if duration_s > 0 else 0.0,
        "output_tok_s": output_tokens / duration_s if duration_s > 0 else 0.0,
        "total_output_tokens": output_tokens,
        "ttft_ms": stats_ms([r.ttft for r in done]),
        "tpot_ms": stats_ms([tpot(r) for r in done if (r.output_tokens or 0) > 1]),
        "itl_ms": stats_ms([gap for r in done for gap in r.itl]),
        "e2e_ms": stats_ms([r.e2e for r in done]),
        "output_lens": [r.output_tokens for r in results],
        "errors": sorted({r.error for r in results if r.error})[:10],
    }


# -- the server ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ServerInfo:
    """What the load needs to know about the server: its context limit and vocabulary."""

    max_model_len: int  # 0: unknown
    vocab_size: int


def vocab_size_of(model_path: str | None) -> int | None:
    """The vocabulary size in a model folder's config.json, if there is one."""
    config = Path(model_path or "") / "config.json"
    if not model_path or not config.is_file():
        return None
    data = json.loads(config.read_text())
    return data.get("vocab_size") or data.get("text_config", {}).get("vocab_size")


def server_info(url: str, model: str | None, vocab_size: int | None) -> ServerInfo:
    """Ask /v1/models for the context limit; the vocabulary from the flag, else the model's
    config (ours, else the server's folder), else the default model's."""
    card = httpx.get(f"{url}/v1/models", timeout=30.0).raise_for_status().json()["data"][0]
    vocab = (
        vocab_size or vocab_size_of(model) or vocab_size_of(card.get("root")) or DEFAULT_VOCAB_SIZE
    )
    return ServerInfo(card.get("max_model_len") or 0, vocab)


def client(url: str, max_connections: int | None) -> httpx.AsyncClient:
    """An HTTP client for the load (max_connections None: no cap)."""
    limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=None)
    return httpx.AsyncClient(base_url=url, limits=limits, timeout=TIMEOUT)


# -- load ------------------------------------------------------------------------------------


async def send_request(
    client: httpx.AsyncClient,
    prompt: list[int],
    output_len: int,
    events: list[tuple[float, dict]] | None = None,
    extra_body: dict | None = None,
) -> RequestResult:
    """One streaming completion (greedy unless `extra_body` says otherwise), timed from send
    to [DONE]. Pass `events` to watch the stream's (arrival time, event) pairs as they
    come, even if the request is cancelled."""
    body = {"prompt": prompt, "max_tokens": output_len, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
    body |= extra_body or {}
    events = [] if events is None else events
    done = False
    start = time.perf_counter()
    try:
        async with client.stream("POST", "/v1/completions", json=body) as resp:
            if resp.status_code != 200:
                text = (await resp.aread()).decode(errors="replace")
                return RequestResult(False, error=f"HTTP {resp.status_code}: {text[:200]}")
            async for line in resp.aiter_lines():
                now, event = time.perf_counter(), parse_sse_line(line)
                if event == SSE_DONE:
                    done = True
                    break
                if isinstance(event, dict):
                    events.append((now, event))
    except (httpx.HTTPError, ValueError) as e:
        return RequestResult(False, error=f"{type(e).__name__}: {e}")
    return result_from_events(start, events, time.perf_counter(), done, output_len)


async def warm_up(client: httpx.AsyncClient, prompts: list[list[int]], output_len: int) -> None:
    """Send these at once and wait: first-call costs stay out of the timed load."""
    results = await asyncio.gather(*(send_request(client, p, output_len) for p in prompts))
    if not all(r.ok for r in results):
        raise RuntimeError(f"warm-up failed: {[r.error for r in results if not r.ok]}")


async def run_load(
    url: str,
    prompts: list[list[int]],
    output_len: int,
    max_concurrency: int,
    rate: float,
    seed: int,
    extra_body: dict | list[dict] | None = None,
    desc: str = "requests",
) -> tuple[list[RequestResult], float]:
    """Two warm-up requests (prompts[:2]), then the rest at Poisson arrivals, at most
    max_concurrency in flight (<= 0: no cap), a bar named `desc` on a terminal's stderr.
    `extra_body`: added to every request's body, or a list that request i takes entry
    i mod its length of. Returns the results and the duration."""
    bodies = extra_body if isinstance(extra_body, list) else [extra_body]
    limit = max_concurrency if max_concurrency > 0 else len(prompts)
    sem = asyncio.Semaphore(limit)
    async with client(url, limit + 2) as http:
        await warm_up(http, prompts[:2], 4)
        timed = prompts[2:]
        offsets = arrival_offsets(len(timed), rate, seed)
        with RequestBar(len(timed), desc) as bar:
            start = time.perf_counter()

            async def one(prompt: list[int], offset: float, body: dict | None) -> RequestResult:
                await asyncio.sleep(max(0.0, start + offset - time.perf_counter()))
                async with sem:
                    bar.sent()
                    result = await send_request(http, prompt, output_len, extra_body=body)
                bar.done(result.ok)
                return result

            results = await asyncio.gather(
                *(
                    one(p, o, bodies[i % len(bodies)])
                    for i, (p, o) in enumerate(zip(timed, offsets))
                )
            )
            return list(results), time.perf_counter() - start


async def wait_idle(http: httpx.AsyncClient, timeout: float) -> bool:
    """Wait until `/stats` shows no running or waiting request on any worker (the last load
    has drained); False if that did not happen within `timeout` seconds."""
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        workers = (await http.get("/stats")).raise_for_status().json().get("workers", {})
        if not any(w.get("num_running") or w.get("num_waiting") for w in workers.values()):
            return True
        await asyncio.sleep(0.25)
    return False

"""`tandem bench embed`: embeddings per second against sentence-transformers, same machine,
same run, same sentences.

1,024 sentences of mixed length (16-256 tokens, seeded, so every side sees the same),
embedded by Tandem in-process (`LLM.embed`, its default dtype), by a served Tandem (the
default cluster over HTTP: 32 clients, 16 sentences per request), and by
sentence-transformers' `encode` in this process at its best of fp32 and bf16 and of batch
sizes 16 to 128 (as `bench offline` takes Hugging Face's best). Prints texts/s and the
ratios; `--json` writes `offline_ratio` and `served_ratio` with the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import random
import time
from pathlib import Path

WORDS = (
    "the a of data model river quick brown fox jumps over lazy dog network vector "
    "search query document embedding server cluster token budget paged cache prefix "
    "scheduler worker gateway latency throughput memory kernel attention layer norm"
).split()


def sentences(n: int, seed: int, tokenizer, lo: int = 16, hi: int = 256) -> list[str]:
    """n texts whose token counts spread evenly over [lo, hi] (the tokenizer's own count)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        target = rng.randint(lo, hi)
        words = [rng.choice(WORDS) for _ in range(target)]
        text = " ".join(words)
        while len(tokenizer(text)["input_ids"]) > hi and len(words) > 1:
            words = words[: int(len(words) * 0.9)]
            text = " ".join(words)
        out.append(text)
    return out


def bench_sentence_transformers(model_dir: str, texts: list[str]) -> dict:
    """texts/s of `encode`, best of fp32/bf16 x batch sizes 16..128 (each after a warm-up)."""
    import torch
    from sentence_transformers import SentenceTransformer

    results = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = SentenceTransformer(model_dir, device="cpu", model_kwargs={"dtype": dtype})
        for batch in (16, 32, 64, 128):
            model.encode(texts[:batch], batch_size=batch, show_progress_bar=False)
            start = time.perf_counter()
            model.encode(texts, batch_size=batch, show_progress_bar=False)
            rate = len(texts) / (time.perf_counter() - start)
            results[f"{str(dtype).removeprefix('torch.')}_b{batch}"] = rate
            print(f"  sentence-transformers {dtype} batch {batch}: {rate:.1f} texts/s", flush=True)
    best = max(results, key=results.get)
    return {"best": best, "texts_s": results[best], "all": results}


def bench_offline(model_dir: str, texts: list[str], dtype: str) -> float:
    from tandem.engine.llm import LLM

    llm = LLM(model_dir, dtype=dtype)
    llm.embed(texts[:64])  # warm-up
    start = time.perf_counter()
    llm.embed(texts)
    return len(texts) / (time.perf_counter() - start)


async def _drive(url: str, texts: list[str], clients: int, per_request: int) -> float:
    import httpx

    batches = [texts[i : i + per_request] for i in range(0, len(texts), per_request)]
    queue: asyncio.Queue = asyncio.Queue()
    for batch in batches:
        queue.put_nowait(batch)

    async with httpx.AsyncClient(timeout=600) as http:

        async def worker() -> None:  # noqa: E306
            while not queue.empty():
                batch = queue.get_nowait()
                r = await http.post(url + "/v1/embeddings", json={"input": batch})
                r.raise_for_status()

        await http.post(url + "/v1/embeddings", json={"input": texts[:per_request]})  # warm
        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        return len(texts) / (time.perf_counter() - start)


def bench_served(model: str, texts: list[str], clients: int, per_request: int,
                 timeout: float) -> float:  # fmt: skip
    from tandem.bench.deploy import deployment

    with deployment(["--model", model], timeout) as (url, _pid):
        return asyncio.run(_drive(url, texts, clients, per_request))


def cmd_bench_embed(args: argparse.Namespace) -> int:
    logging.getLogger("httpx").setLevel(logging.WARNING)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    from tandem.model_source import resolve_model

    model_dir = resolve_model(args.model)
    texts = sentences(args.num_texts, args.seed, AutoTokenizer.from_pretrained(model_dir))
    print(f"{len(texts)} texts of 16-256 tokens, {os.cpu_count()} cores; torch threads: "
          "all cores for each side, one side at a time", flush=True)  # fmt: skip
    report: dict = {"model": args.model, "num_texts": len(texts)}
    try:
        report["sentence_transformers"] = bench_sentence_transformers(model_dir, texts)
    except ImportError:
        raise SystemExit("sentence-transformers is missing: it is in the dev extra") from None
    baseline = report["sentence_transformers"]["texts_s"]
    print(f"sentence-transformers, best ({report['sentence_transformers']['best']}): "
          f"{baseline:.1f} texts/s", flush=True)  # fmt: skip
    offline = bench_offline(model_dir, texts, args.dtype)
    report |= {"offline_texts_s": offline, "offline_ratio": offline / baseline}
    print(f"tandem offline ({args.dtype}): {offline:.1f} texts/s, "
          f"{offline / baseline:.2f}x", flush=True)  # fmt: skip
    if not args.skip_served:
        served = bench_served(args.model, texts, args.clients, args.per_request,
                              args.startup_timeout)  # fmt: skip
        report |= {"served_texts_s": served, "served_ratio": served / baseline}
        print(
            f"tandem served (default cluster, {args.clients} clients, {args.per_request} "
            f"per request): {served:.1f} texts/s, {served / baseline:.2f}x",
            flush=True,
        )
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


def add_bench_embed_parser(bench_sub: argparse._SubParsersAction) -> None:
    p = bench_sub.add_parser("embed", help="embeddings: Tandem against sentence-transformers")
    p.add_argument("--model", default="all-MiniLM-L6-v2")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--num-texts", type=int, default=1024)
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--per-request", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-served", action="store_true")
    p.add_argument("--startup-timeout", type=float, default=300.0)
    p.add_argument("--json", default=None, help="write the figures to this file")
    p.set_defaults(func=cmd_bench_embed)

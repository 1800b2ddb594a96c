"""One load through vLLM's own benchmark client (`benchmarks/backend_request_func.py` of
vLLM's source package), for `tandem bench peer`.

It runs in the peer tools' virtualenv (see bench/peer.py), not Tandem's: it imports only
the standard library and vLLM's request functions (aiohttp, transformers). Input: a JSON
file of prompts; output: a JSON file of per-request results and the load's wall time.

    python peer_client.py --client-dir D --url URL --model NAME --prompts P.json \
        --output-len 128 --concurrency 32 --warmup 4 --out R.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time


async def run(args: argparse.Namespace, prompts: list[dict]) -> dict:
    from backend_request_func import RequestFuncInput, async_request_openai_completions

    limit = asyncio.Semaphore(args.concurrency)

    async def one(item: dict) -> dict:
        request = RequestFuncInput(
            prompt=item["prompt"], api_url=f"{args.url}/v1/completions",
            prompt_len=item["prompt_len"], output_len=args.output_len, model=args.model,
            ignore_eos=True,
        )  # fmt: skip
        async with limit:
            out = await async_request_openai_completions(request)
        # A server whose last chunk carries the usage with an empty choice (llama.cpp's)
        # adds a gap of ~0 after the last token: gaps past the tokens are not the server's.
        gaps = out.itl[: max(out.output_tokens - 1, 0)] if out.output_tokens else out.itl
        return {"success": out.success, "ttft": out.ttft, "itl": gaps,
                "latency": out.latency, "output_tokens": out.output_tokens,
                "error": out.error[-500:]}  # fmt: skip

    warm, measured = prompts[: args.warmup], prompts[args.warmup :]
    if warm:
        await asyncio.gather(*(one(item) for item in warm))
    start = time.perf_counter()
    results = await asyncio.gather(*(one(item) for item in measured))
    return {"duration_s": time.perf_counter() - start, "results": results}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--client-dir", required=True, help="the folder of backend_request_func.py")
    p.add_argument("--url", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--prompts", required=True)
    p.add_argument("--output-len", type=int, required=True)
    p.add_argument("--concurrency", type=int, required=True)
    p.add_argument("--warmup", type=int, default=0, help="the first N prompts, not measured")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    sys.path.insert(0, args.client_dir)
    with open(args.prompts) as f:
        prompts = json.load(f)
    report = asyncio.run(run(args, prompts))
    with open(args.out, "w") as f:
        json.dump(report, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())

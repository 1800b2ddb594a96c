"""`tandem bench serve --workload spec`: what speculative decoding buys, and costs.

The disaggregated cluster with its default flags, started without speculation and then with
`--spec-config` (default: n-gram, 4 tokens, lookups of 2-4), one after the other. On each:

- input-grounded: each text and code file in `tandem/bench/data/spec/` in a chat prompt that
  asks for it back with one name renamed, greedy, `--spec-output-len` (256) tokens;
- random-token: the throughput load's random prompts (`--input-len`), the same length out;

each at 1 and at 8 clients. Per load: TPOT and ITL p50/p99, output tok/s, and (with
speculation) the acceptance rate and mean accepted length from the decode workers'
`vllm:spec_decode_*` counters. Without speculation, the throughput load at 1 client
(`--input-len`, `--output-len`) also runs: the plain server's TPOT, against which the
no-speculation run's own is checked. `tpot_ratio_*` = TPOT p50 with / without.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
from pathlib import Path

import httpx

from tandem.bench.load import ServerInfo, random_prompts, run_load, summarize

DATA = Path(__file__).with_name("data") / "spec"
DEFAULT_SPEC = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 2,
                "prompt_lookup_max": 4}  # fmt: skip
# (file, name to rename, its new name)
RENAMES = [("inventory.py.txt", "quantity", "count"), ("retry.py.txt", "delay", "pause"),
           ("lighthouse.txt", "keeper", "warden"), ("config.json", "orders", "sales")]  # fmt: skip
CLIENTS = (1, 8)
SPEC_METRICS = ("num_drafts", "num_draft_tokens", "num_accepted_tokens")
DRAFT_METRICS = ("draft_catch_up_tokens", "draft_catch_up_seconds", "draft_seconds")


def add_arguments(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--spec-config", default=json.dumps(DEFAULT_SPEC),
                   help="--speculative-config of the speculating cluster")  # fmt: skip
    g.add_argument("--spec-output-len", type=int, default=256)


def deployments(args: argparse.Namespace) -> dict[str, list[str]]:
    return {"no-spec": [], "spec": ["--speculative-config", args.spec_config]}


def grounded_prompts(model: str | None) -> list[list[int]]:
    from tandem.engine.preprocess import render_chat
    from tandem.engine.tokenizer import load_tokenizer
    from tandem.model_prep import default_model_dir

    tokenizer = load_tokenizer(model or str(default_model_dir()))
    prompts = []
    for file, old, new in RENAMES:
        text = (DATA / file).read_text()
        ask = f"Repeat the text below exactly, renaming `{old}` to `{new}` everywhere.\n\n{text}"
        prompts.append(render_chat(tokenizer, [{"role": "user", "content": ask}], True)[1])
    return prompts


def spec_counters(url: str) -> dict[str, float]:
    """The decode workers' vllm:spec_decode_* counters and a draft model's cost
    (tandem:spec_decode_draft_*), summed (zeros without them)."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return {
        name: sum(float(v) for v in re.findall(
            rf"^(?:vllm|tandem):spec_decode_{name}_total\{{[^}}]*\}} (\S+)", text, re.M))
        for name in SPEC_METRICS + DRAFT_METRICS
    }  # fmt: skip


def _load(url: str, prompts: list[list[int]], output_len: int, clients: int, args) -> dict:
    before = spec_counters(url)
    results, duration = asyncio.run(
        run_load(url, prompts[:2] + prompts, output_len, clients, float("inf"), args.seed)
    )
    after = spec_counters(url)
    f = summarize(results, duration)
    delta = {k: after[k] - before[k] for k in SPEC_METRICS + DRAFT_METRICS}
    drafts, proposed = delta["num_drafts"], delta["num_draft_tokens"]
    f["acceptance_rate"] = delta["num_accepted_tokens"] / proposed if proposed else None
    f["mean_accepted_length"] = 1 + delta["num_accepted_tokens"] / drafts if drafts else None
    if delta["draft_seconds"]:  # a draft model: its prompt recompute and its share of the load
        caught = delta["draft_catch_up_tokens"]
        f["draft_catch_up_ms_per_token"] = (
            1000 * delta["draft_catch_up_seconds"] / caught if caught else None)  # fmt: skip
        f["draft_busy_fraction"] = delta["draft_seconds"] / duration
    return f


def run(name: str, url: str, info: ServerInfo, args: argparse.Namespace) -> dict:
    grounded = grounded_prompts(args.model)
    rand = random_prompts(8, args.input_len, info.vocab_size, args.seed)
    figures = {}
    for kind, prompts in (("grounded", grounded), ("random", rand)):
        for clients in CLIENTS:
            batch = (prompts * 2)[: max(len(prompts), clients)] if clients > 1 else prompts[:4]
            f = _load(url, batch, args.spec_output_len, clients, args)
            figures[f"{kind}_c{clients}"] = f
            rate = f["acceptance_rate"]
            print(f"{name} {kind} at {clients} client(s): TPOT p50 {f['tpot_ms']['p50']:.1f} ms, "
                  f"ITL p99 {f['itl_ms']['p99']:.1f} ms, {f['output_tok_s']:.1f} tok/s"
                  + ("" if rate is None else f", acceptance {rate:.2f}, mean accepted length "
                     f"{f['mean_accepted_length']:.2f}")
                  + ("" if "draft_busy_fraction" not in f else
                     f", draft busy {f['draft_busy_fraction']:.0%} of the load, its prompt"
                     f" recompute {f['draft_catch_up_ms_per_token'] or 0:.2f} ms/token")
                  )  # fmt: skip
    if name == "no-spec":
        prompts = random_prompts(6, args.input_len, info.vocab_size, args.seed + 1)
        figures["plain_c1"] = _load(url, prompts[:4], args.output_len, 1, args)
    return figures


def report(runs: dict[str, dict], args: argparse.Namespace) -> tuple[dict, bool]:
    off, on = runs["no-spec"], runs["spec"]
    loads = [f"{kind}_c{c}" for kind in ("grounded", "random") for c in CLIENTS]
    ratios = {f"tpot_ratio_{key}": on[key]["tpot_ms"]["p50"] / off[key]["tpot_ms"]["p50"]
              for key in loads}  # fmt: skip
    plain = off["plain_c1"]["tpot_ms"]["p50"]
    baseline = off["random_c1"]["tpot_ms"]["p50"] / plain
    proposed = [on[k] for k in loads if on[k]["acceptance_rate"] is not None]
    rate = (sum(f["acceptance_rate"] for f in proposed) / len(proposed)) if proposed else None
    print(f"{'=' * 20} speculative decoding {'=' * 20}")
    for key, value in ratios.items():
        print(f"{key}: {value:.3f}")
    print(f"no-spec TPOT at 1 client against the plain server's: {baseline:.3f} (within 5%)")
    result = {
        **ratios,
        "acceptance_rate": on["grounded_c1"]["acceptance_rate"],
        "mean_acceptance_rate": rate,
        "no_spec_tpot_vs_plain": baseline,
        "spec_config": json.loads(args.spec_config),
        "deployments": runs,
    }
    ok = all(f["failed"] == 0 for r in runs.values() for f in r.values() if isinstance(f, dict)
             and "failed" in f)  # fmt: skip
    return result, ok

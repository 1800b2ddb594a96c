"""`tandem bench profile`: one worker's capacity, measured in-process, for `tandem plan`.

It builds the engine a worker runs (EngineCore, same flags) and times its steps:

- prefill: one fresh prompt of T tokens per step (T from --prefill-tokens, capped by
  --max-num-batched-tokens), --repeats times each after a warm-up; the medians are fitted as
  `step_s = a + b*T` by least squares. A later chunk of a long prompt also attends to the
  chunks before it, so this slightly flatters long prompts on big contexts.
- decode: a batch of B requests whose first C tokens are already in the cache (admitted the
  way a decode worker admits a handed-off request, with zeroed KV: the values do not change
  the time), one warm-up step, then the median of --decode-steps steps, for each B in
  --batch-sizes (capped by --max-num-seqs and the KV blocks) and each C in --context-lens.
- capacity: KV blocks, block size, max_num_seqs, max_model_len, max_num_batched_tokens and
  the KV bytes per token (what a hand-off moves).

Prefix caching is off while profiling, and every prompt is distinct random tokens.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import time

import torch

from tandem.engine.config import EngineConfig
from tandem.engine.core import EngineCore
from tandem.engine.request import Request, SamplingParams
from tandem.planner import fit_line

PROFILE_VERSION = 1


def _int_list(text: str) -> list[int]:
    values = [int(v) for v in text.split(",") if v.strip()]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers like 1,2,4, got {text!r}")
    return values


def machine_facts(core: EngineCore, load_avg: float) -> dict:
    """Where the figures were taken: device, dtype, threads, the cores the process may use and
    the load average (1 min) before profiling (other processes on them inflate the times)."""
    from tandem.bench.deploy import format_cpus

    cpus = os.sched_getaffinity(0)
    total = os.cpu_count() or len(cpus)
    pinning = (
        f"pinned to {len(cpus)} of {total} cores"
        if len(cpus) < total
        else f"not pinned: all {total} cores"
    )
    return dict(
        device=str(core.runner.info.device),
        dtype=str(core.runner.info.dtype).removeprefix("torch."),
        torch_threads=torch.get_num_threads(),
        cpus=format_cpus(cpus),
        num_cpus=total,
        pinning=pinning,
        load_avg_1m=round(load_avg, 2),
    )


class Profiler:
    """Times prefill and decode steps of one EngineCore."""

    def __init__(self, core: EngineCore, seed: int = 0) -> None:
        self.core = core
        self.gen = torch.Generator().manual_seed(seed)
        self.vocab = core.runner.info.vocab_size
        self.num_ids = 0

    def _request(self, num_prompt: int, max_tokens: int) -> Request:
        self.num_ids += 1
        low, high = min(10, self.vocab - 1), self.vocab
        prompt = torch.randint(low, high, (num_prompt,), generator=self.gen).tolist()
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        return Request(f"profile-{self.num_ids}", prompt, params)

    def _sync(self) -> None:
        if self.core.runner.info.device.type == "cuda":
            torch.cuda.synchronize()

    def prefill_step_s(self, num_tokens: int) -> float:
        """Seconds of one step computing a fresh num_tokens-token prompt."""
        req = self._request(num_tokens, 1)
        self.core.add_request(req)
        self._sync()
        t = time.perf_counter()
        outputs = self.core.step()
        self._sync()
        elapsed = time.perf_counter() - t
        if not (outputs and outputs[0].finished):
            raise RuntimeError(f"a {num_tokens}-token prompt did not prefill in one step")
        return elapsed

    def decode_step_s(self, batch_size: int, context_len: int, num_steps: int) -> list[float]:
        """Seconds of each of num_steps decode steps of batch_size requests at context_len."""
        core, runner = self.core, self.core.runner
        a = runner.model.args
        num_blocks = -(-context_len // core.kv.block_size)
        shape = (num_blocks, a.num_layers, 2, a.num_kv_heads, core.kv.block_size, a.head_dim)
        kv = torch.zeros(shape, dtype=runner.dtype)
        requests = []
        try:
            for _ in range(batch_size):
                req = self._request(context_len, num_steps + 3)
                req.append_output_token(int(req.prompt_token_ids[-1]))  # prefill's first token
                if not core.add_prefilled_request(req, [kv], context_len):
                    raise RuntimeError(f"batch {batch_size} at context {context_len} did not fit")
                requests.append(req)
            core.step()  # warm-up
            times = []
            for _ in range(num_steps):
                self._sync()
                t = time.perf_counter()
                core.step()
                self._sync()
                times.append(time.perf_counter() - t)
            return times
        finally:
            for req in requests:
                core.abort(req.request_id)


@dataclasses.dataclass(frozen=True, slots=True)
class ProfileArgs:
    """What to measure; the engine's own settings come in an EngineConfig."""

    prefill_tokens: tuple[int, ...] = (128, 256, 512, 1024, 2048)
    batch_sizes: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)
    context_lens: tuple[int, ...] = (256, 1024)
    repeats: int = 3
    decode_steps: int = 5
    seed: int = 0

    def __post_init__(self) -> None:
        if self.repeats < 1 or self.decode_steps < 1:
            raise ValueError("repeats and decode_steps must be >= 1")


def run_profile(config: EngineConfig, args: ProfileArgs, log=print) -> dict:
    """Measure and return the profile (see the module docstring); `log` gets progress lines."""
    load_avg = os.getloadavg()[0]
    cache = dataclasses.replace(config.cache, enable_prefix_caching=False)
    core = EngineCore(dataclasses.replace(config, cache=cache))
    info, sched = core.runner.info, config.scheduler
    budget = sched.max_num_batched_tokens
    prof = Profiler(core, args.seed)

    tokens = sorted({min(t, budget, core.max_model_len - 1) for t in args.prefill_tokens})
    prof.prefill_step_s(tokens[0])  # warm-up: first-call allocations
    samples = {}
    for t in tokens:
        samples[t] = [prof.prefill_step_s(t) for _ in range(args.repeats)]
        log(f"prefill {t:>6} tokens: {statistics.median(samples[t]) * 1e3:9.1f} ms")
    medians = {t: statistics.median(s) for t, s in samples.items()}
    a, b = fit_line(list(medians), list(medians.values()))

    decode: dict[str, dict[str, float]] = {}
    skipped = []
    for ctx in sorted(set(args.context_lens)):
        if ctx + args.decode_steps + 2 > core.max_model_len:
            skipped.append(f"context {ctx}: past max_model_len {core.max_model_len}")
            continue
        per_request = -(-(ctx + args.decode_steps + 2) // core.kv.block_size)
        table = {}
        for batch in sorted(set(args.batch_sizes)):
            if batch > min(sched.max_num_seqs, budget):
                skipped.append(f"batch {batch}: past max_num_seqs or the token budget")
                continue
            if batch * per_request > core.kv.num_free_blocks:
                skipped.append(f"batch {batch} at context {ctx}: past the KV blocks")
                continue
            table[str(batch)] = statistics.median(prof.decode_step_s(batch, ctx, args.decode_steps))
            log(f"decode context {ctx:>6} batch {batch:>4}: {table[str(batch)] * 1e3:9.2f} ms")
        if table:
            decode[str(ctx)] = table
    if not decode:
        raise ValueError("no decode point fits: " + "; ".join(skipped))

    return dict(
        version=PROFILE_VERSION,
        model=config.model.model,
        machine=machine_facts(core, load_avg),
        capacity=dict(
            num_blocks=info.num_blocks,
            block_size=config.cache.block_size,
            max_num_seqs=sched.max_num_seqs,
            max_model_len=core.max_model_len,
            max_num_batched_tokens=budget,
            kv_bytes_per_token=info.block_bytes // config.cache.block_size,
        ),
        prefill=dict(
            step_s={str(t): m for t, m in medians.items()},
            samples_s={str(t): s for t, s in samples.items()},
            fit=dict(a_s=a, b_s_per_token=b),
            tokens_per_s=budget / (a + b * budget),
        ),
        decode=dict(step_s=decode, num_steps=args.decode_steps, skipped=skipped),
    )


def format_profile(profile: dict) -> str:
    """A readable summary of a profile."""
    m, cap, pre, dec = (profile[k] for k in ("machine", "capacity", "prefill", "decode"))
    lines = [
        f"model {profile['model']} on {m['device']} in {m['dtype']}, {m['torch_threads']} torch "
        f"threads, cores {m['cpus']} ({m['pinning']}); load average {m['load_avg_1m']} before",
        f"KV: {cap['num_blocks']} blocks of {cap['block_size']} tokens, "
        f"{cap['kv_bytes_per_token']} bytes/token; max_num_seqs {cap['max_num_seqs']}, "
        f"max_model_len {cap['max_model_len']}, budget {cap['max_num_batched_tokens']} tokens",
        f"{'prefill tokens':>14} {'step (ms)':>10} {'tok/s':>8}",
    ]
    for t, s in pre["step_s"].items():
        lines.append(f"{t:>14} {s * 1e3:>10.1f} {int(t) / s:>8.0f}")
    fit = pre["fit"]
    lines.append(
        f"fit: step = {fit['a_s'] * 1e3:.2f} ms + {fit['b_s_per_token'] * 1e3:.4f} ms/token -> "
        f"{pre['tokens_per_s']:.0f} prompt tok/s at {cap['max_num_batched_tokens']} tokens"
    )
    contexts = list(dec["step_s"])
    batches = sorted({int(b) for table in dec["step_s"].values() for b in table})
    lines.append(
        f"{'decode batch':>14} "
        + " ".join(f"{'ctx ' + c + ' (ms)':>16} {'tok/s':>7}" for c in contexts)
    )
    for batch in batches:
        cells = []
        for c in contexts:
            s = dec["step_s"][c].get(str(batch))
            cells.append(f"{s * 1e3:>16.2f} {batch / s:>7.0f}" if s else f"{'-':>16} {'-':>7}")
        lines.append(f"{batch:>14} " + " ".join(cells))
    for note in dec["skipped"]:
        lines.append(f"skipped: {note}")
    if m["load_avg_1m"] >= 0.5:
        lines.append(
            f"note: the load average was {m['load_avg_1m']} before profiling: other processes "
            "on these cores inflate the times"
        )
    return "\n".join(lines)


def cmd_bench_profile(args: argparse.Namespace) -> int:
    from tandem.engine.args import engine_config
    from tandem.model_source import resolve_model

    args.model = resolve_model(args.model)
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    profile_args = ProfileArgs(
        tuple(args.prefill_tokens),
        tuple(args.batch_sizes),
        tuple(args.context_lens),
        args.repeats,
        args.decode_steps,
        args.seed,
    )
    profile = run_profile(engine_config(args), profile_args)
    print(format_profile(profile))
    with open(args.output, "w") as f:
        json.dump(profile, f, indent=2)
    print(f"wrote {args.output}")
    return 0


def add_bench_profile_parser(bench_sub: argparse._SubParsersAction) -> None:
    """Add `profile` to the `tandem bench` subcommands."""
    from tandem.engine.args import add_engine_args

    p = bench_sub.add_parser(
        "profile", help="one worker's prefill and decode step times, for `tandem plan`"
    )
    add_engine_args(p)
    d = ProfileArgs()
    p.add_argument(
        "--prefill-tokens",
        type=_int_list,
        default=list(d.prefill_tokens),
        help="prompt sizes timed (capped by --max-num-batched-tokens), e.g. 128,512,2048",
    )
    p.add_argument("--batch-sizes", type=_int_list, default=list(d.batch_sizes))
    p.add_argument(
        "--context-lens",
        type=_int_list,
        default=list(d.context_lens),
        help="tokens per request already in the cache at the decode steps",
    )
    p.add_argument("--repeats", type=int, default=d.repeats, help="timings per prefill size")
    p.add_argument(
        "--decode-steps", type=int, default=d.decode_steps, help="timed steps per decode point"
    )
    p.add_argument("--output", default="profile.json", help="the JSON profile written")
    p.set_defaults(func=cmd_bench_profile)

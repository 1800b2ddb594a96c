"""The plan as text: the load, the profile figures used, each pool's search around its
count, and the recommendation."""

from __future__ import annotations

from tandem.planner.search import Plan, PoolPlan, format_seconds


def _pool_lines(pool: PoolPlan) -> list[str]:
    p = f"p{pool.percentile:g} {pool.metric}"
    unit = "prompt" if pool.role == "prefill" else f"output (batch {pool.best_batch})"
    lines = [
        f"{pool.role}: SLO {p} <= {format_seconds(pool.slo_s)}; one worker does "
        f"{pool.capacity_per_worker:.0f} {unit} tok/s; utilisation bound: "
        f">= {pool.lower_bound} replica(s)"
    ]
    if pool.simulated:
        lines.append(f"  {'replicas':>8} {p:>12} {'busy':>6} {'batch':>7}")
        for n, s in pool.simulated.items():
            mark = "  <-" if n == pool.num_replicas else ""
            lines.append(
                f"  {n:>8} {format_seconds(s['latency_s']):>12} {s['busy']:>6.0%} "
                f"{s['mean_batch']:>7.1f}{mark}"
            )
    if not pool.feasible:
        lines.append(f"  -> {pool.role}: infeasible: {pool.reason}")
        return lines
    n = pool.num_replicas
    at_n = format_seconds(pool.simulated[n]["latency_s"])
    fewer = ""
    if n > 1:
        fewer = f"; with {n - 1}: {format_seconds(pool.simulated[n - 1]['latency_s'])}"
    slo = format_seconds(pool.slo_s)
    lines.append(f"  -> {pool.role}: {n} replica{'s' * (n > 1)} ({p} {at_n} <= {slo}{fewer})")
    return lines


def format_plan(plan: Plan) -> str:
    load, fig = plan.load, plan.profile
    m = fig["machine"]
    lo_ctx, hi_ctx = fig["decode_contexts_measured"]
    lines = [
        f"load: {load['request_rate']:.2f} req/s; prompts {load['mean_prompt_len']:.0f} tokens "
        f"on average -> {load['prompt_tok_s']:.0f} prompt tok/s; outputs "
        f"{load['mean_output_len']:.0f} -> {load['output_tok_s']:.0f} output tok/s "
        f"({load['num_requests']} simulated requests)",
        f"profile: {m.get('device', '?')}, {m.get('dtype', '?')}, "
        f"{m.get('torch_threads', '?')} threads; "
        f"prefill step {format_seconds(fig['prefill_a_s'])} + "
        f"{fig['prefill_b_s_per_token'] * 1e3:.3f} ms/token -> "
        f"{fig['prefill_tokens_per_s']:.0f} tok/s at {fig['max_num_batched_tokens']} tokens; "
        f"decode step {format_seconds(fig['decode_step_s_batch1'])} at batch 1 "
        f"(mean context {load['mean_decode_context']:.0f}; measured {lo_ctx}-{hi_ctx})",
    ]
    if not lo_ctx <= load["mean_decode_context"] <= hi_ctx:
        lines.append(
            "note: the mean decode context is outside the profile's context lengths; the "
            "nearest one stands in (profile longer contexts with --context-lens)"
        )
    if load["kv_transfer_s_per_prompt"]:
        lines.append(
            f"KV transfer: {format_seconds(load['kv_transfer_s_per_prompt'])} per mean prompt"
        )
    lines += _pool_lines(plan.prefill) + _pool_lines(plan.decode)
    if plan.feasible:
        lines.append(
            f"recommendation: {plan.prefill.num_replicas} prefill + "
            f"{plan.decode.num_replicas} decode workers"
        )
    else:
        lines.append("recommendation: none: the SLOs cannot be met (see above)")
    return "\n".join(lines)

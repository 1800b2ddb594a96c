import random

import pytest

from tandem.engine.config import SchedulerConfig, SchedulingPolicy
from tandem.engine.kv_cache_manager import KVCacheManager
from tandem.engine.request import Request, RequestStatus, SamplingParams
from tandem.engine.scheduler import Scheduler


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        self.t += 1.0
        return self.t


def make(
    num_blocks=64,
    block_size=4,
    budget=16,
    max_seqs=8,
    policy=SchedulingPolicy.FCFS,
    max_model_len=256,
):
    kv = KVCacheManager(num_blocks, block_size)
    cfg = SchedulerConfig(max_seqs, budget, policy)
    return Scheduler(cfg, kv, max_model_len, clock=Clock())


def req(rid, n, max_tokens=4, priority=0):
    return Request(
        rid,
        list(range(100, 100 + n)),
        SamplingParams(max_tokens=max_tokens, ignore_eos=True),
        priority=priority,
    )


def run_step(s: Scheduler, token=7):
    out = s.schedule()
    assert out.total_num_scheduled_tokens <= s.config.max_num_batched_tokens
    assert len(s.running) <= s.config.max_num_seqs
    finished = s.update_from_output(out, [token] * len(out.requests))
    s.kv.check_integrity()
    return out, finished


def test_chunked_prefill_spans_steps_and_decode_goes_first():
    s = make(budget=8)
    s.add_request(req("long", 20))
    out, _ = run_step(s)
    assert out.num_scheduled_tokens == {"long": 8}
    s.add_request(req("short", 3))
    out, _ = run_step(s)
    assert out.num_scheduled_tokens == {"long": 8}  # running first: it takes the budget
    out, _ = run_step(s)
    assert out.num_scheduled_tokens == {"long": 4, "short": 3}
    out, _ = run_step(s)
    assert out.num_scheduled_tokens == {"long": 1, "short": 1}
    assert s.requests["long"].num_output_tokens == 2


def test_randomized_budget_and_no_leaks():
    rng = random.Random(3)
    s = make(num_blocks=30, budget=12, max_seqs=5)
    for i in range(40):
        s.add_request(req(f"r{i}", rng.randrange(1, 30), max_tokens=rng.randrange(1, 12)))
    steps = 0
    while s.has_unfinished:
        out, _ = run_step(s)
        if rng.random() < 0.05 and s.running:
            s.abort(rng.choice(s.running).request_id)
        steps += 1
        assert steps < 5000
    assert s.kv.num_free_blocks == 30
    s.kv.check_integrity()


def test_max_num_seqs_respected():
    s = make(max_seqs=2, budget=100)
    for i in range(4):
        s.add_request(req(f"r{i}", 3))
    out, _ = run_step(s)
    assert list(out.num_scheduled_tokens) == ["r0", "r1"]


def test_priority_policy_schedules_lowest_value_first_then_fcfs():
    s = make(policy=SchedulingPolicy.PRIORITY, budget=4, max_seqs=1)
    s.add_request(req("late-urgent", 2, priority=0))
    s.add_request(req("lazy", 2, priority=5))
    s.add_request(req("urgent", 2, priority=-1))
    s.add_request(req("late-urgent-2", 2, priority=0))
    order = []
    while s.has_unfinished:
        out, _ = run_step(s)
        for rid in out.num_scheduled_tokens:
            if rid not in order:
                order.append(rid)
    assert order == ["urgent", "late-urgent", "late-urgent-2", "lazy"]


def test_fcfs_preempts_the_last_running_request():
    # 3 blocks of 4 tokens: two 4-token prompts fill 2 blocks; growth forces a preemption.
    s = make(num_blocks=3, block_size=4, budget=32)
    s.add_request(req("first", 4, max_tokens=8))
    s.add_request(req("second", 4, max_tokens=8))
    run_step(s)
    preempted = []
    for _ in range(6):
        out, _ = run_step(s)
        preempted += out.preempted_ids
    assert preempted and preempted[0] == "second"
    assert s.requests["second"].num_preemptions >= 1


def test_priority_preempts_least_urgent_latest_arrival():
    s = make(num_blocks=4, block_size=4, budget=64, policy=SchedulingPolicy.PRIORITY)
    s.add_request(req("p1-early", 4, max_tokens=8, priority=1))
    s.add_request(req("p0", 4, max_tokens=8, priority=0))
    s.add_request(req("p1-late", 4, max_tokens=8, priority=1))
    s.add_request(req("p0-b", 4, max_tokens=8, priority=0))
    run_step(s)
    preempted = []
    for _ in range(4):
        out, _ = run_step(s)
        preempted += out.preempted_ids
    assert preempted[0] == "p1-late"


def test_preempted_request_recomputes_and_keeps_its_tokens():
    s = make(num_blocks=3, block_size=4, budget=32)
    s.add_request(req("a", 4, max_tokens=6))
    s.add_request(req("b", 4, max_tokens=6))
    done = {}
    while s.has_unfinished:
        out, finished = run_step(s, token=9)
        for r in finished:
            done[r.request_id] = r
    assert all(r.output_token_ids == [9] * 6 for r in done.values())
    assert s.kv.num_free_blocks == 3


def test_prompt_too_long_is_rejected():
    s = make(max_model_len=10)
    with pytest.raises(ValueError, match="max_model_len"):
        s.add_request(req("x", 10))


def test_abort_frees_blocks_of_waiting_and_running():
    s = make(budget=4)
    s.add_request(req("a", 10))
    s.add_request(req("b", 10))
    run_step(s)
    s.abort("a")
    s.abort("b")
    assert not s.has_unfinished and s.kv.num_free_blocks == 64
    assert s.kv.req_to_blocks == {}


def test_eos_and_stop_token_ids_finish_with_stop():
    s = make()
    r = Request("a", [1, 2], SamplingParams(max_tokens=10, stop_token_ids=(42,)), eos_token_id=0)
    s.add_request(r)
    run_step(s, token=5)
    _, finished = run_step(s, token=42)
    assert finished == [r] and r.status is RequestStatus.FINISHED_STOPPED and r.stop_reason == 42

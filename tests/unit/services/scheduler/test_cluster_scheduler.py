"""The central scheduler's pure core: plans under budget, one step ahead, placement within
the decode workers' capacity, re-queueing, aborts and dead workers. No NATS, fake clock."""

from __future__ import annotations

import pytest

from tandem.engine.config import SchedulingPolicy
from tandem.services.scheduler.core import ClusterScheduler, PendingRequest, Role


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def make(policy=SchedulingPolicy.FCFS, budget=100, decode_seqs=8, num_decode=1):
    clock = Clock()
    core = ClusterScheduler(policy, worker_timeout=5.0, clock=clock)
    core.on_heartbeat(
        "p0", Role.PREFILL, num_blocks=1000, num_free_blocks=1000, block_size=16,
        max_num_seqs=64, max_model_len=2048, max_num_batched_tokens=budget,
    )  # fmt: skip
    for i in range(num_decode):
        core.on_heartbeat(
            f"d{i}", Role.DECODE, num_blocks=1000, num_free_blocks=1000, block_size=16,
            max_num_seqs=decode_seqs, max_model_len=2048,
        )  # fmt: skip
    return core, clock


def req(rid: str, num_tokens: int, priority: int = 0, arrival: float = 0.0) -> PendingRequest:
    return PendingRequest(rid, num_tokens, priority, arrival, payload=rid)


def chunks(plan):
    return [(c.request.request_id, c.num_tokens, c.is_first) for c in plan.chunks]


def test_long_prompt_is_chunked_under_the_budget_one_plan_ahead():
    core, _ = make(budget=100)
    core.add_request(req("a", 250))
    first, second = core.schedule()
    assert chunks(first) == [("a", 100, True)] and chunks(second) == [("a", 100, False)]
    assert core.schedule() == []  # two plans in flight: the worker has its next one already
    core.on_report("p0")
    (third,) = core.schedule()
    assert chunks(third) == [("a", 50, False)]
    assert [p.step_id for p in (first, second, third)] == [0, 1, 2]


def test_plans_fill_the_budget_with_several_requests():
    core, _ = make(budget=100)
    for rid, n in [("a", 30), ("b", 50), ("c", 40)]:
        core.add_request(req(rid, n))
    plans = core.schedule()
    assert chunks(plans[0]) == [("a", 30, True), ("b", 50, True), ("c", 20, True)]
    assert chunks(plans[1]) == [("c", 20, False)]
    assert all(sum(c.num_tokens for c in p.chunks) <= 100 for p in plans)


def test_decode_capacity_holds_requests_in_the_queue():
    core, _ = make(budget=1000, decode_seqs=2)
    for rid in "abc":
        core.add_request(req(rid, 10))
    (plan,) = core.schedule()
    assert [c.request.request_id for c in plan.chunks] == ["a", "b"]
    assert len(core.waiting) == 1
    core.on_report("p0", prefilled_ids=["a", "b"])
    assert core.schedule() == []  # a and b are still on their way to d0
    core.on_heartbeat("d0", Role.DECODE, received_ids=["a", "b"], num_running=1)
    (plan,) = core.schedule()  # one finished: room for c
    assert chunks(plan) == [("c", 10, True)]


def test_least_loaded_decode_worker_is_chosen():
    core, _ = make(budget=1000, num_decode=2)
    core.on_heartbeat("d0", Role.DECODE, num_running=3)
    core.add_request(req("a", 10))
    core.add_request(req("b", 10))
    (plan,) = core.schedule()
    assert [c.request.decode_worker_id for c in plan.chunks] == ["d1", "d1"]
    core.add_request(req("c", 10))
    core.add_request(req("d", 10))
    (plan,) = core.schedule()
    assert [c.request.decode_worker_id for c in plan.chunks] == ["d1", "d0"]


def test_failed_request_is_requeued_first_and_sent_with_its_spec_again():
    core, _ = make(budget=100)
    core.add_request(req("a", 150))
    core.add_request(req("b", 10))
    first, second = core.schedule()
    core.on_report("p0", failed_ids=["a"])
    assert core.waiting.peek().request_id == "a"
    core.on_report("p0")
    again = core.schedule()
    assert chunks(again[0]) == [("a", 100, True)] and chunks(again[1]) == [("a", 50, False)]
    assert core.workers["d0"].in_transit.get("b") is not None  # b still placed


def test_finished_on_prefill_leaves_no_transit_behind():
    core, _ = make()
    core.add_request(req("a", 10))
    core.schedule()
    assert "a" in core.workers["d0"].in_transit
    core.on_report("p0", finished_ids=["a"])
    assert core.workers["d0"].in_transit == {} and core.prefilling == {}


def test_abort_forgets_the_request_wherever_it_is():
    core, _ = make(budget=10)
    core.add_request(req("a", 10))
    core.add_request(req("b", 10))
    core.add_request(req("c", 10))
    core.schedule()  # a and b placed, c waits
    assert core.abort("a") and core.abort("c")
    assert not core.abort("zzz")
    assert set(core.prefilling) == {"b"} and len(core.waiting) == 0
    assert set(core.workers["d0"].in_transit) == {"b"}


def test_silent_prefill_worker_is_dropped_and_its_requests_wait_again():
    core, clock = make()
    core.add_request(req("a", 10))
    core.schedule()
    clock.now += 3
    core.on_heartbeat("d0", Role.DECODE, max_num_seqs=8)
    clock.now += 3
    assert core.expire() == ["p0"]
    assert core.prefilling == {} and core.waiting.peek().request_id == "a"
    assert core.schedule() == []  # no prefill worker left: the request waits


def test_priority_policy_places_the_most_urgent_first():
    core, _ = make(policy=SchedulingPolicy.PRIORITY, budget=10)
    core.add_request(req("low", 10, priority=5, arrival=1.0))
    core.add_request(req("high", 10, priority=-1, arrival=2.0))
    core.add_request(req("mid", 10, priority=0, arrival=0.5))
    plans = core.schedule()
    assert [p.chunks[0].request.request_id for p in plans] == ["high", "mid"]


def test_prompt_no_worker_can_hold_is_refused():
    core, _ = make()
    try:
        core.add_request(req("a", 2048))
    except ValueError as e:
        assert "max_model_len" in str(e)
    else:
        raise AssertionError("a prompt at max_model_len was queued")


def make_two_prefill(router):
    clock = Clock()
    core = ClusterScheduler(worker_timeout=5.0, router=router, clock=clock)
    for wid in ("p0", "p1"):
        core.on_heartbeat(
            wid, Role.PREFILL, num_blocks=1000, num_free_blocks=1000, block_size=16,
            max_num_seqs=64, max_model_len=4096, max_num_batched_tokens=2048,
        )  # fmt: skip
    core.on_heartbeat(
        "d0", Role.DECODE, num_blocks=1000, num_free_blocks=1000, block_size=16,
        max_num_seqs=64, max_model_len=4096,
    )  # fmt: skip
    return core


def test_kv_aware_router_sends_a_request_to_the_worker_holding_its_prefix():
    from tandem.services.scheduler.core import Router

    core = make_two_prefill(Router.KV_AWARE)
    core.add_request(req("busy", 300))  # lands on one worker and loads it
    core.schedule()
    busy = core.prefilling["busy"].prefill_worker_id
    other = "p1" if busy == "p0" else "p0"
    hit = req("hit", 1100)
    hit.overlap = {busy: 60}  # 960 cached tokens outweigh 300 queued ones
    core.add_request(hit)
    cold = req("cold", 1100)
    core.add_request(cold)
    core.schedule()
    assert core.prefilling["hit"].prefill_worker_id == busy
    assert core.prefilling["cold"].prefill_worker_id == other


def test_round_robin_and_least_loaded_ignore_the_cache():
    from tandem.services.scheduler.core import Router

    core = make_two_prefill(Router.ROUND_ROBIN)
    for i in range(4):
        r = req(f"r{i}", 10)
        r.overlap = {"p0": 1}
        core.add_request(r)
    core.schedule()
    assert sorted(r.prefill_worker_id for r in core.prefilling.values()) == ["p0", "p0", "p1", "p1"]

    core = make_two_prefill(Router.LEAST_LOADED)
    core.add_request(req("big", 1000))
    core.schedule()
    r = req("small", 10)
    r.overlap = {core.prefilling["big"].prefill_worker_id: 60}
    core.add_request(r)
    core.schedule()
    assert core.prefilling["small"].prefill_worker_id != core.prefilling["big"].prefill_worker_id


def test_a_new_prefix_follows_the_request_that_brought_it_before_the_index_knows():
    from tandem.services.scheduler.core import Router

    core = make_two_prefill(Router.KV_AWARE)
    first, second = req("first", 1100), req("second", 1100)
    first.block_hashes = list(range(100, 168))  # 68 full blocks, none in the index yet
    second.block_hashes = list(range(100, 160)) + [999] * 8  # shares 60 of them
    core.add_request(first)
    (plan,) = core.schedule()
    home = core.prefilling["first"].prefill_worker_id
    core.on_report(home, prefilled_ids=["first"], step_id=plan.step_id)
    core.add_request(second)  # both workers idle: 960 cached tokens decide
    (plan,) = core.schedule()
    assert core.prefilling["second"].prefill_worker_id == home
    assert chunks(plan) == [("second", 1100, True)]  # 140 computed tokens, under the budget


def test_expected_cache_hits_cost_no_budget_and_no_room():
    """Requests whose long prefix the worker holds: their first chunks span the cached part
    but charge only the suffix to the budget, and the worker's cache keeps it a candidate
    however many such requests it has queued."""
    from tandem.services.scheduler.core import Router

    core = make_two_prefill(Router.KV_AWARE)
    core.on_heartbeat("p0", Role.PREFILL, num_free_blocks=300)  # room for ~4 cold prompts
    shared = list(range(100, 164))  # 64 blocks: a 1,024-token system prompt
    for i in range(8):
        r = req(f"r{i}", 1088)
        r.block_hashes = shared + [1000 + i] * 4
        r.overlap = {"p0": 64}
        core.add_request(r)
    plans = core.schedule()
    assert {r.prefill_worker_id for r in core.prefilling.values()} == {"p0"}
    (plan,) = [p for p in plans if p.worker_id == "p0"][:1]
    # all eight fit one step: 8 x 64 computed tokens, under the 2,048 budget
    assert chunks(plan) == [(f"r{i}", 1088, True) for i in range(8)]


def test_a_stale_expectation_still_plans_the_whole_prompt():
    from tandem.services.scheduler.core import Router

    core = make_two_prefill(Router.KV_AWARE)
    r = req("r", 3000)
    r.overlap = {"p0": 100, "p1": 100}  # 1,600 tokens expected cached
    core.add_request(r)
    (plan,) = core.schedule()
    # one chunk spans the whole prompt (1,400 computed tokens expected): a worker whose cache
    # no longer holds the prefix computes all 3,000 in that step, and the request is done
    assert chunks(plan) == [("r", 3000, True)]
    core.on_report(plan.worker_id)
    assert core.schedule() == []


def test_a_draining_decode_worker_gets_nothing_new_and_counts_what_is_on_its_way():
    core, _ = make(budget=1000, num_decode=2)
    core.add_request(req("a", 10))
    core.schedule()
    first = core.prefilling["a"].decode_worker_id
    other = ({"d0", "d1"} - {first}).pop()
    assert core.drain(first) == 1  # "a" is on its way there: it must wait for it
    core.add_request(req("b", 10))
    core.add_request(req("c", 10))
    core.schedule()
    assert {core.prefilling[r].decode_worker_id for r in ("b", "c")} == {other}
    core.on_heartbeat(first, Role.DECODE, received_ids=["a"], draining=True)
    assert core.drain(first) == 0 and core.drain("nobody") is None
    assert core.remove_worker(first) and first not in core.workers


def test_a_departing_prefill_worker_hands_its_placed_requests_to_another():
    core, _ = make(budget=10)
    core.on_heartbeat(
        "p1", Role.PREFILL, num_blocks=1000, num_free_blocks=1000, block_size=16,
        max_num_seqs=64, max_model_len=2048, max_num_batched_tokens=10,
    )  # fmt: skip
    core.drain("p1")
    core.add_request(req("a", 30))
    plans = core.schedule()
    assert {p.worker_id for p in plans} == {"p0"}  # p1 is leaving: nothing placed there
    core.workers["p1"].draining = False
    core.add_request(req("b", 10))
    core.schedule()
    assert core.prefilling["b"].prefill_worker_id == "p1"
    assert core.drain("p1") == 1
    core.remove_worker("p1")  # gone before it ran b: b waits again, first in line
    assert core.waiting.peek().request_id == "b" and "b" not in core.prefilling


def test_plans_lost_on_the_way_are_made_again_once_the_worker_says_it_is_idle():
    core, clock = make(budget=100)
    core.add_request(req("a", 150))
    assert [chunks(p) for p in core.schedule()] == [[("a", 100, True)], [("a", 50, False)]]
    core.on_heartbeat("p0", Role.PREFILL, num_running=0, num_waiting=0)
    assert core.schedule() == []  # just sent: they may still be on their way
    clock.now += 4  # NATS restarted meanwhile: the plans never arrived
    core.on_heartbeat("p0", Role.PREFILL, num_running=0, num_waiting=0)
    assert [chunks(p) for p in core.schedule()] == [[("a", 100, True)], [("a", 50, False)]]
    clock.now += 4  # a worker busy with them is left alone
    core.on_heartbeat("p0", Role.PREFILL, num_running=1, num_waiting=1)
    assert core.schedule() == []


def test_a_decode_worker_expired_names_the_requests_handed_to_it_not_yet_received():
    """A worker killed mid hand-off cannot say it dropped what was on its way to it: the
    scheduler's in-transit list goes out with its WorkerLost (the tokenizer re-queues them);
    a request whose receipt the worker reported is not on it."""
    core, clock = make()
    for rid in ("a", "b"):
        core.add_request(req(rid, 10))
    core.schedule()
    core.on_report("p0", prefilled_ids=["a", "b"])  # both handed to d0
    core.on_heartbeat("d0", Role.DECODE, received_ids=["a"])
    clock.now += 6.0  # d0 silent past the timeout (killed); p0 heartbeats on
    core.on_heartbeat("p0", Role.PREFILL, num_running=0, num_waiting=0)
    assert core.expire() == ["d0"]
    assert core.lost_handed["d0"] == ["b"]
    assert len(core.waiting) == 0  # the scheduler itself re-queues neither


def test_with_no_worker_of_a_role_the_queue_waits_for_a_restart_then_is_failed():
    core, clock = make()
    core.add_request(req("a", 10))
    clock.now += 6.0  # both workers silent past the timeout
    assert set(core.expire()) == {"p0", "d0"}
    assert core.stranded() == []  # a restarted worker may yet join
    clock.now += core.no_worker_timeout - 1
    assert core.stranded() == []
    core.on_heartbeat(
        "p0.1", Role.PREFILL, num_blocks=1000, num_free_blocks=1000, block_size=16,
        max_num_seqs=64, max_model_len=2048, max_num_batched_tokens=100,
    )  # fmt: skip
    clock.now += 2  # the decode role has now been empty past the grace
    assert [r.request_id for r in core.stranded()] == ["a"]
    assert len(core.waiting) == 0


def test_a_worker_that_rejoins_within_the_grace_keeps_the_queue():
    core, clock = make()
    core.add_request(req("a", 10))
    clock.now += 6.0
    core.expire()
    assert core.stranded() == []
    for _ in range(int(core.no_worker_timeout)):  # the restarted workers heartbeat on
        clock.now += 1.0
        for wid, role in [("p0.1", Role.PREFILL), ("d0.1", Role.DECODE)]:
            core.on_heartbeat(
                wid, role, num_blocks=1000, num_free_blocks=1000, block_size=16,
                max_num_seqs=64, max_model_len=2048, max_num_batched_tokens=100,
            )  # fmt: skip
        assert core.stranded() == []
    (plan, *_) = core.schedule()
    assert chunks(plan) == [("a", 10, True)]


def test_a_refused_request_is_placed_again_once_on_another_worker_then_given_up():
    core, _ = make()
    core.on_heartbeat(
        "p1", Role.PREFILL, num_blocks=1000, num_free_blocks=1000, block_size=16,
        max_num_seqs=64, max_model_len=2048, max_num_batched_tokens=100,
    )  # fmt: skip
    core.add_request(req("a", 30))
    (plan,) = core.schedule()
    first = plan.worker_id
    assert core.on_report(first, refused_ids=["a"]) == []  # placed again: elsewhere
    (again,) = core.schedule()
    assert again.worker_id != first and chunks(again) == [("a", 30, True)]
    (given_up,) = core.on_report(again.worker_id, refused_ids=["a"])
    assert given_up.request_id == "a"
    assert core.schedule() == [] and len(core.waiting) == 0 and not core.prefilling


def test_token_ids_outside_the_workers_vocabulary_are_refused_at_the_door():
    core, _ = make()
    for worker_id in ("p0", "d0"):
        core.workers[worker_id].vocab_size = 100
    with pytest.raises(ValueError, match=r"\[0, 100\)"):
        core.add_request(PendingRequest("a", 3, 0, 0.0, "a", token_ids=[1, 100, 2]))
    core.add_request(PendingRequest("b", 3, 0, 0.0, "b", token_ids=[1, 99, 2]))


def test_a_report_speaks_only_of_requests_placed_by_that_worker_and_plan_or_earlier():
    core, _ = make()
    core.add_request(req("a", 30))
    (plan,) = core.schedule()
    core.on_report("p9", failed_ids=["a"], step_id=plan.step_id)  # another worker's word
    assert "a" in core.prefilling
    core.on_report("p0", failed_ids=["a"], step_id=plan.step_id)  # dropped there: again
    (again,) = core.schedule()
    assert again.step_id > plan.step_id and chunks(again) == [("a", 30, True)]
    core.on_report("p0", failed_ids=["a"], step_id=plan.step_id)  # late, about the first
    assert core.prefilling["a"].prefill_worker_id == "p0" and len(core.waiting) == 0


def test_a_placed_request_s_own_blocks_are_no_cache_hit():
    """Placing a request remembers its blocks on the worker (the next request with that
    prefix follows it); its own plans, and the worker's queued load, still count its
    whole prompt as work: chunked under the budget, not planned in one step."""
    core, _ = make(budget=256)
    long = req("long", 1500)
    long.block_hashes = list(range(1000, 1093))  # 93 full blocks, none cached
    core.add_request(long)
    first, second = core.schedule()
    assert chunks(first) == [("long", 256, True)] and chunks(second) == [("long", 256, False)]
    assert core._prefill_load(core.workers["p0"]) == 1500
    assert core._unplanned_tokens(core.workers["p0"]) == 1500 - 512
    follower = req("follower", 1500)
    follower.block_hashes = list(range(1000, 1093))
    assert core._overlap(follower, "p0") == 93  # the prefix follows the request that brought it


def test_a_worker_whose_kv_blocks_differ_from_its_peers_is_refused_with_a_message():
    """KV blocks move between any two workers: a worker with another --kv-cache-dtype or
    --block-size never joins (nothing placed on it), and says why; its peers go on."""
    core, _ = make()
    load = dict(num_blocks=100, num_free_blocks=100, max_num_seqs=8, max_model_len=2048)
    assert core.on_heartbeat("d0", Role.DECODE, block_size=16, kv_cache_dtype="float8_e4m3fn",
                             **load) is None  # fmt: skip
    why = core.on_heartbeat("d1", Role.DECODE, block_size=16, kv_cache_dtype="bfloat16", **load)
    assert "d1 refused" in why and "bfloat16" in why and "--kv-cache-dtype" in why
    # an outlier never sets the layout: the cluster's own workers are never locked out
    assert core.on_heartbeat("d0", Role.DECODE, block_size=16, kv_cache_dtype="float8_e4m3fn",
                             **load) is None  # fmt: skip
    why = core.on_heartbeat("d2", Role.DECODE, block_size=32, kv_cache_dtype="float8_e4m3fn",
                            **load)  # fmt: skip
    assert "32 tokens" in why
    assert set(core.workers) == {"p0", "d0"}
    core.add_request(req("a", 20))
    (plan,) = core.schedule()
    assert [c.request.decode_worker_id for c in plan.chunks] == ["d0"]


@pytest.mark.parametrize("router_name", ["KV_AWARE", "LEAST_LOADED"])
def test_a_lora_request_prefers_the_worker_holding_its_adapter(router_name):
    from tandem.services.scheduler.core import Router
    from tandem.services.scheduler.state import LORA_RESIDENT_BLOCKS

    core = make_two_prefill(Router[router_name])
    core.on_heartbeat("p1", Role.PREFILL, lora_adapters=frozenset({"sql"}))
    lora = req("a", 40)
    lora.lora_name = "sql"
    core.add_request(lora)
    core.schedule()
    assert core.prefilling["a"].prefill_worker_id == "p1"  # equal loads: the adapter's holder
    # p1 now has 40 tokens queued, p0 none: a base request goes to p0 either way, and a
    # request for the adapter to p1 under kv-aware (the adapter is worth 64 tokens of cache
    # there), to the less loaded p0 under least-loaded
    base, again = req("base", 10), req("again", 40)
    again.lora_name = "sql"
    core.add_request(again)
    core.schedule()
    assert LORA_RESIDENT_BLOCKS * 16 > 40
    want = "p1" if router_name == "KV_AWARE" else "p0"
    assert core.prefilling["again"].prefill_worker_id == want
    core.add_request(base)
    core.schedule()
    assert core.prefilling["base"].prefill_worker_id == "p0"

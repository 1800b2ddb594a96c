"""Conditional disaggregation in the central scheduler's core: which requests a decode worker
prefills itself, and that none is lost on the way (a worker gone, a message lost, an abort)."""

from __future__ import annotations

from tandem.engine.config import SchedulingPolicy
from tandem.services.scheduler.core import ClusterScheduler, PendingRequest, Role


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def chunks(plan):
    return [(c.request.request_id, c.num_tokens, c.is_first) for c in plan.chunks]


def make(max_local: int, num_decode: int = 1, decode_seqs: int = 8):
    clock = Clock()
    core = ClusterScheduler(SchedulingPolicy.FCFS, worker_timeout=5.0, clock=clock,
                            max_local_prefill_length=max_local)  # fmt: skip
    core.on_heartbeat("p0", Role.PREFILL, num_blocks=1000, num_free_blocks=1000, block_size=16,
                      max_num_seqs=64, max_model_len=2048, max_num_batched_tokens=512)  # fmt: skip
    for i in range(num_decode):
        core.on_heartbeat(f"d{i}", Role.DECODE, num_blocks=1000, num_free_blocks=1000,
                          block_size=16, max_num_seqs=decode_seqs, max_model_len=2048)  # fmt: skip
    return core, clock


def req(rid: str, num_tokens: int, overlap: dict[str, int] | None = None) -> PendingRequest:
    return PendingRequest(rid, num_tokens, 0, 0.0, payload=rid, overlap=overlap or {})


def ids(requests) -> list[tuple[str, str]]:
    return [(r.request_id, r.decode_worker_id) for r in requests]


def test_prompts_up_to_the_length_are_prefilled_by_their_decode_worker_longer_ones_are_not():
    core, _ = make(max_local=64)
    core.add_request(req("short", 64))
    core.add_request(req("long", 65))
    (plan,) = core.schedule()
    assert chunks(plan) == [("long", 65, True)]
    assert ids(core.take_local()) == [("short", "d0")]
    assert core.take_local() == []  # each is sent once
    # both count on d0 until it says they arrived: its room is not given twice
    assert set(core.workers["d0"].in_transit) == {"short", "long"}
    assert core.local["short"].prefill_worker_id == ""


def test_while_a_prefill_worker_has_work_short_prompts_go_there_too():
    core, _ = make(max_local=64)
    core.add_request(req("long", 300))
    core.add_request(req("short", 10))
    (plan,) = core.schedule()
    assert chunks(plan) == [("long", 300, True), ("short", 10, True)] and not core.take_local()
    core.on_report("p0", prefilled_ids=["long", "short"])  # nothing placed there any more
    core.add_request(req("next", 10))
    core.schedule()
    assert ids(core.take_local()) == [("next", "d0")]


def test_zero_turns_it_off():
    core, _ = make(max_local=0)
    core.add_request(req("a", 1))
    (plan,) = core.schedule()
    assert chunks(plan) == [("a", 1, True)] and core.take_local() == []


def test_the_length_counts_only_what_the_decode_worker_does_not_hold():
    core, _ = make(max_local=100, num_decode=2)
    # 300 tokens, 13 blocks (208 tokens) cached on d1: 92 left to compute there
    core.add_request(req("a", 300, overlap={"d1": 13}))
    core.add_request(req("b", 300, overlap={"d0": 2}))  # 268 left on d0: too many
    plans = core.schedule()
    assert ids(core.take_local()) == [("a", "d1")]
    assert [c[0] for p in plans for c in chunks(p)] == ["b"]


def test_a_full_decode_worker_takes_no_local_prefill_the_request_waits():
    core, _ = make(max_local=64, decode_seqs=1)
    core.add_request(req("a", 10))
    core.add_request(req("b", 10))
    core.schedule()
    assert ids(core.take_local()) == [("a", "d0")] and len(core.waiting) == 1
    core.on_heartbeat("d0", Role.DECODE, received_ids=["a"], num_running=0)  # a finished
    core.schedule()
    assert ids(core.take_local()) == [("b", "d0")]


def test_arrival_hands_the_request_to_the_worker():
    core, _ = make(max_local=64)
    core.add_request(req("a", 10))
    core.schedule()
    core.take_local()
    core.on_heartbeat("d0", Role.DECODE, received_ids=["a"], num_running=1)
    assert "a" not in core.local and "a" not in core.workers["d0"].in_transit
    assert not core.remove_worker("x")
    core.remove_worker("d0")  # arrived: the tokenizer re-queues it now, not the scheduler
    assert len(core.waiting) == 0


def test_a_decode_worker_gone_before_its_local_prefill_arrived_sends_it_back_to_the_queue():
    core, clock = make(max_local=64, num_decode=2)
    core.add_request(req("a", 10))
    core.schedule()
    ((_, worker),) = ids(core.take_local())
    clock.now += 6  # every worker silent past the timeout, but the other one comes back
    other = "d1" if worker == "d0" else "d0"
    core.on_heartbeat(other, Role.DECODE, num_blocks=1000, num_free_blocks=1000, block_size=16,
                      max_num_seqs=8, max_model_len=2048)  # fmt: skip
    core.on_heartbeat("p0", Role.PREFILL, max_num_batched_tokens=512, max_num_seqs=64)
    assert worker in core.expire()
    assert "a" not in core.local
    core.schedule()
    assert ids(core.take_local()) == [("a", other)]


def test_a_local_prefill_whose_message_was_lost_is_placed_again():
    core, clock = make(max_local=64)
    core.transit_timeout = 10.0
    core.add_request(req("a", 10))
    core.schedule()
    core.take_local()
    for _ in range(3):  # the workers stay alive; the decode worker never lists "a"
        clock.now += 4
        core.on_heartbeat("d0", Role.DECODE, num_running=0)
        core.on_heartbeat("p0", Role.PREFILL, max_num_batched_tokens=512, max_num_seqs=64)
        core.expire()
    core.schedule()
    assert ids(core.take_local()) == [("a", "d0")]


def test_an_aborted_local_prefill_is_forgotten():
    core, _ = make(max_local=64)
    core.add_request(req("a", 10))
    core.schedule()
    core.take_local()
    assert core.abort("a")
    assert "a" not in core.local and not core.workers["d0"].in_transit
    core.remove_worker("d0")
    assert len(core.waiting) == 0


def test_pooling_requests_always_go_to_a_prefill_worker():
    core, _ = make(max_local=64)
    request = req("emb", 8)
    request.pooling = True
    core.add_request(request)
    (plan,) = core.schedule()
    assert chunks(plan) == [("emb", 8, True)] and core.take_local() == []

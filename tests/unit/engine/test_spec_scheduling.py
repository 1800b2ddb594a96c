"""Proposals in the scheduler and the block pool: their slots come out of the step's token
budget, are cut to the budget, max_tokens and the context; rejected ones are rolled back
(their blocks freed, nothing of theirs in the prefix cache); proposals never preempt."""

from tandem.engine.config import SchedulerConfig
from tandem.engine.kv_cache_manager import KVCacheManager
from tandem.engine.request import Request, SamplingParams
from tandem.engine.scheduler import Scheduler


def make(num_blocks=16, block_size=4, budget=16, max_model_len=64) -> Scheduler:
    kv = KVCacheManager(num_blocks, block_size)
    return Scheduler(SchedulerConfig(8, budget), kv, max_model_len)


def decoding(s: Scheduler, rid: str, prompt_len: int, max_tokens: int = 30) -> Request:
    """A request past its prefill, its first token out (prompts differ by request id)."""
    first = 100 + 50 * len(s.requests)
    r = Request(rid, list(range(first, first + prompt_len)),
                SamplingParams(max_tokens=max_tokens, ignore_eos=True))  # fmt: skip
    s.add_request(r)
    out = s.schedule()
    s.update_from_output(out, [7] * len(out.requests))
    assert r.num_output_tokens == 1 and r.num_computed_tokens == r.num_tokens - 1
    return r


def test_proposals_take_budget_slots_and_rejected_ones_are_rolled_back():
    s = make()
    r = decoding(s, "r", 6)  # 7 tokens: blocks of 4 -> 2 blocks
    free_before = s.kv.num_free_blocks
    r.spec_token_ids = [11, 12, 13, 14, 15]
    out = s.schedule()
    assert out.num_scheduled_tokens == {"r": 6} and out.spec_token_ids == {
        "r": [11, 12, 13, 14, 15]
    }
    assert len(s.kv.block_ids("r")) == 3  # 6 + 6 slots -> 12 positions -> 3 blocks
    assert s.kv.num_free_blocks == free_before - 1
    # two accepted, then the target's own token: 3 tokens out, the rest rolled back
    s.update_from_output(out, [[11, 12, 40]])
    assert r.output_token_ids == [7, 11, 12, 40] and r.num_computed_tokens == r.num_tokens - 1
    assert len(s.kv.block_ids("r")) == 3  # 10 tokens still need 3 blocks
    s.kv.check_integrity()
    # only full blocks of real tokens enter the prefix cache, published when allocated: at
    # the step's allocation, 7 real tokens filled one block (the rest were proposals)
    assert s.kv.num_cached_blocks["r"] == 1
    r.spec_token_ids = [50, 51, 52, 53, 54, 55]
    out = s.schedule()
    assert len(s.kv.block_ids("r")) == 4  # 9 computed + 7 -> 16 positions
    assert s.kv.num_cached_blocks["r"] == 2  # now 10 real tokens: 2 full blocks, not 4
    s.update_from_output(out, [[41]])  # all rejected: one token, blocks back to what 11 need
    assert r.num_tokens == 11 and len(s.kv.block_ids("r")) == 3
    assert s.kv.num_cached_blocks["r"] == 2
    s.kv.check_integrity()
    s.finish(r, r.status)
    assert s.kv.num_free_blocks == 16


def test_proposals_are_cut_to_the_budget_max_tokens_and_the_context():
    s = make(budget=4)
    r = decoding(s, "r", 3)
    r.spec_token_ids = [1, 2, 3, 4, 5, 6]
    assert s.schedule().spec_token_ids == {"r": [1, 2, 3]}  # 1 + 3 = the budget
    s = make()
    r = decoding(s, "r", 3, max_tokens=3)  # one out, two to go: the step outputs at most
    r.spec_token_ids = [1, 2, 3, 4]  # one more than it verifies
    assert s.schedule().spec_token_ids == {"r": [1]}
    s = make(max_model_len=8)
    r = decoding(s, "r", 5)  # 6 tokens of 8
    r.spec_token_ids = [1, 2, 3, 4]
    assert s.schedule().spec_token_ids == {"r": [1, 2]}


def test_proposals_never_preempt_a_request():
    s = make(num_blocks=4)
    a, b = (Request(rid, list(range(first, first + 7)), SamplingParams(max_tokens=9))
            for rid, first in (("a", 100), ("b", 200)))  # fmt: skip
    s.add_request(a)
    s.add_request(b)
    out = s.schedule()
    s.update_from_output(out, [7, 7])  # 8 tokens each: 2 full blocks each, none free
    assert s.kv.num_free_blocks == 0
    a.spec_token_ids = [1, 2]  # they would need a third block
    out = s.schedule()
    assert out.spec_token_ids == {} and out.num_scheduled_tokens == {"a": 1, "b": 1}
    assert s.num_preemptions == 0
    s.update_from_output(out, [9, 9])
    s.kv.check_integrity()

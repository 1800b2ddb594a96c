"""Prefill on one engine, decode on another: the KV moves as protobuf chunks, and the output
equals a single engine's (and so Hugging Face's) token for token."""

import pytest
import torch

from tandem.engine.llm import LLM
from tandem.engine.request import RequestStatus, SamplingParams
from tandem.services.transport import codec, kv_transfer


def _prompts():
    g = torch.Generator().manual_seed(3)
    return [torch.randint(3, 256, (n,), generator=g).tolist() for n in (1, 7, 16, 23, 40)]


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(max_tokens=20, temperature=0.0),
        # Seeded sampling: the decode engine picks up the seed's stream where prefill left it.
        SamplingParams(max_tokens=20, temperature=0.9, top_p=0.95, seed=11, ignore_eos=True),
    ],
    ids=["greedy", "seeded"],
)
def test_prefill_then_decode_elsewhere_matches_one_engine(tiny_model, params):
    reference = LLM(
        tiny_model, dtype="float32", num_gpu_blocks_override=128, block_size=4, max_model_len=96
    )
    expected = [o.outputs[0].token_ids for o in reference.generate(_prompts(), params)]

    prefill = LLM(
        tiny_model, dtype="float32", num_gpu_blocks_override=64, block_size=4, max_model_len=96
    ).engine
    decode = LLM(
        tiny_model, dtype="float32", num_gpu_blocks_override=96, block_size=4, max_model_len=96
    ).engine
    held = decode.kv.pool.allocate(5)  # the decode pool's block ids differ from the prefill pool's
    from tandem.engine.request import Request

    for i, prompt in enumerate(_prompts()):
        prefill.add_request(Request(f"r{i}", prompt, params))
    handed = 0
    while prefill.has_unfinished:
        for out in prefill.step():
            assert out.new_token_ids and not out.finished
            req, kv = prefill.hand_off(out.request.request_id)
            assert req.status is RequestStatus.HANDED_OFF
            chunks = kv_transfer.kv_to_chunks(req.request_id, kv, max_bytes=3 * kv[0].numel() * 4)
            wire = [type(c).FromString(c.SerializeToString()) for c in chunks]
            tiles = [kv_transfer.kv_from_chunk(c, prefill.runner.kv_tile_shape) for c in wire]
            spec = codec.request_to_spec(req)
            moved = codec.request_from_spec(type(spec).FromString(spec.SerializeToString()))
            assert moved.output_token_ids == out.new_token_ids
            assert decode.add_prefilled_request(moved, tiles, req.num_computed_tokens)
            handed += 1
    assert handed == len(expected)
    assert prefill.kv.num_free_blocks == prefill.runner.info.num_blocks  # all back (cached)
    got = {}
    while decode.has_unfinished:
        for out in decode.step():
            got.setdefault(out.request.request_id, list(out.request.output_token_ids[:-1]))
            got[out.request.request_id].append(out.new_token_ids[0])
    assert [got[f"r{i}"] for i in range(len(expected))] == expected
    assert decode.kv.num_free_blocks == decode.runner.info.num_blocks - 5
    decode.kv.pool.free(held)
    decode.kv.check_integrity()
    prefill.kv.check_integrity()


def test_prefilled_request_that_does_not_fit_changes_nothing(tiny_llama):
    from tandem.engine.request import Request

    prefill = LLM(
        tiny_llama, dtype="float32", num_gpu_blocks_override=64, block_size=4, max_model_len=96
    ).engine
    decode = LLM(
        tiny_llama, dtype="float32", num_gpu_blocks_override=24, block_size=4, max_model_len=96
    ).engine
    prefill.add_request(Request("big", list(range(3, 43)), SamplingParams(max_tokens=4)))
    prefill.step()
    req, kv = prefill.hand_off("big")
    held = decode.kv.pool.allocate(20)  # leave 4 free blocks: 40 tokens need 10
    assert not decode.add_prefilled_request(req, [kv], req.num_computed_tokens)
    assert decode.kv.num_free_blocks == 4 and not decode.has_unfinished
    assert "big" not in decode.scheduler.requests
    decode.kv.pool.free(held)
    decode.kv.check_integrity()


def test_planned_chunked_prefill_then_decode_matches_one_engine(tiny_llama):
    """A prefill engine driven by outside plans (8 tokens per request per step)."""
    from tandem.engine.request import Request

    params = SamplingParams(max_tokens=12, temperature=0.0)
    kw = dict(dtype="float32", block_size=4, max_model_len=96)
    prompts = _prompts()
    expected = [
        o.outputs[0].token_ids
        for o in LLM(tiny_llama, num_gpu_blocks_override=128, **kw).generate(prompts, params)
    ]
    prefill = LLM(tiny_llama, num_gpu_blocks_override=64, **kw).engine
    decode = LLM(tiny_llama, num_gpu_blocks_override=96, **kw).engine
    remaining = {}
    for i, prompt in enumerate(prompts):
        prefill.add_request(Request(f"r{i}", prompt, params))
        remaining[f"r{i}"] = len(prompt)
    steps = 0
    while remaining:
        plan = {rid: min(8, left) for rid, left in remaining.items()}
        outs, failed, _ = prefill.step_plan(plan)
        assert not failed
        steps += 1
        for rid, n in plan.items():
            remaining[rid] -= n
        for out in outs:
            req, kv = prefill.hand_off(out.request.request_id)
            assert remaining.pop(req.request_id) == 0
            assert decode.add_prefilled_request(req, [kv], req.num_computed_tokens)
    assert steps == 5  # the 40-token prompt took five 8-token chunks
    got = {}
    while decode.has_unfinished:
        for out in decode.step():
            got[out.request.request_id] = out.request.output_token_ids
    assert [got[f"r{i}"] for i in range(len(prompts))] == expected
    assert prefill.kv.num_free_blocks == prefill.runner.info.num_blocks


def test_plan_entry_that_does_not_fit_fails_and_frees(tiny_llama):
    from tandem.engine.request import Request

    prefill = LLM(
        tiny_llama, dtype="float32", num_gpu_blocks_override=24, block_size=4, max_model_len=96
    ).engine
    prefill.add_request(Request("a", list(range(3, 63)), SamplingParams(max_tokens=2)))
    prefill.add_request(Request("b", list(range(100, 160)), SamplingParams(max_tokens=2)))
    outs, failed, _ = prefill.step_plan({"a": 60, "b": 60})  # 15 blocks each, 24 in the pool
    assert failed == ["b"] and [o.request.request_id for o in outs] == ["a"]
    assert "b" not in prefill.scheduler.requests
    prefill.hand_off("a")
    assert prefill.kv.num_free_blocks == 24 and not prefill.has_unfinished
    prefill.kv.check_integrity()


def test_a_reservation_whose_hand_off_never_comes_is_a_lease_that_expires(tiny_llama, monkeypatch):
    """A decode worker holds a probed prefix for the hand-off; when its prefill worker dies
    after probing, the lease runs out and the blocks come back."""
    import asyncio

    from tandem.engine.request import Request
    from tandem.services.decode import service

    llm = LLM(
        tiny_llama, dtype="float32", num_gpu_blocks_override=32, block_size=4, max_model_len=96
    )
    prompt = list(range(3, 23))
    llm.generate([prompt], SamplingParams(max_tokens=1))  # its blocks are now cached

    async def scenario() -> None:
        worker = service.DecodeWorker(llm.engine.config, bus=None, worker_id="decode-x")
        worker.engine = llm.engine
        spec = codec.request_to_spec(Request("r", prompt, SamplingParams(max_tokens=4)))
        assert worker._reserve(spec) == 4  # full blocks but the last: one token is computed
        assert llm.engine.kv.num_free_blocks == 32 - 4
        await worker.tick()  # within the lease: kept
        assert "r" in worker.reserved
        monkeypatch.setattr(service, "RESERVE_LEASE", 0.0)
        await worker.tick()
        assert not worker.reserved and llm.engine.kv.num_free_blocks == 32
        llm.engine.kv.check_integrity()
        worker.driver.shutdown()

    asyncio.run(scenario())


def test_kv_goes_through_shared_memory_and_over_nats_when_the_file_cannot_be_mapped(
    tiny_llama, monkeypatch
):
    """Two workers on one machine: the first hand-off's KV is a file in /dev/shm. The decode
    worker then fails to map one (as if it saw another /dev/shm): it refuses that hand-off,
    and the prefill worker sends the same request again in chunks over NATS, and keeps to
    NATS for that worker. Both requests decode to the one engine's tokens; no file is left."""
    import asyncio

    from tandem.engine.request import Request
    from tandem.services.decode.service import DecodeWorker
    from tandem.services.prefill.service import PrefillWorker
    from tandem.services.servers import start_nats
    from tandem.services.transport import kv_shm
    from tandem.services.transport.bus import Bus

    if not kv_shm.domain():
        pytest.skip("no shared memory on this machine")
    params = SamplingParams(max_tokens=8, temperature=0.0)
    kw = dict(dtype="float32", block_size=4, max_model_len=96)
    prompts = _prompts()[2:4]  # 16 and 23 tokens
    reference = LLM(tiny_llama, num_gpu_blocks_override=128, **kw)
    expected = [o.outputs[0].token_ids for o in reference.generate(prompts, params)]
    prefill_engine = LLM(tiny_llama, num_gpu_blocks_override=64, **kw).engine
    decode_engine = LLM(tiny_llama, num_gpu_blocks_override=96, **kw).engine
    mapped: list[str] = []
    map_tiles = kv_shm.map_tiles

    def map_once(kv_file, tile_shape):
        if mapped:
            raise PermissionError(13, "Permission denied")
        mapped.append(kv_file.name)
        return map_tiles(kv_file, tile_shape)

    monkeypatch.setattr(kv_shm, "map_tiles", map_once)
    server = start_nats()

    async def scenario():
        buses = [await Bus.connect(server.url, name) for name in ("p", "d")]
        decode = DecodeWorker(decode_engine.config, buses[1], "decode-t")
        prefill = PrefillWorker(prefill_engine.config, buses[0], "prefill-t")
        decode.engine, prefill.engine = decode_engine, prefill_engine
        await decode.subscribe()
        await buses[1].flush()
        for i, prompt in enumerate(prompts):
            prefill_engine.add_request(Request(f"r{i}", prompt, params))
            prefill.decode_of[f"r{i}"] = "decode-t"
        for out in prefill_engine.step():
            await prefill._hand_off(*prefill_engine.hand_off(out.request.request_id))
        for bus in buses:
            await bus.close()
        for worker in (decode, prefill):
            worker.driver.shutdown()
        return prefill, decode

    try:
        prefill, decode = asyncio.run(scenario())
    finally:
        server.stop()
    assert prefill.num_kv_transfers == 2 and prefill.num_kv_file_transfers == 1
    assert prefill.no_shared_memory == {"decode-t"} and len(mapped) == 1
    assert [a.request.request_id for a in decode.arrivals] == ["r0", "r1"]
    assert decode.assembler.num_pending == 0 and not decode.reserved
    assert not (kv_shm.SHM_DIR / mapped[0]).exists(), "the KV file was left in /dev/shm"
    decode._admit()
    got = {}
    while decode_engine.has_unfinished:
        for out in decode_engine.step():
            got[out.request.request_id] = out.request.output_token_ids
    assert [got["r0"], got["r1"]] == expected
    decode_engine.kv.check_integrity()


def test_a_hand_off_whose_reservation_went_is_placed_again_not_failed(tiny_llama, monkeypatch):
    """A decode worker lets a probed reservation go before its hand-off arrives (it is
    handing its requests back on shutdown, or the lease ran out): it refuses the hand-off
    saying so, and the prefill worker sends the request back to the scheduler to be placed
    again; the client's stream is not ended with an error."""
    import asyncio

    from tandem.engine.request import Request
    from tandem.services.decode.service import DecodeWorker
    from tandem.services.prefill.service import PrefillWorker
    from tandem.services.servers import start_nats
    from tandem.services.transport.bus import Bus
    from tandem.services.transport.subjects import subject
    from tandem.v1 import engine_pb2

    kw = dict(dtype="float32", block_size=4, max_model_len=96)
    prefill_engine = LLM(tiny_llama, num_gpu_blocks_override=64, **kw).engine
    decode_engine = LLM(tiny_llama, num_gpu_blocks_override=64, **kw).engine
    on_handoff = DecodeWorker._on_handoff

    async def released_first(self, handoff, raw):
        await self.driver.call(self._hand_back_on_thread)  # as a shutdown's hand-back does
        await on_handoff(self, handoff, raw)

    monkeypatch.setattr(DecodeWorker, "_on_handoff", released_first)
    server = start_nats()

    async def scenario():
        buses = [await Bus.connect(server.url, name) for name in ("p", "d", "s")]
        decode = DecodeWorker(decode_engine.config, buses[1], "decode-t")
        prefill = PrefillWorker(prefill_engine.config, buses[0], "prefill-t")
        decode.engine, prefill.engine = decode_engine, prefill_engine
        preempted, tokens = [], []

        async def on_preempted(msg, raw):
            preempted.append(msg)

        async def on_tokens(msg, raw):
            tokens.append(msg)

        await buses[2].subscribe(
            subject("scheduler", "preempted"), engine_pb2.Preempted, on_preempted
        )
        await buses[2].subscribe(subject("tokens"), engine_pb2.TokenBatch, on_tokens)
        await decode.subscribe()
        for bus in buses:
            await bus.flush()
        prompt = _prompts()[3]
        prefill_engine.add_request(Request("r0", prompt, SamplingParams(max_tokens=8)))
        prefill.decode_of["r0"] = "decode-t"
        for out in prefill_engine.step():
            await prefill._hand_off(*prefill_engine.hand_off(out.request.request_id))
        await buses[0].flush()
        await asyncio.sleep(0.2)
        for bus in buses:
            await bus.close()
        for worker in (decode, prefill):
            worker.driver.shutdown()
        return decode, preempted, tokens

    try:
        decode, preempted, tokens = asyncio.run(scenario())
    finally:
        server.stop()
    assert [m.request.request_id for m in preempted] == ["r0"] and not tokens
    assert list(preempted[0].request.prompt_token_ids) == _prompts()[3]
    assert not decode.arrivals and not decode.reserved and decode.assembler.num_pending == 0
    assert decode_engine.kv.num_free_blocks == 64 and prefill_engine.kv.num_free_blocks == 64
    decode_engine.kv.check_integrity()

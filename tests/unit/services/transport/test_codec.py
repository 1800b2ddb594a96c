"""Protobuf <-> engine types: every conversion round-trips."""

import pytest
import torch

from tandem.engine.request import Request, SamplingParams
from tandem.services.transport import codec, kv_transfer


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(),
        SamplingParams(max_tokens=7, temperature=0.0, ignore_eos=True, min_tokens=3),
        SamplingParams(
            temperature=0.7,
            top_p=0.9,
            top_k=40,
            min_p=0.05,
            seed=0,
            stop=("\n\n", "END"),
            stop_token_ids=(5, 9),
            include_stop_str_in_output=True,
        ),
    ],
)
def test_sampling_params_round_trip(params):
    msg = codec.sampling_params_to_proto(params)
    assert codec.sampling_params_from_proto(type(msg).FromString(msg.SerializeToString())) == params


def test_seed_zero_is_not_lost():
    msg = codec.sampling_params_to_proto(SamplingParams(seed=0))
    assert msg.HasField("seed") and codec.sampling_params_from_proto(msg).seed == 0
    assert (
        codec.sampling_params_from_proto(codec.sampling_params_to_proto(SamplingParams())).seed
        is None
    )


def test_bad_values_on_the_wire_raise_value_error():
    msg = codec.sampling_params_to_proto(SamplingParams())
    msg.top_p = 1.5
    with pytest.raises(ValueError, match="top_p"):
        codec.sampling_params_from_proto(msg)


def test_request_round_trip_keeps_generated_tokens():
    req = Request(
        "r-1",
        [1, 2, 3],
        SamplingParams(max_tokens=9, seed=4),
        eos_token_id=2,
        arrival_time=12.5,
        priority=-3,
        cache_salt="tenant-a",
        output_token_ids=[7, 8],
    )
    spec = codec.request_to_spec(req, reply_subject="tandem.gw.x", trace_context={"a": "b"})
    spec = type(spec).FromString(spec.SerializeToString())
    back = codec.request_from_spec(spec)
    assert spec.reply_subject == "tandem.gw.x" and dict(spec.trace_context) == {"a": "b"}
    for field in (
        "request_id",
        "prompt_token_ids",
        "sampling_params",
        "eos_token_id",
        "arrival_time",
        "priority",
        "cache_salt",
        "output_token_ids",
        "all_token_ids",
    ):
        assert getattr(back, field) == getattr(req, field), field


def test_request_without_eos_or_salt():
    req = Request("r-2", [4], SamplingParams())
    back = codec.request_from_spec(codec.request_to_spec(req))
    assert back.eos_token_id is None and back.cache_salt is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kv_chunks_round_trip_under_max_bytes(dtype):
    tile = (3, 2, 2, 4, 8)  # layers, k/v, kv heads, block size, head dim
    kv = torch.randn(11, *tile).to(dtype)
    block_bytes = kv[0].numel() * kv.element_size()
    max_bytes = 3 * block_bytes + 17
    chunks = kv_transfer.kv_to_chunks("r", kv, max_bytes)
    assert len(chunks) == 4 and all(len(c.data) <= max_bytes for c in chunks)
    assert [c.first_block for c in chunks] == [0, 3, 6, 9]
    wire = [type(c).FromString(c.SerializeToString()) for c in chunks]
    parts = [kv_transfer.kv_from_chunk(c, tile) for c in wire]
    assert torch.equal(torch.cat(parts), kv)


def test_kv_block_larger_than_max_bytes_is_refused():
    with pytest.raises(ValueError, match="KV block"):
        kv_transfer.kv_to_chunks("r", torch.zeros(2, 64), max_bytes=100)

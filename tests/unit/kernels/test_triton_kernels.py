"""The triton kernels against their plain-torch references. On a machine without a GPU they
run under triton's interpreter (`TRITON_INTERPRET=1`, set here before the kernels are
decorated): correct in fp32 and fp16, slow, so the shapes are small. With CUDA they run for
real (`scripts/gpu_check.sh`)."""

from __future__ import annotations

import importlib
import os
import sys

import pytest
import torch

ON_GPU = torch.cuda.is_available()
if not ON_GPU:  # the kernels decorated afresh, interpreted (triton reads it at call time too)
    os.environ["TRITON_INTERPRET"] = "1"
    sys.modules.pop("tandem.kernels.triton_attention", None)
triton_attention = importlib.import_module("tandem.kernels.triton_attention")
from tandem.kernels.reference import reshape_and_cache_ref, unified_attention_ref  # noqa: E402

DEVICE = torch.device("cuda" if ON_GPU else "cpu")
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3}


def batch(q_lens, seq_lens, *, heads=6, kv_heads=2, head_dim=12, block_size=16,
          dtype=torch.float32, seed=0):  # fmt: skip
    """Queries, a cache with random contents, and each sequence's blocks scattered in it."""
    gen = torch.Generator().manual_seed(seed)
    num_blocks = sum(-(-s // block_size) for s in seq_lens) + 3
    shape = (num_blocks, kv_heads, block_size, head_dim)
    k_cache = torch.randn(shape, generator=gen).to(dtype)
    v_cache = torch.randn(shape, generator=gen).to(dtype)
    q = torch.randn(sum(q_lens), heads, head_dim, generator=gen).to(dtype)
    order = torch.randperm(num_blocks, generator=gen).tolist()
    width = max(-(-s // block_size) for s in seq_lens) + 1  # a spare column, as padding
    tables = torch.zeros(len(seq_lens), width, dtype=torch.int32)
    for i, s in enumerate(seq_lens):
        n = -(-s // block_size)
        tables[i, :n] = torch.tensor(order[:n], dtype=torch.int32)
        order = order[n:]
    starts = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    return [t.to(DEVICE) for t in (q, k_cache, v_cache, starts, lens, tables)]


def check(q_lens, seq_lens, num_segments=None, **shape):
    q, k_cache, v_cache, starts, lens, tables = batch(q_lens, seq_lens, **shape)
    scale = q.shape[-1] ** -0.5
    out = torch.full_like(q, float("nan"))
    triton_attention.unified_attention(
        q, k_cache, v_cache, out, starts, lens, tables, max(q_lens), scale, num_segments
    )
    ref = unified_attention_ref(q, k_cache, v_cache, starts, lens, tables, scale)
    torch.testing.assert_close(out, ref, atol=TOLERANCE[q.dtype], rtol=TOLERANCE[q.dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_one_launch_serves_decodes_prefill_chunks_over_a_prefix_and_whole_prompts(dtype):
    # decodes (one query over a context ending inside a block or on its edge), a chunk over a
    # cached prefix, a whole prompt longer than a tile of queries
    check([1, 1, 5, 70], [7, 32, 38, 70], dtype=dtype)


@pytest.mark.parametrize(
    ("heads", "kv_heads", "head_dim", "block_size"),
    [(4, 4, 64, 16), (8, 1, 32, 32), (3, 1, 16, 8), (9, 3, 64, 16)],
)
def test_shapes_gqa_head_sizes_and_block_sizes(heads, kv_heads, head_dim, block_size):
    check([1, 3, 17], [50, 20, 17], heads=heads, kv_heads=kv_heads, head_dim=head_dim,
          block_size=block_size)  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("segments", [2, 5])
def test_a_split_decode_merges_its_segments_exactly(dtype, segments):
    # contexts shorter than the segments (some get no keys at all) and longer ones
    check([1, 1, 1, 1], [1, 9, 70, 130], num_segments=segments, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_reshape_and_cache_writes_each_token_to_its_slot(dtype):
    gen = torch.Generator().manual_seed(3)
    k = torch.randn(7, 2, 12, generator=gen).to(dtype).to(DEVICE)
    v = torch.randn(7, 2, 12, generator=gen).to(dtype).to(DEVICE)
    slots = torch.tensor([5, 16, 17, 40, -1, 3, 63], device=DEVICE)  # -1: a padded row
    caches = [torch.zeros(4, 2, 16, 12, dtype=dtype, device=DEVICE) for _ in range(4)]
    triton_attention.reshape_and_cache(k, v, caches[0], caches[1], slots)
    reshape_and_cache_ref(k, v, caches[2], caches[3], slots)
    assert torch.equal(caches[0], caches[2]) and torch.equal(caches[1], caches[3])
    assert caches[0].count_nonzero() == 6 * 2 * 12  # the padded row wrote nothing


def test_the_kernels_run_interpreted_here_or_on_a_gpu():
    import triton

    jit = triton_attention._unified_attention
    assert ON_GPU or type(jit).__name__ == "InterpretedFunction", type(jit)
    assert triton.__version__


RUN_THROUGH_KERNELS = """
import json, sys
from tandem.engine.llm import LLM
from tandem.engine.request import SamplingParams

llm = LLM(sys.argv[1], dtype="float32", num_gpu_blocks_override=64, max_model_len=128,
          max_num_batched_tokens=24)  # prompts in chunks, decodes beside them
prompts = json.loads(sys.argv[2])
params = SamplingParams(max_tokens=5, temperature=0)
first = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
again = [o.outputs[0].token_ids for o in llm.generate(prompts[:1], params)]  # a cache hit
print(json.dumps([first, again]))
"""


def test_a_model_runs_through_the_kernels_as_hugging_face(tiny_llama):
    """The engine with the triton path forced (`TANDEM_ATTENTION_BACKEND=triton`), in a
    process of its own: greedy tokens equal Hugging Face's in fp32, through chunked
    prefill, decodes batched with prefill chunks, and a prefix-cache hit."""
    import json
    import subprocess

    from transformers import AutoModelForCausalLM

    from tests.helpers.hf import hf_greedy

    prompts = [[5 + i for i in range(30)], [9, 8, 7], [100 + i for i in range(20)]]
    env = os.environ | {"TRITON_INTERPRET": "1", "TANDEM_ATTENTION_BACKEND": "triton"}
    done = subprocess.run(
        [sys.executable, "-c", RUN_THROUGH_KERNELS, tiny_llama, json.dumps(prompts)],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    first, again = json.loads(done.stdout.strip().splitlines()[-1])
    hf = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    assert first == [hf_greedy(hf, p, 5) for p in prompts]
    assert again == first[:1]


def test_a_padded_decode_batch_gives_each_real_row_what_eager_gives(tiny_llama):
    """CUDA graphs' padding (cuda_graphs.py) with the graph replaced by a plain forward pass
    at the padded size: padded rows write no KV and change no real row."""
    from tandem.engine.attention import AttnMetadata, TritonBatch
    from tandem.engine.config import CacheConfig, ModelConfig
    from tandem.engine.cuda_graphs import DecodeGraphs, default_capture_sizes, padded_size
    from tandem.engine.model_runner import ModelRunner

    assert default_capture_sizes(20) == [1, 2, 4, 8, 16]
    assert padded_size(3, [1, 2, 4, 8]) == 4 and padded_size(9, [1, 2, 4, 8]) is None

    class Unrecorded(DecodeGraphs):
        def _replay(self, size):
            return self._forward(size)

    model = ModelConfig(tiny_llama, dtype="float32", max_model_len=64, enforce_eager=True)
    runner = ModelRunner(model, CacheConfig(num_gpu_blocks_override=16))
    dev = runner.device
    gen = torch.Generator().manual_seed(0)
    for k, v in runner.kv_caches:
        k.copy_(torch.randn(k.shape, generator=gen))
        v.copy_(torch.randn(v.shape, generator=gen))
    graphs = Unrecorded(runner.model, runner.kv_caches, [1, 4, 8], 4, dev)
    tables, lens = [[3, 7], [5], [9, 2, 11]], [20, 9, 40]
    ids, positions = [11, 22, 33], [c - 1 for c in lens]
    slots = torch.tensor([t[(c - 1) // 16] * 16 + (c - 1) % 16 for t, c in zip(tables, lens)])
    untouched = [k.clone() for k, _ in runner.kv_caches]
    padded = torch.tensor([t + [0] * (3 - len(t)) for t in tables], dtype=torch.int32)
    lens_t = torch.tensor(lens, dtype=torch.int32, device=dev)
    batch = TritonBatch(torch.arange(4, dtype=torch.int32, device=dev), lens_t, padded.to(dev), 1)
    with torch.inference_mode():
        graphed = graphs.run(ids, positions, lens, tables, slots).clone()  # padded to 4
        after = [k.clone() for k, _ in runner.kv_caches]
        eager = runner.model(torch.tensor(ids, device=dev), torch.tensor(positions, device=dev),
                             AttnMetadata(slots.to(dev), batch), runner.kv_caches)  # fmt: skip
    torch.testing.assert_close(graphed, eager)
    for before, now in zip(untouched, after):  # only the three real rows' slots changed
        changed = (before != now).any(-1).nonzero()[:, [0, 2]].unique(dim=0)
        assert sorted((b * 16 + o) for b, o in changed.tolist()) == sorted(slots.tolist())

"""Pooling: the model folder's pooling read as sentence-transformers writes it, the runner
detected, parameters checked and carried on the wire; the central scheduler places pooling
requests on prefill workers only; and the engine pools a decoder's prompt (last token,
through chunks and a prefix-cache hit; mean, whole) as Hugging Face computes it."""

from __future__ import annotations

import json

import pytest
import torch

from tandem.engine.pooling import PoolerConfig, PoolingParams, detect_runner
from tandem.engine.request import SamplingParams
from tandem.services.transport import codec

LLAMA = {"architectures": ["LlamaForCausalLM"]}
BERT = {"architectures": ["BertModel"]}


def test_the_folder_says_how_to_pool(tmp_path):
    assert PoolerConfig.of_model(tmp_path, LLAMA) == PoolerConfig("LAST", True)
    assert PoolerConfig.of_model(tmp_path, BERT).pooling_type == "CLS"
    classifier = {"architectures": ["BertForSequenceClassification"]}
    assert PoolerConfig.of_model(tmp_path, classifier).normalize is False
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps(
        {"pooling_mode_mean_tokens": True, "pooling_mode_cls_token": False}))  # fmt: skip
    modules = [{"type": "sentence_transformers.models.Transformer", "path": ""},
               {"type": "sentence_transformers.models.Pooling", "path": "1_Pooling"}]  # fmt: skip
    (tmp_path / "modules.json").write_text(json.dumps(modules))
    assert PoolerConfig.of_model(tmp_path, BERT) == PoolerConfig("MEAN", False)
    modules.append({"type": "sentence_transformers.models.Normalize", "path": "2_Normalize"})
    (tmp_path / "modules.json").write_text(json.dumps(modules))
    assert PoolerConfig.of_model(tmp_path, BERT) == PoolerConfig("MEAN", True)
    override = PoolerConfig.of_model(tmp_path, BERT, '{"pooling_type": "cls", "normalize": false}')
    assert override == PoolerConfig("CLS", False)
    with pytest.raises(ValueError, match="pooler-config takes an object with keys"):
        PoolerConfig.of_model(tmp_path, BERT, '{"pool": "MEAN"}')
    with pytest.raises(ValueError, match="pooling_type"):
        PoolerConfig.of_model(tmp_path, BERT, '{"pooling_type": "MAX"}')


def test_the_runner_is_detected_from_the_folder(tmp_path):
    assert detect_runner(tmp_path, LLAMA) == "generate"
    assert detect_runner(tmp_path, LLAMA, convert="embed") == "pooling"
    assert detect_runner(tmp_path, BERT) == "pooling"
    with pytest.raises(ValueError, match="encoder"):
        detect_runner(tmp_path, BERT, runner="generate")
    (tmp_path / "modules.json").write_text("[]")  # a sentence-transformers folder
    assert detect_runner(tmp_path, LLAMA) == "pooling"


def test_pooling_parameters_are_checked_and_travel():
    with pytest.raises(ValueError, match="task"):
        PoolingParams(task="generate")
    with pytest.raises(ValueError, match="dimensions"):
        PoolingParams(dimensions=0)
    for params in (PoolingParams(), PoolingParams("classify", None, None, False),
                   PoolingParams("embed", 64, True, None)):  # fmt: skip
        sampling = SamplingParams(max_tokens=1, pooling=params)
        back = codec.sampling_params_from_proto(codec.sampling_params_to_proto(sampling))
        assert back.pooling == params
    vector, rows = torch.arange(4.0), torch.arange(6.0).view(2, 3)
    assert codec.pooled_from_proto(codec.pooled_to_proto(vector)) == [0.0, 1.0, 2.0, 3.0]
    assert codec.pooled_from_proto(codec.pooled_to_proto(rows)) == [[0, 1, 2], [3, 4, 5]]


def test_the_central_scheduler_places_pooling_on_prefill_workers_only():
    from tandem.services.scheduler.core import ClusterScheduler, PendingRequest, Role

    core = ClusterScheduler(clock=lambda: 0.0)
    core.on_heartbeat("p0", Role.PREFILL, num_blocks=100, num_free_blocks=100, block_size=16,
                      max_num_seqs=8, max_num_batched_tokens=64, vocab_size=100,
                      max_model_len=128)  # fmt: skip
    generate = PendingRequest("g", 10, 0, 0.0, None, [1] * 10)
    with pytest.raises(Exception, match="no decode worker"):
        core.add_request(generate)
    for rid, n in (("a", 40), ("b", 40), ("c", 128)):  # c: as long as the context allows
        core.add_request(PendingRequest(rid, n, 0, 0.0, None, [1] * n, pooling=True))
    (plan,) = core.schedule()[:1]
    # whole prompts that fit a step: a (40) now, b waits for the next step, not split
    assert [(c.request.request_id, c.num_tokens) for c in plan.chunks] == [("a", 40)]
    assert core.prefilling["a"].decode_worker_id == ""


# -- the engine ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_base(tiny_llama):
    from transformers import AutoModel

    return AutoModel.from_pretrained(tiny_llama, dtype=torch.float32).eval()


PROMPTS = [[5 + i for i in range(30)], [9, 8, 7], [100 + i for i in range(20)]]


def hidden(hf, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf(torch.tensor([ids])).last_hidden_state[0]


def test_a_decoder_embeds_its_last_token_through_chunks_and_the_cache(tiny_llama, hf_base):
    from tandem.engine.llm import LLM

    llm = LLM(tiny_llama, dtype="float32", num_gpu_blocks_override=64, max_model_len=128,
              max_num_batched_tokens=16, convert="embed")  # fmt: skip
    outs = llm.embed(PROMPTS)  # the 30-token prompt runs in two chunks
    for ids, out in zip(PROMPTS, outs):
        expected = torch.nn.functional.normalize(hidden(hf_base, ids)[-1], dim=-1)
        assert (out.data - expected).abs().max().item() < 1e-5
    again = llm.embed(PROMPTS[:1])[0]
    assert again.num_cached_tokens == 16 and torch.allclose(again.data, outs[0].data, atol=1e-6)
    raw = llm.embed(PROMPTS[1:2], normalize=False, dimensions=5)[0].data
    # Two fp32 computations summing in different orders (decode-sized products: linear_rows):
    # against the float64 value, HF's first element is 1.1e-5 off here, Tandem's 0.7e-5.
    assert torch.allclose(raw, hidden(hf_base, PROMPTS[1])[-1][:5], atol=3e-5)
    with pytest.raises(ValueError, match="pooling model"):
        llm.generate([[1, 2, 3]])


def test_mean_pooling_runs_each_prompt_whole(tiny_llama, hf_base):
    from tandem.engine.llm import LLM

    llm = LLM(tiny_llama, dtype="float32", num_gpu_blocks_override=64, max_model_len=128,
              max_num_batched_tokens=32, convert="embed",
              pooler_config='{"pooling_type": "MEAN", "normalize": false}')  # fmt: skip
    outs = llm.embed(PROMPTS)  # 30 + 3 + 20 > 32: not all in one step, none split
    for ids, out in zip(PROMPTS, outs):
        assert (out.data - hidden(hf_base, ids).mean(0)).abs().max().item() < 1e-5
    assert llm.embed(PROMPTS[:1])[0].num_cached_tokens == 0  # never from the cache
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        llm.embed([list(range(5, 45))])  # 40 tokens cannot fit one step of 32

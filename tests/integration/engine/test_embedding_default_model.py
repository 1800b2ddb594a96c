"""The default chat model served as an embedder (`--convert embed`): its last token's hidden
state, normalized, equals Hugging Face's in fp32, alone and batched, and from the cache."""

from __future__ import annotations

import torch


def test_last_token_embeddings_of_the_default_model_equal_hugging_face(default_model):
    from transformers import AutoModel, AutoTokenizer

    from tandem.engine.llm import LLM

    texts = ["The capital of France is Paris.", "hello", "Embeddings " * 40]
    llm = LLM(default_model, dtype="float32", max_model_len=512, convert="embed",
              num_gpu_blocks_override=256, max_num_batched_tokens=64)  # fmt: skip
    outs = llm.embed(texts)
    tok = AutoTokenizer.from_pretrained(default_model)
    hf = AutoModel.from_pretrained(default_model, dtype=torch.float32).eval()
    for text, out in zip(texts, outs):
        ids = tok(text)["input_ids"]
        assert out.prompt_token_ids == ids
        with torch.no_grad():
            last = hf(torch.tensor([ids])).last_hidden_state[0, -1]
        expected = torch.nn.functional.normalize(last, dim=-1)
        assert (out.data - expected).abs().max().item() < 1e-5
    again = llm.embed(texts[2:])[0]  # its blocks from the prefix cache
    assert again.num_cached_tokens > 0
    assert (again.data - outs[2].data).abs().max().item() < 1e-5

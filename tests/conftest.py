"""Shared fixtures: tiny random-weight models of each supported family, saved as HF folders."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

DEFAULT_MODEL_ENV = "TANDEM_TEST_MODEL"


def _tokenizer_for(path):
    """A tiny byte-level BPE tokenizer with a chat template, written next to the model."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=200,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    corpus = ["the quick brown fox jumps over the lazy dog", "héllo wörld ünïcode ✓ 日本語"] * 50
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        bos_token="<|im_start|>",
        pad_token="<|endoftext|>",
    )
    fast.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    fast.save_pretrained(path)


TINY_CONFIGS = {
    # GQA (6 query heads on 2 KV heads), head_dim 12: not powers of two.
    "llama": dict(
        cls="LlamaConfig",
        hidden_size=72,
        intermediate_size=144,
        num_hidden_layers=2,
        num_attention_heads=6,
        num_key_value_heads=2,
        head_dim=12,
    ),
    # Qwen2: bias on q/k/v, 3 heads on 1 KV head, untied lm_head.
    "qwen2": dict(
        cls="Qwen2Config",
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=3,
        num_key_value_heads=1,
        tie_word_embeddings=False,
    ),
}


def build_tiny_model(family: str, path) -> str:
    import transformers

    spec = dict(TINY_CONFIGS[family])
    config_cls = getattr(transformers, spec.pop("cls"))
    config = config_cls(
        vocab_size=256,
        max_position_embeddings=512,
        eos_token_id=2,
        bos_token_id=1,
        pad_token_id=0,
        initializer_range=0.5,
        **spec,
    )
    torch.manual_seed(1234)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(path, safe_serialization=True)
    _tokenizer_for(path)
    return str(path)


@pytest.fixture(scope="session", params=sorted(TINY_CONFIGS))
def tiny_model(request, tmp_path_factory) -> str:
    return build_tiny_model(request.param, tmp_path_factory.mktemp(request.param))


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> str:
    return build_tiny_model("llama", tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="session")
def default_model() -> str:
    """The prepared default model (make test prepares it before pytest runs)."""
    from tandem.model_prep import default_model_dir

    path = os.environ.get(DEFAULT_MODEL_ENV) or str(default_model_dir())
    if not os.path.isfile(os.path.join(path, "config.json")):
        pytest.fail(f"default model missing at {path}: run `tandem model prepare`")
    return path

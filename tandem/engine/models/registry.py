"""Model classes by the `architectures` name in a Hugging Face config.json."""

from __future__ import annotations

from torch import nn

from tandem.engine.models.bert import BertForSequenceClassification, BertModel
from tandem.engine.models.llama import LlamaForCausalLM, Qwen2ForCausalLM

MODEL_REGISTRY: dict[str, type[nn.Module]] = {
    "BertForSequenceClassification": BertForSequenceClassification,
    "BertModel": BertModel,
    "LlamaForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
}


def resolve_model_class(hf_config: dict) -> type[nn.Module]:
    names = hf_config.get("architectures") or []
    for name in names:
        if name in MODEL_REGISTRY:
            return MODEL_REGISTRY[name]
    raise ValueError(
        f"unsupported architectures {names}; supported: {', '.join(sorted(MODEL_REGISTRY))}"
    )

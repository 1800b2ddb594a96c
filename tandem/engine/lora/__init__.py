"""Multi-LoRA serving: PEFT adapters over one base model, many in one batch."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class LoRARequest:
    """vLLM's LoRARequest: the adapter a request runs with (`LLM.generate(lora_request=)`)."""

    lora_name: str
    lora_int_id: int
    lora_path: str

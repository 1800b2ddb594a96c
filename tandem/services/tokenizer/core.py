"""The tokenizer stage's pure core: prompts to ids, chat templates, ids to text."""

from __future__ import annotations

from tandem.engine.tokenizer import load_tokenizer


class TokenizerCore:
    """A model folder's tokenizer and chat template. Bad input raises ValueError."""

    def __init__(self, model_dir: str) -> None:
        self.model_dir = model_dir
        self.tokenizer = load_tokenizer(model_dir)
        self.vocab_size = len(self.tokenizer)
        self.eos_token_id = self.tokenizer.eos_token_id

    def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def apply_chat_template(
        self, messages: list[dict[str, str]], add_generation_prompt: bool = True
    ) -> tuple[str, list[int]]:
        """The templated prompt and its ids (the template already holds special tokens)."""
        if not messages:
            raise ValueError("messages must not be empty")
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError("messages must not be used: this model has no chat template")
        text = self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )
        return text, self.tokenizer.encode(text, add_special_tokens=False)

    def detokenize(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        if any(not 0 <= t < self.vocab_size for t in token_ids):
            raise ValueError(f"tokens must be in [0, {self.vocab_size})")
        return self.tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens)

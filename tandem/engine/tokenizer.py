"""Tokenizer of a model folder, and incremental detokenization with stop strings."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from tokenizers.decoders import DecodeStream


def load_tokenizer(model_dir: str | Path, chat_template: str | None = None):
    """The folder's fast tokenizer (tokenizer.json + chat template), no remote code.
    `chat_template` (vLLM's --chat-template: a file, or the Jinja template itself) replaces
    the folder's template."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=False)
    if chat_template:
        tokenizer.chat_template = read_chat_template(chat_template)
    return tokenizer


def read_chat_template(spec: str) -> str:
    """A file's text, or `spec` itself when it is a template (it has Jinja's `{`)."""
    if "{" in spec:
        return spec
    path = Path(spec)
    if not path.is_file():
        raise ValueError(f"--chat-template {spec}: no such file (nor a Jinja template)")
    return path.read_text()


def token_texts(tokenizer, token_ids: list[int]) -> list[str]:
    """Each token's own text (as logprobs show them), in one call."""
    return tokenizer.backend_tokenizer.decode_batch([[t] for t in token_ids], False)


@dataclass(slots=True)
class IncrementalDetokenizer:
    """Turns one request's token stream into text deltas.

    Bytes of a character split across tokens come out whole (tokenizers' DecodeStream). Stop
    strings are searched across delta boundaries; text that could still begin a stop string
    is held back until it cannot.
    """

    tokenizer: object
    stop: tuple[str, ...] = ()
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    text: str = ""
    num_sent: int = 0  # characters of `text` already returned as deltas
    stopped_on: str | None = None
    _stream: DecodeStream = field(init=False)
    _pending: list[int] = field(default_factory=list)  # tokens not yet whole characters

    def __post_init__(self) -> None:
        self._stream = DecodeStream(skip_special_tokens=self.skip_special_tokens)

    def add_tokens(self, token_ids: list[int], finished: bool) -> str:
        """Feed new tokens; return the text that may be sent now. Sets `stopped_on` when a
        stop string matched (the caller then ends the request)."""
        backend = self.tokenizer.backend_tokenizer
        for token_id in token_ids:
            piece = self._stream.step(backend, token_id)
            self._pending.append(token_id)
            if piece and self._add_piece(piece):
                return self._flush()
        if finished:
            if self._pending:
                # The stream ends inside a character: emit its bytes as a full decode would.
                tail = self.tokenizer.decode(
                    self._pending, skip_special_tokens=self.skip_special_tokens
                )
                self._add_piece(tail)
            return self._flush()
        hold = max((len(s) for s in self.stop), default=1) - 1
        return self._flush(max(len(self.text) - hold, self.num_sent))

    def _add_piece(self, piece: str) -> bool:
        """Append whole characters; True when a stop string now matched."""
        self._pending.clear()
        start = max(len(self.text) - max((len(s) for s in self.stop), default=0), 0)
        self.text += piece
        return bool(self.stop) and self._find_stop(start)

    def _find_stop(self, start: int) -> bool:
        best = None
        for s in self.stop:
            idx = self.text.find(s, start)
            if idx != -1 and (best is None or idx < best[0]):
                best = (idx, s)
        if best is None:
            return False
        idx, s = best
        self.text = self.text[: idx + len(s) if self.include_stop_str_in_output else idx]
        self.stopped_on = s
        return True

    def _flush(self, upto: int | None = None) -> str:
        upto = len(self.text) if upto is None else upto
        delta = self.text[self.num_sent : upto]
        self.num_sent = max(self.num_sent, upto)
        return delta

"""The tokenizer stage's pure core: prompts to ids, chat templates, ids to text."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from tandem.engine.preprocess import render_chat
from tandem.engine.tokenizer import IncrementalDetokenizer, load_tokenizer, token_texts
from tandem.v1 import common_pb2, engine_pb2


class TokenizerCore:
    """A model folder's tokenizer and chat template. Bad input raises ValueError."""

    def __init__(self, model_dir: str, chat_template: str | None = None) -> None:
        self.model_dir = model_dir
        self.tokenizer = load_tokenizer(model_dir, chat_template)
        self.vocab_size = len(self.tokenizer)
        self.eos_token_id = self.tokenizer.eos_token_id

    def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def apply_chat_template(
        self, messages: list[dict[str, str]], add_generation_prompt: bool = True
    ) -> tuple[str, list[int]]:
        """The templated prompt and its ids; InvalidRequest when it cannot be rendered."""
        return render_chat(self.tokenizer, messages, add_generation_prompt)

    def detokenize(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        if any(not 0 <= t < self.vocab_size for t in token_ids):
            raise ValueError(f"tokens must be in [0, {self.vocab_size})")
        return self.tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens)


@dataclass(slots=True)
class _Stream:
    reply_subject: str
    detok: IncrementalDetokenizer
    spec: common_pb2.RequestSpec  # this request's own (a fork's: its id and seed)
    token_ids: list[int] = field(default_factory=list)  # streamed so far
    producer: str = ""  # the worker whose tokens came last
    decode_worker: str = ""  # the decode worker holding it, once known
    resumed_from: set[str] = field(default_factory=set)  # lost workers it was re-queued from


class DetokenizerHub:
    """Turns the workers' token batches into each request's text deltas (the tokenizer
    stage's streaming half). A stop string ends the request here: the delta carries
    finish_reason "stop", and the caller tells the scheduler to abort it everywhere."""

    def __init__(self, core: TokenizerCore) -> None:
        self.core = core
        self.streams: dict[str, _Stream] = {}

    def open(self, spec: common_pb2.RequestSpec) -> None:
        """A stream for the request, and one for each of its forks (n > 1)."""
        for index, request_id in enumerate((spec.request_id, *spec.fork_ids)):
            detok = IncrementalDetokenizer(
                self.core.tokenizer,
                tuple(spec.params.stop),
                spec.params.include_stop_str_in_output,
                skip_special_tokens=not spec.params.keep_special_tokens,
            )
            own = common_pb2.RequestSpec()
            own.CopyFrom(spec)
            if index:  # a fork: its own id, seed + index (as Request.fork), no forks
                own.request_id = request_id
                del own.fork_ids[:]
                if own.params.HasField("seed"):
                    own.params.seed += index
            self.streams[request_id] = _Stream(spec.reply_subject, detok, own)

    def resumable(self, worker_id: str, handed: Iterable[str] = ()) -> list[common_pb2.RequestSpec]:
        """The requests a lost worker was producing, each as a spec that carries the tokens
        streamed so far (so it continues where its client is; a stream takes each output
        position once, so whatever that worker still sends is dropped). Requests with no
        token yet are the scheduler's to re-queue, but for those a decode worker said it
        received to prefill itself (conditional disaggregation): the scheduler let them go.
        `handed`: requests the scheduler saw handed to the worker, its receipt not heard of
        (a hand-off under way when it was killed, which it can no longer say it dropped);
        those no other decode worker holds go back too."""
        handed = set(handed)
        out = []
        for request_id, stream in self.streams.items():
            holder = stream.decode_worker or stream.producer
            if holder == worker_id and (stream.token_ids or stream.decode_worker == worker_id):
                out.append(self._resume(stream, worker_id))
            elif (
                request_id in handed
                and stream.decode_worker in ("", worker_id)
                and worker_id not in stream.resumed_from
            ):
                out.append(self._resume(stream, worker_id))
        return out

    def dropped(self, request_id: str, worker_id: str) -> common_pb2.RequestSpec | None:
        """A lost worker says it gave the request up. Whether the WorkerLost message found
        it here depends on which came first, its token or that message (a hand-off under
        way, a decode worker's receipt not yet heard of): re-queued now unless it was then."""
        stream = self.streams.get(request_id)
        if stream is None or worker_id in stream.resumed_from:
            return None
        if not stream.token_ids and stream.decode_worker != worker_id:
            return None
        return self._resume(stream, worker_id)

    @staticmethod
    def _resume(stream: _Stream, worker_id: str) -> common_pb2.RequestSpec:
        stream.decode_worker = stream.producer = ""
        stream.resumed_from.add(worker_id)
        spec = common_pb2.RequestSpec()
        spec.CopyFrom(stream.spec)
        spec.output_token_ids.extend(stream.token_ids)
        return spec

    def received(self, request_id: str, worker_id: str) -> None:
        """A decode worker says the request's hand-off reached it."""
        stream = self.streams.get(request_id)
        if stream is not None:
            stream.decode_worker = worker_id

    def close(self, request_id: str) -> None:
        self.streams.pop(request_id, None)

    def on_tokens(
        self, tokens: engine_pb2.RequestTokens, worker_id: str = ""
    ) -> tuple[str, engine_pb2.TextDelta, bool] | None:
        """(reply subject, delta, stopped_here), or None for tokens the stream has (sent
        again, or by a worker given up on). Unknown requests raise KeyError."""
        stream = self.streams[tokens.request_id]
        if tokens.token_ids and tokens.HasField("first_output_index"):
            seen = len(stream.token_ids) - tokens.first_output_index
            if seen >= len(tokens.token_ids):
                return None
            if seen > 0:  # partly new: keep the new part
                tokens = _tail(tokens, seen)
        if worker_id not in stream.resumed_from:  # its new placement is running
            stream.resumed_from.clear()
        stream.producer = worker_id or stream.producer
        stream.token_ids.extend(tokens.token_ids)
        finished = bool(tokens.finish_reason)
        text = stream.detok.add_tokens(list(tokens.token_ids), finished)
        delta = engine_pb2.TextDelta(
            request_id=tokens.request_id,
            text=text,
            token_ids=tokens.token_ids,
            finish_reason=tokens.finish_reason,
            stop_reason=tokens.stop_reason,
            num_prompt_tokens=tokens.num_prompt_tokens,
            num_cached_tokens=tokens.num_cached_tokens,
        )
        if tokens.HasField("stop_token_id"):
            delta.stop_token_id = tokens.stop_token_id
        if tokens.HasField("pooled"):
            delta.pooled.CopyFrom(tokens.pooled)
        for source, into in ((tokens.logprobs, delta.logprobs),
                             (tokens.prompt_logprobs, delta.prompt_logprobs)):  # fmt: skip
            for lp in source:
                texts = token_texts(self.core.tokenizer, [lp.token_id, *lp.top_ids])
                entry = into.add()
                entry.CopyFrom(lp)
                entry.token = texts[0]
                entry.top_tokens.extend(texts[1:])
        stopped_here = stream.detok.stopped_on is not None and not finished
        if stopped_here:
            delta.finish_reason, delta.stop_reason = "stop", stream.detok.stopped_on
        if finished or stopped_here:
            self.close(tokens.request_id)
        return stream.reply_subject, delta, stopped_here


def _tail(tokens: engine_pb2.RequestTokens, skip: int) -> engine_pb2.RequestTokens:
    """The message without its first `skip` tokens (and their logprobs)."""
    out = engine_pb2.RequestTokens()
    out.CopyFrom(tokens)
    del out.token_ids[:skip]
    del out.logprobs[: min(skip, len(out.logprobs))]
    out.first_output_index += skip
    return out

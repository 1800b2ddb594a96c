"""Every NATS subject of the cluster: its message type, who publishes it, who listens.

The one map of the bus. `Bus.subscribe` refuses a subject that is not here, each message is
checked (`checks.check`) against its type before a handler sees it, the NATS accounts of
`tandem serve`, compose and Kubernetes give each role exactly its own rows (`permissions`),
and the bus fuzz test sends garbage to every row. `*` stands for one id (a worker's or a
gateway's). Request/reply rows are answered on the requester's `_INBOX.>` subject.
"""

from __future__ import annotations

import enum
import functools
from dataclasses import dataclass

from google.protobuf.message import Message

from tandem.v1 import engine_pb2

PREFIX = "tandem"
INBOX = "_INBOX.>"  # where nats-py's requests take their replies


class Role(enum.StrEnum):
    """The kinds of process on the bus; each has its own NATS account."""

    GATEWAY = "gateway"
    TOKENIZER = "tokenizer"
    SCHEDULER = "scheduler"
    PREFILL = "prefill"
    DECODE = "decode"


G, T, S, P, D = Role.GATEWAY, Role.TOKENIZER, Role.SCHEDULER, Role.PREFILL, Role.DECODE


@dataclass(frozen=True, slots=True)
class Subject:
    """One row of the map. `reply`: the answer's type for request/reply subjects (None:
    fire and forget; `bytes`: an empty acknowledgement)."""

    pattern: str  # under PREFIX, `*` for one id
    message: type[Message]
    publishers: frozenset[Role]
    subscribers: frozenset[Role]
    reply: type[Message] | type[bytes] | None = None

    @property
    def full(self) -> str:
        return f"{PREFIX}.{self.pattern}"

    def matches(self, subj: str) -> bool:
        """Whether a concrete subject is an instance of this row."""
        want, got = self.full.split("."), subj.split(".")
        if len(want) == len(got):
            return all(w == "*" or w == g for w, g in zip(want, got))
        # an id may hold dots (a restarted worker's `prefill-0.1`): `*` then spans them
        if "*" not in want or len(got) < len(want):
            return False
        star = want.index("*")
        tail = len(want) - star - 1
        return got[:star] == want[:star] and got[len(got) - tail :] == want[star + 1 :]


def _row(pattern, message, publishers, subscribers, reply=None) -> Subject:
    return Subject(pattern, message, frozenset(publishers), frozenset(subscribers), reply)


SUBJECTS: tuple[Subject, ...] = (
    _row("submit", engine_pb2.SubmitRequest, {T}, {S}, engine_pb2.SubmitAck),
    _row("gateway.*.deltas", engine_pb2.TextDelta, {T}, {G}),
    _row("abort", engine_pb2.AbortRequest, {G, T, S}, {T, S, P, D}),
    _row("heartbeat", engine_pb2.Heartbeat, {P, D}, {S, T, G}),
    _row("prefill.*.plan", engine_pb2.StepPlan, {S}, {P}),
    _row("scheduler.report", engine_pb2.StepReport, {P}, {S, G}),
    _row("decode.*.probe", engine_pb2.KVProbe, {P}, {D}, engine_pb2.KVProbeReply),
    _row("decode.*.kv", engine_pb2.KVBlockChunk, {P}, {D}, bytes),
    _row("decode.*.handoff", engine_pb2.KVHandoff, {P}, {D}, engine_pb2.KVHandoffAck),
    _row("local_prefill.*", engine_pb2.LocalPrefill, {S}, {D}),
    _row("scheduler.preempted", engine_pb2.Preempted, {P, D, T}, {S}),
    _row("scheduler.drain", engine_pb2.DrainRequest, {P, D}, {S}, engine_pb2.DrainReply),
    _row("worker.lost", engine_pb2.WorkerLost, {S}, {T, P, D}),
    _row("tokens", engine_pb2.TokenBatch, {P, D, S}, {T}),  # S: requests it ends
    _row("kv.events", engine_pb2.KVEventBatch, {P, D}, {S}),
    _row("kv.resync.*", engine_pb2.KVResyncRequest, {S}, {P, D}),
    _row("reset_prefix_cache", engine_pb2.ResetPrefixCache, {G}, {P, D}),
    _row("lora_adapters", engine_pb2.LoRAAdapterUpdate, {G}, {P, D}),
    _row("scheduler.stats", engine_pb2.SchedulerStats, {S}, {G}),
    _row("metrics", engine_pb2.MetricsSnapshot, {T, S, P, D}, {G}),
)


def subject(*parts: str) -> str:
    return ".".join((PREFIX, *parts))


@functools.lru_cache(maxsize=4096)
def lookup(subj: str) -> Subject:
    """The row a concrete subject belongs to; KeyError when it is not on the map."""
    for row in SUBJECTS:
        if row.matches(subj):
            return row
    raise KeyError(f"{subj} is not in the subject table (tandem.services.transport.subjects)")


def grant(row: Subject) -> str:
    """The NATS subject that grants a row. NATS's `*` is one token, but an id may hold dots
    (a restarted worker's `prefill-0.1`, a host name in a default worker id): a row with an
    id is granted from the id on with `>`. No role gains another row that way (a test checks)."""
    head, star, _ = row.full.partition("*")
    return f"{head}>" if star else row.full


def permissions(role: Role) -> dict:
    """The role's NATS permissions, in nats-server's config shape: publish only what it
    sends, subscribe only what it reads, answer the requests it receives."""
    pub = sorted({grant(r) for r in SUBJECTS if role in r.publishers})
    sub = sorted({grant(r) for r in SUBJECTS if role in r.subscribers})
    requests = any(role in r.publishers and r.reply is not None for r in SUBJECTS)
    if requests:  # it waits for replies on its inbox
        sub.append(INBOX)
    answers = any(role in r.subscribers and r.reply is not None for r in SUBJECTS)
    perms: dict = {"publish": {"allow": pub}, "subscribe": {"allow": sub}}
    if answers:
        perms["allow_responses"] = True
    return perms


def markdown_table() -> str:
    """The subject table as docs/subjects.md shows it (a test keeps the two equal)."""
    lines = [
        "| subject | from | to | message | reply |",
        "|---|---|---|---|---|",
    ]
    order = list(Role)
    for row in SUBJECTS:
        senders = ", ".join(r.value for r in order if r in row.publishers)
        receivers = ", ".join(r.value for r in order if r in row.subscribers)
        if row.reply is None:
            reply = ""
        else:
            reply = "empty ack" if row.reply is bytes else f"`{row.reply.__name__}`"
        lines.append(
            f"| `{row.full}` | {senders} | {receivers} | `{row.message.__name__}` | {reply} |"
        )
    return "\n".join(lines) + "\n"


def grpc_table() -> str:
    """The tokenizer stage's gRPC methods, as docs/subjects.md shows them."""
    from tandem.v1 import tokenizer_pb2

    service = tokenizer_pb2.DESCRIPTOR.services_by_name["Tokenizer"]
    lines = ["| method | from | to | request | response |", "|---|---|---|---|---|"]
    for method in service.methods:
        lines.append(
            f"| `{service.full_name}/{method.name}` | gateway | tokenizer "
            f"| `{method.input_type.name}` | `{method.output_type.name}` |"
        )
    return "\n".join(lines) + "\n"

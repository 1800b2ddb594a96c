"""NATS with protobuf messages: the only way stages talk besides the tokenizer's gRPC.

The subjects, their message types, publishers and subscribers are in `subjects.SUBJECTS`.
Every message a stage receives is decoded and checked (`checks.check`) before its handler
runs; one that fails is logged with its subject and dropped, and a requester waiting for a
reply gets an error reply (the `Tandem-Error` header), which `Bus.request` raises as
`RemoteError`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import ssl
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import nats
from google.protobuf.message import Message

from tandem.services.transport import checks, subjects
from tandem.v1 import engine_pb2

logger = logging.getLogger(__name__)

M = TypeVar("M", bound=Message)
# Room for NATS headers and protobuf framing next to a KV chunk's bytes.
PAYLOAD_HEADROOM = 4096
ERROR_HEADER = "Tandem-Error"  # on a reply: the request was refused, and why
REQUEST_ID_HEADER = "Tandem-Request-Id"  # on an error reply: the request it was about


def _on_table(subj: str, msg_type: type[Message]) -> None:
    """A subject the code uses must be on the subject table, with its message type."""
    row = subjects.lookup(subj)
    if row.message is not msg_type:
        raise TypeError(f"{subj} carries {row.message.__name__}, not {msg_type.__name__}")


def _request_id_of(msg: Message | None) -> str:
    """The id of the request a message is about ("" when none)."""
    if msg is None:
        return ""
    if "request" in msg.DESCRIPTOR.fields_by_name:
        return msg.request.request_id
    return getattr(msg, "request_id", "")


class RemoteError(RuntimeError):
    """The receiver of a request refused it (an error reply)."""


def reply_error(raw) -> str | None:
    """The error a reply carries, or None."""
    return (raw.headers or {}).get(ERROR_HEADER)


def tls_context_from_env(env=os.environ) -> ssl.SSLContext | None:
    """TLS to NATS for every stage, from the environment: `NATS_TLS_CA` (a CA bundle to
    trust besides the system's), `NATS_TLS_CERT` and `NATS_TLS_KEY` (a client certificate,
    for servers that verify clients). None when none is set: a `tls://` URL alone then uses
    the system's CAs. Credentials go in the URL (`nats://user:pass@host`, `nats://token@host`).
    """
    ca, cert, key = (env.get(f"NATS_TLS_{name}") for name in ("CA", "CERT", "KEY"))
    if not (ca or cert or key):
        return None
    if bool(cert) != bool(key):
        raise ValueError("NATS_TLS_CERT and NATS_TLS_KEY go together")
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca or None)
    if cert:
        ctx.load_cert_chain(cert, key)
    return ctx


class Tombstones:
    """Ids of requests seen lately: a message about one that arrives after its abort (a
    plan, a hand-off) is dropped rather than resurrecting it; a message sent again (a submit
    not acked in time) is not taken twice."""

    def __init__(self, ttl: float = 120.0) -> None:
        self.ttl = ttl
        self._ids: dict[str, float] = {}

    def add(self, request_id: str) -> None:
        now = time.monotonic()
        self._ids[request_id] = now
        if len(self._ids) > 4096:
            self._ids = {k: t for k, t in self._ids.items() if now - t < self.ttl}

    def __contains__(self, request_id: str) -> bool:
        t = self._ids.get(request_id)
        return t is not None and time.monotonic() - t < self.ttl


class SubmitInbox:
    """The scheduler's side of the submit protocol: answer every copy of a submit (the
    tokenizer sends it again until it has an answer), take each request once."""

    def __init__(self, bus: Bus, stage: str) -> None:
        self.bus, self.stage = bus, stage
        self.seen = Tombstones()

    async def accept(self, msg: engine_pb2.SubmitRequest, raw) -> bool:
        """Ack it; True the first time this request comes."""
        request_id = msg.request.request_id
        if raw.reply:
            ack = engine_pb2.SubmitAck(request_id=request_id, stage=self.stage)
            await raw.respond(ack.SerializeToString())
        if request_id in self.seen:
            return False  # sent again: its ack was late or lost
        self.seen.add(request_id)
        return True


def redact(url: str) -> str:
    """A server URL (or text holding one) fit for a log: its password replaced."""
    return re.sub(r"(://[^:/@\s]*:)[^@\s]*@", r"\1***@", url)


class Bus:
    """A NATS connection that sends and receives protobuf messages."""

    def __init__(self, nc: nats.NATS) -> None:
        self.nc = nc

    @classmethod
    async def connect(cls, url: str, name: str, timeout: float = 60.0, on_reconnect=None) -> Bus:
        """Connect, retrying for `timeout` seconds while the server is not there yet (a
        stage may start before NATS does: Kubernetes has no start order); once connected,
        reconnect forever, calling the async `on_reconnect()` after each reconnection."""

        async def on_error(e: Exception) -> None:
            logger.warning("NATS %s: %s", redact(url), redact(str(e) or type(e).__name__))

        tls = tls_context_from_env()
        connect = nats.connect(
            url,
            name=name,
            **({"tls": tls} if tls is not None else {}),
            max_reconnect_attempts=-1,  # also retries the first connection
            reconnect_time_wait=0.5,
            error_cb=on_error,
            **({"reconnected_cb": on_reconnect} if on_reconnect is not None else {}),
        )
        try:
            return cls(await asyncio.wait_for(connect, timeout))
        except TimeoutError:
            raise RuntimeError(f"NATS at {url} unreachable for {timeout:.0f} s") from None

    @property
    def max_payload(self) -> int:
        return self.nc.max_payload

    async def publish(
        self, subj: str, msg: Message, headers: dict | None = None, reply: str = ""
    ) -> None:
        """`headers`: NATS headers (a request's W3C trace context), when not empty; `reply`:
        where receivers answer (NATS's reply subject). `subj` must be on the subject table,
        with `msg` its message type."""
        _on_table(subj, type(msg))
        await self.nc.publish(subj, msg.SerializeToString(), reply=reply, headers=headers or None)

    async def request(
        self,
        subj: str,
        msg: Message,
        reply_type: type[M],
        timeout: float,
        headers: dict | None = None,
    ) -> M:
        _on_table(subj, type(msg))
        reply = await self.nc.request(
            subj, msg.SerializeToString(), timeout=timeout, headers=headers or None
        )
        error = reply_error(reply)
        if error is not None:
            raise RemoteError(f"{subj}: {error}")
        return reply_type.FromString(reply.data)

    async def respond_error(self, raw, error: str, request_id: str = "") -> None:
        """Answer a request with an error reply (nothing when it wants no answer), naming
        the request it was about when there is one."""
        if raw.reply:
            headers = {ERROR_HEADER: error[:512]}
            if request_id:
                headers[REQUEST_ID_HEADER] = request_id[:256]
            await self.nc.publish(raw.reply, b"", headers=headers)

    async def subscribe(
        self,
        subj: str,
        msg_type: type[M],
        handler: Callable[[M, nats.aio.msg.Msg], Awaitable[None]],
        queue: str = "",
        on_error: Callable[[str, str], Awaitable[None]] | None = None,
    ):
        """Call `handler(message, raw)` for each message, in order. A message that does not
        decode or fails its checks is logged and dropped (a requester gets an error reply);
        a handler that raises is logged: the stage keeps running. An error reply arriving
        here (on a subject where replies come) goes to `on_error(error, request id)`.
        `subj` must be on the subject table, with `msg_type` its message type."""
        _on_table(subj, msg_type)

        async def on_msg(raw) -> None:
            error = reply_error(raw)
            if error is not None:
                if on_error is not None:
                    await on_error(error, raw.headers.get(REQUEST_ID_HEADER, ""))
                return
            msg = None
            try:
                msg = msg_type.FromString(raw.data)
                checks.check(msg)
            except Exception as e:
                error = f"invalid {msg_type.__name__}: {e}"
                logger.warning("%s on %s dropped", error, raw.subject)
                await self._respond_error_quietly(raw, error, _request_id_of(msg))
                return
            try:
                await handler(msg, raw)
            except ValueError as e:  # a value only the stage itself could judge
                logger.warning("%s on %s refused: %s", msg_type.__name__, raw.subject, e)
                await self._respond_error_quietly(raw, str(e), _request_id_of(msg))
            except Exception as e:
                logger.exception("handler for %s failed", raw.subject)
                error = f"{type(e).__name__}: {e}"
                await self._respond_error_quietly(raw, error, _request_id_of(msg))

        # Bounded by flow control on the sending side, not by dropping: generous limits.
        return await self.nc.subscribe(
            subj,
            queue=queue,
            cb=on_msg,
            pending_msgs_limit=65536,
            pending_bytes_limit=1 << 30,
        )

    async def _respond_error_quietly(self, raw, error: str, request_id: str = "") -> None:
        try:
            await self.respond_error(raw, error, request_id)
        except Exception as e:  # the connection is going: nobody to tell
            logger.warning("error reply on %s not sent: %s", raw.subject, e)

    async def flush(self) -> None:
        """Return once the server has processed everything sent so far (subscriptions too).

        nats-py writes the flush PING straight to the socket while SUB and PUB commands wait
        in its pending buffer for the flusher task, so a bare `nc.flush()` can be answered
        before a subscription is registered. Push the pending buffer out first."""
        await self.nc._flush_pending(force_flush=True)
        await self.nc.flush()

    async def close(self, timeout: float = 5.0) -> None:
        """Drain (deliver what is pending) when the server is there, else just close: a stage
        stopping after NATS did must not wait for a reconnect."""
        if self.nc.is_connected:
            try:
                await asyncio.wait_for(self.nc.drain(), timeout)
                return
            except Exception as e:
                logger.warning("NATS drain incomplete: %s", e)
        await self.nc.close()

"""The tokenizer stage's first half: a generation request from the gateway is prepared here
(chat template, tokens, checks: `engine.preprocess`), its streams opened, then submitted to
the scheduler, and the gateway's call returns once the scheduler took it.

NATS delivers at most once, and a scheduler that is reconnecting misses what is sent
meanwhile: the submit is a NATS request, sent again (doubling the wait from SUBMIT_RETRY)
until the scheduler acks; it takes each request id once. After SUBMIT_TIMEOUT the request
fails with 503 and its streams close."""

from __future__ import annotations

import asyncio
import logging
import time

from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout

from tandem.engine.client import EngineOverloaded, InvalidRequest, PreparedPrompt
from tandem.engine.preprocess import engine_requests, prepare
from tandem.services.tokenizer.core import TokenizerCore
from tandem.services.tokenizer.stream import StreamRelay
from tandem.services.transport import codec
from tandem.services.transport.bus import Bus, RemoteError
from tandem.services.transport.subjects import subject
from tandem.v1 import common_pb2, engine_pb2
from tandem.v1 import tokenizer_pb2 as pb

logger = logging.getLogger(__name__)
SUBMIT_RETRY = 0.5
SUBMIT_TIMEOUT = 15.0


class Submitter:
    """Prepares, opens and submits the requests the gateways hand to this tokenizer."""

    def __init__(self, bus: Bus, core: TokenizerCore, relay: StreamRelay) -> None:
        self.bus, self.core, self.relay = bus, core, relay

    def prepare(
        self, msg: pb.GenerateRequest
    ) -> tuple[list[PreparedPrompt], list[common_pb2.RequestSpec]]:
        """Its prompts as prepared, and a spec for each (its samples as forks).
        InvalidRequest when it cannot run; EngineOverloaded when no worker is there to say
        how long a context may be."""
        try:
            inputs = codec.generate_input_from_proto(msg)
        except ValueError as e:
            raise InvalidRequest(str(e), str(e).split(" ", 1)[0]) from None
        max_model_len = self.relay.max_model_len
        if not max_model_len:
            raise EngineOverloaded("no worker is live")
        prompts, params = prepare(self.core.tokenizer, inputs, self.core.vocab_size, max_model_len)
        requests = engine_requests(inputs, prompts, params, time.time())
        specs = [
            codec.request_to_spec(r, msg.reply_subject, inputs.trace_context) for r in requests
        ]
        return prompts, specs

    async def submit(self, specs: list[common_pb2.RequestSpec], carrier: dict) -> None:
        """Open each request's streams and submit it; on failure the ones already submitted
        are aborted and every stream closes."""
        done: list[common_pb2.RequestSpec] = []
        try:
            for spec in specs:
                if spec.request_id not in self.relay.hub.streams:  # not a call sent again
                    self.relay.open(spec, carrier)
                await self._to_scheduler(spec, carrier)
                done.append(spec)
        except BaseException as e:
            for spec in specs:
                for request_id in (spec.request_id, *spec.fork_ids):
                    self.relay.close(request_id, error=str(e) or type(e).__name__)
            for spec in done:
                abort = engine_pb2.AbortRequest(request_id=spec.request_id, reason="error")
                await self.bus.publish(subject("abort"), abort)
            raise

    async def _to_scheduler(self, spec: common_pb2.RequestSpec, headers: dict) -> None:
        msg = engine_pb2.SubmitRequest(request=spec)
        wait, deadline = SUBMIT_RETRY, time.monotonic() + SUBMIT_TIMEOUT
        while True:
            left = deadline - time.monotonic()
            try:
                await self.bus.request(subject("submit"), msg, engine_pb2.SubmitAck,
                                       timeout=min(wait, left), headers=headers)  # fmt: skip
                return
            except RemoteError as e:  # the scheduler refused it: it can never run
                raise InvalidRequest(str(e).partition(": ")[2] or str(e)) from None
            except (NatsTimeout, NoRespondersError) as e:
                if wait >= left:
                    raise EngineOverloaded("the scheduler did not take the request") from None
                if isinstance(e, NoRespondersError):  # none subscribed yet: wait, then again
                    await asyncio.sleep(min(wait, left))
                logger.warning("submit of %s not acked: sent again", spec.request_id)
                wait *= 2


def reply_of(prompts: list[PreparedPrompt]) -> pb.GenerateReply:
    return pb.GenerateReply(
        prompts=[pb.PreparedPrompt(token_ids=p.token_ids, text=p.text) for p in prompts]
    )

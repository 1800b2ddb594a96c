"""The tokenizer stage over gRPC: a thin shell that decodes protobuf, calls TokenizerCore (or,
for a generation request, the Submitter), and encodes. Bad input is INVALID_ARGUMENT with the
core's message and the field at fault in the `tandem-param` trailer; a request the cluster
cannot take now is RESOURCE_EXHAUSTED."""

from __future__ import annotations

import contextlib
import logging
import time

import grpc
from prometheus_client import CollectorRegistry

from tandem.engine.client import EngineOverloaded, InvalidRequest
from tandem.services.observability import tracing
from tandem.services.observability.metrics import TokenizerMetrics
from tandem.services.observability.metrics_push import MetricsPublisher, instance_name
from tandem.services.tokenizer.core import TokenizerCore
from tandem.services.tokenizer.submit import Submitter, reply_of
from tandem.services.transport.tokenizer_client import param_trailer
from tandem.v1 import tokenizer_pb2 as pb
from tandem.v1 import tokenizer_pb2_grpc as pb_grpc

logger = logging.getLogger(__name__)


class TokenizerService(pb_grpc.TokenizerServicer):
    def __init__(
        self, core: TokenizerCore, metrics: TokenizerMetrics, submitter: Submitter | None = None
    ) -> None:
        self.core = core
        self.metrics = metrics
        self.submitter = submitter  # None: no NATS, no generation requests

    @contextlib.contextmanager
    def _observed(self, name: str, context):
        """The call's span (under the caller's trace, from gRPC metadata) and its time."""
        start = time.perf_counter()
        with tracing.server_span(name, context.invocation_metadata()):
            yield
        self.metrics.call_seconds.labels(method=name).observe(time.perf_counter() - start)

    async def Submit(self, request: pb.GenerateRequest, context) -> pb.GenerateReply:
        """Prepare (the `tokenize` span), then open the streams and submit."""
        if self.submitter is None:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "this tokenizer has no NATS")
        try:
            with self._observed("tokenize", context):
                prompts, specs = self.submitter.prepare(request)
            await self.submitter.submit(specs, dict(request.trace_context))
        except InvalidRequest as e:
            context.set_trailing_metadata(param_trailer(e.param))
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except EngineOverloaded as e:  # not UNAVAILABLE: the gateway sends that again
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
        return reply_of(prompts)

    async def Tokenize(self, request: pb.TokenizeRequest, context) -> pb.TokenizeResponse:
        with self._observed("tokenize", context):
            ids = self.core.tokenize(request.text, request.add_special_tokens)
        return pb.TokenizeResponse(token_ids=ids, prompt=request.text)

    async def ApplyChatTemplate(self, request: pb.ChatTemplateRequest, context):
        messages = [{"role": m.role, "content": m.content} for m in request.messages]
        try:
            with self._observed("tokenize", context):
                text, ids = self.core.apply_chat_template(messages, request.add_generation_prompt)
        except InvalidRequest as e:
            context.set_trailing_metadata(param_trailer(e.param))
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        return pb.TokenizeResponse(token_ids=ids, prompt=text)

    async def Detokenize(self, request: pb.DetokenizeRequest, context):
        try:
            with self._observed("detokenize", context):
                text = self.core.detokenize(list(request.token_ids), request.skip_special_tokens)
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        return pb.DetokenizeResponse(text=text)

    async def Info(self, request: pb.InfoRequest, context) -> pb.InfoResponse:
        info = pb.InfoResponse(vocab_size=self.core.vocab_size, model=self.core.model_dir)
        if self.core.eos_token_id is not None:
            info.eos_token_id = self.core.eos_token_id
        return info


async def start_server(
    core: TokenizerCore,
    address: str,
    metrics: TokenizerMetrics | None = None,
    submitter: Submitter | None = None,
) -> tuple[grpc.aio.Server, int]:
    """Serve on `address` ("127.0.0.1:0" picks a port); returns the server and its port."""
    server = grpc.aio.server()
    metrics = metrics or TokenizerMetrics(CollectorRegistry())
    service = TokenizerService(core, metrics, submitter)
    pb_grpc.add_TokenizerServicer_to_server(service, server)
    port = server.add_insecure_port(address)
    await server.start()
    return server, port


async def serve(
    model_dir: str,
    address: str,
    nats_url: str | None = None,
    health_port: int | None = None,
    chat_template: str | None = None,
) -> None:
    """Run the stage until cancelled (the `tandem tokenizer` entry point): gRPC on
    `address`, and with `nats_url` the detokenizing stream relay too; `/health` on
    `health_port` when given."""
    from tandem.services.observability.health import HealthServer
    from tandem.services.tokenizer.core import DetokenizerHub
    from tandem.services.tokenizer.stream import StreamRelay
    from tandem.services.transport.bus import Bus

    core = TokenizerCore(model_dir, chat_template)
    registry = CollectorRegistry()
    metrics = TokenizerMetrics(registry)
    bus = publisher = submitter = None
    if nats_url:
        bus = await Bus.connect(nats_url, "tokenizer")
        relay = StreamRelay(bus, DetokenizerHub(core), metrics)
        await relay.start()
        submitter = Submitter(bus, core, relay)
        publisher = MetricsPublisher(bus, registry, instance_name("tokenizer"), "tokenizer")
        publisher.start()
    server, port = await start_server(core, address, metrics, submitter)
    health = HealthServer(health_port, registry=registry) if health_port else None
    if health is not None:
        await health.start()
        health.up = True
    logger.info("tokenizer for %s on port %d", model_dir, port)
    try:
        await server.wait_for_termination()
    finally:
        if health is not None:
            await health.stop()
        await server.stop(grace=1)
        if publisher is not None:
            publisher.stop()
        if bus is not None:
            await bus.close()

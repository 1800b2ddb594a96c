"""The tokenizer stage's gRPC client: what the other stages import to call it (the contract,
not the stage). INVALID_ARGUMENT becomes InvalidRequest (a ValueError) naming the field the
server named in its `tandem-param` trailer; UNAVAILABLE and RESOURCE_EXHAUSTED (the cluster
cannot take it now) become EngineOverloaded (503)."""

from __future__ import annotations

import asyncio
import time

import grpc

from tandem.engine.client import EngineOverloaded, InvalidRequest
from tandem.services.observability import tracing
from tandem.v1 import tokenizer_pb2 as pb
from tandem.v1 import tokenizer_pb2_grpc as pb_grpc

PARAM_TRAILER = "tandem-param"  # on INVALID_ARGUMENT: the request field at fault


def param_trailer(param: str | None) -> tuple[tuple[str, str], ...]:
    """The trailing metadata a server sets with an INVALID_ARGUMENT about `param`."""
    return ((PARAM_TRAILER, param),) if param else ()


def _error(e: grpc.aio.AioRpcError) -> Exception:
    """The caller's exception for a failed call."""
    code = e.code()
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return InvalidRequest(e.details(), dict(e.trailing_metadata() or ()).get(PARAM_TRAILER))
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED):
        return EngineOverloaded(e.details() or "the tokenizer stage is unreachable")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return EngineOverloaded("the cluster did not take the request in time")
    return e


class TokenizerClient:
    """The other stages' view of the tokenizer."""

    def __init__(self, target: str) -> None:
        self.channel = grpc.aio.insecure_channel(target)
        self.stub = pb_grpc.TokenizerStub(self.channel)

    async def _call(self, method, request, timeout: float | None = None):
        try:
            return await method(request, metadata=tracing.grpc_metadata(), timeout=timeout)
        except grpc.aio.AioRpcError as e:
            raise _error(e) from None

    async def submit(self, request: pb.GenerateRequest, timeout: float) -> pb.GenerateReply:
        """Hand a generation request to the tokenizer stage, which submits it onward; sent
        again while no tokenizer is reachable (one restarting), for up to `timeout` s. A
        tokenizer takes each request id once, and so does the scheduler behind it."""
        deadline, wait = time.monotonic() + timeout, 0.1
        while True:
            left = deadline - time.monotonic()
            try:
                return await self.stub.Submit(
                    request, metadata=tracing.grpc_metadata(), timeout=max(left, 0.001)
                )
            except grpc.aio.AioRpcError as e:
                if e.code() != grpc.StatusCode.UNAVAILABLE or wait >= left:
                    raise _error(e) from None
                await asyncio.sleep(wait)
                wait = min(2 * wait, 1.0)

    async def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        req = pb.TokenizeRequest(text=text, add_special_tokens=add_special_tokens)
        return list((await self._call(self.stub.Tokenize, req)).token_ids)

    async def apply_chat_template(
        self, messages: list[dict[str, str]], add_generation_prompt: bool = True
    ) -> tuple[str, list[int]]:
        req = pb.ChatTemplateRequest(
            messages=[pb.ChatMessage(role=m["role"], content=m["content"]) for m in messages],
            add_generation_prompt=add_generation_prompt,
        )
        resp = await self._call(self.stub.ApplyChatTemplate, req)
        return resp.prompt, list(resp.token_ids)

    async def detokenize(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        req = pb.DetokenizeRequest(token_ids=token_ids, skip_special_tokens=skip_special_tokens)
        return (await self._call(self.stub.Detokenize, req)).text

    async def info(self) -> pb.InfoResponse:
        return await self._call(self.stub.Info, pb.InfoRequest())

    async def close(self) -> None:
        await self.channel.close()

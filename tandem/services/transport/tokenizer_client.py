"""The tokenizer stage's gRPC client: what the other stages import to call it (the contract,
not the stage). INVALID_ARGUMENT becomes ValueError."""

from __future__ import annotations

import grpc

from tandem.services.observability import tracing
from tandem.v1 import tokenizer_pb2 as pb
from tandem.v1 import tokenizer_pb2_grpc as pb_grpc


class TokenizerClient:
    """The other stages' view of the tokenizer. INVALID_ARGUMENT becomes ValueError."""

    def __init__(self, target: str) -> None:
        self.channel = grpc.aio.insecure_channel(target)
        self.stub = pb_grpc.TokenizerStub(self.channel)

    async def _call(self, method, request):
        try:
            return await method(request, metadata=tracing.grpc_metadata())
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.INVALID_ARGUMENT:
                raise ValueError(e.details()) from None
            raise

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

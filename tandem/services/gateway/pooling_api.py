"""The pooling endpoints, as vLLM serves them: /v1/embeddings (OpenAI's shape), /pooling,
/score and /v1/score, /rerank, /v1/rerank and /v2/rerank (Jina's and Cohere's shape),
/classify. Each input is one prefill-only request (`engine.pooling`); a server whose model
generates answers them with a 400, as a pooling server answers generation.

Scores: a cross-encoder (a sequence classifier) reads each (query, document) pair as one
input and gives its relevance (sigmoid of one logit, or the softmax's last class); an
embedding model embeds both sides and gives their cosine similarity."""

from __future__ import annotations

import base64
import struct
import time
import uuid
from typing import Any, Literal

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field, field_validator

from tandem.engine.client import GenerateInput
from tandem.engine.pooling import PoolingParams
from tandem.engine.request import SamplingParams
from tandem.services.gateway.routes import Gateway
from tandem.services.gateway.state import GatewayState
from tandem.services.gateway.streaming import APIError, collect

router = APIRouter()

Input = str | list[str] | list[int] | list[list[int]]


class PoolingBody(BaseModel):
    """What every pooling request takes besides its input (vLLM's names)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = None
    user: str | None = None
    truncate_prompt_tokens: int | None = Field(None, ge=-1)  # -1: the model's context
    priority: int = 0
    request_id: str | None = Field(None, min_length=1, max_length=200, pattern=r"^[!-~]+$")

    # what GatewayState.submit reads of a request body
    n = property(lambda self: 1)
    return_token_ids = property(lambda self: False)
    prompt_logprobs = property(lambda self: None)


class EmbeddingRequest(PoolingBody):
    input: Input
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)
    normalize: bool | None = None  # vLLM's extra

    _input = field_validator("input")(lambda v: _non_empty(v, "input"))


class PoolingRequest(EmbeddingRequest):
    task: Literal["embed", "classify", "encode"] | None = None


class ClassifyRequest(PoolingBody):
    input: str | list[str]
    activation: bool | None = None

    _input = field_validator("input")(lambda v: _non_empty(v, "input"))


class ScoreRequest(PoolingBody):
    text_1: str | list[str]
    text_2: str | list[str]
    activation: bool | None = None

    _t1 = field_validator("text_1")(lambda v: _non_empty(v, "text_1"))
    _t2 = field_validator("text_2")(lambda v: _non_empty(v, "text_2"))


class RerankRequest(PoolingBody):
    query: str
    documents: list[str]
    top_n: int | None = Field(None, ge=0)
    return_documents: bool = True

    _docs = field_validator("documents")(lambda v: _non_empty(v, "documents"))


def _non_empty(value: Any, name: str) -> Any:
    if isinstance(value, (str, list)) and len(value) == 0:
        raise ValueError(f"{name} must not be empty")
    if isinstance(value, list) and value and isinstance(value[0], list):
        if any(len(v) == 0 for v in value):
            raise ValueError(f"{name} must not hold an empty list of token ids")
    return value


def _prompts(value: Input) -> list[str | list[int]]:
    if isinstance(value, str):
        return [value]
    if value and all(isinstance(v, int) for v in value):
        return [list(value)]
    return list(value)


async def _run(gateway: GatewayState, body: PoolingBody, route: str, prompts: list,
               params: PoolingParams) -> tuple[list, int]:  # fmt: skip
    """Each prompt pooled: their outputs in order, and the prompt tokens in all."""
    gateway.check_ready()
    gateway.check_model(body.model)
    if gateway.runner != "pooling":
        raise APIError(400, f"{route} needs a pooling model; this server's model generates "
                       "(serve an embedding or cross-encoder model, or use --runner pooling)",
                       "BadRequestError", "model")  # fmt: skip
    size = gateway.hidden_size
    if params.dimensions is not None and size is not None and params.dimensions > size:
        raise APIError(400, f"dimensions must be <= {size}, this model's embedding size",
                       "BadRequestError", "dimensions")  # fmt: skip
    if params.task in ("classify", "score") and not gateway.classifier:
        raise APIError(400, f"{route} needs a classification model (a cross-encoder); this "
                       "one embeds", "BadRequestError", "model")  # fmt: skip
    base_id = body.request_id or f"{route.strip('/').replace('/', '-')}-{uuid.uuid4().hex}"
    sampling = SamplingParams(max_tokens=1, pooling=params)
    api = gateway.telemetry.observe(route, base_id, sampling)
    k = body.truncate_prompt_tokens
    with api.failing():
        inputs = GenerateInput(
            request_ids=[], params=sampling, prompts=prompts, priority=body.priority,
            truncate_prompt_tokens=gateway.client.max_model_len if k == -1 else k,
        )  # fmt: skip
        try:
            streams, choices, num_prompt_tokens = await gateway.submit(api, base_id, body, inputs)
        except APIError as e:
            if e.param == "prompt":  # the prompt is these endpoints' input
                e.param = "input"
            raise
    await collect(streams, choices)
    outputs = []
    for choice in choices:
        if choice.last is None or choice.last.pooled is None:
            raise APIError(500, "a pooling request ended without its output", "InternalError")
        outputs.append(choice.last.pooled)
    return outputs, num_prompt_tokens


def _meta(gateway: GatewayState, prefix: str) -> dict:
    return {"id": f"{prefix}-{uuid.uuid4().hex}", "object": "list", "created": int(time.time()),
            "model": gateway.served_model_name}  # fmt: skip


def _usage(num_prompt_tokens: int) -> dict:
    return {"prompt_tokens": num_prompt_tokens, "total_tokens": num_prompt_tokens,
            "completion_tokens": 0, "prompt_tokens_details": None}  # fmt: skip


def _encoded(vector: list[float], encoding_format: str):
    if encoding_format == "base64":  # little-endian float32, as OpenAI's
        return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
    return vector


@router.post("/v1/embeddings")
async def embeddings(body: EmbeddingRequest, gateway: Gateway):
    params = _params(PoolingParams, task="embed", dimensions=body.dimensions,
                     normalize=body.normalize)  # fmt: skip
    outputs, num_prompt_tokens = await _run(gateway, body, "/v1/embeddings",
                                            _prompts(body.input), params)  # fmt: skip
    data = [{"object": "embedding", "embedding": _encoded(v, body.encoding_format), "index": i}
            for i, v in enumerate(outputs)]  # fmt: skip
    return dict(_meta(gateway, "embd"), data=data, usage=_usage(num_prompt_tokens))


@router.post("/pooling")
async def pooling(body: PoolingRequest, gateway: Gateway):
    task = body.task or ("classify" if gateway.classifier else "embed")
    params = _params(PoolingParams, task=task, dimensions=body.dimensions,
                     normalize=body.normalize)  # fmt: skip
    outputs, num_prompt_tokens = await _run(gateway, body, "/pooling", _prompts(body.input),
                                            params)  # fmt: skip
    data = [{"object": "pooling", "data": _encoded(v, body.encoding_format), "index": i}
            for i, v in enumerate(outputs)]  # fmt: skip
    return dict(_meta(gateway, "pool"), data=data, usage=_usage(num_prompt_tokens))


@router.post("/classify")
async def classify(body: ClassifyRequest, gateway: Gateway):
    params = _params(PoolingParams, task="classify", activation=body.activation)
    outputs, num_prompt_tokens = await _run(gateway, body, "/classify", _prompts(body.input),
                                            params)  # fmt: skip
    labels = gateway.classifier or ()
    data = []
    for i, probs in enumerate(outputs):
        best = max(range(len(probs)), key=probs.__getitem__)
        label = labels[best] if best < len(labels) else str(best)
        data.append({"index": i, "label": label, "probs": probs, "num_classes": len(probs)})
    return dict(_meta(gateway, "classify"), data=data, usage=_usage(num_prompt_tokens))


async def _scores(gateway: GatewayState, body: PoolingBody, route: str, queries: list[str],
                  documents: list[str], activation: bool | None):  # fmt: skip
    """One score per (query, document) pair, and the prompt tokens in all."""
    if gateway.classifier:  # a cross-encoder reads each pair as one input
        params = _params(PoolingParams, task="score", activation=activation)
        pairs = [(q, d) for q, d in zip(queries, documents)]
        outputs, num_tokens = await _run(gateway, body, route, pairs, params)
        return [v[-1] for v in outputs], num_tokens
    params = _params(PoolingParams, task="embed", normalize=True)
    distinct = list(dict.fromkeys([*queries, *documents]))
    outputs, num_tokens = await _run(gateway, body, route, distinct, params)
    vectors = dict(zip(distinct, outputs))
    return [sum(a * b for a, b in zip(vectors[q], vectors[d]))
            for q, d in zip(queries, documents)], num_tokens  # fmt: skip


def _pairs(text_1: str | list[str], text_2: str | list[str]) -> tuple[list[str], list[str]]:
    """vLLM's score pairing: one to one, one to many, or many to many of the same length."""
    left = [text_1] if isinstance(text_1, str) else list(text_1)
    right = [text_2] if isinstance(text_2, str) else list(text_2)
    if len(left) == 1:
        left = left * len(right)
    if len(left) != len(right):
        raise APIError(400, "text_1 must be one text, or as many as text_2",
                       "BadRequestError", "text_1")  # fmt: skip
    return left, right


@router.post("/score")
@router.post("/v1/score")
async def score(body: ScoreRequest, gateway: Gateway):
    queries, documents = _pairs(body.text_1, body.text_2)
    scores, num_tokens = await _scores(gateway, body, "/score", queries, documents,
                                       body.activation)  # fmt: skip
    data = [{"index": i, "object": "score", "score": s} for i, s in enumerate(scores)]
    return dict(_meta(gateway, "score"), data=data, usage=_usage(num_tokens))


@router.post("/rerank")
@router.post("/v1/rerank")
@router.post("/v2/rerank")
async def rerank(body: RerankRequest, gateway: Gateway):
    documents = list(body.documents)
    scores, num_tokens = await _scores(gateway, body, "/rerank", [body.query] * len(documents),
                                       documents, None)  # fmt: skip
    order = sorted(range(len(documents)), key=lambda i: -scores[i])
    if body.top_n:
        order = order[: body.top_n]
    results = []
    for i in order:
        result = {"index": i, "relevance_score": scores[i]}
        if body.return_documents:
            result["document"] = {"text": documents[i]}
        results.append(result)
    return {"id": f"rerank-{uuid.uuid4().hex}", "model": gateway.served_model_name,
            "usage": {"total_tokens": num_tokens}, "results": results}  # fmt: skip


def _params(cls, **values) -> PoolingParams:
    try:
        return cls(**values)
    except ValueError as e:
        raise APIError(400, str(e), "BadRequestError", str(e).split()[0]) from None

"""Explicit conversions between protobuf messages and engine types. Nothing else crosses a
process boundary: no pickle, no ad-hoc dicts."""

from __future__ import annotations

import json

from tandem.engine.client import GenerateInput
from tandem.engine.pooling import PoolingParams
from tandem.engine.request import Request, SamplingParams
from tandem.engine.structured_output.params import KINDS, StructuredOutputsParams
from tandem.v1 import common_pb2, engine_pb2, tokenizer_pb2

KV_DTYPES = frozenset(
    {"float32", "bfloat16", "float16", "float8_e4m3fn", "float8_e5m2"}
)  # the KV dtypes a hand-off may carry
ROLE_NAMES = {engine_pb2.WORKER_ROLE_PREFILL: "prefill", engine_pb2.WORKER_ROLE_DECODE: "decode"}


def sampling_params_to_proto(p: SamplingParams) -> common_pb2.SamplingParams:
    msg = common_pb2.SamplingParams(
        temperature=p.temperature,
        top_p=p.top_p,
        top_k=p.top_k,
        min_p=p.min_p,
        max_tokens=p.max_tokens,
        min_tokens=p.min_tokens,
        stop=list(p.stop),
        stop_token_ids=list(p.stop_token_ids),
        ignore_eos=p.ignore_eos,
        include_stop_str_in_output=p.include_stop_str_in_output,
        presence_penalty=p.presence_penalty,
        frequency_penalty=p.frequency_penalty,
        repetition_penalty=p.repetition_penalty,
        logit_bias=dict(p.logit_bias),
        allowed_token_ids=list(p.allowed_token_ids or ()),
        restrict_to_allowed=p.allowed_token_ids is not None,
        bad_words=[common_pb2.TokenSequence(token_ids=list(w)) for w in p.bad_words_token_ids],
        keep_special_tokens=not p.skip_special_tokens,
        no_spaces_between_special_tokens=not p.spaces_between_special_tokens,
        n=p.n,
    )
    if p.seed is not None:
        msg.seed = p.seed
    if p.logprobs is not None:
        msg.logprobs = p.logprobs
    if p.prompt_logprobs is not None:
        msg.prompt_logprobs = p.prompt_logprobs
    so = p.structured_outputs
    if so is not None:
        msg.structured_outputs.CopyFrom(common_pb2.StructuredOutputs(
            kind=so.kind, spec=so.spec, backend=so.backend, any_whitespace=so.any_whitespace,
            reasoning_parser=so.reasoning_parser or "",
        ))  # fmt: skip
    if p.pooling is not None:
        pooling = common_pb2.Pooling(task=p.pooling.task)
        for name in ("dimensions", "normalize", "activation"):
            if getattr(p.pooling, name) is not None:
                setattr(pooling, name, getattr(p.pooling, name))
        msg.pooling.CopyFrom(pooling)
    return msg


def pooling_from_proto(m: common_pb2.Pooling) -> PoolingParams:
    return PoolingParams(
        task=m.task or "embed",
        dimensions=m.dimensions if m.HasField("dimensions") else None,
        normalize=m.normalize if m.HasField("normalize") else None,
        activation=m.activation if m.HasField("activation") else None,
    )


def pooled_to_proto(tensor) -> engine_pb2.PooledOutput:
    """A pooled output (float32 tensor) as its message."""
    return engine_pb2.PooledOutput(data=tensor.reshape(-1).tolist(), shape=list(tensor.shape))


def pooled_from_proto(m: engine_pb2.PooledOutput) -> list:
    """The pooled output as nested lists of floats (a vector, or tokens x dim)."""
    data = list(m.data)
    if len(m.shape) == 2:
        width = m.shape[1]
        return [data[i : i + width] for i in range(0, len(data), width)]
    return data


def structured_outputs_from_proto(m: common_pb2.StructuredOutputs) -> StructuredOutputsParams:
    if m.kind not in KINDS:
        raise ValueError(f"structured_outputs kind must be one of {', '.join(KINDS)}")
    if m.kind == "choice":
        value = tuple(json.loads(m.spec))
    else:
        value = True if m.kind == "json_object" else m.spec
    return StructuredOutputsParams(
        **{m.kind: value}, backend=m.backend or "auto", any_whitespace=m.any_whitespace,
        reasoning_parser=m.reasoning_parser or None,
    )  # fmt: skip


def sampling_params_from_proto(m: common_pb2.SamplingParams) -> SamplingParams:
    """Validates like the engine does: a bad value raises ValueError naming it."""
    return SamplingParams(
        max_tokens=m.max_tokens,
        temperature=m.temperature,
        top_p=m.top_p,
        top_k=m.top_k,
        min_p=m.min_p,
        seed=m.seed if m.HasField("seed") else None,
        stop=tuple(m.stop),
        stop_token_ids=tuple(m.stop_token_ids),
        ignore_eos=m.ignore_eos,
        min_tokens=m.min_tokens,
        include_stop_str_in_output=m.include_stop_str_in_output,
        presence_penalty=m.presence_penalty,
        frequency_penalty=m.frequency_penalty,
        repetition_penalty=m.repetition_penalty or 1.0,
        logit_bias=tuple(sorted(m.logit_bias.items())),
        allowed_token_ids=tuple(m.allowed_token_ids) if m.restrict_to_allowed else None,
        bad_words_token_ids=tuple(tuple(w.token_ids) for w in m.bad_words),
        logprobs=m.logprobs if m.HasField("logprobs") else None,
        prompt_logprobs=m.prompt_logprobs if m.HasField("prompt_logprobs") else None,
        skip_special_tokens=not m.keep_special_tokens,
        spaces_between_special_tokens=not m.no_spaces_between_special_tokens,
        n=m.n or 1,
        structured_outputs=structured_outputs_from_proto(m.structured_outputs)
        if m.HasField("structured_outputs")
        else None,
        pooling=pooling_from_proto(m.pooling) if m.HasField("pooling") else None,
    )


def logprobs_to_proto(lp) -> common_pb2.TokenLogprobs:
    """An engine TokenLogprobs as its message (token texts are the tokenizer stage's)."""
    return common_pb2.TokenLogprobs(
        token_id=lp.token_id,
        logprob=lp.logprob,
        rank=lp.rank,
        top_ids=lp.top_ids,
        top_logprobs=lp.top_logprobs,
    )


def request_to_spec(
    req: Request, reply_subject: str = "", trace_context: dict[str, str] | None = None
) -> common_pb2.RequestSpec:
    spec = common_pb2.RequestSpec(
        request_id=req.request_id,
        prompt_token_ids=req.prompt_token_ids,
        params=sampling_params_to_proto(req.sampling_params),
        priority=req.priority,
        arrival_time=req.arrival_time,
        reply_subject=reply_subject,
        cache_salt=req.cache_salt or "",
        lora_name=req.lora_name or "",
        lora_path=req.lora_path or "",
        output_token_ids=req.output_token_ids,
        trace_context=trace_context or {},
        fork_ids=req.fork_ids,
    )
    if req.eos_token_id is not None:
        spec.eos_token_id = req.eos_token_id
    return spec


def request_from_spec(spec: common_pb2.RequestSpec) -> Request:
    return Request(
        request_id=spec.request_id,
        prompt_token_ids=list(spec.prompt_token_ids),
        sampling_params=sampling_params_from_proto(spec.params),
        eos_token_id=spec.eos_token_id if spec.HasField("eos_token_id") else None,
        arrival_time=spec.arrival_time,
        priority=spec.priority,
        cache_salt=spec.cache_salt or None,
        lora_name=spec.lora_name or None,
        lora_path=spec.lora_path or None,
        output_token_ids=list(spec.output_token_ids),
        fork_ids=tuple(spec.fork_ids),
    )


def generate_input_to_proto(
    inputs: GenerateInput, reply_subject: str
) -> tokenizer_pb2.GenerateRequest:
    msg = tokenizer_pb2.GenerateRequest(
        request_ids=inputs.request_ids,
        add_generation_prompt=inputs.add_generation_prompt,
        bad_words=inputs.bad_words,
        params=sampling_params_to_proto(inputs.params),
        fill_context=inputs.fill_context,
        return_prompt_text=inputs.return_prompt_text,
        priority=inputs.priority,
        cache_salt=inputs.cache_salt or "",
        lora_name=inputs.lora_name or "",
        lora_path=inputs.lora_path or "",
        reply_subject=reply_subject,
        trace_context=inputs.trace_context or {},
        arrival_time=inputs.arrival_time,
    )
    if inputs.messages is not None:
        msg.messages_json = json.dumps(inputs.messages)
    if inputs.tools is not None:
        msg.tools_json = json.dumps(inputs.tools)
    if inputs.chat_template_kwargs is not None:
        msg.chat_template_kwargs_json = json.dumps(inputs.chat_template_kwargs)
    for prompt in inputs.prompts:
        if isinstance(prompt, str):
            msg.prompts.add(text=prompt)
        elif isinstance(prompt, tuple):  # a text pair
            msg.prompts.add(text=prompt[0], text_pair=prompt[1])
        else:
            msg.prompts.add().token_ids.token_ids.extend(prompt)
    if inputs.truncate_prompt_tokens is not None:
        msg.truncate_prompt_tokens = inputs.truncate_prompt_tokens
    return msg


def _json_field(text: str, name: str, kind: type):
    """An optional JSON field of a message (empty: None); ValueError naming it."""
    if not text:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        raise ValueError(f"{name} must be JSON") from None
    if not isinstance(value, kind):
        raise ValueError(f"{name} must be a JSON {kind.__name__}")
    return value


def _prompt_of(p: tokenizer_pb2.PromptInput) -> str | tuple[str, str] | list[int]:
    if p.WhichOneof("prompt") != "text":
        return list(p.token_ids.token_ids)
    return (p.text, p.text_pair) if p.text_pair else p.text


def generate_input_from_proto(msg: tokenizer_pb2.GenerateRequest) -> GenerateInput:
    """ValueError (naming the field) when the message cannot be a request."""
    messages = None
    if msg.messages_json:
        try:
            messages = json.loads(msg.messages_json)
        except json.JSONDecodeError:
            raise ValueError("messages must be JSON") from None
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise ValueError("messages must be a list of objects")
    tools = _json_field(msg.tools_json, "tools", list)
    kwargs = _json_field(msg.chat_template_kwargs_json, "chat_template_kwargs", dict)
    return GenerateInput(
        request_ids=list(msg.request_ids),
        params=sampling_params_from_proto(msg.params),
        prompts=[_prompt_of(p) for p in msg.prompts],
        messages=messages,
        add_generation_prompt=msg.add_generation_prompt,
        tools=tools,
        chat_template_kwargs=kwargs,
        truncate_prompt_tokens=(
            msg.truncate_prompt_tokens if msg.HasField("truncate_prompt_tokens") else None
        ),
        bad_words=list(msg.bad_words),
        fill_context=msg.fill_context,
        return_prompt_text=msg.return_prompt_text,
        priority=msg.priority,
        cache_salt=msg.cache_salt or None,
        lora_name=msg.lora_name or None,
        lora_path=msg.lora_path or None,
        trace_context=dict(msg.trace_context),
        arrival_time=msg.arrival_time,
    )

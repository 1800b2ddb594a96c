"""A generation request from the API's terms to the engine's: chat messages rendered with the
model's template, texts tokenized, prompts truncated, bad words turned into token sequences,
and everything checked against the vocabulary and the context length.

One place for both deployments: the tokenizer stage runs it for the cluster, the in-process
client when colocated, so both answer the same 400s (InvalidRequest, naming the field)."""

from __future__ import annotations

import dataclasses
import re

from tandem.engine.client import GenerateInput, InvalidRequest, PreparedPrompt
from tandem.engine.request import Request, SamplingParams


def render_chat(
    tokenizer,
    messages: list[dict],
    add_generation_prompt: bool,
    tools: list[dict] | None = None,
    template_kwargs: dict | None = None,
) -> tuple[str, list[int]]:
    """The templated prompt and its ids: encoded without special tokens, since the template
    places its own (as vLLM does). `tools` reach templates that take them;
    `template_kwargs` (vLLM's chat_template_kwargs) are more variables for the template."""
    from jinja2 import TemplateError

    if not messages:
        raise InvalidRequest("messages must not be empty", "messages")
    if not getattr(tokenizer, "chat_template", None):
        raise InvalidRequest(
            "messages must not be given: the model's tokenizer has no chat template", "messages"
        )
    try:
        reserved = {"messages", "tools", "tokenize", "add_generation_prompt", "chat_template"}
        kwargs = {k: v for k, v in (template_kwargs or {}).items() if k not in reserved}
        text = tokenizer.apply_chat_template(
            messages,
            tools=tools,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            **kwargs,
        )
    except (TemplateError, KeyError, TypeError, ValueError) as e:
        raise InvalidRequest(
            f"messages must fit the model's chat template: {e}", "messages"
        ) from None
    return text, tokenizer.encode(text, add_special_tokens=False)


def bad_words_ids(tokenizer, words: list[str]) -> tuple[tuple[int, ...], ...]:
    """Each bad word as token sequences, alone and after a space (as vLLM does)."""
    out: list[tuple[int, ...]] = []
    for word in words:
        for text in (word.lstrip(), " " + word.lstrip()):
            ids = tuple(tokenizer.encode(text, add_special_tokens=False))
            if ids and ids not in out:
                out.append(ids)
    return tuple(out)


def _param_of(message: str) -> str | None:
    match = re.match(r"([a-z_]+)[a-z_.]* must", message)
    return match.group(1) if match else None


def prepare(
    tokenizer, inputs: GenerateInput, vocab_size: int, max_model_len: int
) -> tuple[list[PreparedPrompt], SamplingParams]:
    """Each prompt's token ids (and text, when asked for) and the request's full sampling
    parameters; InvalidRequest when it cannot run."""
    param = "messages" if inputs.messages is not None else "prompt"
    if inputs.messages is not None:
        text, ids = render_chat(tokenizer, inputs.messages, inputs.add_generation_prompt,
                                inputs.tools, inputs.chat_template_kwargs)  # fmt: skip
        prompts = [PreparedPrompt(ids, text if inputs.return_prompt_text else "")]
    else:
        if not inputs.prompts:
            raise InvalidRequest("prompt must not be empty", "prompt")
        prompts = [_encode(tokenizer, p, inputs) for p in inputs.prompts]
    if len(inputs.request_ids) != len(prompts) * max(inputs.n, 1) or not inputs.request_ids:
        raise InvalidRequest("request_ids must hold n ids per prompt", "request_id")
    k = inputs.truncate_prompt_tokens
    pooling = inputs.params.pooling is not None
    for prompt in prompts:
        if k is not None and len(prompt.token_ids) > k:
            prompt.token_ids = prompt.token_ids[-k:]
            prompt.text = ""  # no longer the text given
        check_prompt(prompt.token_ids, param, vocab_size, max_model_len, pooling)
        if not inputs.return_prompt_text:
            prompt.text = ""
        elif not prompt.text:
            prompt.text = tokenizer.decode(prompt.token_ids, skip_special_tokens=True)
    try:
        changes = {}
        if inputs.bad_words:
            changes["bad_words_token_ids"] = bad_words_ids(tokenizer, inputs.bad_words)
        if inputs.fill_context:  # one prompt (chat): the reply may fill the rest
            changes["max_tokens"] = max_model_len - len(prompts[0].token_ids)
        params = dataclasses.replace(inputs.params, **changes) if changes else inputs.params
        params.check_vocab(vocab_size)
    except ValueError as e:
        raise InvalidRequest(str(e), _param_of(str(e))) from None
    return prompts, params


def _encode(tokenizer, prompt, inputs: GenerateInput) -> PreparedPrompt:
    """A prompt's ids. Pooling requests' texts (and text pairs) are cut to
    `truncate_prompt_tokens` by the tokenizer, from the end, its special tokens kept (as
    sentence-transformers and vLLM do); token ids keep their last k (`prepare`)."""
    if isinstance(prompt, list):
        return PreparedPrompt(list(prompt))
    text, pair = (prompt, None) if isinstance(prompt, str) else prompt
    k = inputs.truncate_prompt_tokens
    if inputs.params.pooling is not None and k is not None:
        ids = tokenizer.encode(text, pair, truncation=True, max_length=k)
    elif pair is not None:
        ids = tokenizer.encode(text, pair)
    else:
        ids = tokenizer.encode(text)
    return PreparedPrompt(ids, text if pair is None else "")


def check_prompt(ids: list[int], param: str, vocab_size: int, max_model_len: int,
                 pooling: bool = False) -> None:  # fmt: skip
    """A prompt is not empty, holds only known token ids and leaves room for a token (a
    pooling request's may fill the context: it generates none)."""
    if not ids:
        raise InvalidRequest(f"{param} must not be empty", param)
    if any(not 0 <= t < vocab_size for t in ids):
        raise InvalidRequest(f"{param} token ids must be in [0, {vocab_size})", param)
    if pooling and len(ids) > max_model_len:
        raise InvalidRequest(
            f"This model's maximum context length is {max_model_len} tokens; the input "
            f"has {len(ids)} tokens (truncate_prompt_tokens cuts it).", param,
        )  # fmt: skip
    if not pooling and len(ids) >= max_model_len:
        raise InvalidRequest(
            f"This model's maximum context length is {max_model_len} tokens; "
            f"the prompt has {len(ids)} tokens and at least one must be generated.",
            param,
        )


def engine_requests(
    inputs: GenerateInput, prompts: list[PreparedPrompt], params: SamplingParams, now: float
) -> list[Request]:
    """One engine request per prompt, its other samples as forks (n > 1)."""
    requests = []
    for i, prompt in enumerate(prompts):
        ids = inputs.ids_of(i)
        request = Request(ids[0], prompt.token_ids, params, priority=inputs.priority,
                          cache_salt=inputs.cache_salt, fork_ids=tuple(ids[1:]),
                          lora_name=inputs.lora_name, lora_path=inputs.lora_path)  # fmt: skip
        request.arrival_time = inputs.arrival_time or now
        requests.append(request)
    return requests

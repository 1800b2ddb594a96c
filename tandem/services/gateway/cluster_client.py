"""The gateway's engine client for the disaggregated cluster: each request goes whole to the
tokenizer stage (gRPC Submit), which prepares it and submits it to the scheduler; its text
deltas come back over NATS."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator

from tandem.engine.client import (
    EngineOverloaded,
    GenerateInput,
    GenerationChunk,
    LogprobEntry,
    PreparedPrompt,
    check_ids_free,
)
from tandem.services.observability.metrics_push import SnapshotStore
from tandem.services.transport import codec
from tandem.services.transport.bus import Bus
from tandem.services.transport.subjects import subject
from tandem.services.transport.tokenizer_client import TokenizerClient
from tandem.v1 import engine_pb2

logger = logging.getLogger(__name__)
WORKER_TIMEOUT = 5.0  # a worker whose heartbeats stopped this long ago no longer counts
# How long a submit may take: the tokenizer stage's own resending to the scheduler (15 s)
# plus a margin, within which an unreachable tokenizer is called again.
SUBMIT_TIMEOUT = 20.0


class ClusterEngineClient:
    """EngineClient over the stages. Ready once the tokenizer answers and at least one
    prefill and one decode worker heartbeat."""

    def __init__(self, nats_url: str, tokenizer_target: str) -> None:
        self.nats_url = nats_url
        self.tokenizer_target = tokenizer_target
        self.tokenizer: TokenizerClient | None = None
        self.gateway_id = f"gw-{uuid.uuid4().hex[:8]}"
        self.reply_subject = subject("gateway", self.gateway_id, "deltas")
        self.vocab_size = 0
        self.needs_decode = True  # a pooling model's cluster serves without decode workers
        self.workers: dict[str, engine_pb2.Heartbeat] = {}
        self.seen: dict[str, float] = {}
        self._streams: dict[str, asyncio.Queue] = {}
        self._forks: dict[str, tuple[str, ...]] = {}  # request id -> its forks' ids (n > 1)
        self.scheduler_stats: engine_pb2.SchedulerStats | None = None
        self.bus: Bus | None = None
        self.snapshots = SnapshotStore()

    async def start(self) -> None:
        """Connect; retried by the caller while the stages start."""
        if self.tokenizer is None:  # its channel belongs to the running loop
            self.tokenizer = TokenizerClient(self.tokenizer_target)
        info = await self.tokenizer.info()
        self.vocab_size = info.vocab_size
        self.bus = await Bus.connect(
            self.nats_url, self.gateway_id, on_reconnect=self._on_reconnect
        )
        await self.bus.subscribe(self.reply_subject, engine_pb2.TextDelta, self._on_delta)
        await self.bus.subscribe(subject("heartbeat"), engine_pb2.Heartbeat, self._on_heartbeat)
        await self.bus.subscribe(subject("scheduler", "report"), engine_pb2.StepReport, self._rep)
        await self.bus.subscribe(
            subject("scheduler", "stats"), engine_pb2.SchedulerStats, self._on_scheduler_stats
        )
        await self.bus.subscribe(subject("metrics"), engine_pb2.MetricsSnapshot, self._on_metrics)
        await self.bus.flush()

    async def _on_heartbeat(self, hb: engine_pb2.Heartbeat, raw) -> None:
        self.workers[hb.worker_id] = hb
        self.seen[hb.worker_id] = time.monotonic()

    async def _on_reconnect(self) -> None:
        """NATS was lost and is back: messages of the requests in flight may have been lost
        meanwhile (a finish among them), so each of them ends now with an explicit error
        rather than waiting for ever; new requests go through as before."""
        lost = engine_pb2.TextDelta(
            error="the cluster's message bus restarted while this request ran", error_code=503
        )
        for request_id, queue in list(self._streams.items()):
            logger.warning("NATS reconnected: request %s ends with an error", request_id)
            queue.put_nowait(lost)

    async def _on_metrics(self, snapshot: engine_pb2.MetricsSnapshot, raw) -> None:
        self.snapshots.add(snapshot)

    def metrics(self) -> list[str]:
        return self.snapshots.texts()

    async def _on_scheduler_stats(self, stats: engine_pb2.SchedulerStats, raw) -> None:
        self.scheduler_stats = stats

    async def _rep(self, report: engine_pb2.StepReport, raw) -> None:
        if report.HasField("heartbeat"):
            await self._on_heartbeat(report.heartbeat, raw)

    def _live(self) -> list[engine_pb2.Heartbeat]:
        now = time.monotonic()
        return [hb for wid, hb in self.workers.items() if now - self.seen[wid] < WORKER_TIMEOUT]

    @property
    def max_model_len(self) -> int:
        lens = [hb.max_model_len for hb in self._live()]
        return min(lens) if lens else 0

    @property
    def ready(self) -> bool:
        roles = {hb.role for hb in self._live() if not hb.draining}
        needed = {engine_pb2.WORKER_ROLE_PREFILL}
        if self.needs_decode:
            needed.add(engine_pb2.WORKER_ROLE_DECODE)
        return self.bus is not None and self.vocab_size > 0 and needed <= roles

    def stats(self) -> dict:
        """Each live worker's load, from its heartbeats."""
        stats = self.scheduler_stats
        scheduler = {}
        if stats is not None:
            scheduler = {
                "num_waiting": stats.num_waiting,
                "num_prefilling": stats.num_prefilling,
                "num_waiting_tokens": stats.num_waiting_tokens,
                "index_available": stats.index_available,
                "index_lookup_p50_ms": stats.index_lookup_p50_ms,
                "num_index_lookups": stats.num_index_lookups,
            }
        live = self._live()
        transfers = sum(hb.num_kv_transfers for hb in live)
        seconds = sum(hb.kv_transfer_seconds for hb in live)
        kv_transfer = {
            "num_transfers": transfers,
            "mean_ms": 1000 * seconds / transfers if transfers else None,
            "bytes": sum(hb.kv_transfer_bytes for hb in live),
            "num_shared_memory": sum(hb.num_kv_file_transfers for hb in live),
        }
        return {
            "scheduler": scheduler,
            "kv_transfer": kv_transfer,
            "workers": {
                hb.worker_id: {
                    "role": codec.ROLE_NAMES.get(hb.role, "unknown"),
                    "num_blocks": hb.num_blocks,
                    "num_free_blocks": hb.num_free_blocks,
                    "block_size": hb.block_size,
                    "kv_cache_dtype": hb.kv_cache_dtype,
                    "num_running": hb.num_running,
                    "num_waiting": hb.num_waiting,
                    "num_steps": hb.num_steps,
                    "num_preemptions": hb.num_preemptions,
                    "prefix_cache_queries": hb.prefix_cache_queries,
                    "prefix_cache_hits": hb.prefix_cache_hits,
                    "num_kv_blocks_received": hb.num_kv_blocks_received,
                    "draining": hb.draining,
                }
                for hb in self._live()
            },
        }

    async def encode(self, prompt: str, add_special_tokens: bool = True) -> list[int]:
        return await self.tokenizer.tokenize(prompt, add_special_tokens)

    async def apply_chat_template(
        self, messages: list[dict], add_generation_prompt: bool = True
    ) -> list[int]:
        _, ids = await self.tokenizer.apply_chat_template(messages, add_generation_prompt)
        return ids

    async def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return await self.tokenizer.detokenize(token_ids, skip_special_tokens)

    async def _on_delta(self, delta: engine_pb2.TextDelta, raw) -> None:
        queue = self._streams.get(delta.request_id)
        if queue is not None:
            queue.put_nowait(delta)
        if delta.error:  # a request that failed before forking fails its forks too
            for fork_id in self._forks.get(delta.request_id, ()):
                if fork_id in self._streams:
                    self._streams[fork_id].put_nowait(delta)

    async def submit(
        self, inputs: GenerateInput
    ) -> tuple[list[PreparedPrompt], list[AsyncIterator[GenerationChunk]]]:
        """The request goes whole to the tokenizer stage; its streams listen from before,
        since deltas may come before the call returns."""
        check_ids_free(inputs.request_ids, self._streams)
        queues = {rid: asyncio.Queue() for rid in inputs.request_ids}
        self._streams.update(queues)
        for i in range(inputs.num_prompts):
            ids = inputs.ids_of(i)
            if len(ids) > 1:
                self._forks[ids[0]] = tuple(ids[1:])
        if not inputs.arrival_time:
            inputs.arrival_time = time.time()
        msg = codec.generate_input_to_proto(inputs, self.reply_subject)
        try:
            reply = await self.tokenizer.submit(msg, SUBMIT_TIMEOUT)
        except BaseException:
            for rid in inputs.request_ids:
                self._streams.pop(rid, None)
                self._forks.pop(rid, None)
            raise
        prompts = [PreparedPrompt(list(p.token_ids), p.text) for p in reply.prompts]
        return prompts, [self._stream(rid, queues[rid]) for rid in inputs.request_ids]

    async def _stream(self, request_id: str, queue: asyncio.Queue):
        finished = False
        try:
            while not finished:
                delta: engine_pb2.TextDelta = await queue.get()
                if delta.error:
                    if delta.error_code == 400:
                        raise ValueError(delta.error)
                    if delta.error_code == 503:
                        raise EngineOverloaded(delta.error)
                    raise RuntimeError(delta.error)
                finished = bool(delta.finish_reason)
                yield GenerationChunk(
                    delta.text,
                    list(delta.token_ids),
                    delta.finish_reason or None,
                    delta.stop_reason
                    or (delta.stop_token_id if delta.HasField("stop_token_id") else None),
                    delta.num_prompt_tokens,
                    delta.num_cached_tokens,
                    delta.produced_at,
                    _entries(delta.logprobs),
                    _entries(delta.prompt_logprobs),
                    codec.pooled_from_proto(delta.pooled) if delta.HasField("pooled") else None,
                )
        finally:
            self._streams.pop(request_id, None)
            self._forks.pop(request_id, None)
            if not finished:
                await self.abort(request_id)

    async def abort(self, request_id: str) -> None:
        msg = engine_pb2.AbortRequest(request_id=request_id, reason="client")
        await self.bus.publish(subject("abort"), msg)

    async def reset_prefix_cache(self) -> None:
        """Every worker resets; their AllBlocksCleared events clear the index."""
        await self.bus.publish(subject("reset_prefix_cache"), engine_pb2.ResetPrefixCache())

    async def update_lora(self, name: str, path: str | None) -> None:
        """Every worker loads the adapter now (or frees it); one that misses this loads it
        when a request names it (the request carries its path)."""
        msg = engine_pb2.LoRAAdapterUpdate(lora_name=name, lora_path=path or "",
                                           unload=path is None)  # fmt: skip
        await self.bus.publish(subject("lora_adapters"), msg)

    async def shutdown(self) -> None:
        if self.bus is not None:
            await self.bus.close()
        if self.tokenizer is not None:
            await self.tokenizer.close()


def _entries(logprobs) -> list[LogprobEntry] | None:
    """TokenLogprobs messages (texts filled in by the tokenizer stage) for the gateway."""
    return [
        LogprobEntry(
            lp.token_id,
            lp.token,
            lp.logprob,
            list(zip(lp.top_ids, lp.top_tokens, lp.top_logprobs)),
            lp.rank,
        )
        for lp in logprobs
    ] or None

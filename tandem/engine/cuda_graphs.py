"""CUDA graphs for decode steps: the model's forward pass captured once per batch size at
start-up and replayed, so a decode step costs one launch instead of hundreds of kernel
launches from Python (at batch 1 on a fast GPU, launches are most of a step).

As vLLM: a set of capture sizes (`--cuda-graph-sizes`, default 1, 2, 4, 8 and every
multiple of 8 up to 512, capped by --max-num-seqs), a batch padded up to the next size
(padded rows write no KV: their slot is -1, and read one key of block 0), graphs captured
largest first in one shared memory pool, `--enforce-eager` to run without them. Only batches
of decodes replay a graph (every query one token, through the triton kernels, whose loops
read the context lengths from device memory); anything with a prefill chunk runs eagerly.
"""

from __future__ import annotations

import logging
import time

import torch

from tandem.engine.attention import AttnMetadata, TritonBatch

logger = logging.getLogger(__name__)


def default_capture_sizes(max_num_seqs: int) -> list[int]:
    """vLLM's: 1, 2, 4, then multiples of 8 up to 512; none above max_num_seqs."""
    sizes = [1, 2, 4, *range(8, 513, 8)]
    return [s for s in sizes if s <= max_num_seqs] or [1]


def padded_size(n: int, sizes: list[int]) -> int | None:
    """The smallest capture size that holds n rows (None: larger than any, run eagerly)."""
    return next((s for s in sorted(sizes) if s >= n), None)


class DecodeGraphs:
    """A model's decode steps, captured for each size; `run` replays the one that fits."""

    def __init__(self, model, kv_caches, sizes: list[int], max_blocks_per_seq: int,
                 device: torch.device) -> None:  # fmt: skip
        self.model = model
        self.kv_caches = kv_caches
        self.sizes = sorted(set(sizes))
        largest = self.sizes[-1]
        i64 = dict(dtype=torch.int64, device=device)
        i32 = dict(dtype=torch.int32, device=device)
        self.input_ids = torch.zeros(largest, **i64)
        self.positions = torch.zeros(largest, **i64)
        self.slot_mapping = torch.full((largest,), -1, **i64)
        self.query_start_loc = torch.arange(largest + 1, **i32)  # one query token per row
        self.seq_lens = torch.ones(largest, **i32)
        self.block_tables = torch.zeros(largest, max_blocks_per_seq, **i32)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.capture_seconds = 0.0
        self.capture_bytes = 0

    def _meta(self, size: int) -> AttnMetadata:
        batch = TritonBatch(self.query_start_loc[: size + 1], self.seq_lens[:size],
                            self.block_tables[:size], max_query_len=1)  # fmt: skip
        return AttnMetadata(slot_mapping=self.slot_mapping[:size], triton=batch)

    def _forward(self, size: int) -> torch.Tensor:
        return self.model(self.input_ids[:size], self.positions[:size], self._meta(size),
                          self.kv_caches)  # fmt: skip

    @torch.inference_mode()
    def capture(self) -> None:
        """Every size, largest first (the smaller ones reuse its memory pool)."""
        torch.cuda.synchronize()
        free_before = torch.cuda.mem_get_info()[0]
        start = time.perf_counter()
        pool = None
        stream = torch.cuda.Stream()
        for size in reversed(self.sizes):
            with torch.cuda.stream(stream):
                self._forward(size)  # warm-up: triton compiles, allocator settles
            stream.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool, stream=stream):
                self.outputs[size] = self._forward(size)
            pool = graph.pool() if pool is None else pool
            self.graphs[size] = graph
        torch.cuda.synchronize()
        self.capture_seconds = time.perf_counter() - start
        self.capture_bytes = max(free_before - torch.cuda.mem_get_info()[0], 0)
        logger.info(
            "captured %d CUDA graphs for decode batches of %s in %.1f s, %.0f MiB",
            len(self.graphs), _ranges(self.sizes), self.capture_seconds,
            self.capture_bytes / 2**20,
        )  # fmt: skip

    def fits(self, num_rows: int) -> bool:
        return padded_size(num_rows, self.sizes) is not None

    def run(self, input_ids: list[int], positions: list[int], context_lens: list[int],
            tables: list[list[int]], slots: torch.Tensor) -> torch.Tensor:  # fmt: skip
        """A batch of n decodes (one token each) through the graph of the next size up;
        their hidden states, (n, hidden)."""
        n = len(input_ids)
        size = padded_size(n, self.sizes)
        device = self.input_ids.device
        self.input_ids[:n].copy_(torch.tensor(input_ids), non_blocking=True)
        self.positions[:n].copy_(torch.tensor(positions), non_blocking=True)
        self.slot_mapping[:n].copy_(slots, non_blocking=True)
        self.slot_mapping[n:size].fill_(-1)
        self.seq_lens[:n].copy_(torch.tensor(context_lens, dtype=torch.int32), non_blocking=True)
        self.seq_lens[n:size].fill_(1)
        width = max(len(t) for t in tables)
        padded = torch.zeros(n, width, dtype=torch.int32)
        for i, table in enumerate(tables):
            padded[i, : len(table)] = torch.tensor(table, dtype=torch.int32)
        self.block_tables[:size].zero_()
        self.block_tables[:n, :width].copy_(padded.to(device, non_blocking=True))
        return self._replay(size)[:n]

    def _replay(self, size: int) -> torch.Tensor:
        self.graphs[size].replay()
        return self.outputs[size]


def _ranges(sizes: list[int]) -> str:
    return f"{sizes[0]}..{sizes[-1]} ({len(sizes)} sizes)" if len(sizes) > 3 else str(sizes)

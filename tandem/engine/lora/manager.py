"""A worker's LoRA adapters: the ones it may serve (name -> PEFT folder), those read into
memory (at most --max-cpu-loras, least recently used evicted), and --max-loras slots in the
wrapped projections' stacked weights (a slot is rewritten when a batch needs an adapter
that holds none; the least recently used slot not in the batch goes)."""

from __future__ import annotations

import logging
from collections import OrderedDict

import torch

from tandem.engine.config import LoRAConfig
from tandem.engine.lora.adapter import LoRAAdapter, LoRAError, read_adapter
from tandem.engine.lora.layers import LoRABatch, LoRALinear

logger = logging.getLogger(__name__)

# wrapped projection -> the adapter targets of its shards, in order
SHARDS = {
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "o_proj": ("o_proj",),
    "gate_up_proj": ("gate_proj", "up_proj"),
    "down_proj": ("down_proj",),
}


class LoRAManager:
    def __init__(self, model, config: LoRAConfig, dtype: torch.dtype, device: torch.device,
                 backend: str = "torch") -> None:  # fmt: skip
        if not hasattr(model, "shard_sizes") or not hasattr(model, "layers"):
            raise ValueError("LoRA is supported on the Llama family's decoders only")
        self.config = config
        self.dtype, self.device, self.backend = dtype, device, backend
        self.num_layers = len(model.layers)
        self.paths: dict[str, str] = {}
        self.loaded: OrderedDict[str, LoRAAdapter] = OrderedDict()  # in memory, LRU last
        self.slots: list[str | None] = [None] * config.max_loras
        self.slot_used = [0] * config.max_loras  # the step that last used each slot
        self.step = 0
        self.num_loads = 0  # adapters read from disk
        self.num_evictions = 0  # adapters dropped from memory (max_cpu_loras)
        self.resident: tuple[str, ...] = ()  # those in memory, as another thread may read it
        a = model.args
        self.modules: list[tuple[int, LoRALinear, tuple[str, ...]]] = []
        for i, layer in enumerate(model.layers):
            for owner, name in ((layer.self_attn, "qkv_proj"), (layer.self_attn, "o_proj"),
                                (layer.mlp, "gate_up_proj"), (layer.mlp, "down_proj")):  # fmt: skip
                base = getattr(owner, name)
                if name in ("qkv_proj", "gate_up_proj"):
                    sizes = model.shard_sizes(name)
                else:
                    sizes = [a.hidden_size]
                fan_in = {"o_proj": a.num_heads * a.head_dim,
                          "down_proj": a.intermediate_size}.get(name, a.hidden_size)  # fmt: skip
                wrapped = LoRALinear(base, sizes, fan_in, config.max_loras,
                                     config.max_lora_rank, dtype, device, backend)  # fmt: skip
                setattr(owner, name, wrapped)
                self.modules.append((i, wrapped, SHARDS[name]))
        for name, path in config.lora_modules:
            self.add(name, path)

    @property
    def names(self) -> list[str]:
        return list(self.paths)

    def add(self, name: str, path: str) -> LoRAAdapter:
        """Serve `name` from the PEFT folder `path`: read and checked now (a bad adapter is
        refused here, with the reason); raises LoRAError."""
        adapter = read_adapter(name, path, self.config.max_lora_rank, self.num_layers)
        if name in self.paths:
            self.remove(name)
        self.paths[name] = path
        self._keep(adapter)
        return adapter

    def remove(self, name: str) -> bool:
        """Stop serving `name` and free its memory. A request still running with it reads
        it again from the path it carries, at its next step."""
        known = self.paths.pop(name, None) is not None
        self.loaded.pop(name, None)
        self.resident = tuple(self.loaded)
        for slot, held in enumerate(self.slots):
            if held == name:
                self.slots[slot] = None
        return known

    def _keep(self, adapter: LoRAAdapter) -> None:
        self.loaded[adapter.name] = adapter
        self.loaded.move_to_end(adapter.name)
        while len(self.loaded) > self.config.cpu_loras:
            evicted, _ = self.loaded.popitem(last=False)
            self.num_evictions += 1
            logger.info("LoRA adapter %s evicted from memory (--max-cpu-loras %d)", evicted,
                        self.config.cpu_loras)  # fmt: skip
        self.resident = tuple(self.loaded)

    def _adapter(self, name: str, path: str | None = None) -> LoRAAdapter:
        adapter = self.loaded.get(name)
        if adapter is None:
            path = self.paths.get(name) or path
            if path is None:
                raise LoRAError(f"LoRA adapter {name!r} is not loaded here")
            adapter = read_adapter(name, path, self.config.max_lora_rank, self.num_layers)
            self.num_loads += 1
            self.paths.setdefault(name, path)  # served here from now on
        self._keep(adapter)
        return adapter

    def activate(self, names: dict[str, str | None]) -> dict[str, int]:
        """A slot for each adapter of a batch (at most max_loras of them; name -> the path
        its requests carry)."""
        if len(names) > len(self.slots):
            raise LoRAError(f"{len(names)} adapters in one batch; --max-loras is "
                            f"{len(self.slots)}")  # fmt: skip
        self.step += 1
        mapping = {}
        for name in names:
            if name in self.slots:
                mapping[name] = self.slots.index(name)
        for name in names.keys() - mapping.keys():
            free = [s for s in range(len(self.slots)) if s not in mapping.values()]
            slot = min(free, key=lambda s: (self.slots[s] is not None, self.slot_used[s]))
            self._write_slot(slot, self._adapter(name, names[name]))
            mapping[name] = slot
        for slot in mapping.values():
            self.slot_used[slot] = self.step
        return mapping

    def _write_slot(self, slot: int, adapter: LoRAAdapter) -> None:
        for layer, module, targets in self.modules:
            shards = []
            for target in targets:
                pair = adapter.weights.get((layer, target))
                shards.append(None if pair is None else
                              tuple(t.to(self.device, self.dtype) for t in pair))  # fmt: skip
            module.set_slot(slot, shards)
        self.slots[slot] = adapter.name

    def set_batch(self, segments: list[tuple[int, int, str | None]],
                  paths: dict[str, str | None]) -> None:  # fmt: skip
        """The next forward's rows by adapter: (start, end, name or None), in row order;
        `paths`: each adapter's folder as its requests carry it."""
        names = {name: paths.get(name) for _, _, name in segments if name is not None}
        if not names:
            self.clear()
            return
        mapping = self.activate(names)
        batch = LoRABatch.build(
            [(s, e, -1 if n is None else mapping[n]) for s, e, n in segments], self.device,
            self.backend, len(self.slots), self.dtype,
        )  # fmt: skip
        for _, module, _ in self.modules:
            module.batch = batch

    def clear(self) -> None:
        for _, module, _ in self.modules:
            module.batch = None

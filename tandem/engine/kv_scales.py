"""An FP8 KV cache's per-layer scales (kv_quant.py says what they scale): read from the
checkpoint, measured at start-up on a fixed text (--calculate-kv-scales), or 1.0."""

from __future__ import annotations

import logging

import torch

from tandem.engine.attention import build_attn_metadata
from tandem.engine.kv_quant import (
    CALIBRATION_TEXT,
    K_SCALE_CONSTANT,
    V_SCALE_CONSTANT,
    calibrated_scale,
    is_fp8,
)
from tandem.engine.loader import read_kv_scales
from tandem.engine.tokenizer import load_tokenizer

logger = logging.getLogger(__name__)


def layer_kv_scales(runner, model_dir: str, cache_config) -> list[float]:
    """Each layer's K scale then V scale, set on its attention module: from the checkpoint,
    else measured (--calculate-kv-scales), else 1.0. A ModelRunner's, once its model and
    cache are built."""
    layers = [] if runner.is_encoder else [m.self_attn for m in runner.model.layers]
    if not is_fp8(runner.info.kv_cache_dtype):
        return [1.0] * (2 * len(layers))
    found = read_kv_scales(model_dir)
    if found:
        source = "the checkpoint"
    elif cache_config.calculate_kv_scales:
        source, found = "a calibration text", _calibrate(runner, model_dir, layers)
    else:
        source = "none given: 1.0"
    scales = []
    for i, attn in enumerate(layers):  # float32's, as a hand-off carries them
        attn.k_scale, attn.v_scale = (
            torch.tensor(found.get((i, kv), 1.0), dtype=torch.float32).item() for kv in "kv"
        )
        scales += [attn.k_scale, attn.v_scale]
    logger.info("KV cache scales from %s (K %.4g..%.4g, V %.4g..%.4g)", source,
                min(scales[0::2]), max(scales[0::2]), min(scales[1::2]),
                max(scales[1::2]))  # fmt: skip
    return scales


def _calibrate(runner, model_dir: str, layers) -> dict[tuple[int, str], float]:
    """max |K| and max |V| per layer over one prefill of CALIBRATION_TEXT, in scratch
    blocks (the step's own K and V are measured before they are stored)."""
    tokenizer = load_tokenizer(model_dir)
    ids = tokenizer.encode(CALIBRATION_TEXT)[: runner.info.max_model_len]
    ids = ids[: runner.info.num_blocks * runner.block_size]
    for attn in layers:
        attn.kv_amax = [0.0, 0.0]
    try:
        table = list(range(-(-len(ids) // runner.block_size)))
        meta = build_attn_metadata([len(ids)], [len(ids)], [table], runner.block_size,
                                   runner.device, allow_triton=False)  # fmt: skip
        with torch.inference_mode():
            runner.model(torch.tensor(ids, device=runner.device),
                       torch.arange(len(ids), device=runner.device), meta,
                       runner.kv_caches)  # fmt: skip
        found = {}
        for i, attn in enumerate(layers):
            found[i, "k"] = calibrated_scale(attn.kv_amax[0], K_SCALE_CONSTANT)
            found[i, "v"] = calibrated_scale(attn.kv_amax[1], V_SCALE_CONSTANT)
        return found
    finally:
        for attn in layers:
            attn.kv_amax = None
        for k, v in runner.kv_caches:
            k.zero_()
            v.zero_()

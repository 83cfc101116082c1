"""The paged KV cache tensors of one rank (the blocks are handed out by afd.block_pool)."""

from __future__ import annotations

import torch

from models.attention import kv_cache_shape
from models.config import ModelConfig


def allocate_kv_caches(cfg: ModelConfig, num_blocks: int, block_size: int,
                       dtype: torch.dtype, device: str | torch.device,
                       num_layers: int | None = None) -> list[torch.Tensor]:
    """One cache tensor per layer (see models.attention for the layouts) of ``dtype`` (the
    engine's ``cache_dtype``: the model's, or FP8 e4m3 with kv_cache_dtype "fp8"); ``num_layers``:
    cfg.num_layers unless given (one more with the MTP layer, whose cache is the last)."""
    shape = kv_cache_shape(cfg, num_blocks, block_size)
    return [torch.zeros(shape, dtype=dtype, device=device)
            for _ in range(cfg.num_layers if num_layers is None else num_layers)]


def kv_block_dim(cfg: ModelConfig) -> int:
    """The block axis of a layer's cache tensor (the layouts differ: MLA's is first)."""
    one, two = kv_cache_shape(cfg, 1, 1), kv_cache_shape(cfg, 2, 1)
    return next(i for i, (a, b) in enumerate(zip(one, two)) if a != b)

"""The paged KV pool of one attention rank: the block allocator and the per-layer cache tensors."""

from __future__ import annotations

from collections import deque

import torch

from models.attention import kv_cache_shape
from models.config import ModelConfig


class BlockAllocator:
    """Hands out fixed-size KV blocks by id; every block is either free or owned by one sequence."""

    def __init__(self, num_blocks: int, block_size: int):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        return 1.0 - len(self._free) / self.num_blocks

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def can_allocate(self, n: int) -> bool:
        return n <= len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise RuntimeError(f"KV pool exhausted: asked for {n} blocks, {len(self._free)} free")
        return [self._free.popleft() for _ in range(n)]

    def free(self, block_ids: list[int]) -> None:
        self._free.extend(block_ids)
        if len(self._free) > self.num_blocks:
            raise RuntimeError("KV block freed twice")


def allocate_kv_caches(cfg: ModelConfig, num_blocks: int, block_size: int,
                       dtype: torch.dtype, device: str | torch.device) -> list[torch.Tensor]:
    """One cache tensor per layer (see models.attention for the layouts)."""
    shape = kv_cache_shape(cfg, num_blocks, block_size)
    return [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_layers)]

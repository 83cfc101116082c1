"""The paged KV cache tensors of one rank (the blocks are handed out by afd.block_pool)."""

from __future__ import annotations

import math
import os

import numpy as np
import torch

from models.attention import kv_cache_shape
from models.config import ModelConfig


def allocate_kv_caches(cfg: ModelConfig, num_blocks: int, block_size: int,
                       dtype: torch.dtype, device: str | torch.device,
                       num_layers: int | None = None, state_slots: int = 0,
                       state_dtype: torch.dtype | None = None, window_blocks: int = 0) -> list:
    """One cache tensor per layer (see models.attention for the layouts) of ``dtype`` (the
    engine's ``cache_dtype``: the model's, or FP8 e4m3 with kv_cache_dtype "fp8"); ``num_layers``:
    cfg.num_layers unless given (one more with the MTP layer, whose cache is the last).
    Each layer's own width (GLM-5's "shared" DSA layers cache no indexer key; a DeepSeek-V4
    layer's rows its type's).
    A hybrid model's linear layers (models.hybrid) hold ``state_slots`` sequences' states
    instead (``LinearStates``: the conv state in ``state_dtype``, the run dtype; the recurrent
    state fp32), one slot per sequence the scheduler runs at once.
    ``window_blocks`` > 0: the sliding-window layers' caches are the window pool's
    (afd.window_pool), that many blocks and its null block after them.
    ValueError for an FP8 cache the kernels cannot read on ``device`` (``check_fp8_kv_device``)."""
    if dtype == torch.float8_e4m3fn:
        check_fp8_kv_device(device)
    lin = cfg.linear_attn
    windowed: tuple[int, ...] = ()
    if window_blocks:
        from afd.window_pool import window_layers

        windowed = window_layers(cfg)
    caches: list = []
    for layer in range(cfg.num_layers if num_layers is None else num_layers):
        if lin is not None and lin.is_linear(layer):
            from models.hybrid import LinearStates

            caches.append(LinearStates.allocate(lin, state_slots, state_dtype or dtype, device))
        else:
            blocks = window_blocks + 1 if layer in windowed else num_blocks
            caches.append(zeros(kv_cache_shape(cfg, blocks, block_size, layer), dtype, device))
    return caches


def zeros(shape: tuple[int, ...], dtype: torch.dtype,
          device: str | torch.device) -> torch.Tensor:
    """``torch.zeros(shape, dtype=dtype, device=device)``; on the CPU made of memory the OS
    hands out already zeroed (numpy's zeros: calloc), whose pages are touched only once
    written. torch.zeros writes every byte at once: a CPU rank's default pool (0.25 GiB,
    afd.config) cost about 0.35 s of a rank's start and was resident from the start, though
    a short run writes a few blocks of it."""
    if torch.device(device).type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    raw = np.zeros(math.prod(shape) * dtype.itemsize, dtype=np.uint8)
    return torch.from_numpy(raw).view(dtype).view(shape)


def cache_bytes(caches: list) -> int:
    """Bytes of a rank's caches: every layer's KV tensor, and a hybrid model's linear layers'
    state slots (``LinearStates.nbytes``)."""
    return sum(c.nbytes for c in caches)


def check_fp8_kv_device(device: str | torch.device) -> None:
    """ValueError on a CUDA GPU under compute capability 8.9 (Ampere: A100, A10), where Triton
    has no e4m3 type, so the decode and paged-prefill kernels could not load an FP8 cache: the
    first step would fail to compile. The torch kernels (AFD_KERNEL_BACKEND=torch) read it
    anywhere, as does the CPU."""
    device = torch.device(device)
    if device.type != "cuda" or os.environ.get("AFD_KERNEL_BACKEND") == "torch":
        return
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 9):
        raise ValueError(f"kv_cache_dtype='fp8' needs a GPU of compute capability 8.9 or later "
                         f"(Triton's e4m3), this one ({device}) is {major}.{minor}: use "
                         "kv_cache_dtype='auto', or AFD_KERNEL_BACKEND=torch (slow)")


def kv_block_dim(cfg: ModelConfig) -> int:
    """The block axis of a layer's cache tensor (the layouts differ: MLA's is first)."""
    one, two = kv_cache_shape(cfg, 1, 1), kv_cache_shape(cfg, 2, 1)
    return next(i for i, (a, b) in enumerate(zip(one, two)) if a != b)

"""The paged KV cache tensors of one rank (the blocks are handed out by afd.block_pool)."""

from __future__ import annotations

import os

import torch

from models.attention import kv_cache_shape
from models.config import ModelConfig


def allocate_kv_caches(cfg: ModelConfig, num_blocks: int, block_size: int,
                       dtype: torch.dtype, device: str | torch.device,
                       num_layers: int | None = None) -> list[torch.Tensor]:
    """One cache tensor per layer (see models.attention for the layouts) of ``dtype`` (the
    engine's ``cache_dtype``: the model's, or FP8 e4m3 with kv_cache_dtype "fp8"); ``num_layers``:
    cfg.num_layers unless given (one more with the MTP layer, whose cache is the last).
    Each layer's own width (GLM-5's "shared" DSA layers cache no indexer key; a DeepSeek-V4
    layer's rows its type's).
    ValueError for an FP8 cache the kernels cannot read on ``device`` (``check_fp8_kv_device``)."""
    if dtype == torch.float8_e4m3fn:
        check_fp8_kv_device(device)
    return [torch.zeros(kv_cache_shape(cfg, num_blocks, block_size, layer), dtype=dtype,
                        device=device)
            for layer in range(cfg.num_layers if num_layers is None else num_layers)]


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

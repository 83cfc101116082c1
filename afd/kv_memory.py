"""A rank's KV pool sized from its own GPU memory (vLLM's ``gpu_memory_utilization``).

When no size is given (``num_kv_blocks``, ``kv_cache_memory_gb``, ``AFD_KV_CACHE_GB``), every
rank that holds KV (the single process, attention ranks, prefill ranks) sizes its own pool once
its weights are loaded, on its own GPU:

    budget = min(gpu_memory_utilization x total / ranks on this GPU - in use by this process,
                 free on the GPU now) - activation reserve
    blocks = budget // bytes per block (every layer that caches, the MTP layer's too, in the
             cache's dtype: kv_cache_dtype "fp8" holds twice bf16's blocks)
             - 1 with CUDA graphs (their padding rows' scratch block)

As vLLM: the fraction is of the GPU's total memory, and what the process holds once loaded
(its weights) and what a step needs besides the KV (activations) come off it. "In use" is
``torch.cuda.memory_reserved`` after ``empty_cache``: what torch's allocator holds for this
process (the weights, buffers), not other processes' memory, as vLLM's per-instance budget.
Memory outside torch (the CUDA context, NCCL and cuBLAS workspaces) is not in it; the cap at
what is free now covers what exists by then, the rest comes out of the 1 - utilization headroom
and ``WORKSPACE_BYTES``. Several ranks on one GPU (a one-GPU test of a layout) split the
fraction evenly.

vLLM measures the activations with a profile forward of ``max_num_batched_tokens`` tokens. afd
estimates them instead (``activation_reserve``, conservative by construction): an attention
rank's forward is collective with the FFN ranks (every MoE layer is a dispatch and a combine),
so a profile run there means every rank of the layout stepping together before any is ready,
and its peak would still miss what the FFN ranks' replies allocate. The estimate counts, for a
step of ``max_num_batched_tokens`` tokens, the widest temporaries of one layer at once, MLA's
per-head expansion of the prefill context, and the sampler's fp32 logits.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass

import torch

from afd.config import EngineConfig, bytes_per_block
from models.attention import MLA_PREFILL_MAX_CONTEXT
from models.config import ModelConfig

log = logging.getLogger("afd.kv_memory")

# Tests only: JSON {"single" | "attention" | "prefill": {"total": B, "free": B, "in_use": B}},
# the numbers device_memory reports on a rank of that kind (bytes), on any device, CPU too.
FAKE_MEMORY_ENV = "AFD_TEST_DEVICE_MEMORY"

# Allowance for memory a first step allocates outside torch tensors (cuBLAS workspace, Triton
# and NCCL buffers). Chosen, not measured (no GPU run of this yet).
WORKSPACE_BYTES = 512 * 2**20


@dataclass(frozen=True)
class DeviceMemory:
    total: int  # bytes the device has
    free: int  # bytes free on it now, every process's use counted (cudaMemGetInfo)
    in_use: int  # bytes this process's torch allocator holds (its weights and buffers)


def sized_from_device_memory(device: str) -> bool:
    """Does a rank on ``device`` size its KV pool from its memory when no size is given?"""
    return device.startswith("cuda") or bool(os.environ.get(FAKE_MEMORY_ENV))


def device_memory(device: torch.device, kind: str) -> DeviceMemory:
    """This process's view of its GPU's memory. ``kind`` ("single", "attention", "prefill")
    only picks the numbers AFD_TEST_DEVICE_MEMORY fakes for that kind of rank (tests)."""
    fake = os.environ.get(FAKE_MEMORY_ENV)
    if fake:
        return DeviceMemory(**json.loads(fake)[kind])
    torch.cuda.empty_cache()  # what loading freed is not this process's any more
    free, total = torch.cuda.mem_get_info(device)
    return DeviceMemory(total, free, torch.cuda.memory_reserved(device))


def activation_reserve(model_cfg: ModelConfig, cfg: EngineConfig) -> int:
    """Bytes a step of ``max_num_batched_tokens`` tokens may need beyond weights and KV, an
    upper estimate (see the module docstring): per token the residual stream's buffers, one
    attention's projections, the wider of one dense MLP and one MoE layer (top_k routed copies
    with their gate/up and activation, shared experts, fp32 router logits); MLA's prefill
    expansion of up to MLA_PREFILL_MAX_CONTEXT context positions to per-head K and V; the
    sampling rows' fp32 logits twice (logits and probabilities); WORKSPACE_BYTES."""
    m, tokens = model_cfg, cfg.max_num_batched_tokens
    element = torch.empty((), dtype=cfg.dtype).element_size()
    if m.attention == "mla":
        qk, v = m.qk_nope_head_dim + m.qk_rope_head_dim, m.v_head_dim
    else:
        qk = v = m.head_dim
    attention = m.num_heads * (2 * qk + v) + m.kv_cache_dim
    dense = 3 * m.intermediate_size
    moe = (m.top_k * (2 * m.hidden_size + 3 * m.moe_intermediate_size)
           + 3 * m.n_shared_experts * m.moe_intermediate_size
           + m.num_experts * 4 // element)
    per_token = (6 * m.hidden_size + attention + max(dense, moe)) * element
    context = 0
    if m.attention == "mla":  # a sequence longer than the cap is expanded alone, whole
        positions = min(max(MLA_PREFILL_MAX_CONTEXT, cfg.max_model_len),
                        cfg.max_num_seqs * cfg.max_model_len)
        context = positions * m.num_heads * (m.qk_nope_head_dim + v + qk) * element
    rows = min(tokens, cfg.max_num_seqs * (1 + cfg.num_speculative_tokens))
    logits = 2 * rows * m.vocab_size * 4
    return tokens * per_token + context + logits + WORKSPACE_BYTES


def kv_blocks_from_memory(cfg: EngineConfig, model_cfg: ModelConfig, device: torch.device,
                          kind: str, *, ranks_on_device: int = 1, graphs: bool = False) -> int:
    """This rank's KV blocks (of ``cfg.block_size``) once its weights are loaded (see the
    module docstring). ``kind``: "single", "attention" or "prefill" (the log line, and the
    test's fake numbers). ``graphs``: it may capture CUDA graphs, whose scratch block comes out
    of the same memory. ValueError naming the numbers when one max_model_len sequence does not
    fit."""
    mem = device_memory(device, kind)
    per_block = bytes_per_block(model_cfg, cfg.block_size, cfg.cache_dtype, cfg.mtp)
    reserve = activation_reserve(model_cfg, cfg)
    share = int(cfg.gpu_memory_utilization * mem.total) // ranks_on_device
    budget = min(share - mem.in_use, mem.free) - reserve
    blocks = max(0, budget) // per_block - graphs
    need = -(-cfg.max_model_len // cfg.block_size)
    gib = 2**30
    numbers = (f"gpu_memory_utilization={cfg.gpu_memory_utilization} of {mem.total / gib:.2f} "
               f"GiB{f' / {ranks_on_device} ranks on this GPU' if ranks_on_device > 1 else ''}"
               f" = {share / gib:.2f} GiB, minus {mem.in_use / gib:.2f} GiB in use after "
               f"loading the weights (free now: {mem.free / gib:.2f} GiB), minus an activation "
               f"reserve of {reserve / gib:.2f} GiB for max_num_batched_tokens="
               f"{cfg.max_num_batched_tokens}")
    if blocks < need:
        raise ValueError(
            f"{kind} rank on {device}: KV cache too small: {numbers} leaves {budget / gib:.2f} "
            f"GiB, {max(0, blocks)} blocks of {per_block} bytes, but one max_model_len="
            f"{cfg.max_model_len} sequence needs {need} blocks of block_size={cfg.block_size}: "
            "raise gpu_memory_utilization, lower max_model_len or max_num_batched_tokens, or "
            "give kv_cache_memory_gb / num_kv_blocks")
    log.info("%s rank on %s: %d KV blocks (%.2f GiB): %s", kind, device, blocks,
             blocks * per_block / gib, numbers)
    return blocks

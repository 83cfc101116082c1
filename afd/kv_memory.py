"""A rank's KV pool sized from its own GPU memory (vLLM's ``gpu_memory_utilization``).

When no size is given (``num_kv_blocks``, ``kv_cache_memory_gb``, ``AFD_KV_CACHE_GB``), every
rank that holds KV (the single process, attention ranks, prefill ranks) sizes its own pool once
its weights are loaded, on its own GPU:

    budget = min(gpu_memory_utilization x total / ranks on this GPU - in use by this process,
                 free on the GPU now) - activation reserve - CUDA graph pool reserve
             - a hybrid model's state slots (with CUDA graphs one more: their padding
               rows' scratch slot)
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

CUDA graphs of decode steps (afd.cuda_graphs; the default on CUDA) allocate their intermediates
from a private memory pool that nothing else reuses. They are captured once the KV pool exists
(they bake its addresses in), so the pool cannot be measured before sizing: it is estimated
too (``graph_pool_reserve``), with the same per-step estimate, for a step of the largest
captured batch (its decode rows, no prefill), plus the graphs' static buffers, allocated then
too: their inputs, and the logits and routing ids that every size writes into one set of
outputs sized for the largest (so these do not grow with the number of sizes); with MTP
drafts also the MTP graphs' inputs and the hidden states and drafts they share the same way,
and the MTP passes' logits. It is 0 where
no graphs are captured (enforce_eager, an attention kind not captured, a prefill rank,
experts on FFN ranks).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass

import torch

from afd.config import EngineConfig, WindowSizes, bytes_per_block, state_bytes
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
    upper estimate (see the module docstring): ``step_activations`` of that many tokens, as
    many sampling rows as a step can have, with MLA's prefill expansion; WORKSPACE_BYTES."""
    tokens = cfg.max_num_batched_tokens
    rows = min(tokens, cfg.max_num_seqs * (1 + cfg.num_speculative_tokens))
    return step_activations(model_cfg, cfg, tokens, rows, prefill=True) + WORKSPACE_BYTES


def graph_pool_reserve(model_cfg: ModelConfig, cfg: EngineConfig) -> int:
    """Bytes the CUDA graphs of decode steps take once the KV pool is sized (afd.cuda_graphs),
    an upper estimate. Their private pool (every size shares it, the largest captured first;
    a graph keeps nothing of its own alive there, so each smaller capture reuses what the
    larger ones freed): ``step_activations`` of the largest size's decode rows (no prefill:
    decode steps only), whose two fp32 logits per row also cover the largest step's LM head
    output in the pool and the fp32 logits [largest, V] it is written into, the static output
    every size shares. Outside the pool, the other static buffers, each once for the largest
    size: the shared routing output (int64 [largest, top_k] per MoE layer) and the inputs
    (five int64 [largest], block tables int32 [largest, max_model_len / block_size]). None of
    it grows with the number of sizes. With MTP drafts (k), also once for the largest size the
    MTP graphs' static buffers, every size's views of one set as the logits are: the target's
    kept hidden states [largest, H] (the MTP graph's input) and the drafts (int64 [k,
    largest]) as outputs, and as inputs three int64 [largest] (next ids, drafting rows, chain
    order), three int64 [k - 1, largest] (the chained rounds' positions, slots, lengths) and
    the chain's block tables int32 [largest, max_model_len / block_size]; in the pool, the
    MTP graph's k passes' fp32 logits [largest, V] as if all were live at once (its one
    layer's other intermediates reuse what the target's capture freed). MiMo-V2-Flash /
    gpt-oss: its torch attention's pieces (``window_activations``) left out, as a captured
    step's decode rows run the window decode kernels (a capture through the torch path fails:
    it reads the lengths on the host). A hybrid model (models.hybrid): its linear layers'
    per-row state copies (``linear_activations``' torch decode path) left out likewise, as a
    captured step's decode rows run the Gated DeltaNet decode kernels. 0 when the runner
    would not capture
    (model_runner._graphs_apply: an attention kind not in CAPTURED_ATTENTION)."""
    from afd.cuda_graphs import CAPTURED_ATTENTION

    if not cfg.cuda_graph_sizes or model_cfg.attention not in CAPTURED_ATTENTION:
        return 0
    largest = max(cfg.cuda_graph_sizes)
    routing = model_cfg.top_k * 8 * sum(map(model_cfg.is_moe_layer,
                                            range(model_cfg.num_layers)))
    table = -(-cfg.max_model_len // cfg.block_size) * 4  # one row's block table
    # per row: five int64 inputs (ids, positions, slots, lengths, logits index), a hybrid
    # model's sixth (its state slot), the routing ids and a block table row
    inputs = 5 + (model_cfg.linear_attn is not None)
    kept = largest * (routing + inputs * 8 + table)
    if cfg.mtp:
        k, element = cfg.num_speculative_tokens, torch.empty((), dtype=cfg.dtype).element_size()
        outputs = model_cfg.hidden_size * element + k * 8
        inputs = (3 + 3 * (k - 1)) * 8 + table
        kept += largest * (outputs + inputs) + k * largest * model_cfg.vocab_size * 4
    # a hybrid model's decode rows: the Gated DeltaNet decode kernels update the states in
    # their slots, none of linear_activations' per-row state copies (the torch path's)
    lin = model_cfg.linear_attn
    states = 0 if lin is None else 16 * lin.num_v_heads * lin.k_head_dim * lin.v_head_dim * largest
    return (step_activations(model_cfg, cfg, largest, largest, prefill=False)
            - window_activations(model_cfg, cfg) - states + kept)


def step_activations(model_cfg: ModelConfig, cfg: EngineConfig, tokens: int, rows: int,
                     prefill: bool) -> int:
    """Bytes one forward of ``tokens`` tokens with ``rows`` sampling rows may need beyond
    weights and KV, an upper estimate: per token the residual stream's buffers, one attention's
    projections, the wider of one dense MLP and one MoE layer (top_k routed copies with their
    gate/up and activation, shared experts, fp32 router logits), summed though attention's and
    the MLP's are not live together; with ``prefill``, MLA's expansion of up to
    MLA_PREFILL_MAX_CONTEXT context positions to per-head K and V; DeepSeek-V3.2's sparse
    path (``dsa_activations``); a hybrid model's linear-attention layer
    (``linear_activations``); the rows' fp32 logits twice (logits and probabilities)."""
    m = model_cfg
    element = torch.empty((), dtype=cfg.dtype).element_size()
    if m.attention == "mla":
        qk, v = m.qk_nope_head_dim + m.qk_rope_head_dim, m.v_head_dim
    else:
        qk, v = m.head_dim, m.v_head_dim if m.attention == "mimo" else m.head_dim
    attention = m.num_heads * (2 * qk + v) + m.kv_cache_dim
    dense = 3 * m.intermediate_size
    moe = (m.top_k * (2 * m.hidden_size + 3 * m.moe_intermediate_size)
           + 3 * m.n_shared_experts * m.moe_intermediate_size
           + m.num_experts * 4 // element)
    per_token = (6 * m.hidden_size + attention + max(dense, moe)) * element
    context = 0
    if prefill and m.attention == "mla":  # a sequence longer than the cap is expanded alone
        positions = min(max(MLA_PREFILL_MAX_CONTEXT, cfg.max_model_len),
                        cfg.max_num_seqs * cfg.max_model_len)
        context = positions * m.num_heads * (m.qk_nope_head_dim + v + qk) * element
    logits = 2 * rows * m.vocab_size * 4
    return (tokens * per_token + context + dsa_activations(m, cfg) + v4_activations(m, cfg)
            + window_activations(m, cfg) + linear_activations(m, cfg, tokens, rows) + logits)


def linear_activations(m: ModelConfig, cfg: EngineConfig, tokens: int, rows: int) -> int:
    """A hybrid model's linear-attention layer (models.hybrid.GatedDeltaNet: plain torch, its
    rule in fp32) over ``tokens`` tokens, ``rows`` of them decode rows: per token (a prefill
    chunk padded to DELTA_CHUNK) its projections and conv in the run dtype and about 16 fp32
    vectors of num_v_heads x max(k_head_dim, v_head_dim) (q, k, v and their chunked copies,
    the solves' outputs, the output) and 4 of the chunk's num_v_heads x DELTA_CHUNK decays;
    per decode row (and the chunk being computed) 4 copies of a sequence's recurrent state
    (gathered from its slot, decayed, the update's outer product, the sum). Several times a
    GQA layer's projections, and decode rows cost a state each: 4 x 2 MiB a row at
    Qwen3-Next's sizes. 0 for other models."""
    lin = m.linear_attn
    if lin is None:
        return 0
    from models.hybrid import DELTA_CHUNK

    element = torch.empty((), dtype=cfg.dtype).element_size()
    key_dim, value_dim = lin.num_k_heads * lin.k_head_dim, lin.num_v_heads * lin.v_head_dim
    wide = lin.num_v_heads * max(lin.k_head_dim, lin.v_head_dim)
    per_token = (4 * (16 * wide + 4 * lin.num_v_heads * DELTA_CHUNK)
                 + element * (2 * (key_dim + value_dim + lin.num_v_heads) + 4 * lin.conv_dim))
    state = 4 * lin.num_v_heads * lin.k_head_dim * lin.v_head_dim
    return (tokens + DELTA_CHUNK - 1) * per_token + 4 * state * (min(rows, tokens) + 1)


def window_activations(m: ModelConfig, cfg: EngineConfig) -> int:
    """MiMo-V2-Flash's torch attention (kernels.window_attention, on every device): a piece's
    four fp32 tensors of at most MAX_SCORES scores (scores, with the sink, probabilities and
    the masked copy), and the cache rows it gathers, at most MAX_SCORES values or one
    max_model_len sequence's (a full layer's query sees its whole context), in the cache's
    dtype and as fp32 keys and values (twice: the values' masked copy). 0 for other models."""
    if m.attention != "mimo":
        return 0
    from kernels.window_attention import MAX_SCORES

    cache_element = torch.empty((), dtype=cfg.cache_dtype).element_size()
    rows = max(MAX_SCORES, cfg.max_model_len * m.kv_cache_dim)
    return 4 * MAX_SCORES * 4 + rows * (cache_element + 8)


def v4_activations(m: ModelConfig, cfg: EngineConfig) -> int:
    """DeepSeek-V4's torch attention (models.deepseek_v4): a piece's four [piece, heads, keys]
    fp32 tensors (scores, masked, logits, probabilities) of at most V4_MAX_SCORES each; the
    rows a row reads back in full (a chunk of up to max_num_batched_tokens, its window and the
    windows it closes) twice (the copy its entries are written into); the compressed entries
    of a sequence as long as a block table holds (max_model_len in whole blocks: a CUDA
    graph's decode rows list every entry their tables hold) in the model's dtype: the
    indexer's once, the K=V ones twice (a piece's keys are its window's rows and those
    entries, concatenated); and a decode piece's per-entry lists [rows, entries] (entry
    positions, the index path's positions and slots int64, index scores fp32, closed /
    selected bools: 32 bytes an entry at most), rows * entries at most V4_MAX_SCORES over the
    piece's widest head count, or one row's. 0 for other models."""
    if m.attention != "v4":
        return 0
    from models.deepseek_v4 import V4_MAX_SCORES

    v4 = m.v4
    element = torch.empty((), dtype=cfg.dtype).element_size()
    rates = [v4.rate(i) for i in range(m.num_layers) if v4.rate(i)]
    local = (min(cfg.max_num_batched_tokens, cfg.max_model_len) + v4.sliding_window
             + 2 * max(rates, default=0))
    width = -(-cfg.max_model_len // cfg.block_size) * cfg.block_size  # a block table's tokens
    n_entries = width // min(rates) if rates else 0
    entries = n_entries * (2 * v4.head_dim + v4.index_head_dim)
    heads = max(m.num_heads, v4.head_dim, v4.index_n_heads, v4.index_head_dim)
    lists = max(V4_MAX_SCORES // heads, n_entries) * 32 if rates else 0
    return 4 * V4_MAX_SCORES * 4 + (2 * local * m.kv_cache_dim + entries) * element + lists


def dsa_activations(m: ModelConfig, cfg: EngineConfig) -> int:
    """DeepSeek-V3.2's sparse path (kernels.dsa), where max_model_len exceeds index_topk:
    a piece's four [piece, heads, L] fp32 tensors (index and attention scores, their relu /
    softmax) of at most DSA_MAX_SCORES each, its sort's values and indices, and the context it
    gathers (the decode rows': DSA_MAX_SCORES / heads positions; a prefill chunk's: one
    max_model_len) in the cache's dtype and in fp32; with GLM-5's shared layers, the full
    layer's selection they reuse (a prefill token's: a bool per context position; a decode
    row's: int32 indices, min(index_topk, max_model_len) of them; at most
    max_num_batched_tokens of either). 0 for other models."""
    if not m.dsa or cfg.max_model_len <= m.index_topk:
        return 0
    from kernels.dsa import DSA_MAX_SCORES

    heads = max(m.num_heads, m.index_n_heads)
    positions = max(DSA_MAX_SCORES // heads, cfg.max_model_len)
    cache_element = torch.empty((), dtype=cfg.cache_dtype).element_size()
    per_token = max(cfg.max_model_len, 4 * min(m.index_topk, cfg.max_model_len))
    kept = cfg.max_num_batched_tokens * per_token if m.index_shared_layers else 0
    return (4 * DSA_MAX_SCORES * 4 + 2 * (DSA_MAX_SCORES // heads) * 8
            + positions * m.kv_cache_dim * (4 + cache_element) + kept)


def kv_blocks_from_memory(cfg: EngineConfig, model_cfg: ModelConfig, device: torch.device,
                          kind: str, *, ranks_on_device: int = 1, graphs: bool = False) -> int:
    """This rank's KV blocks (of ``cfg.block_size``) once its weights are loaded (see the
    module docstring). ``kind``: "single", "attention" or "prefill" (the log line, and the
    test's fake numbers). ``graphs``: it may capture CUDA graphs, whose scratch block and pool
    (``graph_pool_reserve``) come out of the same memory. ValueError naming the numbers when
    one max_model_len sequence does not fit. With a window pool (``cfg.window_pool``): the
    main pool's blocks (``kv_pools_from_memory``)."""
    return kv_pools_from_memory(cfg, model_cfg, device, kind, ranks_on_device=ranks_on_device,
                                graphs=graphs)["num_kv_blocks"]


def kv_pools_from_memory(cfg: EngineConfig, model_cfg: ModelConfig, device: torch.device,
                         kind: str, *, ranks_on_device: int = 1, graphs: bool = False) -> dict:
    """``kv_blocks_from_memory`` as the EngineConfig fields it sizes: ``num_kv_blocks``, and
    with a window pool (afd.window_pool) ``num_window_blocks`` too, the memory split between
    the two (``WindowSizes.split``: the window pool its bound, the full layers the rest)."""
    mem = device_memory(device, kind)
    per_block = bytes_per_block(model_cfg, cfg.block_size, cfg.cache_dtype, cfg.mtp)
    reserve = activation_reserve(model_cfg, cfg)
    pool = graph_pool_reserve(model_cfg, cfg) if graphs else 0
    share = int(cfg.gpu_memory_utilization * mem.total) // ranks_on_device
    # a hybrid model's linear-attention states: max_num_seqs slots and the state snapshots'
    # (num_state_snapshots), a fixed cost; with CUDA graphs one more, their padding rows'
    # scratch slot (afd.model_runner)
    states = state_bytes(model_cfg, cfg.dtype, cfg.num_state_slots + graphs)
    budget = min(share - mem.in_use, mem.free) - reserve - pool - states
    blocks = max(0, budget) // per_block - graphs
    sized = {"num_kv_blocks": blocks}
    if cfg.window_pool:  # MiMo-V2-Flash / gpt-oss: the main pool's and the window pool's
        sizes = WindowSizes(model_cfg, cfg.block_size, cfg.cache_dtype, cfg.mtp,
                            cfg.max_num_seqs, cfg.max_num_batched_tokens, cfg.max_model_len)
        blocks, window = sizes.pools(max(0, budget), cfg.num_window_blocks)
        sizes.check(window)
        if sizes.full_bytes:  # the graphs' scratch block, in the main pool (the window pool's
            blocks -= graphs  # padding rows use its null block, there anyway)
        sized = {"num_kv_blocks": blocks, "num_window_blocks": window}
        per_block = sizes.full_bytes
    need = -(-cfg.max_model_len // cfg.block_size)
    gib = 2**30
    numbers = (f"gpu_memory_utilization={cfg.gpu_memory_utilization} of {mem.total / gib:.2f} "
               f"GiB{f' / {ranks_on_device} ranks on this GPU' if ranks_on_device > 1 else ''}"
               f" = {share / gib:.2f} GiB, minus {mem.in_use / gib:.2f} GiB in use after "
               f"loading the weights (free now: {mem.free / gib:.2f} GiB), minus an activation "
               f"reserve of {reserve / gib:.2f} GiB for max_num_batched_tokens="
               f"{cfg.max_num_batched_tokens}, minus a CUDA graph pool estimate of "
               f"{pool / gib:.2f} GiB" + (f" for decode batches up to "
                                          f"{max(cfg.cuda_graph_sizes)}" if pool else
                                          " (no CUDA graphs)")
               + (f", minus {states / gib:.2f} GiB of linear-attention states for "
                  f"max_num_seqs={cfg.max_num_seqs}"
                  + (f" and num_state_snapshots={cfg.num_state_snapshots}"
                     if cfg.num_state_snapshots else "") if states else ""))
    if blocks < need:
        raise ValueError(
            f"{kind} rank on {device}: KV cache too small: {numbers} leaves {budget / gib:.2f} "
            f"GiB, {max(0, blocks)} blocks of {per_block} bytes, but one max_model_len="
            f"{cfg.max_model_len} sequence needs {need} blocks of block_size={cfg.block_size}: "
            "raise gpu_memory_utilization, lower max_model_len or max_num_batched_tokens"
            f"{' or max_num_seqs / num_state_snapshots (state slots)' if states else ''}"
            f"{', give fewer or smaller cuda_graph_sizes or set enforce_eager' if pool else ''}"
            + (f", or lower num_window_blocks (the window pool's {sized['num_window_blocks']} "
               f"blocks take {sizes.window_bytes * sized['num_window_blocks'] / 2**20:.1f} MiB "
               "of it)" if cfg.window_pool else "")
            + ", or give kv_cache_memory_gb / num_kv_blocks")
    log.info("%s rank on %s: %d KV blocks (%.2f GiB)%s: %s", kind, device, blocks,
             blocks * per_block / gib,
             f", the window pool {sized['num_window_blocks']} blocks of "
             f"{sizes.window_bytes} bytes" if cfg.window_pool else "", numbers)
    return sized

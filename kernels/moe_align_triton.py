"""Token-to-expert alignment for ``fused_moe``: (token, slot) pairs sorted by expert, on the device.

Output, for ``topk_ids`` [T, K] flattened to S = T*K slots (slot s = token s // K, choice s % K):
  counts [E] int32         slots routed to each expert (ids of -1 or >= E are skipped)
  sorted_slots [S] int32   slot ids grouped by expert, expert 0's first, token order inside an
                           expert (a stable sort, as the torch reference does); entries past
                           sum(counts) are left unwritten and never read.
The GEMMs pad each expert's segment to their own BLOCK_M themselves (see ``moe_gemm_triton``), so
the two GEMMs can use different block sizes and nothing here depends on a tile config.

Two launches (one when the slots fit one chunk, as in decode), no host sync, deterministic (no
atomics): a count pass writes per-chunk histograms, then every chunk's program reads all
histograms to find where its slots go.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# One program holds a [CHUNK, E_PAD] one-hot tile; this many elements keeps it in registers.
_TILE_ELEMS = 8192


@triton.jit
def _one_hot(ids_ptr, pid, num_slots, num_experts, E_PAD: tl.constexpr, CHUNK: tl.constexpr):
    offs = pid * CHUNK + tl.arange(0, CHUNK)
    ids = tl.load(ids_ptr + offs, mask=offs < num_slots, other=-1).to(tl.int32)
    cols = tl.arange(0, E_PAD)
    # -1 and out-of-range ids match no column, which is how they are skipped.
    hit = (ids[:, None] == cols[None, :]) & (cols[None, :] < num_experts)
    return offs, hit.to(tl.int32)  # [CHUNK], [CHUNK, E_PAD]


@triton.jit(do_not_specialize=["num_slots"])
def moe_count_kernel(
    ids_ptr,  # [S] int32/int64 expert id per slot
    chunk_counts_ptr,  # [num_chunks, E_PAD] int32 out
    num_slots,
    num_experts,
    E_PAD: tl.constexpr,
    CHUNK: tl.constexpr,
):
    pid = tl.program_id(0)
    _, hit = _one_hot(ids_ptr, pid, num_slots, num_experts, E_PAD, CHUNK)
    cols = tl.arange(0, E_PAD)
    tl.store(chunk_counts_ptr + pid * E_PAD + cols, tl.sum(hit, 0))


@triton.jit(do_not_specialize=["num_slots", "num_chunks"])
def moe_scatter_kernel(
    ids_ptr,  # [S] int32/int64
    chunk_counts_ptr,  # [num_chunks, E_PAD] int32 from moe_count_kernel
    counts_ptr,  # [E] int32 out
    sorted_slots_ptr,  # [S] int32 out
    num_slots,
    num_experts,
    num_chunks,
    E_PAD: tl.constexpr,
    CHUNK: tl.constexpr,
    SINGLE: tl.constexpr,  # one chunk: count here, no moe_count_kernel launch (decode batches)
):
    pid = tl.program_id(0)
    offs, hit = _one_hot(ids_ptr, pid, num_slots, num_experts, E_PAD, CHUNK)
    cols = tl.arange(0, E_PAD)
    if SINGLE:
        total = tl.sum(hit, 0)
        before = tl.zeros([E_PAD], dtype=tl.int32)
    else:
        # Every program sums all chunk histograms (tiny: num_chunks x E int32 from L2) so that
        # no third launch or grid-wide barrier is needed.
        total = tl.zeros([E_PAD], dtype=tl.int32)
        before = tl.zeros([E_PAD], dtype=tl.int32)  # this expert's slots in earlier chunks
        for c0 in range(0, num_chunks, CHUNK):
            rows = c0 + tl.arange(0, CHUNK)
            tile = tl.load(chunk_counts_ptr + rows[:, None] * E_PAD + cols[None, :],
                           mask=(rows < num_chunks)[:, None], other=0)  # [CHUNK, E_PAD]
            total += tl.sum(tile, 0)
            before += tl.sum(tl.where((rows < pid)[:, None], tile, 0), 0)
    if pid == 0:
        tl.store(counts_ptr + cols, total, mask=cols < num_experts)
    base = tl.cumsum(total, 0) - total + before  # [E_PAD] first position of this chunk's slots
    rank = tl.cumsum(hit, 0) - hit  # [CHUNK, E_PAD] earlier slots of the same expert in chunk
    pos = tl.sum(hit * (base[None, :] + rank), 1)  # [CHUNK]
    tl.store(sorted_slots_ptr + pos, offs, mask=tl.sum(hit, 1) > 0)


def align_by_expert(flat_ids: torch.Tensor, num_experts: int, *,
                    chunk: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """flat_ids: [S] int32/int64 contiguous -> (counts [E] int32, sorted_slots [S] int32).

    ``chunk`` (a power of two >= 16) overrides the slots per program, for tests.
    """
    num_slots = flat_ids.numel()
    e_pad = max(16, triton.next_power_of_2(num_experts))
    chunk = chunk or max(16, min(1024, _TILE_ELEMS // e_pad))
    num_chunks = triton.cdiv(num_slots, chunk)
    device = flat_ids.device
    counts = torch.empty(num_experts, dtype=torch.int32, device=device)
    sorted_slots = torch.empty(num_slots, dtype=torch.int32, device=device)
    single = num_chunks == 1
    chunk_counts = counts  # unused placeholder when single
    if not single:
        chunk_counts = torch.empty(num_chunks, e_pad, dtype=torch.int32, device=device)
        moe_count_kernel[(num_chunks,)](flat_ids, chunk_counts, num_slots, num_experts,
                                        E_PAD=e_pad, CHUNK=chunk, num_warps=4)
    moe_scatter_kernel[(num_chunks,)](flat_ids, chunk_counts, counts, sorted_slots, num_slots,
                                      num_experts, num_chunks, E_PAD=e_pad, CHUNK=chunk,
                                      SINGLE=single, num_warps=4)
    return counts, sorted_slots

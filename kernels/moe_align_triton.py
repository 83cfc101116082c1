"""Token-to-expert alignment for ``fused_moe``: (token, slot) pairs sorted by expert, on the device.

Output, for ``topk_ids`` [T, K] flattened to S = T*K slots (slot s = token s // K, choice s % K):
  counts [E] int32         slots routed to each expert (ids of -1 or >= E are skipped)
  sorted_slots [S] int32   slot ids grouped by expert, expert 0's first, token order inside an
                           expert (a stable sort, as the torch reference does); entries past
                           sum(counts) are left unwritten and never read.
The GEMMs pad each expert's segment to their own BLOCK_M themselves (see ``moe_gemm_triton``), so
the two GEMMs can use different block sizes and nothing here depends on a tile config.

Two launches (one when the slots fit one chunk), no host sync, deterministic (no atomics): a
count pass writes per-chunk histograms, then every chunk's program reads all histograms to find
where its slots go. Small batches skip this module's launches: ``route_block`` gives a GEMM
program the same answer for its own m-block from the ids alone (see ``inline_route_fits``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.triton_utils import cdiv, gdc_launch_dependents, gdc_wait, next_pow2, pdl_kwargs

# One program holds a [CHUNK, E_PAD] one-hot tile; this many elements keeps it in registers.
_TILE_ELEMS = 8192
# route_block's tiles ([S_PAD, E_PAD] one-hot, [BLOCK_M, S_PAD] selection) stay this small: every
# GEMM program recomputes them before its first weight load, so they must cost well under the
# launches they replace (alignment and top-k sum). 8192 int32 over 128 threads is 64 registers
# for a moment; the table's m <= 32 tiles compile without spills with it (test_kernels_sm90).
_INLINE_ELEMS = 8192


def inline_route_fits(num_slots: int, num_experts: int, block_m: int) -> bool:
    """Whether GEMM programs can route their own rows (``route_block``) for this batch."""
    s_pad = next_pow2(max(num_slots, 1))
    return s_pad * max(_e_pad(num_experts), block_m) <= _INLINE_ELEMS


def _e_pad(num_experts: int) -> int:
    return max(16, next_pow2(num_experts))


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
    PDL: tl.constexpr,
):
    gdc_wait(PDL)
    gdc_launch_dependents(PDL)  # a tiny grid: let the next kernel's programs get ready now
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
    SINGLE: tl.constexpr,  # one chunk: count here, no moe_count_kernel launch
    PDL: tl.constexpr,
):
    gdc_wait(PDL)
    gdc_launch_dependents(PDL)
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


@triton.jit
def expert_block(pid_m, counts, num_rows, E_PAD: tl.constexpr, BLOCK_M: tl.constexpr):
    """m-block ``pid_m`` of rows grouped by expert, each expert's segment padded to BLOCK_M.

    counts: [E_PAD] int32 rows per expert (0 past the last expert). Returns (expert, first
    grouped row, rows in this block, first row of the block inside its expert's segment,
    number of non-empty blocks). Past the last block, expert >= E and rows <= 0.
    """
    offs_e = tl.arange(0, E_PAD)
    blocks = (counts + BLOCK_M - 1) // BLOCK_M
    block_end = tl.cumsum(blocks, 0)
    # Experts whose blocks all come before this one; past the last block this is >= E and
    # selects no expert below, so count = 0 and rows <= 0.
    expert = tl.sum((block_end <= pid_m).to(tl.int32), 0)
    sel = offs_e == expert
    count = tl.sum(tl.where(sel, counts, 0), 0)
    local = (pid_m - tl.sum(tl.where(sel, block_end - blocks, 0), 0)) * BLOCK_M
    first = tl.sum(tl.where(sel, tl.cumsum(counts, 0) - counts, 0), 0) + local
    rows = tl.minimum(count - local, num_rows - first)  # counts past num_rows are clipped
    return expert, first, rows, local, tl.sum(blocks, 0)


@triton.jit
def expert_block_scan(pid_m, counts_ptr, num_experts, num_rows, BLOCK_M: tl.constexpr):
    """``expert_block``'s (expert, first, rows, local, blocks) by a scalar loop over the experts'
    counts instead of vector reductions, for kernels whose k loop is warp-specialized (Triton's
    Hopper auto-WS pass cannot partition a kernel holding reduce or scan ops). One scalar load
    per expert: cheap beside the m >= 128 tiles that use it."""
    expert = num_experts
    first = 0
    rows = 0
    local = 0
    seen = 0  # blocks of the experts before e
    row0 = 0  # rows of the experts before e
    for e in range(num_experts):
        count = tl.load(counts_ptr + e).to(tl.int32)
        blocks = (count + BLOCK_M - 1) // BLOCK_M
        hit = (pid_m >= seen) & (pid_m < seen + blocks)
        here = (pid_m - seen) * BLOCK_M
        expert = tl.where(hit, e, expert)
        local = tl.where(hit, here, local)
        first = tl.where(hit, row0 + here, first)
        rows = tl.where(hit, count - here, rows)
        seen += blocks
        row0 += count
    rows = tl.minimum(rows, num_rows - first)  # counts past num_rows are clipped
    return expert, first, rows, local, seen


@triton.jit
def route_block(ids_ptr, pid_m, num_slots, num_experts, S_PAD: tl.constexpr,
                E_PAD: tl.constexpr, BLOCK_M: tl.constexpr):
    """``align_by_expert`` + ``expert_block`` for one m-block, from the routing ids alone.

    ids_ptr: [S] expert id per slot. Returns (expert, first grouped row, rows, number of
    non-empty blocks, slots [BLOCK_M] int32: the block's slot ids in the order
    ``align_by_expert`` would sort them, 0 for rows past ``rows``).
    """
    offs_s = tl.arange(0, S_PAD)
    ids = tl.load(ids_ptr + offs_s, mask=offs_s < num_slots, other=-1).to(tl.int32)
    cols = tl.arange(0, E_PAD)
    # -1 and out-of-range ids match no column, which is how they are skipped.
    hit = (ids[:, None] == cols[None, :]) & (cols[None, :] < num_experts)  # [S_PAD, E_PAD]
    counts = tl.sum(hit.to(tl.int32), 0)
    expert, first, rows, local, num_blocks = expert_block(pid_m, counts, num_slots, E_PAD,
                                                          BLOCK_M)
    mine = ((ids == expert) & (expert < num_experts)).to(tl.int32)  # [S_PAD]
    rank = tl.cumsum(mine, 0) - mine  # earlier slots of the same expert: a stable sort
    want = local + tl.arange(0, BLOCK_M)  # ranks this block holds
    sel = (mine[None, :] > 0) & (rank[None, :] == want[:, None])  # [BLOCK_M, S_PAD]
    slots = tl.sum(tl.where(sel, offs_s[None, :], 0), 1)
    return expert, first, rows, num_blocks, slots


def align_by_expert(flat_ids: torch.Tensor, num_experts: int, *, chunk: int | None = None,
                    pdl: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """flat_ids: [S] int32/int64 contiguous -> (counts [E] int32, sorted_slots [S] int32).

    ``chunk`` (a power of two >= 16) overrides the slots per program, for tests. ``pdl``:
    launch with programmatic dependent launch (see ``triton_utils.gdc_wait``).
    """
    num_slots = flat_ids.numel()
    e_pad = _e_pad(num_experts)
    chunk = chunk or max(16, min(1024, _TILE_ELEMS // e_pad))
    num_chunks = cdiv(num_slots, chunk)
    device = flat_ids.device
    counts = torch.empty(num_experts, dtype=torch.int32, device=device)
    sorted_slots = torch.empty(num_slots, dtype=torch.int32, device=device)
    single = num_chunks == 1
    chunk_counts = counts  # unused placeholder when single
    if not single:
        chunk_counts = torch.empty(num_chunks, e_pad, dtype=torch.int32, device=device)
        moe_count_kernel[(num_chunks,)](flat_ids, chunk_counts, num_slots, num_experts,
                                        E_PAD=e_pad, CHUNK=chunk, PDL=pdl, num_warps=4,
                                        **pdl_kwargs(pdl))
    moe_scatter_kernel[(num_chunks,)](flat_ids, chunk_counts, counts, sorted_slots, num_slots,
                                      num_experts, num_chunks, E_PAD=e_pad, CHUNK=chunk,
                                      SINGLE=single, PDL=pdl, num_warps=4, **pdl_kwargs(pdl))
    return counts, sorted_slots

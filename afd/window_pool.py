"""The window pool: a second KV block pool for a model's sliding-window layers (MiMo-V2-Flash,
gpt-oss).

A sliding layer's query at position p reads only positions p - window + 1 .. p, so once a
sequence has computed c tokens no later query reads a position below c - window + 1 (the next
step's first query is at c; a prefill chunk's first query reads window - 1 rows before it; a
verifying sequence's rows start at c too, and a rejected draft is never counted in c). The
sliding layers' blocks wholly below that line are given back to this pool and their entries
in the sequence's window table point at the null block (``WindowPool.null``, one block past
the pool's, never handed out) that no real row reads (kernels.window_attention: a row reads from
its first query's window start, every path); a CUDA graph's padding rows write and read it
(afd.cuda_graphs: the window pool's scratch block). The full layers keep every row in the main pool,
as before: one block table per pool, ``Sequence.block_ids`` and ``Sequence.window_block_ids``,
the same length (block b of both holds positions b * block_size ..).

Sizing (``split_kv_budget``): a running sequence holds at most the blocks over its window and
its step's tokens, so the pool never needs more than ``window_pool_bound`` blocks
(max_num_seqs sequences' windows plus one step's tokens; the blocks of n-gram drafts a step
rejected are kept for the next, which can pass it: then fewer drafts, or a preemption; a
sequence never more than max_model_len's blocks, afd.config.WindowSizes); the full layers
take the rest of the KV memory. The scheduler (afd.scheduler) takes blocks of
both pools on admission and growth, preempts when either runs short, and frees both on
finish, abort and preemption.

Prefix caching: the window pool caches its full blocks under the main pool's keys, and a
block given back stays cached (free, evictable) until its memory is needed; a prefix hit
counts only as far as this pool still holds the blocks its first query reads
(``WindowPool.cached_window``: vLLM's sliding-window groups match a hit the same way).

vLLM (its hybrid KV cache manager's sliding-window groups) and SGLang (its SWA memory pool)
free these rows the same way. Not yet with this pool (afd.config refuses them, naming the
model): the prefix cache's host tier (it keeps main-pool blocks), P/D transfer (it moves every
row of every layer), MTP drafts (MiMo's are not read anyway).
``num_window_blocks=0`` keeps every row of the sliding layers in the main pool, as before.
"""

from __future__ import annotations

from collections.abc import Sequence

from afd.block_pool import BlockKeys, BlockPool, proven_run
from models.config import ModelConfig


def window_layers(model_cfg: ModelConfig) -> tuple[int, ...]:
    """The layers whose caches live in the window pool: MiMo-V2-Flash's and gpt-oss's sliding
    layers (``ModelConfig.mimo``); ()
    for every other model (no window pool)."""
    mimo = model_cfg.mimo
    if mimo is None:
        return ()
    return tuple(i for i in range(min(model_cfg.num_layers, len(mimo.layer_types)))
                 if mimo.sliding(i))


def window_dims(model_cfg: ModelConfig) -> int:
    """Values cached per token over the window pool's layers."""
    return sum(model_cfg.layer_kv_cache_dim(i) for i in window_layers(model_cfg))


def blocks_per_seq(window: int, block_size: int, step_tokens: int) -> int:
    """Window blocks one sequence holds at most while it runs a step of ``step_tokens``: its
    positions c - window + 1 .. c + step_tokens - 1, in at most this many blocks."""
    return -(-(window + step_tokens) // block_size) + 1


def window_pool_bound(window: int, block_size: int, max_num_seqs: int,
                      max_num_batched_tokens: int) -> int:
    """Window blocks that ``max_num_seqs`` running sequences hold at most in one step of
    ``max_num_batched_tokens`` tokens: each its window's blocks (ceil(window / block_size) + 2
    at most, the edge blocks partly used), and the step's tokens between them."""
    return (max_num_seqs * (-(-window // block_size) + 2)
            + -(-max_num_batched_tokens // block_size))


def split_kv_budget(budget: int, full_bytes: int, window_bytes: int, bound: int, least: int,
                    max_full: int) -> tuple[int, int]:
    """(main pool blocks, window pool blocks) in ``budget`` bytes: the window pool gets what
    the running sequences can hold at most (``bound``), or, with less memory, one block for
    each block of the main pool (a window block is only ever held beside a main one), never
    fewer than one sequence needs (``least``); the main pool the rest. ``full_bytes``: a
    block's bytes over the full layers (0 when every layer is sliding: the main pool then
    holds no rows and counts ``max_full`` blocks)."""
    if full_bytes == 0:
        return max_full, max(least, min(bound, budget // window_bytes))
    window = max(least, min(bound, budget // (full_bytes + window_bytes)))
    return max(0, budget - window * window_bytes) // full_bytes, window


class WindowPool:
    """The window pool's blocks (a ``BlockPool``) and the null block id. With prefix caching
    its full blocks are cached under the main pool's keys as theirs are, and a block given
    back stays cached until evicted; a prefix hit is cut to where this pool still holds the
    window its next query reads (``cached_window``)."""

    def __init__(self, num_blocks: int, block_size: int, window: int,
                 enable_caching: bool = False):
        self.pool = BlockPool(num_blocks, block_size, enable_caching)
        self.window = window
        # the cache tensors' last block: never handed out, never read by a real row (CUDA
        # graphs' padding rows use it: afd.cuda_graphs)
        self.null = num_blocks

    @property
    def num_free(self) -> int:
        return self.pool.num_free

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    def first_read(self, num_computed: int) -> int:
        """The first block a sequence's next query reads, ``num_computed`` tokens computed."""
        return max(0, num_computed - self.window + 1) // self.pool.block_size

    def cached_window(self, token_ids: Sequence[int], keys: BlockKeys, hit: int
                      ) -> tuple[int, int, list[int]]:
        """A main-pool prefix hit of ``hit`` full blocks cut to the longest one, h <= hit,
        whose window this pool holds cached (the blocks its first query reads, ``first_read``
        of h blocks' tokens, to h): (h, that first block, those blocks). Owns nothing."""
        size, h = self.pool.block_size, hit
        while h > 0:
            first, places = self.first_read(h * size), []
            # from the hit's end back: a block this pool lacks, m, rules out every h' > m too
            # (each reads m: first_read grows with h'), so the next try is h = m and no block
            # is looked up twice (O(hit) in all, not O(hit x window))
            for b in range(h - 1, first - 1, -1):
                place = proven_run(self.pool._by_key, self.pool._content, token_ids, keys, b,
                                   b + 1, size)
                if not place:
                    h = b
                    break
                places += place
            else:
                return h, first, places[::-1]
        return 0, 0, []

    def grow(self, table: list[int], num_blocks: int) -> None:
        """Extend a sequence's window ``table`` to ``num_blocks`` entries (caller checked that
        they are free)."""
        if num_blocks > len(table):
            table += self.pool.allocate(num_blocks - len(table))

    def slide(self, table: list[int], num_computed: int) -> None:
        """Give back the blocks of ``table`` wholly below what any later query of the sequence
        reads (position ``num_computed`` - window + 1 and on), pointing their entries at the
        null block."""
        end = min(len(table), self.first_read(num_computed))
        start = end  # the entries freed before are a prefix: walk back to it (most steps: none)
        while start and table[start - 1] != self.null:
            start -= 1
        if start < end:
            self.pool.free(table[start:end])
            table[start:end] = [self.null] * (end - start)

    def release(self, table: list[int]) -> None:
        """Give back every block a sequence's window ``table`` holds (finish, abort, preemption)."""
        self.pool.free([b for b in table if b != self.null])
        table.clear()

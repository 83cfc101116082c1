"""An attention rank's step counters (``CoreStats``) and prefix-cache totals: what crosses the
control plane to the front end, which imports this (not afd.core, whose model runner needs
torch: the HTTP front end runs no model)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated

from msgspec import Meta


@dataclass
class CoreStats:
    num_running: int
    num_waiting: int
    kv_usage: float  # fraction of KV blocks in use
    num_free_blocks: int
    num_preemptions: int  # total since start
    prefix_cache_queries: int = 0  # tokens looked up in the prefix cache, total since start
    prefix_cache_hits: int = 0  # of those, tokens found there
    prefix_cache_host_hits: int = 0  # of the hits, tokens copied back from the host tier
    num_waiting_blocks: int = 0  # KV blocks the waiting sequences need (Scheduler.waiting_blocks)
    # speculative decoding, total since start: draft tokens verified, and of those accepted;
    # verifications (a sequence's drafts of one step), and the accepted drafts by position
    # (entry i: verifications whose draft i was accepted; vLLM's per-position counts)
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    num_drafts: int = 0
    num_accepted_per_pos: list[int] = field(default_factory=list)
    # a window pool's blocks and of those the free ones (afd.window_pool: a sliding-window
    # model's; 0 and 0 without one); checked >= 0 where they cross the control plane
    num_free_window_blocks: Annotated[int, Meta(ge=0)] = 0
    num_window_blocks: Annotated[int, Meta(ge=0)] = 0
    # a hybrid model's free state slots (models.hybrid: of max_num_seqs; a P/D decode rank's
    # receives hold theirs), 0 for other models
    num_free_state_slots: Annotated[int, Meta(ge=0)] = 0

    @property
    def window_kv_usage(self) -> float | None:
        """Fraction of the window pool's blocks in use (as ``kv_usage``: cached free blocks
        count as free), clamped to 0-1; None without a window pool."""
        if not self.num_window_blocks:
            return None
        return min(1.0, max(0.0, 1.0 - self.num_free_window_blocks / self.num_window_blocks))


@dataclass
class PrefixCacheStats:
    """Prefix cache totals, in tokens, over every rank that admits prompts (vLLM's
    prefix_cache_queries / prefix_cache_hits): a sequence counts its tokens each time it is
    admitted (a preempted one again when it comes back), and the hits among them."""

    queries: int = 0
    hits: int = 0
    host_hits: int = 0  # of the hits, those found in a host tier (afd.kv_offload)

    @classmethod
    def total(cls, stats: list[CoreStats]) -> PrefixCacheStats:
        return cls(sum(s.prefix_cache_queries for s in stats),
                   sum(s.prefix_cache_hits for s in stats),
                   sum(s.prefix_cache_host_hits for s in stats))

"""The global scheduler's placement decisions: which prefill rank runs a prompt, which decode
attention rank receives it. Pure bookkeeping over what the ranks last reported (no I/O)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class RankLoad:
    in_flight: int = 0  # requests placed on this rank and not yet finished or handed on
    free_blocks: int = 0  # KV blocks free at its last report
    promised_blocks: int = 0  # blocks of transfers sent its way but not yet admitted
    running: int = 0  # sequences it is decoding, at its last report


class RequestRouter:
    def __init__(self, prefill_ranks: list[int], attention_ranks: list[int],
                 num_blocks: int, block_size: int):
        self.block_size = block_size
        self.prefill = {r: RankLoad() for r in prefill_ranks}
        self.attention = {r: RankLoad(free_blocks=num_blocks) for r in attention_ranks}

    def pick_prefill(self) -> int:
        """The prefill rank with the shortest queue."""
        return min(self.prefill, key=lambda r: (self.prefill[r].in_flight, r))

    def pick_attention(self) -> int:
        """P=0: the attention rank with the fewest requests in flight."""
        return min(self.attention, key=lambda r: (self.attention[r].in_flight, r))

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def pick_decode(self, num_kv_tokens: int) -> int:
        """The decode rank with the most KV blocks left once the transfers already promised to
        it land, then the lightest running load. It admits the transfer only when it has room."""
        def score(r: int) -> tuple:
            load = self.attention[r]
            return (-(load.free_blocks - load.promised_blocks), load.running, load.in_flight, r)

        rank = min(self.attention, key=score)
        self.attention[rank].promised_blocks += self.blocks_for(num_kv_tokens + 1)
        return rank

    def admitted(self, rank: int, num_kv_tokens: int) -> None:
        load = self.attention[rank]
        load.promised_blocks = max(0, load.promised_blocks - self.blocks_for(num_kv_tokens + 1))

    def report(self, rank: int, free_blocks: int, running: int) -> None:
        load = self.attention[rank]
        load.free_blocks, load.running = free_blocks, running

"""Per-forward inputs that the attention layers read: where each token sits in the paged KV cache.

Built by the engine for every step and passed explicitly down the layers (no global context).
Sequences are ordered decodes first: the first ``num_decodes`` sequences contribute exactly one
token each (the batched decode path); the rest are prefill chunks (a prompt piece, or a recompute).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kernels import PrefillLayout


@dataclass
class ForwardBatch:
    positions: torch.Tensor  # [T] int64, position of each token in its sequence
    slot_mapping: torch.Tensor  # [T] int64, flat cache slot (block * block_size + offset) per token
    block_tables: torch.Tensor  # [B, max_blocks] int32, each sequence's blocks (padding: 0)
    seq_lens: torch.Tensor  # [B] int64, tokens in the cache once this step's are written
    query_lens: list[int]  # [B] new tokens per sequence this step (python, for slicing)
    num_decodes: int  # the first num_decodes sequences have query_len 1
    context_lens: list[int] | None = None  # seq_lens on the host (no device sync in loops)
    cos: torch.Tensor | None = None  # [T, rope_dim/2] fp32, filled by the model once per forward
    sin: torch.Tensor | None = None
    # Built by prefill_layout() on the first layer's call, shared by the others.
    _prefill_layout: PrefillLayout | None = field(default=None, repr=False)

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens)

    def prefill_layout(self) -> PrefillLayout | None:
        """The prefill sequences (those past the decodes) packed for
        ``kernels.*_prefill_attention``: their query and context lengths, on the host and on the
        device. Built once per forward, from the host lists (no device read); None when every
        sequence is a decode."""
        if self.num_decodes == self.num_seqs:
            return None
        if self._prefill_layout is None:
            lens = self.context_lens if self.context_lens is not None else self.seq_lens.tolist()
            nd = self.num_decodes
            self._prefill_layout = PrefillLayout(self.query_lens[nd:], lens[nd:],
                                                 self.block_tables.device)
        return self._prefill_layout

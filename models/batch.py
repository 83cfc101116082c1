"""Per-forward inputs that the attention layers read: where each token sits in the paged KV cache.

Built by the engine for every step and passed explicitly down the layers (no global context).
The batch is a list of attention rows, decode rows first. A decode row is one token that
attends over its sequence's cache up to its own position (the batched decode path): a plain
decode is one row; a sequence verifying speculative drafts [last token, d1..dk] is k + 1 rows
with the same block table and seq_lens start + 1 .. start + k + 1, which is exactly causal since
a layer writes all of the step's KV before it attends. ``decode_groups`` says which consecutive
decode rows are one sequence's (``kernels.decode_groups``), so that decode attention reads a
verifying sequence's context once for its k + 1 rows, not once per row; it is None when every
decoding sequence is one row (plain decode) and on the CUDA-graph path (per row). Each row
after the first ``num_decodes`` is one prefill chunk (a prompt piece, or a recompute) of
several tokens. Tokens are laid out in row order, so the first ``num_decodes`` tokens are the
decode rows'.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kernels import DecodeGroups, PrefillLayout


@dataclass
class DsaSelections:
    """A full DSA layer's top-k this step, for the shared layers after it (GLM-5): the decode
    rows' positions (``kernels.dsa.dsa_decode_attention``'s indices, int32 [num_decodes, K],
    -1: none; device tensors, so a CUDA graph holds them) and the prefill chunks' pieces
    (``dsa_attention_torch``'s ``selections``)."""

    decode: torch.Tensor | None = None
    prefill: list = field(default_factory=list)


@dataclass
class ForwardBatch:
    positions: torch.Tensor  # [T] int64, position of each token in its sequence
    slot_mapping: torch.Tensor  # [T] int64, flat cache slot (block * block_size + offset) per token
    block_tables: torch.Tensor  # [B, max_blocks] int32, each row's sequence's blocks (padding: 0)
    seq_lens: torch.Tensor  # [B] int64, cache positions the row attends over (its own included)
    query_lens: list[int]  # [B] tokens per row this step (python, for slicing)
    num_decodes: int  # the first num_decodes rows have query_len 1
    context_lens: list[int] | None = None  # seq_lens on the host (no device sync in loops)
    # The decode rows per sequence (None: one row each): the decode attentions' groups.
    decode_groups: DecodeGroups | None = None
    cos: torch.Tensor | None = None  # [T, rope_dim/2] fp32, filled by the model once per forward
    sin: torch.Tensor | None = None
    # DeepSeek-V4 (models.deepseek_v4): the step's token ids (its hash-routed layers' router
    # reads them) and the cos / sin of each of its ropes by name, filled with cos / sin
    input_ids: torch.Tensor | None = None
    rope_tables: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None
    # Hybrid models (models.hybrid): per row, its sequence's state slot (the linear layers'
    # conv and recurrent states), None for every other model
    state_slots: list[int] | None = None
    # the same on the device ([B] int64, afd.model_runner's one host-to-device copy): what a
    # CUDA graph's batch carries instead of the host list (afd.cuda_graphs), its decode rows'
    # state slots read on the device only (models.hybrid.linear_rows); None: built from
    # ``state_slots`` where needed
    state_slot_ids: torch.Tensor | None = None
    # A window pool's (afd.window_pool: MiMo-V2-Flash's sliding layers): the rows' tables
    # over it ([B, max_blocks] int32, blocks out of every window: its null block) and the
    # tokens' slots in it ([T] int64); None where the sliding layers share the main pool
    window_block_tables: torch.Tensor | None = None
    window_slot_mapping: torch.Tensor | None = None
    # Built by prefill_layout() on the first layer's call, shared by the others.
    _prefill_layout: PrefillLayout | None = field(default=None, repr=False)
    # Decoder layer -> [T, K] int64 where that MoE layer's router writes its topk_ids (the CUDA
    # graphs' shared static outputs, afd.cuda_graphs); None, or a layer not in it: new tensors.
    topk_ids_out: dict[int, torch.Tensor] | None = None
    # DSA with shared layers (GLM-5): the last full layer's top-k selection this step, which
    # the shared layers after it attend over; None before any
    dsa_selections: DsaSelections | None = field(default=None, repr=False)
    # models.hybrid.LinearRows, built on the first linear layer's call, shared by the others
    _linear_rows: object = field(default=None, repr=False)

    @property
    def num_seqs(self) -> int:
        """Attention rows (B): a verifying sequence counts once per verified token."""
        return len(self.query_lens)

    def prefill_layout(self) -> PrefillLayout | None:
        """The prefill chunks (the rows past the decodes) packed for
        ``kernels.*_prefill_attention``: their query and context lengths, on the host and on the
        device. Built once per forward, from the host lists (no device read); None when every
        row is a decode row."""
        if self.num_decodes == self.num_seqs:
            return None
        if self._prefill_layout is None:
            lens = self.context_lens if self.context_lens is not None else self.seq_lens.tolist()
            nd = self.num_decodes
            self._prefill_layout = PrefillLayout(self.query_lens[nd:], lens[nd:],
                                                 self.block_tables.device)
        return self._prefill_layout

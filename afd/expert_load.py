"""Expert load recording: how many tokens the router sent to each logical expert, per layer.

What EPLB placements are computed from (afd.eplb; SGLang's expert distribution recorder, vLLM's
``--enable-eplb`` load window). Counted where routing happens, an attention rank or the single
process, after top-k (one count per (token, chosen expert); -1 ids, no expert, are not counted),
into one [layers, experts] int64 tensor on the routing device: no host sync per step, one when
the record is read. Start zeroes it and turns counting on, stop turns it off (the counts stay),
a dump reads them. Only the front end sums the attention ranks' records (afd.layouts).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch imported where used: the HTTP front end imports this module
    import torch



class NoExpertLoadRecord(ValueError):
    """A dump asked for with no record started (or for a model without routed experts)."""


class ExpertLoadRecorder:
    """Per-layer token counts of one routing process."""

    def __init__(self, num_layers: int, num_experts: int, device: torch.device):
        import torch

        self.num_layers, self.num_experts = num_layers, num_experts
        # one spare column takes the -1 ids, so masking them needs no host sync
        self.counts = torch.zeros(num_layers, num_experts + 1, dtype=torch.long, device=device)
        self.recording = False
        self.started = False

    def start(self) -> None:
        self.counts.zero_()
        self.recording = self.started = True

    def stop(self) -> None:
        self.recording = False

    def add(self, layer: int, topk_ids: torch.Tensor) -> None:
        """topk_ids [T, K] logical ids of decoder layer ``layer`` (-1: no expert). Layers past
        the decoder layers (DeepSeek's MTP layer) are not recorded: placements from a record
        cover the decoder layers (afd.placement.ExpertPlacement.table)."""
        import torch

        if layer >= self.num_layers:
            return
        ids = topk_ids.flatten().long()
        ids = torch.where(ids >= 0, ids, self.num_experts)
        self.counts[layer].index_add_(0, ids, torch.ones_like(ids))

    def snapshot(self) -> list[list[int]] | None:
        """[layers][experts] counts so far; None if no record was ever started."""
        return self.counts[:, :self.num_experts].tolist() if self.started else None


def record_dict(num_layers: int, num_experts: int, counts: list[list[int]]) -> dict:
    """The dump's JSON form (what ``--expert-placement`` reads back, afd.eplb)."""
    return {"num_layers": num_layers, "num_experts": num_experts, "counts": counts}


def sum_records(records: list[list[list[int]] | None], num_layers: int, num_experts: int
                ) -> dict:
    """Sum the attention ranks' snapshots (None: a rank never started) into one record;
    NoExpertLoadRecord if none was started."""
    started = [r for r in records if r is not None]
    if not started:
        raise NoExpertLoadRecord("no expert load record: start one first "
                                 "(start_expert_load_record(), or POST "
                                 "/start_expert_distribution_record)")
    counts = [[sum(r[layer][e] for r in started) for e in range(num_experts)]
              for layer in range(num_layers)]
    return record_dict(num_layers, num_experts, counts)

"""Ping-pong: overlap one micro-batch's trip through the FFN ranks with the next one's attention.

Each micro-batch's forward is a generator (``MoEModel.forward_stages``) that stops at every MoE
layer to dispatch its routed tokens and again to collect them. The driver dispatches every
micro-batch's layer-0 tokens, then repeatedly collects the oldest micro-batch in flight and runs
its attention up to its next dispatch, while the other micro-batches are on the FFN ranks:

    attn(0) D(0) attn(1) D(1) | C(0) attn(0) D(0) | C(1) attn(1) D(1) | C(0) ...

FFN ranks serve in the same order: for each MoE layer, micro-batch 0, 1, ...
"""

from __future__ import annotations

from collections import deque
from collections.abc import Generator

import torch

from models.batch import ForwardBatch
from models.model import ExpertPath, ForwardOut, MoEModel, StageDriver


def run_micro_batches(model: MoEModel, inputs: list[tuple[torch.Tensor, ForwardBatch,
                                                          torch.Tensor]],
                      kv_caches: list[torch.Tensor], experts: ExpertPath,
                      keep_hidden: bool = False) -> list[torch.Tensor | ForwardOut]:
    """inputs: (input_ids, batch, logits_index) per micro-batch. Returns logits per micro-batch
    (``keep_hidden``: a ForwardOut each, logits and hidden states, for the MTP layer)."""
    return drive_micro_batches(
        [model.forward_stages(ids, batch, kv_caches, index, keep_hidden)
         for ids, batch, index in inputs], experts)


def drive_micro_batches(stages: list[Generator], experts: ExpertPath) -> list:
    """Ping-pong over one forward generator per micro-batch (the target's layers, or the MTP
    layer's); returns what each generator returns."""
    drivers = [StageDriver(g, experts, i) for i, g in enumerate(stages)]
    in_flight = deque()
    for driver in drivers:  # every micro-batch up to its first dispatch
        wait = driver.advance()
        if wait is not None:
            in_flight.append((driver, wait))
    while in_flight:
        driver, wait = in_flight.popleft()  # the oldest trip comes back first
        nxt = driver.advance(experts.combine(wait.handle))
        if nxt is not None:
            in_flight.append((driver, nxt))
    return [d.result for d in drivers]


def split_evenly(sizes: list[int], parts: int) -> list[tuple[int, int]]:
    """Contiguous [start, end) ranges over ``sizes`` with about equal sums; exactly ``parts``
    ranges (trailing ones empty when there are fewer items than parts)."""
    total = sum(sizes)
    bounds, acc, start = [], 0, 0
    for i, size in enumerate(sizes):
        acc += size
        remaining_parts = parts - len(bounds) - 1
        remaining_items = len(sizes) - i - 1
        if remaining_parts and (acc * parts >= total * (len(bounds) + 1)
                                or remaining_items < remaining_parts):
            bounds.append((start, i + 1))
            start = i + 1
    bounds.append((start, len(sizes)))
    while len(bounds) < parts:
        bounds.append((len(sizes), len(sizes)))
    return bounds

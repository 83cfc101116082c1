"""CUDA graphs of an FFN rank's expert compute (``EngineConfig.ffn_cuda_graphs``, opt-in).

Per MoE layer and micro-batch an FFN rank (afd.transport.TorchExpertServer.serve) receives rows
grouped by source then slot, regroups them by slot, runs ``kernels.grouped_moe`` and sends them
back. At decode sizes the host time of that compute (Triton's Python launcher, two GEMM launches
plus the regrouping) exceeds its GPU time. Here the compute, not the communication, is captured
once per (MoE layer's experts, row bucket) and replayed:

  * static buffers: ``counts`` [sources, slots] (the received counts land there), ``x``
    [max_rows, H] (the received rows land in its first N rows) and ``out`` [max_rows, H];
  * a serve of N rows replays the graph of the smallest bucket B >= N. The B - N padding rows are
    a virtual extra source holding B - N rows of a virtual extra slot: in slot-major order they
    come last, and ``grouped_moe`` is given only the real slots' counts (its ROWS route processes
    sum(counts) rows), so padding rows, whatever they hold (an earlier, larger serve's rows), are
    never computed into a real row. Their outputs are never sent (only ``out[:N]``);
  * the graph reads ``counts`` on the device only (``slot_order``: cumsum + searchsorted, no
    data-dependent shape), so nothing in the captured region reads on the host;
  * the answer is copied out of ``out`` (``run`` returns a fresh tensor): the send is async, and
    a later serve's replay (the next micro-batch, the next layer) rewrites ``out`` on the compute
    stream without waiting for that send. The copy costs N x H elements on the device; one
    output buffer per in-flight serve would avoid it at the cost of memory per graph.

Which serves replay: 0 < N <= ``max_rows``; others (prefill chunks, N = 0) run eagerly as before.
Buckets (``default_buckets``): powers of two up to the cap, and the cap itself. The cap is the
decode-sized worst case, attention ranks x max_num_seqs x (1 + num_speculative_tokens) x top_k
(every row of every attention rank's step on this rank), at most ``MAX_ROWS``.

Memory: the static buffers (2 x max_rows x H in the activation dtype) and the graphs' one shared
pool (the largest bucket's intermediates; the graphs replay one at a time) come out of the FFN
rank's memory, which holds no KV cache: nothing is taken from a KV pool.

Capture (``capture_pending``) runs between steps, where no send is in flight: the FFN rank
(afd.rank_ffn) captures a few graphs per vote, so its start does not hold the attention ranks'
first vote past the layout's timeout; a layer serves eagerly until all its buckets are captured.
A capture that raises leaves that layer eager, with a warning.

Live rebalancing (afd.rebalance.move_experts) copies expert weights in place, so the graphs stay
valid; each graph still records the expert tensors it baked in, and a layer whose tensors were
rebound (another storage) has its graphs dropped, is served eagerly and is captured again between
later steps. FP8 experts (``experts.kernel_args``) are captured like bf16 ones: their scales are
expert tensors too.

Without CUDA (tests) the same static-buffer path runs eagerly (``capture=False``): each "graph"
keeps the expert tensors it would have baked in, the torch reference runs on the real rows and the
padding rows' outputs are NaN, so CPU tests check what capture relies on.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

import kernels
from kernels.backend import resolve_backend

log = logging.getLogger("afd.ffn_graphs")

MAX_ROWS = 4096  # the largest bucket at most: 2 x 4096 x 7168 bf16 = 112 MiB of static buffers


def capture_budget_s(timeout_s: float) -> float:
    """Seconds of capture an FFN rank begins per vote (``ExpertGraphs.capture_pending``): the
    attention ranks wait in their next vote, and the front end hears from no rank, meanwhile;
    both give up after the layout's ``timeout_s``."""
    return timeout_s / 8


def max_serve_rows(attention: int, max_num_seqs: int, num_speculative_tokens: int,
                   top_k: int) -> int:
    """Rows one serve can hold in a decode step: every decode row of every attention rank with
    all its top_k experts on this FFN rank."""
    return attention * max_num_seqs * (1 + num_speculative_tokens) * top_k


def default_buckets(max_rows: int) -> tuple[int, ...]:
    """1, 2, 4, ... up to min(max_rows, MAX_ROWS), and that cap itself."""
    if not isinstance(max_rows, int) or max_rows < 1:
        raise ValueError(f"max_rows must be a positive integer, got {max_rows!r}")
    cap = min(max_rows, MAX_ROWS)
    sizes = {cap}
    b = 1
    while b < cap:
        sizes.add(b)
        b *= 2
    return tuple(sorted(sizes))


def slot_order(counts: torch.Tensor, total: int) -> torch.Tensor:
    """counts [sources, slots] of ``total`` rows laid out source-major -> the source-major row of
    each slot-major position [total], computed on the device only: ``total`` is given, never
    read from ``counts`` (the captured graphs' order and the eager serves')."""
    flat = counts.flatten()
    src_start = torch.cumsum(flat, 0) - flat  # where each (source, slot) block begins
    blocks = torch.arange(counts.numel(), device=counts.device).view(counts.shape).t().flatten()
    lens = flat[blocks]  # slot-major
    ends = torch.cumsum(lens, 0)
    pos = torch.arange(total, device=counts.device)
    j = torch.searchsorted(ends, pos, right=True)  # the slot-major block of each position
    return src_start[blocks[j]] + pos - (ends[j] - lens[j])


def _weights(experts) -> tuple:
    return (experts.w13, experts.w2, experts.kernel_args)


def _signature(weights: tuple) -> tuple:
    w13, w2, fp8 = weights
    tensors = [w13, w2, *(v for v in fp8.values() if isinstance(v, torch.Tensor))]
    return tuple((t.data_ptr(), tuple(t.shape), t.dtype) for t in tensors)


@dataclass
class _Graph:
    bucket: int
    weights: tuple  # the expert tensors this graph reads (baked into a captured graph)
    n_slots: int
    graph: torch.cuda.CUDAGraph | None  # None: run eagerly (no CUDA)

    def __post_init__(self) -> None:
        # what ``ensure`` compares each serve with, taken once (the weights are kept alive
        # above, so their storage cannot be reused under the same address)
        self.signature = _signature(self.weights)


class ExpertGraphs:
    """Static buffers and one graph per (experts, bucket); ``run`` is one serve's compute."""

    def __init__(self, sources: int, slots: int, hidden: int, dtype: torch.dtype,
                 device: torch.device, buckets: tuple[int, ...], *, capture: bool):
        if not buckets or any(not isinstance(b, int) or b < 1 for b in buckets):
            raise ValueError(f"buckets must be positive integers, got {buckets!r}")
        self.sources, self.slots = sources, slots
        self.buckets = tuple(sorted(set(buckets)))
        self.max_rows = self.buckets[-1]
        self.capture = capture
        with torch.inference_mode():
            self.counts = torch.zeros(sources, slots, dtype=torch.long, device=device)
            self.x = torch.zeros(self.max_rows, hidden, dtype=dtype, device=device)
            self.out = torch.zeros(self.max_rows, hidden, dtype=dtype, device=device)
        self.graphs: dict[int, dict[int, _Graph]] = {}  # id(experts) -> bucket -> graph
        self.pending: list = []  # experts to capture at the next drain (new or dropped)
        self.failed: set[int] = set()  # experts whose capture failed: eager from then on
        self._partial: dict[int, dict[int, _Graph]] = {}  # the first pending layer's so far
        self.pool = torch.cuda.graph_pool_handle() if capture else None
        self.replays = 0  # serves that ran a graph (or its eager emulation)

    def fits(self, num_rows: int) -> bool:
        return 0 < num_rows <= self.max_rows

    def bucket(self, num_rows: int) -> int:
        return next(b for b in self.buckets if b >= num_rows)

    def _forward(self, bucket: int, weights: tuple, n_slots: int) -> None:
        """What a graph holds: x[:bucket] (the first N real) regrouped by slot, the experts,
        scattered back into out[:bucket]. Reads ``counts`` on the device only."""
        s, size = self.slots, self.sources
        full = torch.zeros(size + 1, s + 1, dtype=torch.long, device=self.counts.device)
        full[:size, :s] = self.counts
        full[size, s] = bucket - self.counts.sum()  # the padding: a source and slot of its own
        by_slot = slot_order(full, bucket)
        xs = self.x[:bucket].index_select(0, by_slot)
        slot_counts = full.sum(dim=0)[:n_slots]  # the real slots only: padding is never computed
        w13, w2, fp8 = weights
        if resolve_backend(None, xs, w13, w2) == "triton":
            y = kernels.grouped_moe(xs, slot_counts, w13, w2, **fp8)  # rows past sum: unwritten
        else:  # the torch reference reads counts on the host: never captured (CPU emulation)
            real = int(slot_counts.sum())
            y = torch.full_like(xs, float("nan"))  # what padding rows hold: never sent
            y[:real] = kernels.grouped_moe(xs[:real], slot_counts, w13, w2, **fp8)
        self.out[:bucket].index_copy_(0, by_slot, y)

    def ensure(self, experts) -> bool:
        """This layer's graphs exist and read its current expert tensors; False (graphs dropped,
        captured again by ``capture_pending``) when its tensors were rebound."""
        key = id(experts)
        graphs = self.graphs.get(key)
        if graphs is None:  # never added, dropped, or its capture failed: eager
            if key not in self.failed and not any(e is experts for e in self.pending):
                self.pending.append(experts)
            return False
        first = next(iter(graphs.values()))
        if (first.signature == _signature(_weights(experts))
                and first.n_slots == len(experts.expert_ids)):
            return True
        log.warning("an MoE layer's expert tensors changed storage: its CUDA graphs are dropped "
                    "and captured again between steps (eager until then)")
        del self.graphs[key]
        self.pending.append(experts)
        return False

    @torch.inference_mode()
    def _capture(self, bucket: int, weights: tuple, n_slots: int) -> _Graph:
        """One graph (without CUDA: its record). Two eager runs before the capture compile the
        Triton kernels and settle their fallbacks, on padding rows alone (``counts`` zeroed,
        then restored): nothing is compiled or retried while capturing."""
        if not self.capture:
            return _Graph(bucket, weights, n_slots, None)
        if resolve_backend(None, self.x, weights[0], weights[1]) != "triton":
            raise RuntimeError("the torch kernel backend (AFD_KERNEL_BACKEND=torch) reads the "
                               "expert counts on the host, which a capture cannot hold")
        saved = self.counts.clone()
        stream = torch.cuda.current_stream()
        try:
            self.counts.zero_()
            for _ in range(2):
                self._forward(bucket, weights, n_slots)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            # thread_local: the process group's watchdog thread may query its events meanwhile
            with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
                self._forward(bucket, weights, n_slots)
        finally:
            # a capture that fails at its end (capture_end raising: an invalidated capture)
            # leaves torch.cuda.graph's capture stream current; the serves go on on this one
            torch.cuda.set_stream(stream)
            self.counts.copy_(saved)
        torch.cuda.synchronize()
        return _Graph(bucket, weights, n_slots, graph)

    def add(self, experts) -> None:
        """Capture every bucket's graph of ``experts`` now, largest first (one pool for all: a
        smaller graph's intermediates fit in what a larger one's left free)."""
        self.failed.discard(id(experts))  # an earlier failure is not this capture's
        self.pending = [e for e in self.pending if e is not experts]
        self.pending.insert(0, experts)
        while self.pending and self.pending[0] is experts:
            self.capture_pending(1)
        if id(experts) in self.failed:
            raise RuntimeError("capture failed (see the warning above)")

    def capture_pending(self, max_graphs: int | None = None,
                        budget_s: float | None = None) -> int:
        """Capture up to ``max_graphs`` graphs (None: all) of the pending layers, largest bucket
        first; a layer replays once all its buckets are captured (until then it is served
        eagerly). ``budget_s``: no graph is begun once that many seconds have passed (the first
        always is), so a batch of slow captures (Triton's first compiles) cannot keep the
        attention ranks waiting in their vote past the layout's timeout. Call where no send is
        in flight. Returns the graphs captured."""
        done, start = 0, time.monotonic()
        while self.pending and (max_graphs is None or done < max_graphs):
            if budget_s is not None and done and time.monotonic() - start >= budget_s:
                break
            experts = self.pending[0]
            key, weights = id(experts), _weights(experts)
            partial = self._partial.setdefault(key, {})
            if partial and next(iter(partial.values())).signature != _signature(weights):
                partial.clear()  # rebound between two of its captures: start again
            bucket = next(b for b in reversed(self.buckets) if b not in partial)
            try:
                partial[bucket] = self._capture(bucket, weights, len(experts.expert_ids))
            except Exception as exc:  # noqa: BLE001 - a capture that fails leaves eager serves
                log.warning("CUDA graph capture of an MoE layer's experts failed, it is served "
                            "eagerly: %s: %s", type(exc).__name__, exc)
                self.failed.add(key)
                del self._partial[key]
                self.pending.pop(0)
                continue
            done += 1
            if len(partial) == len(self.buckets):
                self.graphs[key] = self._partial.pop(key)
                self.pending.pop(0)
        return done

    @torch.inference_mode()
    def run(self, experts, num_rows: int) -> torch.Tensor:
        """``counts`` and ``x[:num_rows]`` hold a serve's input: its answer [num_rows, H], rows
        in the received order, a tensor of its own (the send may outlive the next replay)."""
        entry = self.graphs[id(experts)][self.bucket(num_rows)]
        if entry.graph is None:
            self._forward(entry.bucket, entry.weights, entry.n_slots)
        else:
            entry.graph.replay()
        self.replays += 1
        return self.out[:num_rows].clone()

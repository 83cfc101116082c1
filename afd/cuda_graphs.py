"""CUDA graphs for decode steps: one captured forward per padded batch size, in decode rows.

A decode step of B rows (one token each) launches a few hundred kernels from Python; with few
rows the GPU waits on the host. Here each size in ``sizes`` is captured once at start, as vLLM
and SGLang do, and a step of B rows replays the graph of the smallest size >= B. A row is a
plain decode's token or one of the k + 1 tokens of a sequence verifying speculative drafts
(``models.batch``: each row has its own block table row and seq_len, so verify rows need
nothing of their own here; the graphs run the per-row decode kernels, a verifying sequence's
context read once per row, as the captured batch has no ``decode_groups``):

  * the step's inputs are copied into fixed buffers (the graph reads them from there);
  * rows B..size-1 are dummy sequences: token 0 at position 0, one cached token, their KV written
    to and read from a scratch block (the KV pool's last block, which the allocator never hands
    out), so padding never touches a real sequence's cache;
  * block tables are as wide as ``max_model_len`` allows, so every step fits the captured shapes;
  * what a step hands out after its replay, its fp32 logits and its MoE layers' routing ids,
    lands in one set of static output buffers sized for the largest size, each graph writing
    rows [:size] of them (the LM head and the routers' top-k write there, no copy added), so
    the graphs' pool holds no per-size outputs: what any graph allocates in it is free again
    once its capture ends, and the next, smaller capture reuses it.

MTP drafts (``mtp_tokens`` = k > 0): the target forward keeps every row's hidden state (after
the final norm) in a static output, and a second graph per size holds the MTP layer's passes
that draft for the next step (``afd.model_runner``: its first pass over the step's rows, then
k - 1 chained rounds, one row per sequence). Between the two replays the host samples and
fills the MTP inputs (``set_mtp_inputs``): each row's next token, the rows that draft, and the
chained rounds' entries (order, position, slot, length and block table per round; an entry past
its rounds, and every padding entry, writes the scratch block). Its drafts [k, size] are read
once after the replay, as the eager path reads its own. Both graphs' kept outputs are shared by
every size too: the hidden states land in rows [:size] of one static [largest, H] buffer (one
[size, H] copy a replay: the final norm allocates its output) and the drafts in columns [:size]
of one int64 [k, largest] buffer (each pass's argmax writes there, no copy added), so the MTP
graphs keep nothing per size in the pool either.

Which steps replay (``fits``): decode rows only (no prefill chunk), no more than the largest
size, one micro-batch, and experts in this process (an all_to_all to FFN ranks sizes its
messages on the host). Models: MLA and GQA attention, whose decode kernels read the sequence
lengths on the device and size their grids by shapes only; DeepSeek-V4's, whose decode
rows take a static path in a graph's batch (every entry the tables' width holds, every row's
window pooled, its entry written only where the row closes it); and MiMo-V2-Flash's / gpt-oss's
("mimo": full and sliding-window GQA with sinks), whose decode rows run the window decode
kernels (``kernels.gqa_decode_triton.window_decode_attention_triton``: lengths on the device,
splits from the window and the tables' width), their sliding layers' rope computed in the
forward from the static positions. With a window pool (afd.window_pool) the sliding layers
read and write through its own tables: those are static buffers too (``window_block_tables``,
``window_slot_mapping``), their padding rows on the window pool's null block, which no real
sequence's query reads (its entries there are out of every window) and which the pool never
hands out, so padding never writes a real sequence's window blocks either. Hybrid
linear-attention models (Qwen3-Next, Qwen3.5-MoE: models.hybrid, "gqa" attention beside Gated
DeltaNet layers) too: their full layers run the GQA decode kernel, and their linear layers'
decode rows the Gated DeltaNet decode kernels (``kernels.gated_delta_triton``), which read
each row's state slot from a static buffer (``state_slot_ids``: a graph's batch carries the
slots on the device, not the host list) and start a row's states from zero where its position
is 0, both on the device. Padding rows (position 0: fresh, so they read no state) write the
scratch state slot (``scratch_state_slot``: one slot past the sequences' and the state
snapshots', which neither the scheduler nor the snapshot pool hands out).

Without CUDA (tests) the same static-buffer path runs eagerly (``capture=False``): the padding
and scratch-block logic is then checked against plain eager steps on CPU.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from models.batch import ForwardBatch
from models.model import Dispatch, ExpertPath, LocalExperts, MoEModel, run_stages

log = logging.getLogger("afd.cuda_graphs")

MAX_DEFAULT_SIZE = 256
# Attention kinds whose decode forward reads no tensor data on the host (tests/test_cuda_graphs.py
# audits each): kernels.mla_decode_attention and kernels.gqa_decode_attention; DeepSeek-V4's
# static decode path (models.deepseek_v4 V4Attention._decode_rows, a batch without host lengths);
# MiMo-V2-Flash's / gpt-oss's window decode (models.mimo_v2_flash, kernels.window_attention's
# window_decode_attention). A hybrid model's ("gqa" beside its Gated DeltaNet layers,
# models.hybrid) linear layers read their rows' state slots from a static buffer (DecodeGraphs).
CAPTURED_ATTENTION = ("mla", "gqa", "v4", "mimo")


def default_sizes(max_rows: int) -> tuple[int, ...]:
    """1, 2, 4, then every multiple of 8 up to min(max_rows, 256), and that cap itself.
    ``max_rows``: decode rows a step can have, max_num_seqs x (1 + num_speculative_tokens)."""
    cap = min(max_rows, MAX_DEFAULT_SIZE)
    sizes = {s for s in (1, 2, 4, *range(8, cap + 1, 8)) if s <= cap}
    return tuple(sorted(sizes | {cap}))


def unsupported_reason(model: MoEModel) -> str | None:
    """Why this model's decode forward cannot be captured, or None."""
    if model.cfg.attention not in CAPTURED_ATTENTION:
        return (f"{model.cfg.attention} attention has no decode path known to read nothing on "
                f"the host; decode steps are captured for {', '.join(CAPTURED_ATTENTION)}")
    return None


class RoutedTap(ExpertPath):
    """An ExpertPath that shows every dispatch's (layer, topk_ids [T, K]) to ``on_route``, then
    hands it on: how a step's routing reaches a recorder with no change to the model. (Here,
    beside its users, not in afd.expert_load: the front end imports that, and ExpertPath's
    module, models.model, imports torch.)"""

    def __init__(self, inner: ExpertPath, on_route: Callable[[int, torch.Tensor], None]):
        self.inner, self.on_route = inner, on_route

    def dispatch(self, req: Dispatch, micro_batch: int = 0) -> object:
        self.on_route(req.layer, req.routing.topk_ids)
        return self.inner.dispatch(req, micro_batch)

    def combine(self, handle: object) -> torch.Tensor:
        return self.inner.combine(handle)


@dataclass
class _Graph:
    """One captured size: its batch views over the static buffers and its outputs, views
    [:size] of the shared static outputs (every size's the same storage)."""

    size: int
    batch: ForwardBatch
    graph: torch.cuda.CUDAGraph | None  # None: run eagerly (no CUDA)
    logits: torch.Tensor  # [size, V] fp32, DecodeGraphs.logits_out[:size], written by each run
    # (decoder layer, topk_ids [size, K]) per MoE layer, views of DecodeGraphs.topk_ids_out,
    # rewritten by each run: the routing an expert load record reads
    routed: list[tuple[int, torch.Tensor]]
    # with MTP drafts: the target's hidden state [size, H] (the MTP graph's input,
    # DecodeGraphs.hidden_out[:size]), the MTP graph (None: eager, as ``graph``) and its drafts
    # [k, size] int64 (DecodeGraphs.drafts_out[:, :size]), rewritten by its replay
    hidden: torch.Tensor | None = None
    mtp_graph: torch.cuda.CUDAGraph | None = None
    drafts: torch.Tensor | None = None


def _views(part: torch.Tensor, whole: torch.Tensor) -> bool:
    """Is ``part`` a view of ``whole``'s storage?"""
    return part.untyped_storage().data_ptr() == whole.untyped_storage().data_ptr()


class DecodeGraphs:
    """Static buffers, the scratch block and one graph per size; ``run`` is one decode step."""

    def __init__(self, model: MoEModel, kv_caches: list[torch.Tensor], *, scratch_block: int,
                 block_size: int, max_model_len: int, sizes: tuple[int, ...], capture: bool,
                 mtp_tokens: int = 0, window_null_block: int | None = None,
                 scratch_state_slot: int | None = None):
        """``mtp_tokens``: k, the MTP drafts a step makes (0: no MTP layer; see the module
        doc); the model's MTP layer writes its KV to the last of ``kv_caches``.
        ``window_null_block``: with a window pool (afd.window_pool), its null block
        (``WindowPool.null``), the padding rows' block there; None: no window pool (every
        step's batch then has no window tables, and with one every step's has them).
        ``scratch_state_slot``: a hybrid model's (models.hybrid), the linear layers' state slot
        its padding rows write (one no sequence or snapshot holds); required there, refused
        for other models."""
        if mtp_tokens and getattr(model, "mtp", None) is None:
            raise ValueError(f"mtp_tokens={mtp_tokens} needs a model with its MTP layer")
        if not sizes or any(not isinstance(s, int) or s < 1 for s in sizes):
            raise ValueError(f"cuda_graph_sizes must be positive integers, got {sizes!r}")
        hybrid = getattr(model.cfg, "linear_attn", None) is not None
        if hybrid != (scratch_state_slot is not None):
            raise ValueError(f"scratch_state_slot ({scratch_state_slot}) must be given exactly "
                             "for a hybrid linear-attention model (models.hybrid), whose "
                             "padding rows write it")
        self.model, self.kv_caches = model, kv_caches
        self.sizes = tuple(sorted(set(sizes)))
        self.max_size = self.sizes[-1]
        self.scratch_block = scratch_block
        self.scratch_slot = scratch_block * block_size  # its first slot: every padding row's
        self.width = -(-max_model_len // block_size)  # block-table columns
        # (a hybrid model's first layer may be a linear one: its LinearStates is no tensor)
        device = next(c for c in kv_caches if isinstance(c, torch.Tensor)).device
        n = self.max_size
        with torch.inference_mode():
            self.input_ids = torch.zeros(n, dtype=torch.long, device=device)
            self.positions = torch.zeros(n, dtype=torch.long, device=device)
            self.slot_mapping = torch.full((n,), self.scratch_slot, dtype=torch.long,
                                           device=device)
            self.block_tables = torch.full((n, self.width), scratch_block, dtype=torch.int32,
                                           device=device)
            self.seq_lens = torch.ones(n, dtype=torch.long, device=device)
            self.logits_index = torch.arange(n, dtype=torch.long, device=device)
            self.window_null_block = window_null_block
            self.window_block_tables = self.window_slot_mapping = None
            if window_null_block is not None:  # the window pool's, as the main pool's above
                self.window_null_slot = window_null_block * block_size
                self.window_block_tables = torch.full((n, self.width), window_null_block,
                                                      dtype=torch.int32, device=device)
                self.window_slot_mapping = torch.full((n,), self.window_null_slot,
                                                      dtype=torch.long, device=device)
            self.scratch_state_slot = scratch_state_slot
            self.state_slot_ids = None
            if hybrid:  # each row's state slot (models.hybrid.linear_rows reads it on the device)
                self.state_slot_ids = torch.full((n,), scratch_state_slot, dtype=torch.long,
                                                 device=device)
            # The static outputs every size shares (rows [:size]): outside the graphs' pool, so
            # a size's outputs are never memory another capture may reuse; each step's are
            # read (the runner copies its logits rows out) before the next step's run.
            cfg = model.cfg
            self.moe_layers = [i for i in range(cfg.num_layers) if cfg.is_moe_layer(i)]
            self.logits_out = torch.zeros(n, cfg.vocab_size, dtype=torch.float32, device=device)
            self.topk_ids_out = torch.zeros(len(self.moe_layers), n, cfg.top_k,
                                            dtype=torch.long, device=device)
        self.mtp_tokens = mtp_tokens
        if mtp_tokens:
            self._mtp_buffers(n, mtp_tokens, device)
            # the MTP graphs' static outputs every size shares, as logits_out: the target's
            # hidden states (rows [:size]) and the drafts (columns [:size])
            self.hidden_out = torch.zeros(n, model.cfg.hidden_size,
                                          dtype=model.lm_head.weight.dtype, device=device)
            self.drafts_out = torch.zeros(mtp_tokens, n, dtype=torch.long, device=device)
        self.graphs: dict[int, _Graph] = {}
        self.routed: list[tuple[int, torch.Tensor]] = []  # the last _forward's (see _Graph)
        self.hidden: torch.Tensor | None = None  # the last _forward's, with MTP drafts
        self.last: tuple[_Graph, int] | None = None  # the last run's graph and real rows
        self.pool = None
        if capture:
            self._capture_all()
        else:
            self.graphs = {s: _Graph(s, self._batch(s), None, self.logits_out[:s], [])
                           for s in self.sizes}

    @torch.inference_mode()
    def _mtp_buffers(self, n: int, k: int, device: torch.device) -> None:
        """The MTP graph's inputs, at their padding values: per row its next token; per
        drafting sequence the row whose MTP output drafts (``draft_rows``); per chained entry
        its sequence (``chain_order``: index among the drafting rows), block table and, per
        round r = 1 .. k - 1 (row r - 1), its position, slot and length."""
        rounds = k - 1
        self.next_ids = torch.zeros(n, dtype=torch.long, device=device)
        self.draft_rows = torch.zeros(n, dtype=torch.long, device=device)
        self.chain_order = torch.zeros(n, dtype=torch.long, device=device)
        self.chain_positions = torch.zeros(rounds, n, dtype=torch.long, device=device)
        self.chain_slots = torch.full((rounds, n), self.scratch_slot, dtype=torch.long,
                                      device=device)
        self.chain_seq_lens = torch.ones(rounds, n, dtype=torch.long, device=device)
        self.chain_tables = torch.full((n, self.width), self.scratch_block, dtype=torch.int32,
                                       device=device)

    def _batch(self, size: int) -> ForwardBatch:
        # context_lens stays None: decode attention reads the lengths on the device only.
        out = {layer: self.topk_ids_out[i, :size] for i, layer in enumerate(self.moe_layers)}
        batch = ForwardBatch(positions=self.positions[:size],
                             slot_mapping=self.slot_mapping[:size],
                             block_tables=self.block_tables[:size], seq_lens=self.seq_lens[:size],
                             query_lens=[1] * size, num_decodes=size, topk_ids_out=out)
        if self.window_block_tables is not None:
            batch.window_block_tables = self.window_block_tables[:size]
            batch.window_slot_mapping = self.window_slot_mapping[:size]
        if self.state_slot_ids is not None:
            batch.state_slot_ids = self.state_slot_ids[:size]
        return batch

    def _forward(self, size: int, batch: ForwardBatch) -> torch.Tensor:
        """The forward a graph holds; its MoE layers' routing lands in ``self.routed`` (and,
        with MTP drafts, every row's hidden state after the final norm in ``self.hidden``). Its
        logits and routing ids are written into the shared static outputs' rows [:size]."""
        routed = self.routed = []
        experts = RoutedTap(LocalExperts(self.model), lambda *r: routed.append(r))
        if not self.mtp_tokens:
            return self.model.forward(self.input_ids[:size], batch, self.kv_caches,
                                      self.logits_index[:size], experts,
                                      logits_out=self.logits_out[:size])
        out = run_stages(self.model.forward_stages(self.input_ids[:size], batch, self.kv_caches,
                                                   self.logits_index[:size], keep_hidden=True,
                                                   logits_out=self.logits_out[:size]),
                         experts)
        self.hidden = self.hidden_out[:size].copy_(out.hidden)  # the shared static output
        return out.logits

    def _mtp_forward(self, size: int, hidden: torch.Tensor) -> torch.Tensor:
        """The MTP graph's passes (``afd.model_runner``'s ``_execute_with_mtp`` and ``_chain``,
        over the static buffers): the first over the step's rows (its batch, hidden: the
        target's), then k - 1 chained rounds of ``size`` rows. Drafts [k, size] int64, each
        pass's argmax written into ``drafts_out[:, :size]`` (returned): row 0 per drafting row,
        row r per chained entry. (A load record skips the MTP layer.)"""
        mtp, model = self.model.mtp, self.model
        cache, experts = self.kv_caches[mtp.index], LocalExperts(model)
        batch = self._batch(size)
        batch.cos, batch.sin = model.rotary.cos_sin(batch.positions)
        out = run_stages(mtp.stages(self.next_ids[:size], hidden, batch, cache,
                                    self.draft_rows[:size]), experts)
        drafts = self.drafts_out[:, :size]
        tokens = torch.argmax(out.logits, dim=-1, out=drafts[0])
        order = self.chain_order[:size]
        tokens, hidden = tokens[order], out.hidden[order]
        for r in range(self.mtp_tokens - 1):
            batch = ForwardBatch(positions=self.chain_positions[r, :size],
                                 slot_mapping=self.chain_slots[r, :size],
                                 block_tables=self.chain_tables[:size],
                                 seq_lens=self.chain_seq_lens[r, :size],
                                 query_lens=[1] * size, num_decodes=size)
            batch.cos, batch.sin = model.rotary.cos_sin(batch.positions)
            out = run_stages(mtp.stages(tokens, hidden, batch, cache, self.logits_index[:size]),
                             experts)
            tokens = torch.argmax(out.logits, dim=-1, out=drafts[r + 1])
            hidden = out.hidden
        return drafts

    @torch.inference_mode()
    def _capture_all(self) -> None:
        """Largest size first, all sharing one memory pool (a smaller graph's activations fit in
        what the larger one reserved). Two eager runs before each capture compile the Triton
        kernels and settle their fallbacks, so nothing is compiled or retried while capturing;
        they run on the padding rows alone, which write only the scratch block. A graph keeps
        nothing of its own alive in the pool: its outputs are the shared static ones (checked
        here), and the rotary tables the forward leaves on its batch are let go. With MTP
        drafts each size's MTP graph follows its target graph the same way, reading that
        graph's hidden output (replayed once first on the padding rows: finite states to warm
        up on)."""
        self.pool = torch.cuda.graph_pool_handle()
        for size in reversed(self.sizes):
            batch = self._batch(size)
            for _ in range(2):
                self._forward(size, batch)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            # thread_local: another thread's CUDA call (none is expected at start) cannot spoil
            # this capture, and this capture forbids only this thread's unsafe calls
            with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
                logits = self._forward(size, batch)
            if not (_views(logits, self.logits_out) and len(self.routed) == len(self.moe_layers)
                    and all(_views(ids, self.topk_ids_out) for _, ids in self.routed)):
                raise RuntimeError(f"the size-{size} decode graph's logits or routing are not "
                                   "in the shared static outputs")
            # cos/sin (and the rope tables of MiMo's sliding layers, DeepSeek-V4's ropes): read
            # within a replay only, so their pool memory may be another capture's; kept on the
            # batch they would stay one allocation per size
            batch.cos = batch.sin = batch.rope_tables = None
            entry = self.graphs[size] = _Graph(size, batch, graph, self.logits_out[:size],
                                               self.routed)
            if self.mtp_tokens:  # its input: this size's hidden output (the shared one's rows)
                entry.hidden = self.hidden
                graph.replay()  # (padding rows) so that the warm-up runs read finite states
                for _ in range(2):
                    self._mtp_forward(size, entry.hidden)
                torch.cuda.synchronize()
                entry.mtp_graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(entry.mtp_graph, pool=self.pool,
                                      capture_error_mode="thread_local"):
                    entry.drafts = self._mtp_forward(size, entry.hidden)
                if not (_views(entry.hidden, self.hidden_out)
                        and _views(entry.drafts, self.drafts_out)):
                    raise RuntimeError(f"the size-{size} MTP graph's hidden input or drafts "
                                       "are not in the shared static outputs")
        torch.cuda.synchronize()

    def padded_size(self, num_rows: int) -> int:
        return next(s for s in self.sizes if s >= num_rows)

    def fits(self, batch: ForwardBatch) -> bool:
        """Decode rows only (plain decodes and verify rows), as many as a captured size."""
        return 0 < batch.num_decodes == batch.num_seqs <= self.max_size

    def last_routing(self) -> list[tuple[int, torch.Tensor]]:
        """(decoder layer, topk_ids [B, K]) per MoE layer of the last ``run``'s B real rows
        (the padding rows' routing left out): what an expert load record counts."""
        entry, num = self.last
        return [(layer, topk_ids[:num]) for layer, topk_ids in entry.routed]

    @torch.inference_mode()
    def run(self, input_ids: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        """One decode step: input_ids [B], batch of B decode rows -> logits [B, V] fp32, one
        per row. The result is a view of the static output every size shares: read it (and
        ``last_routing``) before the next ``run``, of any size."""
        num, cols = batch.num_seqs, batch.block_tables.shape[1]
        if (batch.window_block_tables is None) != (self.window_block_tables is None):
            raise ValueError("a step's window_block_tables (afd.window_pool) must be given "
                             "exactly when the graphs were built with window_null_block "
                             f"(here {self.window_null_block})")
        entry = self.graphs[self.padded_size(num)]
        size = entry.size
        self.input_ids[:num].copy_(input_ids)
        self.positions[:num].copy_(batch.positions)
        self.slot_mapping[:num].copy_(batch.slot_mapping)
        self.seq_lens[:num].copy_(batch.seq_lens)
        # Columns past a sequence's blocks keep older ids: valid blocks, never read (seq_lens).
        self.block_tables[:num, :cols].copy_(batch.block_tables)
        windowed = self.window_block_tables is not None
        if windowed:  # the same, over the window pool (its null block: no real row reads it)
            self.window_block_tables[:num, :batch.window_block_tables.shape[1]].copy_(
                batch.window_block_tables)
            self.window_slot_mapping[:num].copy_(batch.window_slot_mapping)
        if self.state_slot_ids is not None:  # a hybrid model's rows' state slots
            ids = batch.state_slot_ids
            if ids is None:  # (a batch built without the device copy: one made here)
                if batch.state_slots is None:
                    raise ValueError("a hybrid model's decode step needs its rows' state "
                                     "slots (ForwardBatch.state_slots or state_slot_ids)")
                ids = torch.tensor(batch.state_slots, dtype=torch.long)
            self.state_slot_ids[:num].copy_(ids[:num])
        if num < size:  # rows a larger step used go back to padding
            self.input_ids[num:size].zero_()
            self.positions[num:size].zero_()
            self.slot_mapping[num:size].fill_(self.scratch_slot)
            self.seq_lens[num:size].fill_(1)
            self.block_tables[num:size, 0].fill_(self.scratch_block)
            if windowed:
                self.window_slot_mapping[num:size].fill_(self.window_null_slot)
                self.window_block_tables[num:size, 0].fill_(self.window_null_block)
            if self.state_slot_ids is not None:
                self.state_slot_ids[num:size].fill_(self.scratch_state_slot)
        self.last = (entry, num)
        if entry.graph is None:
            logits = self._forward(size, entry.batch)
            entry.routed, entry.hidden = self.routed, self.hidden
            return logits[:num]
        entry.graph.replay()
        return entry.logits[:num]

    @torch.inference_mode()
    def set_mtp_inputs(self, host: np.ndarray, tables: np.ndarray) -> None:
        """The MTP inputs of the last ``run``'s step, for ``run_mtp``: ``host``
        (``mtp_host_inputs``' int64 array for its padded size: next ids, draft rows, chain
        order, then per round positions, slots and lengths) in one host-to-device copy, and
        the chained entries' block tables [E, cols] int32 (entries past them pad)."""
        entry, _ = self.last
        size, rounds = entry.size, self.mtp_tokens - 1
        if host.shape != ((3 + 3 * rounds) * size,):
            raise ValueError(f"MTP inputs for size {size} must have {(3 + 3 * rounds) * size} "
                             f"values, got {host.shape}")
        dev = torch.from_numpy(host).to(self.next_ids.device)
        self.next_ids[:size].copy_(dev[:size])
        self.draft_rows[:size].copy_(dev[size:2 * size])
        self.chain_order[:size].copy_(dev[2 * size:3 * size])
        if rounds:
            per_round = dev[3 * size:].view(3, rounds, size)
            self.chain_positions[:, :size].copy_(per_round[0])
            self.chain_slots[:, :size].copy_(per_round[1])
            self.chain_seq_lens[:, :size].copy_(per_round[2])
            num, cols = tables.shape
            if num:  # columns past an entry's blocks keep older ids, never read
                self.chain_tables[:num, :cols].copy_(torch.from_numpy(tables))
            self.chain_tables[num:size, 0].fill_(self.scratch_block)

    @torch.inference_mode()
    def run_mtp(self) -> torch.Tensor:
        """The MTP graph of the last ``run``'s size, over the inputs ``set_mtp_inputs`` put:
        drafts [k, size] int64 (a view of the static drafts every size shares: read it before
        the next run, of any size)."""
        entry, _ = self.last
        if entry.mtp_graph is None:
            return self._mtp_forward(entry.size, entry.hidden)
        entry.mtp_graph.replay()
        return entry.drafts


def mtp_host_inputs(size: int, k: int, next_ids: list[int], rows: list[int], order: list[int],
                    rounds: list[int], positions: np.ndarray, tables: np.ndarray,
                    block_size: int, scratch_slot: int) -> np.ndarray:
    """``DecodeGraphs.set_mtp_inputs``' host array for a step padded to ``size`` rows, MTP
    drafts k: ``next_ids`` per row and ``rows`` (the drafting rows) as ``mtp_inputs`` gives
    them, the chained entries as ``DraftChain`` plans them (``order``, ``rounds``, p per
    entry, block tables). Round r's rows are the entries; an entry with fewer than r rounds,
    and every row past the entries, is padding there: position 0, the scratch slot, length 1."""
    n = k - 1
    out = np.zeros((3 + 3 * n) * size, dtype=np.int64)
    out[:len(next_ids)] = next_ids
    out[size:size + len(rows)] = rows
    out[2 * size:2 * size + len(order)] = order
    if n:
        pos, slots, lens = out[3 * size:].reshape(3, n, size)
        slots[:] = scratch_slot
        lens[:] = 1
        e = len(order)
        r = np.arange(1, n + 1)[:, None]  # [rounds, 1]
        live = np.asarray(rounds, dtype=np.int64)[None, :] >= r  # [rounds, E]
        p = positions[None, :e] + r
        entries = np.broadcast_to(np.arange(e), p.shape)
        slot = tables[entries, np.where(live, p, 0) // block_size] * block_size + p % block_size
        pos[:, :e] = np.where(live, p, 0)
        slots[:, :e] = np.where(live, slot, scratch_slot)
        lens[:, :e] = np.where(live, p + 1, 1)
    return out

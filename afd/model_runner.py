"""Turns a scheduler plan into model inputs, runs the forward, samples the next tokens."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from afd.config import EngineConfig
from afd.cuda_graphs import DecodeGraphs, RoutedTap, mtp_host_inputs, unsupported_reason
from afd.expert_load import ExpertLoadRecorder
from afd.kv_cache import allocate_kv_caches
from afd.sampler import Sampler, SamplerOutput, gather_prompt_logprobs
from afd.pingpong import drive_micro_batches, run_micro_batches, split_evenly
from afd.scheduler import ScheduledSeq, SchedulerOutput
from afd.spec_decode import accept, expand_rows
from kernels import DecodeGroups
from models.batch import ForwardBatch
from models.model import ExpertPath, ForwardOut, LocalExperts, MoEModel

log = logging.getLogger("afd.model_runner")


def row_order(seqs: list[ScheduledSeq]) -> tuple[list[bool], list[int]]:
    """Per sequence (plan order) whether its rows are decode rows, and the sequences in row
    order: those decoding first, then the prefill chunks, each group in plan order."""
    decoding = [s.num_new_tokens == 1 or bool(s.draft_token_ids) for s in seqs]
    return decoding, ([i for i, d in enumerate(decoding) if d]
                      + [i for i, d in enumerate(decoding) if not d])


def mtp_inputs(seqs: list[ScheduledSeq], sampled: list[int]
               ) -> tuple[list[int], list[int], list[int]]:
    """The MTP layer's inputs over the rows ``flatten`` made of ``seqs``: per token (row order)
    its next token (the next prompt or output token, or the token its row just sampled); per
    sampling sequence (plan order; ``sampled``: the step's samples, 1 + drafts each) the row
    whose MTP output drafts after its last emitted token, and how many tokens it emits (by
    verification's own rule, ``accept``; a sequence that a stop ends sooner needs no draft)."""
    _, order = row_order(seqs)
    taken, row = {}, 0
    for i, s in enumerate(seqs):
        if s.samples:
            tokens = sampled[row:row + 1 + len(s.draft_token_ids)]
            # (a failed row's sample is < 0: no draft equals it)
            taken[i] = [max(t, 0) for t in tokens], accept(tokens, s.draft_token_ids)
            row += len(tokens)
    next_ids: list[int] = []
    first = [0] * len(seqs)
    for i in order:
        s = seqs[i]
        start, n = s.seq.num_computed_tokens, s.num_new_tokens
        first[i] = len(next_ids)
        if i in taken:  # the positions before its last token, then its sampling rows
            next_ids += (s.seq.token_ids[start + 1:start + n - len(s.draft_token_ids)]
                         + taken[i][0])
        else:  # a chunk that ends before the sequence's last token
            next_ids += s.seq.token_ids[start + 1:start + n + 1]
    rows, emitted = [], []
    for i, (tokens, used) in taken.items():
        # its sampling rows end the sequence's rows; the used-th of them drafts
        rows.append(first[i] + seqs[i].num_new_tokens - len(tokens) + used - 1)
        emitted.append(used)
    return next_ids, rows, emitted


@dataclass
class DraftChain:
    """One micro-batch's chained MTP rows (k > 1): after the MTP pass drafts d1 at the row
    (position p) that takes a sampling sequence's last emitted token, round r = 1 .. k - 1
    runs the MTP layer on one row per sequence at position p + r: token d_r, hidden state the
    MTP layer's own at its round r - 1 row (after shared_head.norm), writing MTP KV at p + r,
    drafting d_{r+1}. A sequence takes fewer rounds where its blocks end (the scheduler's
    lookahead slots ran out) or its next step could not verify more drafts (max_tokens).
    Entries are ordered by rounds, most first, so round r's rows are a prefix of round r - 1's."""

    order: list[int]  # entries: index among the micro-batch's sampling sequences
    rounds: list[int]  # per entry, its chained rounds (>= 1)
    positions: np.ndarray  # [E] int64: per entry, p
    tables: np.ndarray  # [E, width] int32: per entry, its block table

    @classmethod
    def plan(cls, sampling: list[ScheduledSeq], emitted: list[int], extra: int,
             block_size: int) -> DraftChain:
        entries = []
        for i, (s, used) in enumerate(zip(sampling, emitted)):
            seq = s.seq
            pos = seq.num_computed_tokens + s.num_new_tokens - len(s.draft_token_ids) + used - 2
            usable = seq.max_output - seq.num_output_tokens - used - 1  # next step's drafts
            rounds = min(extra, usable - 1, len(seq.block_ids) * block_size - pos - 1)
            if rounds > 0:
                entries.append((rounds, i, pos))
        entries.sort(key=lambda e: -e[0])  # stable: plan order among equals
        width = max((len(sampling[i].seq.block_ids) for _, i, _ in entries), default=1)
        tables = np.zeros((len(entries), width), dtype=np.int32)
        for row, (_, i, _) in enumerate(entries):
            blocks = sampling[i].seq.block_ids
            tables[row, :len(blocks)] = blocks
        return cls([i for _, i, _ in entries], [r for r, _, _ in entries],
                   np.array([p for _, _, p in entries], dtype=np.int64), tables)

    def num_rows(self, r: int) -> int:
        """Rows of round r (>= 1): the entries with at least r rounds."""
        return sum(1 for rounds in self.rounds if rounds >= r)

    def batch(self, r: int, block_size: int, device: torch.device
              ) -> tuple[ForwardBatch, torch.Tensor]:
        """Round r's decode rows (one per entry still chaining) and their logits index."""
        n = self.num_rows(r)
        pos = self.positions[:n] + r
        slots = self.tables[np.arange(n), pos // block_size] * block_size + pos % block_size
        dev = torch.from_numpy(np.concatenate((pos, slots, pos + 1, np.arange(n)))).to(device)
        batch = ForwardBatch(positions=dev[:n], slot_mapping=dev[n:2 * n],
                             block_tables=torch.from_numpy(self.tables[:n]).to(device),
                             seq_lens=dev[2 * n:3 * n], query_lens=[1] * n, num_decodes=n,
                             context_lens=(pos + 1).tolist())
        return batch, dev[3 * n:]


def to_device(host: torch.Tensor, device: torch.device, pinned: bool = False) -> torch.Tensor:
    """``host`` copied to ``device``. ``pinned`` (async scheduling, afd.core): on CUDA through
    pinned memory without waiting, so that the copy queues behind the step in flight instead
    of the host waiting for that step to end (a pageable copy synchronizes the stream)."""
    if pinned and device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


def flatten(seqs: list[ScheduledSeq], block_size: int, device: torch.device,
            pinned: bool = False) -> tuple[torch.Tensor, ForwardBatch, torch.Tensor]:
    """Flatten scheduled sequences into (input_ids [T], ForwardBatch, logits_index [N]):
    ``flatten_decodes`` where it applies (most steps), else ``flatten_rows``. ``pinned``: the
    host-to-device copies as ``to_device``'s."""
    return (flatten_decodes(seqs, block_size, device, pinned)
            or flatten_rows(seqs, block_size, device, pinned))


def flatten_decodes(seqs: list[ScheduledSeq], block_size: int, device: torch.device,
                    pinned: bool = False) -> tuple[torch.Tensor, ForwardBatch, torch.Tensor] | None:
    """``flatten_rows`` for a step of plain decodes only: every sequence computes its last
    token alone (no drafts) and samples. Then there is one token, one row and one logits row
    per sequence, in plan order, and the per-token lists are the per-sequence ones; no prompt
    position is scored (the last token's position is at least the prompt's last, which
    predicts no prompt token). None (without looking further) at the first sequence that is
    not one, or for no sequences."""
    ids: list[int] = []
    starts: list[int] = []  # per sequence: its token's position
    blocks: list[int] = []
    num_blocks: list[int] = []
    for s in seqs:
        seq = s.seq
        start, token_ids = seq.num_computed_tokens, seq.token_ids
        if s.num_new_tokens != 1 or s.draft_token_ids or start + 1 != len(token_ids):
            return None
        ids.append(token_ids[start])
        starts.append(start)
        block_ids = seq.block_ids
        blocks += block_ids
        num_blocks.append(len(block_ids))
    n = len(ids)
    if not n:
        return None
    tables = np.zeros((n, max(num_blocks)), dtype=np.int32)
    tables[np.arange(tables.shape[1]) < np.array(num_blocks)[:, None]] = blocks
    pos = np.array(starts, dtype=np.int64)
    slots = tables[np.arange(n), pos // block_size] * block_size + pos % block_size
    seq_lens = [p + 1 for p in starts]
    state_slots = _state_slots(seqs)
    # flatten_rows' one copy: ids, seq_lens, logits_index (0..n-1), positions, slots, and a
    # hybrid model's state slots (the CUDA graphs read them on the device: afd.cuda_graphs)
    host = [np.array(ids + seq_lens, dtype=np.int64), np.arange(n, dtype=np.int64), pos, slots]
    if state_slots is not None:
        host.append(np.array(state_slots, dtype=np.int64))
    dev = to_device(torch.from_numpy(np.concatenate(host)), device, pinned)
    batch = ForwardBatch(positions=dev[3 * n:4 * n], slot_mapping=dev[4 * n:5 * n],
                         block_tables=to_device(torch.from_numpy(tables), device, pinned),
                         seq_lens=dev[n:2 * n], query_lens=[1] * n, num_decodes=n,
                         context_lens=seq_lens, state_slots=state_slots,
                         state_slot_ids=None if state_slots is None else dev[5 * n:])
    if seqs[0].seq.window_block_ids is not None:
        _add_window_rows(batch, [s.seq for s in seqs], np.arange(n), pos, None, block_size,
                         device, pinned)
    return dev[:n], batch, dev[2 * n:3 * n]


def _add_window_rows(batch: ForwardBatch, seqs: list, token_seq: np.ndarray, pos: np.ndarray,
                     rows_of: list[int] | None, block_size: int, device: torch.device,
                     pinned: bool = False) -> None:
    """The window pool's block tables and slots (afd.window_pool) for a batch whose rows are
    ``seqs``' (row order; ``rows_of``: each one's rows, None: one each), its tokens ``pos`` of
    sequence ``token_seq``: the same layout as the main pool's, over ``window_block_ids``."""
    width = max(len(seq.window_block_ids) for seq in seqs)
    tables = np.zeros((len(seqs), width), dtype=np.int32)
    for i, seq in enumerate(seqs):
        tables[i, :len(seq.window_block_ids)] = seq.window_block_ids
    slots = tables[token_seq, pos // block_size] * block_size + pos % block_size
    if rows_of is not None and len(rows_of) != sum(rows_of):
        tables = np.repeat(tables, rows_of, axis=0)
    batch.window_block_tables = to_device(torch.from_numpy(tables), device, pinned)
    batch.window_slot_mapping = to_device(torch.from_numpy(slots.astype(np.int64)), device,
                                          pinned)


def _state_slots(seqs: list[ScheduledSeq]) -> list[int] | None:
    """Each sequence's state slot, in the order given (a hybrid model's; else None)."""
    if not seqs or seqs[0].seq.state_slot is None:
        return None
    return [s.seq.state_slot for s in seqs]


def flatten_rows(seqs: list[ScheduledSeq], block_size: int, device: torch.device,
                 pinned: bool = False) -> tuple[torch.Tensor, ForwardBatch, torch.Tensor]:
    """Flatten scheduled sequences into (input_ids [T], ForwardBatch, logits_index [N]).

    Attention rows (``models.batch``): decode rows first, a plain decode's one token and each
    token of a sequence verifying drafts ([last token, d1..dk]: k + 1 rows over the same block
    table, seq_lens start + 1 .. start + k + 1), then one row per prefill chunk; tokens in row
    order. So a step of decodes and verifications is decode-only, whatever its drafts. With a
    verifying sequence among them, ``decode_groups`` holds each decoding sequence's rows (1, or
    k + 1), so that decode attention reads its context once for all of them.

    logits_index holds, per sequence in plan order, its rows for prompt logprobs (if it asks)
    and then its sampling rows (if this step reaches its last token): one, or with drafts one
    per computed position from its last token on.
    """
    decoding, order = row_order(seqs)
    ids: list[int] = []
    positions: list[int] = []
    seq_lens: list[int] = []  # per row
    query_lens: list[int] = []  # per row
    first_token = [0] * len(seqs)  # per sequence (plan order): its first token
    rows_of: list[int] = []  # per sequence (row order): its rows
    token_seq: list[int] = []  # per token: its sequence (row order)
    blocks: list[int] = []  # every sequence's block ids, in row order
    num_blocks: list[int] = []
    for k, i in enumerate(order):
        s = seqs[i]
        seq, start, n = s.seq, s.seq.num_computed_tokens, s.num_new_tokens
        first_token[i] = len(ids)
        chunk = seq.token_ids[start:start + n]
        ids += chunk + s.draft_token_ids if s.draft_token_ids else chunk
        positions += range(start, start + n)
        token_seq += [k] * n
        blocks += seq.block_ids
        num_blocks.append(len(seq.block_ids))
        if decoding[i]:  # n rows of one token, each seeing the cache up to its own position
            seq_lens += range(start + 1, start + n + 1)
            query_lens += [1] * n
            rows_of.append(n)
        else:
            seq_lens.append(start + n)
            query_lens.append(n)
            rows_of.append(1)
    logits_index: list[int] = []
    for i, s in enumerate(seqs):
        span = s.prompt_logprob_positions
        if span:
            offset = first_token[i] - s.seq.num_computed_tokens
            logits_index += range(offset + span.start, offset + span.stop)
        if s.samples:
            end = first_token[i] + s.num_new_tokens
            logits_index += range(end - 1 - len(s.draft_token_ids), end)

    # [S, width] int32 per sequence, then per row: a verifying sequence's rows share its table
    # (numpy: a few host ops on small arrays, each cheaper than a torch op)
    width = max(num_blocks, default=1)
    tables = np.zeros((len(seqs), width), dtype=np.int32)
    tables[np.arange(width) < np.array(num_blocks)[:, None]] = blocks
    pos = np.array(positions, dtype=np.int64)
    slots = (tables[np.array(token_seq, dtype=np.int64), pos // block_size] * block_size
             + pos % block_size)
    if len(query_lens) != len(seqs):
        tables = np.repeat(tables, rows_of, axis=0)
    # a verifying sequence's decode rows as one group, read once by the decode attention
    groups = DecodeGroups.rows_or_none(rows_of[:sum(decoding)])
    # one host-to-device copy for every per-token and per-row integer
    t, b, n = len(ids), len(query_lens), len(logits_index)
    host = [np.array(ids + seq_lens + logits_index, dtype=np.int64), pos, slots]
    if groups is not None:
        host.append(DecodeGroups.host_index(groups))
    dev = to_device(torch.from_numpy(np.concatenate(host)), device, pinned)
    batch = ForwardBatch(
        positions=dev[t + b + n:2 * t + b + n],
        slot_mapping=dev[2 * t + b + n:3 * t + b + n],
        block_tables=to_device(torch.from_numpy(tables), device, pinned),
        seq_lens=dev[t:t + b],
        query_lens=query_lens,
        num_decodes=sum(s.num_new_tokens for s, d in zip(seqs, decoding) if d),
        context_lens=seq_lens,
        decode_groups=None if groups is None else DecodeGroups(groups, dev[3 * t + b + n:]),
        # per row (one per sequence: a hybrid model verifies no drafts)
        state_slots=_state_slots([seqs[i] for i in order]),
    )
    if seqs and seqs[0].seq.window_block_ids is not None:
        _add_window_rows(batch, [seqs[i].seq for i in order],
                         np.array(token_seq, dtype=np.int64), pos, rows_of, block_size, device,
                         pinned)
    return dev[:t], batch, dev[t + b:t + b + n]


def _drafts_per_seq(rounds: list[list[int]], chain: DraftChain) -> list[list[int]]:
    """Per sampling sequence (one micro-batch's, plan order) its drafts: ``rounds[0]``, one
    per sequence, then ``rounds[r][e]`` for each round r its chain entry e takes."""
    mine = [[d] for d in rounds[0]]
    for e, i in enumerate(chain.order):  # entry e is row e of each round it takes
        mine[i] += [rounds[r][e] for r in range(1, chain.rounds[e] + 1)]
    return mine


class ModelRunner:
    def __init__(self, model: MoEModel, cfg: EngineConfig, experts: ExpertPath | None = None,
                 decodes: bool = True):
        """``experts``: where routed tokens go (None: this process's own experts). With a
        transport every step is collective: even an empty plan runs a zero-token forward.
        ``decodes``: False on a prefill rank (no decode steps, so no CUDA graphs)."""
        self.model = model
        self.cfg = cfg
        self.device = torch.device(cfg.device)
        self.experts = experts or LocalExperts(model)
        self.collective = experts is not None
        self.mtp = model.mtp  # the MTP layer (speculative method "mtp"), or None
        graphs = not cfg.enforce_eager and decodes and self._graphs_apply()
        # With CUDA graphs the pool has one more block, the padding rows' scratch block, which
        # the allocator (cfg.num_kv_blocks) never hands out. The MTP layer's cache is the last.
        # a hybrid model's linear layers: one state slot per sequence a step may run (the
        # scheduler hands them out: EngineCore)
        self.state_slots = cfg.max_num_seqs if model.cfg.linear_attn is not None else 0
        # and after them, with prefix caching, the state snapshots' (afd.state_snapshots)
        self.state_snapshots = cfg.num_state_snapshots if self.state_slots else 0
        # and after those, with CUDA graphs, the padding rows' scratch state slot (as the
        # scratch block: neither the scheduler nor the snapshot pool hands it out)
        self.scratch_state_slot = (self.state_slots + self.state_snapshots
                                   if self.state_slots and graphs else None)
        # the sliding layers' own pool (afd.window_pool), its null block after its blocks
        self.window_blocks = cfg.num_window_blocks if cfg.window_pool else 0
        self.kv_caches = allocate_kv_caches(model.cfg, cfg.num_kv_blocks + graphs,
                                            cfg.block_size, cfg.cache_dtype, self.device,
                                            len(model.all_layers()),
                                            state_slots=(self.state_slots + self.state_snapshots
                                                         + (self.scratch_state_slot is not None)),
                                            state_dtype=cfg.dtype,
                                            window_blocks=self.window_blocks)
        self.graphs = self._build_graphs() if graphs else None
        self.sampler = Sampler(cfg.seed)
        self.load_record = (ExpertLoadRecorder(model.cfg.num_layers, model.cfg.num_experts,
                                               self.device) if model.cfg.num_experts else None)

    @torch.inference_mode()
    def copy_states(self, copies: list[tuple[int, int]]) -> None:
        """Copy whole state slots (source, destination), in order, in every linear layer:
        a hybrid model's state snapshots taken and restored (afd.state_snapshots)."""
        from models.hybrid import LinearStates

        for cache in self.kv_caches:
            if isinstance(cache, LinearStates):
                for src, dst in copies:
                    cache.conv[dst].copy_(cache.conv[src])
                    cache.recurrent[dst].copy_(cache.recurrent[src])

    def _graphs_apply(self) -> bool:
        reason = ("experts on FFN ranks (the all_to_all sizes its messages on the host)"
                  if self.collective else unsupported_reason(self.model))
        if reason:
            log.info("no CUDA graphs: decode steps run eagerly here: %s", reason)
        return reason is None

    def _build_graphs(self) -> DecodeGraphs | None:
        capture = self.device.type == "cuda"
        try:
            graphs = DecodeGraphs(self.model, self.kv_caches, scratch_block=self.cfg.num_kv_blocks,
                                  block_size=self.cfg.block_size,
                                  max_model_len=self.cfg.max_model_len,
                                  sizes=self.cfg.cuda_graph_sizes, capture=capture,
                                  mtp_tokens=self.cfg.num_speculative_tokens if self.mtp else 0,
                                  # the window pool's null block (WindowPool.null: its last)
                                  window_null_block=self.window_blocks or None,
                                  scratch_state_slot=self.scratch_state_slot)
        except Exception as exc:  # noqa: BLE001 - a capture that fails leaves eager steps
            log.warning("CUDA graph capture failed, decode steps run eagerly: %s: %s",
                        type(exc).__name__, exc)
            return None
        mtp = (f", then the MTP layer's {graphs.mtp_tokens} draft passes"
               if graphs.mtp_tokens else "")
        if capture:
            log.info("captured CUDA graphs of decode steps for batch sizes %s%s", graphs.sizes,
                     mtp)
        else:  # tests: the same static buffers, run eagerly
            log.info("CUDA-graph path of decode steps (not captured: no CUDA) for batch sizes "
                     "%s%s", graphs.sizes, mtp)
        return graphs

    def prepare(self, seqs: list[ScheduledSeq]) -> tuple[torch.Tensor, ForwardBatch, torch.Tensor]:
        """(input_ids [T], ForwardBatch, logits_index [N]) for ``seqs``: see ``flatten``."""
        return flatten(seqs, self.cfg.block_size, self.device)

    @torch.inference_mode()
    def execute(self, plan: SchedulerOutput, micro_batches: int = 1) -> SamplerOutput:
        """Run one step in ``micro_batches`` ping-ponged parts; returns the sampled token (and
        logprobs, where asked) of each sequence that reached its end (in plan order), or, for
        a sequence with drafts, one per verified position (1 + drafts rows; the caller accepts
        them). A step of decodes and verifications alone (decode rows only) replays a CUDA
        graph when one is as large as its rows."""
        if plan.empty and not self.collective:
            return SamplerOutput([], [])
        record = self.load_record.add if self.load_record and self.load_record.recording else None
        experts = self.experts if record is None else RoutedTap(self.experts, record)
        if self.mtp is not None:
            return self._execute_with_mtp(plan, micro_batches, experts, record)
        if self.graphs is not None and micro_batches == 1:
            ids, batch, index = self.prepare(plan.seqs)
            if self.graphs.fits(batch):
                logits = self._replay(ids, batch, index, record)
            else:
                logits = run_micro_batches(self.model, [(ids, batch, index)], self.kv_caches,
                                           experts)[0]
        else:
            _, inputs = self._micro_batches(plan.seqs, micro_batches)
            parts = run_micro_batches(self.model, inputs, self.kv_caches, experts)
            # (one part: its logits as they are, no copy of the [N, V] rows)
            logits = parts[0] if len(parts) == 1 else torch.cat(parts)
        return self._sample(logits, plan.seqs)

    @torch.inference_mode()
    def launch(self, plan: SchedulerOutput, placeholders: list[tuple[int, int]],
               prev_tokens: torch.Tensor | None) -> SamplerOutput:
        """Async scheduling (afd.core ``EngineCore``): ``execute`` of one micro-batch without
        MTP, its samples left on the device (``SamplerOutput.device_tokens``; host ids only
        where logprobs were asked for). ``placeholders``: (plan index, row of ``prev_tokens``)
        per sequence whose last token is the previous step's sample, still unknown on the
        host: its input id is taken from ``prev_tokens`` (that step's ``device_tokens``) on
        the device. Such a sequence decodes that one token, so its index among the decode
        rows, which come first in the plan and in the input ids, is its plan index. A NaN
        row's -1 becomes id 0 there: its request fails when that step's samples are read,
        and this row's sample is dropped. Host-to-device copies go through pinned memory on
        CUDA, so nothing here waits for the step in flight."""
        if plan.empty:
            return SamplerOutput([], [], device_tokens=torch.empty(0, dtype=torch.long))
        record = self.load_record.add if self.load_record and self.load_record.recording else None
        experts = self.experts if record is None else RoutedTap(self.experts, record)
        ids, batch, index = flatten(plan.seqs, self.cfg.block_size, self.device, pinned=True)
        n = len(placeholders)
        # most decode steps: rows 0..n-1 from rows 0..n-1 (not merely i from i: a row between
        # them, say a prompt's last chunk of one token, keeps its own input)
        if n and all(i == r == k for k, (i, r) in enumerate(placeholders)):
            ids[:n].copy_(prev_tokens[:n].clamp(min=0))
        elif n:
            where = to_device(torch.tensor([i for i, _ in placeholders]
                                           + [r for _, r in placeholders], dtype=torch.long),
                              self.device, pinned=True)
            ids.index_copy_(0, where[:n], prev_tokens.index_select(0, where[n:]).clamp(min=0))
        if self.graphs is not None and self.graphs.fits(batch):
            logits = self._replay(ids, batch, index, record)
        else:
            logits = run_micro_batches(self.model, [(ids, batch, index)], self.kv_caches,
                                       experts)[0]
        return self._sample(logits, plan.seqs, keep_device=True)

    def _micro_batches(self, seqs: list[ScheduledSeq], micro_batches: int
                       ) -> tuple[list[list[ScheduledSeq]], list[tuple]]:
        """``seqs`` split into ``micro_batches`` parts of about equal tokens, and each part's
        ``prepare``d inputs."""
        if micro_batches == 1:  # split_evenly's one part: all of them (without the walk)
            return [seqs], [self.prepare(seqs)]
        sizes = [s.num_new_tokens for s in seqs]
        parts = [seqs[a:b] for a, b in split_evenly(sizes, micro_batches)]
        return parts, [self.prepare(part) for part in parts]

    def _sample(self, logits: torch.Tensor, seqs: list[ScheduledSeq], keep_device: bool = False
                ) -> SamplerOutput:
        """The step's samples (and prompt logprobs) from its logits (``prepare``'s rows);
        ``keep_device``: the sampler's (``launch``)."""
        logits, prompt_logprobs = self._prompt_logprobs(logits, seqs)
        sampling = [s for s in seqs if s.samples]
        if not sampling:
            return SamplerOutput([], [], prompt_logprobs,
                                 device_tokens=(torch.empty(0, dtype=torch.long,
                                                            device=logits.device)
                                                if keep_device else None))
        # one row per sampling sequence, or 1 + drafts for a speculating one (its rows in
        # order: a seeded one's take consecutive step seeds from its generator)
        rows = expand_rows([s.seq for s in sampling], [s.draft_token_ids for s in sampling])
        out = (self.sampler.sample(logits, *rows, keep_device=True) if keep_device
               else self.sampler.sample(logits, *rows))
        out.prompt_logprobs = prompt_logprobs
        return out

    def _execute_with_mtp(self, plan: SchedulerOutput, micro_batches: int,
                          experts: ExpertPath, record=None) -> SamplerOutput:
        """A step, then the MTP layer over its rows (``mtp_inputs``), each micro-batch as the
        target's, then k - 1 chained rounds (``DraftChain``); ``draft_tokens``: per sampling
        sequence, the drafts after the last token it emits. With FFN ranks each MTP round's
        MoE is one more collective round, taken by every rank, an idle one with zero rows:
        always k rounds a step (k is engine-wide, so every rank knows the count without a
        vote; a rank whose sequences chain fewer rounds takes the rest with zero rows).
        A step of decode rows alone replays CUDA graphs where they are captured: the
        target's, then (after sampling) the MTP layer's (``_graph_step_with_mtp``)."""
        if self.graphs is not None and micro_batches == 1:
            inputs = [self.prepare(plan.seqs)]
            if self.graphs.fits(inputs[0][1]):
                return self._graph_step_with_mtp(plan.seqs, *inputs[0], record)
            parts = [plan.seqs]
        else:
            parts, inputs = self._micro_batches(plan.seqs, micro_batches)
        outs = run_micro_batches(self.model, inputs, self.kv_caches, experts, keep_hidden=True)
        out = self._sample(torch.cat([o.logits for o in outs]), plan.seqs)
        cache, size = self.kv_caches[self.mtp.index], self.cfg.block_size
        stages, chains, row = [], [], 0
        for part, (_, batch, _), target in zip(parts, inputs, outs):
            sampling = [s for s in part if s.samples]
            num = sum(1 + len(s.draft_token_ids) for s in sampling)
            next_ids, rows, emitted = mtp_inputs(part, out.tokens[row:row + num])
            row += num
            chains.append(DraftChain.plan(sampling, emitted,
                                          self.cfg.num_speculative_tokens - 1, size))
            dev = torch.tensor(next_ids + rows, dtype=torch.long).to(self.device)
            stages.append(self.mtp.stages(dev[:len(next_ids)], target.hidden, batch, cache,
                                          dev[len(next_ids):]))
        first = drive_micro_batches(stages, experts)  # (a load record skips the MTP layer)
        out.draft_tokens = self._chain(chains, first, experts)
        return out

    def _chain(self, chains: list[DraftChain], first: list[ForwardOut], experts: ExpertPath
               ) -> list[list[int]]:
        """The k - 1 chained MTP rounds after the MTP pass (``first``: its result per
        micro-batch, one row per sampling sequence); per sampling sequence (plan order) its
        drafts. They stay on the device between rounds: one read at the end."""
        cache, size = self.kv_caches[self.mtp.index], self.cfg.block_size
        drafts = [[o.logits.argmax(dim=-1)] for o in first]  # per part, per round: [rows]
        carried = [(d[0][c.order], o.hidden[c.order]) for d, o, c in zip(drafts, first, chains)]
        for r in range(1, self.cfg.num_speculative_tokens):
            if not self.collective and not any(c.num_rows(r) for c in chains):
                break  # no rank waits for this one's rounds
            stages = []
            for chain, (tokens, hidden) in zip(chains, carried):
                batch, index = chain.batch(r, size, self.device)
                batch.cos, batch.sin = self.model.rotary.cos_sin(batch.positions)
                n = len(index)
                stages.append(self.mtp.stages(tokens[:n], hidden[:n], batch, cache, index))
            for p, o in enumerate(drive_micro_batches(stages, experts)):
                carried[p] = (o.logits.argmax(dim=-1), o.hidden)
                drafts[p].append(carried[p][0])
        flat = iter(torch.cat([d for part in drafts for d in part]).tolist())
        per_seq = []
        for part, chain in zip(drafts, chains):
            per_seq += _drafts_per_seq([[next(flat) for _ in range(len(d))] for d in part],
                                       chain)
        return per_seq

    def _replay(self, ids: torch.Tensor, batch: ForwardBatch, index: torch.Tensor,
                record) -> torch.Tensor:
        """A decode step through the CUDA graphs: the ``index`` rows' logits, and with a load
        ``record`` the real rows' routing, read after the replay."""
        logits = self.graphs.run(ids, batch)[index]
        if record is not None:
            for layer, topk_ids in self.graphs.last_routing():
                record(layer, topk_ids)
        return logits

    def _graph_step_with_mtp(self, seqs: list[ScheduledSeq], ids: torch.Tensor,
                             batch: ForwardBatch, index: torch.Tensor, record) -> SamplerOutput:
        """``_execute_with_mtp`` for a step of decode rows alone, through the CUDA graphs: the
        target's graph (keeping every row's hidden state), sampling on the host, then the MTP
        graph of the same size (its first pass and the k - 1 chained rounds, every round over
        all the size's rows, those past a round's entries padding); one read of its drafts."""
        graphs, k, size = self.graphs, self.cfg.num_speculative_tokens, self.cfg.block_size
        out = self._sample(self._replay(ids, batch, index, record), seqs)
        next_ids, rows, emitted = mtp_inputs(seqs, out.tokens)
        chain = DraftChain.plan([s for s in seqs if s.samples], emitted, k - 1, size)
        padded = graphs.last[0].size
        graphs.set_mtp_inputs(
            mtp_host_inputs(padded, k, next_ids, rows, chain.order, chain.rounds,
                            chain.positions, chain.tables, size, graphs.scratch_slot),
            chain.tables)
        drafts = graphs.run_mtp().tolist()
        drafts[0] = drafts[0][:len(rows)]
        out.draft_tokens = _drafts_per_seq(drafts, chain)
        return out

    def _prompt_logprobs(self, logits: torch.Tensor, seqs: list[ScheduledSeq]
                         ) -> tuple[torch.Tensor, dict]:
        """Split the step's logits [rows, V] fp32 (in ``prepare``'s order) into the sampling
        rows and the prompt logprobs of the sequences that ask, per request id."""
        spans = [s.prompt_logprob_positions for s in seqs]
        if not any(spans):
            return logits, {}
        sample_rows, prompt_rows, targets, runs, owners = [], [], [], [], []
        row = 0
        for s, span in zip(seqs, spans):
            if span:
                prompt_rows += range(row, row + len(span))
                targets += s.seq.token_ids[span.start + 1:span.stop + 1]
                runs.append((len(span), s.seq.params.prompt_logprobs))
                owners.append(s.seq.request_id)
                row += len(span)
            if s.samples:
                num = 1 + len(s.draft_token_ids)
                sample_rows += range(row, row + num)
                row += num
        dev = logits.device
        scored = gather_prompt_logprobs(
            logits[torch.tensor(prompt_rows, device=dev)],
            torch.tensor(targets, dtype=torch.long, device=dev), runs)
        return logits[torch.tensor(sample_rows, dtype=torch.long, device=dev)], dict(
            zip(owners, scored))

"""Turns a scheduler plan into model inputs, runs the forward, samples the next tokens."""

from __future__ import annotations

import logging

import numpy as np
import torch

from afd.config import EngineConfig
from afd.cuda_graphs import DecodeGraphs, unsupported_reason
from afd.expert_load import ExpertLoadRecorder, RoutedTap
from afd.kv_cache import allocate_kv_caches
from afd.sampler import Sampler, SamplerOutput, gather_prompt_logprobs
from afd.pingpong import drive_micro_batches, run_micro_batches, split_evenly
from afd.scheduler import ScheduledSeq, SchedulerOutput
from afd.spec_decode import expand_rows
from models.batch import ForwardBatch
from models.model import ExpertPath, LocalExperts, MoEModel

log = logging.getLogger("afd.model_runner")


def row_order(seqs: list[ScheduledSeq]) -> tuple[list[bool], list[int]]:
    """Per sequence (plan order) whether its rows are decode rows, and the sequences in row
    order: those decoding first, then the prefill chunks, each group in plan order."""
    decoding = [s.num_new_tokens == 1 or bool(s.draft_token_ids) for s in seqs]
    return decoding, ([i for i, d in enumerate(decoding) if d]
                      + [i for i, d in enumerate(decoding) if not d])


def mtp_inputs(seqs: list[ScheduledSeq], sampled: list[int]) -> tuple[list[int], list[int]]:
    """The MTP layer's inputs over the rows ``flatten`` made of ``seqs``: per token (row order)
    its next token (the next prompt or output token, or the token its row just sampled), and
    per sampled token (``sampled``: the step's, sampling sequences in plan order, 1 + drafts
    each) the row whose MTP output drafts after it."""
    _, order = row_order(seqs)
    taken, row = {}, 0
    for i, s in enumerate(seqs):
        if s.samples:
            num = 1 + len(s.draft_token_ids)
            taken[i] = [max(t, 0) for t in sampled[row:row + num]]  # a failed row's is < 0
            row += num
    next_ids: list[int] = []
    first = [0] * len(seqs)
    for i in order:
        s = seqs[i]
        start, n = s.seq.num_computed_tokens, s.num_new_tokens
        first[i] = len(next_ids)
        if i in taken:  # the positions before its last token, then its sampling rows
            next_ids += s.seq.token_ids[start + 1:start + n - len(s.draft_token_ids)] + taken[i]
        else:  # a chunk that ends before the sequence's last token
            next_ids += s.seq.token_ids[start + 1:start + n + 1]
    rows: list[int] = []
    for i, tokens in taken.items():
        end = first[i] + seqs[i].num_new_tokens
        rows += range(end - len(tokens), end)
    return next_ids, rows


def flatten(seqs: list[ScheduledSeq], block_size: int, device: torch.device
            ) -> tuple[torch.Tensor, ForwardBatch, torch.Tensor]:
    """Flatten scheduled sequences into (input_ids [T], ForwardBatch, logits_index [N]).

    Attention rows (``models.batch``): decode rows first, a plain decode's one token and each
    token of a sequence verifying drafts ([last token, d1..dk]: k + 1 rows over the same block
    table, seq_lens start + 1 .. start + k + 1), then one row per prefill chunk; tokens in row
    order. So a step of decodes and verifications is decode-only, whatever its drafts.

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
    # one host-to-device copy for every per-token and per-row integer
    t, b, n = len(ids), len(query_lens), len(logits_index)
    dev = torch.from_numpy(np.concatenate(
        (np.array(ids + seq_lens + logits_index, dtype=np.int64), pos, slots))).to(device)
    batch = ForwardBatch(
        positions=dev[t + b + n:2 * t + b + n],
        slot_mapping=dev[2 * t + b + n:],
        block_tables=torch.from_numpy(tables).to(device),
        seq_lens=dev[t:t + b],
        query_lens=query_lens,
        num_decodes=sum(s.num_new_tokens for s, d in zip(seqs, decoding) if d),
        context_lens=seq_lens,
    )
    return dev[:t], batch, dev[t + b:t + b + n]


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
        self.kv_caches = allocate_kv_caches(model.cfg, cfg.num_kv_blocks + graphs,
                                            cfg.block_size, cfg.dtype, self.device,
                                            len(model.all_layers()))
        self.graphs = self._build_graphs() if graphs else None
        self.sampler = Sampler(cfg.seed)
        self.load_record = (ExpertLoadRecorder(model.cfg.num_layers, model.cfg.num_experts,
                                               self.device) if model.cfg.num_experts else None)

    def _graphs_apply(self) -> bool:
        reason = ("experts on FFN ranks (the all_to_all sizes its messages on the host)"
                  if self.collective else
                  "MTP drafts (the MTP layer runs after each step's sampling, not captured)"
                  if self.mtp is not None else unsupported_reason(self.model))
        if reason:
            log.warning("enforce_eager=False: decode steps run eagerly here: %s", reason)
        return reason is None

    def _build_graphs(self) -> DecodeGraphs | None:
        capture = self.device.type == "cuda"
        try:
            graphs = DecodeGraphs(self.model, self.kv_caches, scratch_block=self.cfg.num_kv_blocks,
                                  block_size=self.cfg.block_size,
                                  max_model_len=self.cfg.max_model_len,
                                  sizes=self.cfg.cuda_graph_sizes, capture=capture)
        except Exception as exc:  # noqa: BLE001 - a capture that fails leaves eager steps
            log.warning("CUDA graph capture failed, decode steps run eagerly: %s: %s",
                        type(exc).__name__, exc)
            return None
        if capture:
            log.info("captured CUDA graphs of decode steps for batch sizes %s", graphs.sizes)
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
            return self._execute_with_mtp(plan, micro_batches, experts)
        if self.graphs is not None and micro_batches == 1:
            ids, batch, index = self.prepare(plan.seqs)
            if self.graphs.fits(batch):
                logits = self.graphs.run(ids, batch)[index]
                if record is not None:  # the real rows' routing, read after the replay
                    for layer, topk_ids in self.graphs.last_routing():
                        record(layer, topk_ids)
            else:
                logits = run_micro_batches(self.model, [(ids, batch, index)], self.kv_caches,
                                           experts)[0]
        else:
            sizes = [s.num_new_tokens for s in plan.seqs]
            parts = [plan.seqs[a:b] for a, b in split_evenly(sizes, micro_batches)]
            inputs = [self.prepare(part) for part in parts]
            logits = torch.cat(run_micro_batches(self.model, inputs, self.kv_caches, experts))
        return self._sample(logits, plan.seqs)

    def _sample(self, logits: torch.Tensor, seqs: list[ScheduledSeq]) -> SamplerOutput:
        """The step's samples (and prompt logprobs) from its logits (``prepare``'s rows)."""
        logits, prompt_logprobs = self._prompt_logprobs(logits, seqs)
        sampling = [s for s in seqs if s.samples]
        if not sampling:
            return SamplerOutput([], [], prompt_logprobs)
        # one row per sampling sequence, or 1 + drafts for a speculating one (its rows in
        # order: a seeded one's take consecutive step seeds from its generator)
        rows = expand_rows([s.seq for s in sampling], [s.draft_token_ids for s in sampling])
        out = self.sampler.sample(logits, *rows)
        out.prompt_logprobs = prompt_logprobs
        return out

    def _execute_with_mtp(self, plan: SchedulerOutput, micro_batches: int,
                          experts: ExpertPath) -> SamplerOutput:
        """A step, then the MTP layer over its rows (``mtp_inputs``), each micro-batch as the
        target's; ``draft_tokens``: per sampled token, the MTP argmax after it (the next
        step's draft if that token is the last one emitted). With FFN ranks the MTP layer's
        MoE is one more collective round, taken by every rank, an idle one with zero rows."""
        sizes = [s.num_new_tokens for s in plan.seqs]
        parts = [plan.seqs[a:b] for a, b in split_evenly(sizes, micro_batches)]
        inputs = [self.prepare(part) for part in parts]
        outs = run_micro_batches(self.model, inputs, self.kv_caches, experts, keep_hidden=True)
        out = self._sample(torch.cat([o.logits for o in outs]), plan.seqs)
        stages, row = [], 0
        for part, (_, batch, _), target in zip(parts, inputs, outs):
            num = sum(1 + len(s.draft_token_ids) for s in part if s.samples)
            next_ids, rows = mtp_inputs(part, out.tokens[row:row + num])
            row += num
            dev = torch.tensor(next_ids + rows, dtype=torch.long).to(self.device)
            stages.append(self.mtp.stages(dev[:len(next_ids)], target.hidden, batch,
                                          self.kv_caches[self.mtp.index], dev[len(next_ids):]))
        logits = torch.cat(drive_micro_batches(stages, experts))  # (a load record skips it)
        out.draft_tokens = logits.argmax(dim=-1).tolist()
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

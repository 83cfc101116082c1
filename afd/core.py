"""EngineCore: one attention rank's scheduler, KV pool and model runner, stepping together.

It speaks token ids only (no text); the front end (afd.engine) tokenizes, detokenizes and checks
stop strings. ``step`` is the loop body every layout runs:
    plan = schedule(); sampled = execute(plan); update(plan); emit outputs
"""

from __future__ import annotations

import gc
from dataclasses import dataclass, field

import torch

from afd.config import EngineConfig
from afd.core_stats import CoreStats, PrefixCacheStats
from afd.block_pool import BlockPool, CacheEvents
from afd.expert_load import ExpertLoadRecorder, NoExpertLoadRecord, sum_records
from afd.kv_cache import kv_block_dim
from afd.kv_offload import HostKVTier
from afd.model_runner import ModelRunner
from afd.sampling_params import check_token_ids
from afd.scheduler import Scheduler, SchedulerOutput
from afd.sequence import CoreOutput, CoreRequest, Sequence, Status
from afd.spec_decode import accept, rewind
from afd.state_snapshots import StateSnapshots
from afd.token_masks import NO_TOKEN
from afd.window_pool import WindowPool
from models.model import ExpertPath, MoEModel


def _row_error(token: int, seq: Sequence, row: int | None = None) -> str:
    """Why a sampled row has no token (a negative id from the sampler). ``row``: a
    speculating sequence's verify row (its grammar may have failed on a draft before it:
    ``GrammarState.draft_failure``)."""
    if token != NO_TOKEN:
        return "the model's logits hold a NaN"
    grammar = seq.grammar
    failed = grammar.error if grammar is not None else None
    if failed is None and row is not None and grammar is not None:
        failure = grammar.draft_failure
        failed = failure[1] if failure is not None and row >= failure[0] else None
    if failed is not None:
        return (f"structured_outputs: the grammar failed after {seq.num_output_tokens} output "
                f"tokens: {failed}")
    forced = seq.forced_token()  # (the row after the tokens taken so far)
    if forced is not None:
        return (f"thinking_token_budget={seq.params.thinking_token_budget} forces the "
                f"reasoning's end token {forced} (reasoning_end_token_ids[0]) next, and "
                "allowed_token_ids, bad_words or min_tokens (where it is a stop token) ban it: "
                "allow that token")
    return ("structured_outputs, allowed_token_ids, bad_words and thinking_token_budget leave "
            "no token to sample")


# Async scheduling: the token id a sequence holds, last, for a sample of the step in flight
# (never a real id; never read as one: the runner takes that input from the device)
PLACEHOLDER = -1


class HostTokens:
    """A step's sampled ids on their way to the host: on CUDA a non-blocking copy into pinned
    memory and an event recorded after it, waited on only when they are read (``tolist``);
    elsewhere the ids themselves (the step ran synchronously)."""

    def __init__(self, tokens: torch.Tensor):
        self.event = None
        if tokens.is_cuda:
            self.host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
            self.host.copy_(tokens, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.host = tokens

    def tolist(self) -> list[int]:
        if self.event is not None:
            self.event.synchronize()
        return self.host.tolist()


@dataclass
class InFlight:
    """Async scheduling: a step launched whose samples the host has not read yet.
    ``sampling``: its sampling sequences (plan order), one sample row each. ``rows``: id of
    each of them -> its row (the next step's inputs for a placeholder come from there).
    ``members``: ids of every sequence of the plan. ``release``: sequences that finished or
    were aborted after it was launched, their blocks and state slot kept until it is done.
    ``final``: ids of those whose sample in it is their last (max_tokens or the context
    reached, whatever the token): out of the queues since its launch, so that no later step
    gives them a row, still to be emitted. ``sync``: read its samples right after launching
    it (the next plan needs them)."""

    plan: SchedulerOutput
    sampling: list
    sampled: object  # afd.sampler.SamplerOutput, device_tokens set
    host: HostTokens
    rows: dict[int, int]
    members: set[int]
    release: list[Sequence] = field(default_factory=list)
    final: set[int] = field(default_factory=set)
    sync: bool = False


def _take_one(seq: Sequence, token: int, logprobs) -> tuple:
    """A one-row step's sample for ``seq``: appended, or (a negative id) this request failed,
    not the rank. (seq, new tokens, their logprobs or None, error or None, None)."""
    if token < 0:
        return seq, [], None, _row_error(token, seq), None
    seq.append(token)
    return seq, [token], None if logprobs is None else [logprobs], None, None


class EngineCore:
    """``prefill_only``: a prefill rank's core. A sequence that has its first token is parked
    (blocks kept, no more steps) until its KV moves to a decode rank (``release``).

    ``cfg.async_scheduling`` (the single-process engine, attention ranks without FFN ranks,
    P/D decode ranks among them):
    ``step`` launches step N + 1 before reading step N's samples (``execute_async``). After
    launching a step, every sequence that samples in it is advanced as if its sample were
    known: ``Scheduler.update`` counts its tokens computed and it holds ``PLACEHOLDER`` as its
    last token, so the next plan decodes that position; the runner takes its input id from
    the step's samples on the device. The host then reads the previous step's samples
    (waiting for that step alone), puts each in its placeholder's place and emits the
    outputs, the stops it finds one step late: a sequence that stopped in step N has a row
    in step N + 1 (launched already), which is dropped; it leaves the queues at once and its
    blocks are freed once N + 1 is done. A step whose next plan needs its samples on the host
    (a sampling sequence with penalties, bad_words or a grammar: ``Sequence.reads_outputs``;
    prompt logprobs scored in it) is read right after its launch. A sequence whose sample is
    its last by length leaves the queues when that step is launched (no dropped row)."""

    closed = False  # ``shutdown``
    _inflight: InFlight | None = None  # async scheduling: the step launched, not yet read

    def __init__(self, model: MoEModel, cfg: EngineConfig, experts: ExpertPath | None = None,
                 prefill_only: bool = False):
        self.cfg = cfg
        self.runner = ModelRunner(model, cfg, experts, decodes=not prefill_only)
        # the prefix cache's host tier: this rank's own, as its device cache
        self.host = (HostKVTier(cfg.num_offload_blocks, cfg.block_size, self.runner.kv_caches,
                                kv_block_dim(model.cfg))
                     if cfg.num_offload_blocks and cfg.enable_prefix_caching else None)
        self.allocator = BlockPool(cfg.num_kv_blocks, cfg.block_size, cfg.enable_prefix_caching,
                                   on_evict=self.host.evicted if self.host else None)
        # MiMo-V2-Flash's sliding layers: their own pool, the runner's caches' (afd.window_pool)
        self.window = (WindowPool(cfg.num_window_blocks, cfg.block_size,
                                  model.cfg.mimo.sliding_window, cfg.enable_prefix_caching)
                       if self.runner.window_blocks else None)
        # a hybrid model's prefix cache: snapshots of its linear layers' states, in the
        # runner's state tensors after the sequences' slots (afd.state_snapshots)
        self.snapshots = None
        if self.runner.state_snapshots and cfg.enable_prefix_caching:
            self.snapshots = StateSnapshots(self.runner.state_slots,
                                            self.runner.state_snapshots)
            self.allocator.on_forget = self.snapshots.drop
        self.scheduler = Scheduler(self.allocator, cfg.max_num_seqs, cfg.max_num_batched_tokens,
                                   None if prefill_only else cfg.speculative,
                                   cfg.scheduling_policy, host=self.host,
                                   mtp_kv=cfg.mtp,  # the runner writes the MTP layer's KV
                                   # a hybrid model's linear layers: the runner's state slots
                                   state_slots=self.runner.state_slots, window=self.window,
                                   snapshots=self.snapshots)
        self.seqs: dict[str, Sequence] = {}
        self.prefill_only = prefill_only
        if cfg.async_scheduling and (prefill_only or self.runner.collective):
            raise ValueError("async_scheduling=True on a prefill rank or a rank of a layout "
                             "with FFN ranks: they step synchronously (workers.core_config "
                             "turns it off on prefill ranks)")
        self.newly_parked: list[Sequence] = []
        self._ready: list[CoreOutput] = []  # async: outputs read outside a step, for the next
        self._grammars = None  # afd.structured_output.GrammarCompiler, at first use
        self.events: CacheEvents | None = None  # KV cache events (``record_kv_events``)

    def record_kv_events(self) -> None:
        """Record what this rank's prefix cache (device pool and host tier) stores, evicts and
        clears, for the front end's router (``take_kv_events``). No-op with caching off."""
        if not self.cfg.enable_prefix_caching or self.events is not None:
            return
        self.events = CacheEvents(self.allocator._by_key,
                                  self.host._by_key if self.host is not None else None)
        self.allocator.events = self.events
        if self.host is not None:
            self.host.events = self.events

    @property
    def kv_events_pending(self) -> bool:
        return self.events is not None and self.events.pending

    def take_kv_events(self, limit: int) -> list[tuple[int, list[int], list[int]]]:
        """The KV cache events since the last call, in batches of at most ``limit`` digests:
        (resets, removed, stored) each (afd.block_pool.CacheEvents.take); none if not recorded."""
        return [] if self.events is None else self.events.take(limit)

    def attach_grammar(self, seq: Sequence) -> None:
        """Give a structured-output sequence its matcher, advanced over the output it already
        has (a sequence this rank takes over). ParamError if the grammar does not build."""
        so = seq.params.structured_outputs
        if so is None:
            return
        if self._grammars is None:
            from afd.structured_output import GrammarCompiler

            self._grammars = GrammarCompiler(self.cfg.tokenizer or self.cfg.model,
                                             self.runner.model.cfg.vocab_size,
                                             self.cfg.trust_remote_code)
        seq.grammar = self._grammars.state(so, seq.grammar_eos,
                                           seq.params.reasoning_end_token_ids)
        seq.grammar.replay(seq.token_ids[seq.num_prompt_tokens:])

    def add_request(self, req: CoreRequest) -> None:
        self.check_open()
        if req.request_id in self.seqs:
            raise ValueError(f"request_id {req.request_id!r} is already running")
        seq = Sequence(req, self.cfg.max_model_len)
        self.attach_grammar(seq)
        self.seqs[req.request_id] = seq
        self.scheduler.add(seq)

    def add_or_refuse(self, req: CoreRequest) -> list[CoreOutput]:
        """Queue a request a rank was sent; a bad one (a duplicate id, or one the front end's
        ``check_token_ids`` refuses: only a forged message) fails alone. The single-process
        engine calls ``add_request``: its front end checked the request, once for all n."""
        try:
            check_token_ids(req.prompt_token_ids, req.params, self.runner.model.cfg.vocab_size,
                            self.cfg.max_model_len)
            self.add_request(req)
        except ValueError as exc:
            return [CoreOutput(req.request_id, [], "error", None, str(exc))]
        return []

    def abort(self, request_ids: list[str]) -> None:
        for rid in request_ids:
            seq = self.seqs.pop(rid, None)
            if seq is not None:
                self._retire(seq)
        if self._ready:  # async scheduling: read already, not emitted (nothing after an abort:
            # the id may be taken again at once, and outputs go by request id)
            gone = set(request_ids)
            self._ready = [out for out in self._ready if out.request_id not in gone]
        if self._inflight is not None:  # async scheduling
            self._ready += self._drain_if_idle()

    def _retire(self, seq: Sequence) -> None:
        """Take a finished or aborted sequence out (``Scheduler.finish``); one that the step
        in flight (async scheduling) still computes keeps its blocks until that step is read."""
        inflight = self._inflight
        if inflight is not None and id(seq) in inflight.members:
            self.scheduler.detach(seq)
            inflight.release.append(seq)
        else:
            self.scheduler.finish(seq)

    def has_unfinished(self) -> bool:
        return (self.scheduler.has_unfinished() or self._inflight is not None
                or bool(self._ready))

    def step(self) -> list[CoreOutput]:
        self.check_open()
        if self.cfg.async_scheduling:
            return self.execute_async(self.scheduler.schedule())
        return self.execute(self.scheduler.schedule())

    # ---- async scheduling ------------------------------------------------------------------
    @property
    def in_flight(self) -> bool:
        """Async scheduling: is a step launched whose samples are not read yet (so a step,
        even of an empty plan, has outputs to give)?"""
        return self._inflight is not None or bool(self._ready)

    def execute_async(self, plan: SchedulerOutput) -> list[CoreOutput]:
        """Async scheduling's step (``step``, or an attention rank's loop, which schedules
        itself): launch ``plan`` (step N + 1; possibly empty), then read and emit step N, the
        one in flight."""
        outputs = self._step_async(plan)
        if self._ready:
            outputs, self._ready = self._ready + outputs, []
        return outputs

    def _step_async(self, plan: SchedulerOutput) -> list[CoreOutput]:
        prev = self._inflight
        launched = None
        if not plan.empty:
            self.flush_offloads()
            self.flush_state_copies()  # the plan's snapshot restores, into the slots it reads
            launched = self._launch(plan, prev)
        self._inflight = launched  # sequences N finishes that N + 1 computes: freed after it
        outputs = self._read(prev) if prev is not None else []
        if launched is not None:
            self._advance(launched)
            if launched.sync:
                self._inflight = None
                outputs += self._read(launched)
        return outputs + self._drain_if_idle()

    def _drain_if_idle(self) -> list[CoreOutput]:
        """With nothing left to schedule, read the step in flight now (what remains in it:
        retired sequences' rows, and the last tokens of ``InFlight.final`` ones), so that its
        blocks come back, and those tokens out, without waiting for a further step: a caller
        with no request left makes none, and a rank's loop idles."""
        step = self._inflight
        if step is None or self.scheduler.has_unfinished():
            return []
        self._inflight = None
        return self._read(step)

    def _launch(self, plan: SchedulerOutput, prev: InFlight | None) -> InFlight:
        sampling = [s for s in plan.seqs if s.samples]  # before the counts move
        placeholders = []
        if prev is not None:
            for i, s in enumerate(plan.seqs):
                row = prev.rows.get(id(s.seq))
                # (a sequence that sampled in prev and is scheduled again decodes its sample)
                if row is not None and s.seq.status is Status.RUNNING:
                    placeholders.append((i, row))
        sampled = self.runner.launch(plan, placeholders,
                                     prev.sampled.device_tokens if prev is not None else None)
        sync = bool(sampled.prompt_logprobs) or any(s.seq.reads_outputs for s in sampling)
        return InFlight(plan, sampling, sampled, HostTokens(sampled.device_tokens),
                        {id(s.seq): k for k, s in enumerate(sampling)},
                        {id(s.seq) for s in plan.seqs}, sync=sync)

    def _advance(self, step: InFlight) -> None:
        """After launching ``step``: its tokens count as computed, and each sequence sampling
        in it holds a placeholder for its sample (a sequence retired meanwhile: neither); one
        whose sample is its last leaves the queues (``InFlight.final``)."""
        seqs = step.plan.seqs
        live = [s for s in seqs if s.seq.status is not Status.FINISHED]
        self.scheduler.update(step.plan if len(live) == len(seqs) else SchedulerOutput(live))
        # the snapshots update took (of the states after this step, queued after it), as
        # execute's (else the next launch's flush runs them first, in the same order)
        self.flush_state_copies()
        for s in step.sampling:
            seq = s.seq
            if seq.status is not Status.FINISHED:
                seq.token_ids.append(PLACEHOLDER)
                if len(seq.token_ids) - seq.num_prompt_tokens >= seq.max_output:
                    self.scheduler.detach(seq)
                    step.final.add(id(seq))

    def _read(self, step: InFlight) -> list[CoreOutput]:
        """Read a launched step's samples: each replaces its sequence's placeholder (stops
        checked as ``Sequence.append`` does), outputs as ``execute``'s; then the blocks of the
        sequences retired while it ran are freed."""
        sampled = step.sampled
        tokens = sampled.tokens or step.host.tolist()
        for rid, scored in sampled.prompt_logprobs.items():
            seq = self.seqs.get(rid)
            if seq is not None and id(seq) in step.members:
                seq.add_prompt_logprobs(scored)
        taken = []
        final, live = step.final, self.seqs
        for s, token, logprobs in zip(step.sampling, tokens, sampled.logprobs):
            seq = s.seq
            # stopped a step earlier, or aborted: dropped (a last sample, unless aborted: kept)
            if seq.status is Status.FINISHED and (
                    id(seq) not in final or live.get(seq.request_id) is not seq):
                continue
            assert seq.token_ids[-1] == PLACEHOLDER
            seq.token_ids.pop()
            taken.append(_take_one(seq, token, logprobs))
        outputs = self._outputs(taken)
        for seq in step.release:
            self.scheduler.release(seq)
        return outputs

    def execute(self, plan: SchedulerOutput, micro_batches: int = 1) -> list[CoreOutput]:
        """Run a plan (possibly empty, when other ranks have work) and emit the new tokens."""
        sampling = [s for s in plan.seqs if s.samples]  # before update() moves the counts
        speculating = any(s.draft_token_ids for s in sampling)
        # a speculating seeded sequence's generator, to rewind to what its emitted tokens used
        states = ([s.seq.generator.get_state() if s.draft_token_ids and s.seq.generator else None
                   for s in sampling] if speculating else None)
        self.flush_offloads()  # before the forward writes the blocks the plan reclaimed
        self.flush_state_copies()  # the plan's snapshot restores, into the slots it reads
        sampled = self.runner.execute(plan, micro_batches)
        if sampled.prompt_logprobs:
            for s in plan.seqs:
                scored = sampled.prompt_logprobs.get(s.seq.request_id)
                if scored is not None:
                    s.seq.add_prompt_logprobs(scored)
        if speculating:
            taken = self._verify(sampling, sampled, states)
        else:  # one row per sequence
            taken = [_take_one(s.seq, token, logprobs)
                     for s, token, logprobs in zip(sampling, sampled.tokens, sampled.logprobs)]
        if sampled.draft_tokens:
            self._keep_mtp_drafts(taken, sampled.draft_tokens)
        self.scheduler.update(plan)  # after the appends: accepted drafts' blocks may be cached
        self.flush_state_copies()  # the snapshots update took, before a slot changes hands
        return self._outputs(taken)

    def _outputs(self, taken: list[tuple]) -> list[CoreOutput]:
        """Each sampling sequence's output of a step (``taken``: per sequence (seq, new
        tokens, their logprobs or None, error or None, [drafts, accepted] or None)); the
        finished ones leave, a prefill rank's others are parked."""
        outputs, prefill_only = [], self.prefill_only
        for seq, new, logprobs, error, spec in taken:
            out = CoreOutput(seq.request_id, new, seq.finish_reason, seq.stop_reason, None, None,
                             logprobs)
            if error is not None:
                out.finish_reason, out.stop_reason, out.error = "error", None, error
            elif len(seq.token_ids) - seq.num_prompt_tokens == len(new):  # its first token(s)
                out.prompt_logprobs = seq.take_prompt_logprobs()
                if seq.first_scheduled is not None:
                    out.metrics = {"queue_time": seq.first_scheduled - seq.received,
                                   "prefill_time": (seq.metrics.first_token_time
                                                    - seq.first_scheduled),
                                   "num_cached_tokens": seq.num_cached_tokens or 0}
            if spec is not None:  # this step's drafts and how many were accepted
                out.metrics = {**(out.metrics or {}), "spec": spec}
            preempted = seq.metrics.num_preemptions - seq.reported_preemptions
            if preempted:  # since its last output (counted here, on the sequence it holds)
                seq.reported_preemptions = seq.metrics.num_preemptions
                out.metrics = {**(out.metrics or {}), "num_preemptions": preempted}
            outputs.append(out)
            if out.finish_reason is not None:
                self._retire(seq)
                del self.seqs[seq.request_id]
            elif prefill_only:
                self.scheduler.park(seq)
                self.newly_parked.append(seq)
        return outputs

    @staticmethod
    def _verify(sampling: list, sampled, states: list) -> list[tuple]:
        """Speculative decoding: accept each sequence's drafts up to its first differing sample
        and append the emitted tokens; per sequence (seq, new tokens, their logprobs or None,
        error or None, [drafts, accepted] or None)."""
        taken, row = [], 0
        for s, state in zip(sampling, states):
            seq, drafts = s.seq, s.draft_token_ids
            tokens = sampled.tokens[row:row + len(drafts) + 1]
            logprobs = sampled.logprobs[row:row + len(drafts) + 1]
            row += len(drafts) + 1
            used = accept(tokens, drafts)  # 1 without drafts
            if drafts:
                rewind(seq.generator, state, used)
            new, error = [], None
            for token in tokens[:used]:  # stops as the one-token steps would have
                if token < 0:  # fail this request, not the rank
                    error = _row_error(token, seq, len(new) if drafts else None)
                    break
                seq.append(token)
                new.append(token)
                if seq.finish_reason is not None:
                    break
            if drafts:
                # KV stays computed for the last token and the drafts emitted before the final
                # new token, not for accepted drafts past a stop (EOS, a stop token): those
                # the sequence never holds
                s.num_rejected = len(drafts) + 1 - len(new)
                # drafts its samples took: the emitted ones up to the first differing row (a
                # stop on an accepted draft ends the output there, yet it was accepted)
                s.num_accepted = min(len(new), used - 1)
            logprobs = logprobs[:len(new)]
            taken.append((seq, new, None if not logprobs or logprobs[0] is None else logprobs,
                          error, [len(drafts), s.num_accepted] if drafts else None))
        return taken

    @staticmethod
    def _keep_mtp_drafts(taken: list[tuple], draft_tokens: list[list[int]]) -> None:
        """MTP: each sequence's drafts for its next step, which the MTP layer made after the
        last token it emitted (``draft_tokens``: per sampling sequence; none kept once it
        finished)."""
        for (seq, new, *_rest), drafts in zip(taken, draft_tokens, strict=True):
            if new and seq.finish_reason is None:
                seq.mtp_drafts = drafts
                seq.mtp_drafts_for = len(seq.token_ids)

    def flush_offloads(self) -> None:
        """Run the host tier's pending copies: before anything writes the device blocks that
        were reclaimed since the last call (the step's forward, a KV transfer)."""
        if self.host is not None:
            self.host.flush(self.runner.kv_caches)

    def flush_state_copies(self) -> None:
        """Run the state snapshots' pending copies (afd.state_snapshots) on the runner's
        linear-attention state tensors, in order."""
        if self.snapshots is not None and self.snapshots.copies:
            self.runner.copy_states(self.snapshots.take_copies())

    def release(self, request_id: str) -> Sequence | None:
        """Free a parked sequence (its KV was sent, or is no longer wanted)."""
        seq = self.seqs.pop(request_id, None)
        if seq is not None:
            self.scheduler.finish(seq)
        return seq

    def add_transferred(self, seq: Sequence) -> None:
        """A sequence prefilled elsewhere, its KV already in this rank's blocks (never put in
        this rank's prefix cache: what arrived was not computed here). Its prompt logprobs,
        if asked for, went to the front end from where it was prefilled. ParamError if its
        grammar does not build here (the caller frees its blocks)."""
        self.attach_grammar(seq)
        seq.cacheable = False
        seq.skip_prompt_logprobs()
        self.seqs[seq.request_id] = seq
        self.scheduler.add_running(seq)

    def stats(self) -> list[CoreStats]:
        """One entry per attention rank (here, this one)."""
        return [CoreStats(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            kv_usage=self.allocator.usage,
            num_free_blocks=self.allocator.num_free,
            num_preemptions=self.scheduler.num_preemptions,
            prefix_cache_queries=self.scheduler.prefix_cache_queries,
            prefix_cache_hits=self.scheduler.prefix_cache_hits,
            prefix_cache_host_hits=self.scheduler.prefix_cache_host_hits,
            num_waiting_blocks=self.scheduler.waiting_blocks(),
            num_draft_tokens=self.scheduler.num_draft_tokens,
            num_accepted_tokens=self.scheduler.num_accepted_tokens,
            num_drafts=self.scheduler.num_drafts,
            num_accepted_per_pos=list(self.scheduler.num_accepted_per_pos),
            num_free_window_blocks=self.window.num_free if self.window is not None else 0,
            num_window_blocks=self.window.num_blocks if self.window is not None else 0,
            num_free_state_slots=len(self.scheduler.free_state_slots or ()),
        )]

    def prefix_cache_stats(self) -> PrefixCacheStats:
        s = self.scheduler  # its counters alone (stats() also walks the waiting queue)
        return PrefixCacheStats(s.prefix_cache_queries, s.prefix_cache_hits,
                                s.prefix_cache_host_hits)

    def reset_prefix_cache(self) -> None:
        """Forget every cached block, the host tier's too; running sequences keep theirs, and
        their full blocks are offered to the cache again at their next step."""
        self.flush_offloads()  # restores planned but not run (none between steps) still land
        self.flush_state_copies()
        self.allocator.reset()
        if self.snapshots is not None:
            self.snapshots.clear()
        if self.window is not None:
            self.window.pool.reset()
        if self.host is not None:
            self.host.reset()
        if self.events is not None:
            self.events.clear()
        for seq in self.seqs.values():
            seq.num_cached_blocks = 0

    # ---- expert load record (afd.expert_load) ---------------------------------------------
    def load_recorder(self) -> ExpertLoadRecorder:
        if self.runner.load_record is None:
            raise NoExpertLoadRecord("the model has no routed experts: no expert load to record")
        return self.runner.load_record

    def start_expert_load_record(self) -> None:
        self.load_recorder().start()

    def stop_expert_load_record(self) -> None:
        self.load_recorder().stop()

    def expert_load_record(self) -> dict:
        rec = self.load_recorder()
        return sum_records([rec.snapshot()], rec.num_layers, rec.num_experts)

    def rebalance_experts(self, record: dict | None = None, placement=None) -> dict:
        raise ValueError("rebalance_experts needs FFN ranks (ffn >= 1): the single-process "
                         "engine holds every expert, there is nothing to place")

    def shutdown(self) -> None:
        pass

    def close(self) -> None:
        """``LLM.shutdown`` of the single process: give back what it holds, as a multi-rank
        engine's processes do when they exit: every request is dropped, and the model, its KV
        cache, CUDA graphs and host tier are released (GPU memory returned to the caching
        allocator's free pool and emptied), so the caller's process can start another engine
        while keeping this one's ``LLM`` object. ``add_request`` and ``step`` raise
        RuntimeError after. (``shutdown``, what a server's AsyncEngine calls on the front end
        it wraps, releases nothing: the process is ending.)"""
        if self.closed:
            return
        self.abort(list(self.seqs))
        self.closed = True
        device = self.cfg.device
        self.runner = self.host = self._grammars = None
        self.scheduler.host = None
        self.allocator.on_evict = None
        gc.collect()  # the model's modules refer to each other
        if torch.device(device).type == "cuda" and torch.cuda.is_available():
            torch.cuda.empty_cache()

    def check_open(self) -> None:
        if self.closed:
            raise RuntimeError("the engine was shut down: its model and KV cache are released; "
                               "start a new one")

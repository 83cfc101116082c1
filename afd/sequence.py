"""Core-side state of one sequence: its tokens, how many are in the KV cache, its blocks."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Literal, TypedDict

import msgspec

from afd.block_pool import BlockKeys
from afd.outputs import RequestMetrics
from afd.penalties import PenaltyState
from afd.sampler import PromptLogprobs
from afd.sampling_params import SamplingParams, TokenId

if TYPE_CHECKING:  # torch imported where used: the HTTP front end imports this module
    import torch


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PARKED = "parked"  # prefilled on a prefill rank, KV held until it moves to a decode rank
    FINISHED = "finished"


@dataclass
class CoreRequest:
    """What the front end hands a core: token ids and sampling rules, no text."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    eos_token_ids: tuple[int, ...] = ()
    arrival_time: float = field(default_factory=time.monotonic)
    # scheduling_policy "priority": lower values are served first (vLLM's); 0 under "fcfs"
    priority: int = 0
    # vLLM's per-tenant prefix-cache isolation: mixed into the first block's key (so into every
    # key after it): requests with different salts never share cached blocks
    cache_salt: str | None = None


class StepMetrics(TypedDict, total=False):
    """What a core says of a request beside its tokens (``CoreOutput.metrics``), seconds and
    counts: with its first token, queue_time, prefill_time and num_cached_tokens; transfer_time
    (the front end adds it in P/D); spec: [drafts, accepted] of a speculative step;
    num_preemptions: the sequence's preemptions since its last output."""

    queue_time: float
    prefill_time: float
    transfer_time: float
    num_cached_tokens: Annotated[int, msgspec.Meta(ge=0)]
    spec: tuple[Annotated[int, msgspec.Meta(ge=0)], Annotated[int, msgspec.Meta(ge=0)]]
    num_preemptions: Annotated[int, msgspec.Meta(ge=0)]


class CoreOutput(msgspec.Struct, array_like=True, gc=False):
    """New tokens of one sequence from one step, and whether (and why) it finished.

    A rank sends it to the front end as one array of these fields in this order, checked
    against these types on arrival (afd.protocol). (gc=False: it holds no reference cycle, and
    a step makes one per running request.)"""

    request_id: str
    new_token_ids: list[TokenId]
    finish_reason: Literal["stop", "length", "abort", "error"] | None = None
    stop_reason: int | str | None = None
    error: str | None = None
    metrics: StepMetrics | None = None
    # per new token, when its params ask: (token ids, logprobs, rank of the sampled token) with
    # the sampled token first (afd.sampler.SamplerOutput)
    logprobs: list[tuple[Annotated[list[TokenId], msgspec.Meta(min_length=1)],
                         Annotated[list[float], msgspec.Meta(min_length=1)], int]] | None = None
    # with the first token, when its params ask for prompt_logprobs: the prompt's, all of them
    prompt_logprobs: PromptLogprobs | None = None


class Sequence:
    def __init__(self, req: CoreRequest, max_model_len: int):
        import torch

        self.request_id = req.request_id
        self.token_ids: list[int] = list(req.prompt_token_ids)
        self.num_prompt_tokens = len(req.prompt_token_ids)
        self.num_computed_tokens = 0  # tokens whose KV is in the cache
        self.block_ids: list[int] = []
        # prefix cache (afd.block_pool): keys of the full blocks of token_ids (grown on demand),
        # how many leading blocks of block_ids are in the cache already, and whether this
        # sequence's KV may be cached at all (not KV received from another rank, which this
        # rank did not compute)
        self.block_keys = BlockKeys(req.cache_salt)
        self.num_cached_blocks = 0
        # a hybrid model's linear-attention state slot while running (afd.scheduler), else None
        self.state_slot: int | None = None
        # with state snapshots (afd.state_snapshots): the block boundaries (token counts) still
        # ahead where its state is to be snapshotted, ascending, set at each admission
        self.snapshot_targets: list[int] = []
        # with a window pool (afd.window_pool) the sliding layers' block table, as long as
        # block_ids, its blocks out of every window the pool's null block; else None
        self.window_block_ids: list[int] | None = None
        self.cacheable = True
        self.num_cached_tokens: int | None = None  # prompt tokens the first admission reused
        self.status = Status.WAITING
        self.params = req.params
        self.priority = req.priority
        self.eos_token_ids = () if req.params.ignore_eos else tuple(req.eos_token_ids)
        self.stop_token_ids = set(req.params.stop_token_ids)
        limit = max_model_len - self.num_prompt_tokens
        self.max_output = limit if req.params.max_tokens is None else min(req.params.max_tokens,
                                                                          limit)
        self.metrics = RequestMetrics(arrival_time=req.arrival_time)
        self.reported_preemptions = 0  # of metrics.num_preemptions, those sent with an output
        self.received = time.monotonic()  # this rank's clock (arrival_time is the front's)
        self.first_scheduled: float | None = None
        self.generator: torch.Generator | None = None
        if req.params.seed is not None and not req.params.greedy:
            self.generator = torch.Generator().manual_seed(req.params.seed)
        # the sampler's per-step penalty bookkeeping (dropped with the sequence)
        self.penalties = PenaltyState() if req.params.penalized else None
        # does sampling it read its output tokens on the host (penalties, bad_words, a
        # grammar; a thinking_token_budget while the thinking lasts: ``reads_outputs``)?
        self._reads_outputs = bool(req.params.penalized or req.params.bad_words_token_ids
                                   or req.params.structured_outputs is not None)
        # thinking_token_budget: output tokens scanned for a reasoning end id so far, and
        # whether one came (``thinking``)
        self._think_scanned = self.num_prompt_tokens
        self._think_ended = req.params.thinking_token_budget is None
        # structured output: the grammar's matcher (afd.structured_output.GrammarState), set by
        # the core of the rank that samples this sequence; it ends in the model's EOS ids,
        # ignore_eos or not
        self.grammar = None
        # speculative decoding: the token ids as a numpy array (afd.spec_decode.TokenArray),
        # for the n-gram lookup, made at the first lookup
        self.token_array = None
        # MTP speculative decoding: the drafts the MTP layer made after the step that left
        # this sequence with ``mtp_drafts_for`` tokens (stale, and unused, once it has more)
        self.mtp_drafts: list[int] = []
        self.mtp_drafts_for = -1
        self.grammar_eos = tuple(req.eos_token_ids)
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        # prompt logprobs (params.prompt_logprobs): those of prompt tokens 1..n scored so far,
        # kept until they leave with the first token. The scheduler takes cached KV only for
        # positions already scored, since a cached block gives no logits.
        self.prompt_logprobs: PromptLogprobs | None = None
        self.num_prompt_logprobs = 0
        if req.params.prompt_logprobs is not None:
            self.prompt_logprobs = PromptLogprobs(req.params.prompt_logprobs)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def prompt_logprobs_pending(self) -> bool:
        """Does it still need logits at prompt positions (for prompt_logprobs)?"""
        return (self.params.prompt_logprobs is not None
                and self.num_prompt_logprobs < self.num_prompt_tokens - 1)

    def add_prompt_logprobs(self, scored: PromptLogprobs) -> None:
        """Keep the prompt logprobs of the next scored positions (they come in order)."""
        self.prompt_logprobs.extend(scored)
        self.num_prompt_logprobs += len(scored)

    def take_prompt_logprobs(self) -> PromptLogprobs | None:
        """The finished prompt logprobs, once (they leave with the first token)."""
        if self.prompt_logprobs_pending:
            return None
        out, self.prompt_logprobs = self.prompt_logprobs, None
        return out

    def skip_prompt_logprobs(self) -> None:
        """Computed elsewhere (a P/D prefill rank): never compute or send them here."""
        self.num_prompt_logprobs = max(0, self.num_prompt_tokens - 1)
        self.prompt_logprobs = None

    @property
    def reads_outputs(self) -> bool:
        """Does sampling it read its output tokens on the host? Async scheduling (afd.core)
        reads such a sequence's samples right after their step's launch. A budget's
        sequence does while its thinking is open (as last found by ``thinking``, which the
        step's rows ask before this): so ``thinking`` never scans a placeholder."""
        return self._reads_outputs or not self._think_ended

    def thinking(self) -> bool:
        """thinking_token_budget: is the reasoning still open (no reasoning end id among the
        output tokens)? Scans only the tokens added since the last call."""
        if not self._think_ended:
            ends = self.params.reasoning_end_token_ids
            self._think_ended = any(t in ends for t in self.token_ids[self._think_scanned:])
            self._think_scanned = len(self.token_ids)
        return not self._think_ended

    def budget_room(self) -> int | None:
        """thinking_token_budget: how many more tokens the open reasoning may take before the
        one forced to end it (drafts stop there); None without a budget or once it ended."""
        if not self.thinking():
            return None
        return max(0, self.params.thinking_token_budget - self.num_output_tokens)

    def forced_token(self, drafts=()) -> int | None:
        """thinking_token_budget: the token the row after ``drafts`` must take, the first
        reasoning end id, where that row is the budget's position and no end id came before
        it (output or drafts); else None."""
        room = self.budget_room()
        if room is None or room != len(drafts):
            return None
        ends = self.params.reasoning_end_token_ids
        return None if any(t in ends for t in drafts) else ends[0]

    def append(self, token: int) -> None:
        """Add a sampled token and decide whether the sequence is done."""
        token_ids = self.token_ids
        token_ids.append(token)
        num_output = len(token_ids) - self.num_prompt_tokens
        now = time.monotonic()
        metrics = self.metrics
        if metrics.first_token_time is None:
            metrics.first_token_time = now
        metrics.last_token_time = now
        metrics.num_generated_tokens = num_output
        grammar = self.grammar
        if grammar is not None:
            grammar.accept(token)
        if token in self.eos_token_ids:
            self.finish_reason = "stop"
        elif token in self.stop_token_ids:
            self.finish_reason, self.stop_reason = "stop", token
        elif grammar is not None and grammar.finished:  # nothing can follow
            self.finish_reason = "stop"
        elif num_output >= self.max_output:
            self.finish_reason = "length"

"""What generate() returns, with vLLM's field names."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RequestMetrics:
    """Per-request timing (seconds, time.monotonic clock) and derived latencies."""

    arrival_time: float
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None
    queue_time: float | None = None  # waiting in a rank's queue before its first step
    # from its first step to its first token, on the rank that prefilled it (vLLM's prefill
    # time: chunks, other sequences' steps between them and preemptions included)
    prefill_time: float | None = None
    transfer_time: float | None = None  # P/D: prompt KV moved from a prefill rank to decode
    num_generated_tokens: int = 0
    num_preemptions: int = 0
    # speculative decoding: draft tokens verified for this request (all its completions), and
    # of those accepted
    spec_num_draft_tokens: int = 0
    spec_num_accepted_tokens: int = 0

    @property
    def time_in_queue(self) -> float | None:
        return self.queue_time

    @property
    def ttft(self) -> float | None:
        """Time to first token."""
        if self.first_token_time is None:
            return None
        return self.first_token_time - self.arrival_time

    @property
    def tpot(self) -> float | None:
        """Mean time per output token after the first."""
        if self.first_token_time is None or self.last_token_time is None:
            return None
        if self.num_generated_tokens < 2:
            return 0.0
        return (self.last_token_time - self.first_token_time) / (self.num_generated_tokens - 1)


@dataclass
class Logprob:
    """One token's log probability under the model's raw distribution, its rank there (1: the
    likeliest) and its text decoded alone."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class CompletionOutput:
    """One completion of a request. With ``SamplingParams.output_kind`` DELTA, ``text``,
    ``token_ids`` and ``logprobs`` hold only what is new since the completion's last output
    (``cumulative_logprob`` stays the running sum); otherwise all of it so far."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop", "length", "abort", "error" or None while running
    stop_reason: int | str | None = None  # the stop string or stop token id that ended it
    # With SamplingParams.logprobs = k: the sum of the sampled tokens' logprobs, and per token
    # {token id: Logprob} for the sampled token and the k likeliest (k + 1 entries at most).
    cumulative_logprob: float | None = None
    logprobs: list[dict[int, Logprob]] | None = None

    def finished(self) -> bool:
        """Whether this completion has ended (vLLM's method: ``finish_reason`` is set)."""
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    """A request's output after a step (``SamplingParams.output_kind``: CUMULATIVE, each step
    with everything so far; DELTA, each step with what is new, ``outputs`` listing the
    completions still running and those that finished since, ``prompt_logprobs`` in the first
    output that has them; FINAL_ONLY, one output when it finishes)."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics | None = None
    error: str | None = field(default=None)  # set when finish_reason is "error"
    # prompt tokens whose KV came from the prefix cache (the most any completion reused), set
    # with the first token, as vLLM's
    num_cached_tokens: int | None = None
    # With SamplingParams.prompt_logprobs = k: one entry per prompt token, None for the first
    # (nothing before it scores it), then {token id: Logprob} for the prompt token and the k
    # likeliest at its position (vLLM's shape); set with the first output
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None

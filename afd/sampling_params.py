"""Sampling parameters with vLLM's field names; every bad value is a ValueError naming the field."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


class ParamError(ValueError):
    """A bad argument: ``param`` names the field (the HTTP server puts it in the error body)."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


@dataclass
class SamplingParams:
    """How to sample one prompt's completions.

    n: completions per prompt. max_tokens: new tokens at most (None: up to the context limit).
    temperature: 0 means greedy. top_p in (0, 1]; top_k: 0 or -1 disables; min_p in [0, 1].
    seed: per-request seed, reproducible whatever else is in the batch.
    stop: strings that end the completion (not included in the text).
    stop_token_ids: token ids that end the completion. ignore_eos: keep going past EOS.
    skip_special_tokens: leave special tokens out of the text.
    include_stop_str_in_output: keep the matched stop string in the text.
    """

    n: int = 1
    max_tokens: int | None = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        self.validate()

    def validate(self) -> None:
        def bad(name: str, value: Any, limit: str) -> ParamError:
            return ParamError(name, f"{name} must be {limit}, got {value!r}")

        def is_int(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        def is_num(v: Any) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool)

        if not is_int(self.n) or self.n < 1:
            raise bad("n", self.n, "an integer >= 1")
        if self.max_tokens is not None and (not is_int(self.max_tokens) or self.max_tokens < 1):
            raise bad("max_tokens", self.max_tokens, "an integer >= 1")
        if not is_num(self.temperature) or not self.temperature >= 0:
            raise bad("temperature", self.temperature, ">= 0")
        if not is_num(self.top_p) or not 0 < self.top_p <= 1:
            raise bad("top_p", self.top_p, "in (0, 1]")
        if not is_int(self.top_k) or self.top_k < -1:
            raise bad("top_k", self.top_k, "-1, 0 (disabled) or a positive integer")
        if not is_num(self.min_p) or not 0 <= self.min_p <= 1:
            raise bad("min_p", self.min_p, "in [0, 1]")
        if self.seed is not None and not is_int(self.seed):
            raise bad("seed", self.seed, "an integer or None")
        if not all(isinstance(s, str) and s for s in self.stop):
            raise bad("stop", self.stop, "a non-empty string or a list of them")
        if not all(is_int(t) and t >= 0 for t in self.stop_token_ids):
            raise bad("stop_token_ids", self.stop_token_ids, "a list of non-negative integers")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("extra")
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SamplingParams":
        return cls(**d)

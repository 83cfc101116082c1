"""Shared by the FP8 KV cache tests (tests/test_kv_cache_fp8.py, tests/test_hybrid_fp8kv.py):
the reference's rounded KV write and the comparison of an FP8-cache engine's outputs with it."""

from __future__ import annotations

import torch

from kernels.fp8 import FP8_DTYPE, to_kv_cache


def qdq(x: torch.Tensor, cache_dtype: torch.dtype) -> torch.Tensor:
    """The reference's KV write: rounded through FP8 as the FP8 cache stores it, kept in the
    (fp32) cache's dtype."""
    return to_kv_cache(x, FP8_DTYPE).to(cache_dtype)


def logprob_rows(outs) -> list[list[dict[int, float]]]:
    return [[{t: e.logprob for t, e in step.items()} for step in o.outputs[0].logprobs]
            for o in outs]


def assert_rounded_reference(got, want, outs, ref_outs, plain_outs) -> None:
    """The FP8 cache's tokens (``got``) are the rounded fp32 reference's (``want``), every
    step's logprobs within 1e-5 of it; and not vacuous: they differ from the plain fp32
    cache's (``plain_outs``)."""
    assert got == want
    for mine, ref in zip(logprob_rows(outs), logprob_rows(ref_outs)):
        for a, b in zip(mine, ref):
            assert a.keys() == b.keys()
            assert max(abs(a[t] - b[t]) for t in a) < 1e-5
    diff = max(abs(a[t] - b[t]) for mine, fp32 in zip(logprob_rows(outs), logprob_rows(plain_outs))
               for a, b in zip(mine, fp32) for t in a.keys() & b.keys())
    assert diff > 1e-6, "the FP8 cache rounded nothing"

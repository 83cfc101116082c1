"""The serving soak (slow; run with ``pytest -m slow``): 2,000 requests at concurrency 64
through 1P+1A+1F, no failure, every greedy output equal to the single-process engine's."""

from __future__ import annotations

import os
import sys

import pytest

# appended, not prepended: bench/kernels.py must not shadow the kernels package
sys.path.append(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                             "bench"))
from soak import soak  # noqa: E402


@pytest.mark.slow
def test_soak_2000_requests_1p1a1f():
    result = soak(num_prompts=2000, max_concurrency=64, layout="1,1,1")
    assert result["completed"] == 2000 and not result.get("failed")
    assert result["outputs_checked"] == 2000 and result["outputs_mismatched"] == 0, \
        result.get("mismatches")
    assert not result["processes_left"]

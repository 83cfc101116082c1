"""The offline API as a vLLM user calls it (``from vllm import LLM, SamplingParams``): the
keywords and shapes that code written for vLLM passes, on the embedded tiny model."""

from __future__ import annotations

import pytest

from afd import LLM, SamplingParams


@pytest.fixture(scope="module")
def llm():
    with LLM(seed=0) as engine:
        yield engine


GREEDY = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)


def test_unknown_constructor_keyword_names_llm_and_the_keyword():
    """A keyword no part of the engine takes is a TypeError from ``LLM()`` itself, before
    anything loads, with vLLM's parallelism sizes pointed at the layout and a typo at the
    nearest name (it was resolve_engine_config()'s TypeError, after loading the tokenizer)."""
    with pytest.raises(TypeError, match=r"LLM\(\) .*'tensor_parallel_size'.*attention=") as err:
        LLM(tensor_parallel_size=2)
    assert "resolve_engine_config" not in str(err.value)
    with pytest.raises(TypeError, match=r"LLM\(\) .*'max_num_seq'.*'max_num_seqs'"):
        LLM(max_num_seq=8)

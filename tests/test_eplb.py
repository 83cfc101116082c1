"""Expert load records (afd.expert_load) and placements computed from them (afd.eplb)."""

from __future__ import annotations

import json

import pytest
import torch

from afd import LLM, SamplingParams
from afd.expert_load import ExpertLoadRecorder, NoExpertLoadRecord

# the embedded tiny DeepSeek-V3: 4 decoder layers (layer 0 dense), 16 experts, top-4
LAYERS, EXPERTS, TOP_K = 4, 16, 4
PROMPTS = [{"prompt_token_ids": list(range(5 + 7 * i, 5 + 7 * i + n))}
           for i, n in enumerate((9, 17, 4))]
PARAMS = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
# tokens that go through the model: every prompt token, then every output token but the last
TOKENS = sum(len(p["prompt_token_ids"]) + PARAMS.max_tokens - 1 for p in PROMPTS)


def test_recorder_counts_topk_ids_and_skips_minus_one():
    rec = ExpertLoadRecorder(2, 4, torch.device("cpu"))
    assert rec.snapshot() is None  # never started
    rec.start()
    rec.add(1, torch.tensor([[0, 3], [3, -1], [-1, -1]]))
    rec.add(1, torch.tensor([[3, 2]]))
    assert rec.snapshot() == [[0, 0, 0, 0], [1, 0, 1, 3]]
    rec.stop()
    assert rec.snapshot() == [[0, 0, 0, 0], [1, 0, 1, 3]]  # stop keeps the counts
    rec.start()
    assert rec.snapshot() == [[0] * 4, [0] * 4]  # start begins from zero


def record_run(llm: LLM, path=None) -> dict:
    """Generate PROMPTS before, during and after a record; the record."""
    llm.generate(PROMPTS[:1], PARAMS, use_tqdm=False)  # before start: not counted
    llm.start_expert_load_record()
    outs = llm.generate(PROMPTS, PARAMS, use_tqdm=False)
    assert all(len(o.outputs[0].token_ids) == PARAMS.max_tokens for o in outs)
    llm.stop_expert_load_record()
    llm.generate(PROMPTS[1:], PARAMS, use_tqdm=False)  # after stop: not counted
    return llm.dump_expert_load_record(path)


@pytest.fixture(scope="module")
def single_record():
    """The single process's record, eager (enable_prefix_caching off: every prompt token is
    computed, so the counts are exact)."""
    with LLM(enable_prefix_caching=False) as llm:
        with pytest.raises(NoExpertLoadRecord, match="start one first"):
            llm.dump_expert_load_record()
        return record_run(llm)


def test_single_process_record_counts_every_routed_token(single_record, tmp_path):
    record = single_record
    assert record["num_layers"] == LAYERS and record["num_experts"] == EXPERTS
    counts = record["counts"]
    assert counts[0] == [0] * EXPERTS  # dense layer
    assert [sum(row) for row in counts[1:]] == [TOKENS * TOP_K] * (LAYERS - 1)
    assert len({tuple(row) for row in counts[1:]}) > 1  # each layer routes its own way
    # decode steps through the CUDA-graph path (its static buffers, eager on CPU): 3 rows pad
    # to the captured size 4, and the padding row's routing is not counted
    with LLM(enable_prefix_caching=False, enforce_eager=False, cuda_graph_sizes=[4]) as llm:
        assert llm.engine.core.runner.graphs is not None
        path = tmp_path / "load.json"
        assert record_run(llm, path) == record
        assert json.loads(path.read_text()) == record


def test_layout_record_is_the_sum_over_attention_ranks(single_record):
    """Two attention ranks (each counting its own requests) and an FFN rank: the front end's
    sum equals the single process's record (same tokens, same routing)."""
    with LLM(attention=2, ffn=1, enable_prefix_caching=False, timeout_s=30) as llm:
        assert record_run(llm) == single_record

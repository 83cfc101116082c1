"""The KV cache in FP8 (``kv_cache_dtype="fp8"``): e4m3, scale 1.0, values clamped to +-448.

The storage format changes nothing beyond the rounding: the engine with an FP8 cache is
token-identical (greedy, fp32) to the same model whose KV writes are rounded through FP8 but
stored in an fp32 cache (``qdq``), over chunked prefill, preemption and prefix-cache hits, for
MLA (DeepSeek-V3) and GQA (Qwen3-MoE); P/D, MTP drafts, the host tier and the CUDA-graph path
(run eagerly on CPU) work with it. The KV sizing counts one byte an element. Kernels with an
FP8 cache against their references: the ``fp8kv`` cases of tests/test_kernels_*.py.
"""

from __future__ import annotations

import json
import random

import pytest
import torch

import models.attention
from afd import LLM, SamplingParams
from afd.config import bytes_per_block, resolve_engine_config
from afd.kv_memory import FAKE_MEMORY_ENV, activation_reserve, kv_blocks_from_memory
from ckpt_utils import build_hf_model, mixed_prompts, mtp_checkpoint, save_checkpoint
from fp8kv_utils import assert_rounded_reference, qdq
from kernels.fp8 import FP8_MAX, to_kv_cache
from models.config import load_config

FP8 = torch.float8_e4m3fn
NEW_TOKENS = 16
# 30 blocks of 4 tokens cannot hold all 8 sequences: later ones are preempted and recomputed;
# 16-token steps split the longer prompts into chunks
SMALL = dict(block_size=4, num_kv_blocks=30, max_model_len=112, max_num_batched_tokens=16)
GREEDY = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=2)


@pytest.fixture(scope="module")
def v3(tmp_path_factory):
    return save_checkpoint(build_hf_model("deepseek_v3"), str(tmp_path_factory.mktemp("v3")))


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    return save_checkpoint(build_hf_model("qwen3_moe"), str(tmp_path_factory.mktemp("qwen3")))


def prompts() -> list[dict]:
    """Mixed prompts, the last two sharing a 24-token prefix with the first (prefix hits)."""
    base = mixed_prompts()
    shared = base[0][:24] if len(base[0]) >= 24 else (base[0] * 24)[:24]
    rng = random.Random(3)
    extra = [shared + [rng.randrange(1, 200) for _ in range(k)] for k in (5, 11)]
    return [{"prompt_token_ids": p} for p in [shared + [7, 8], *base, *extra]]


def run(llm: LLM, batch: list[dict], params: SamplingParams = GREEDY):
    outs = llm.generate(batch, params, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs], outs


def no_leak(llm: LLM) -> bool:
    core = llm.engine.core
    return core.allocator.num_free == core.allocator.num_blocks and not core.seqs


def test_to_kv_cache_clamps_and_rounds():
    x = torch.tensor([1000.0, -1000.0, 448.0, 0.3, 1e-4, -2.5])
    got = to_kv_cache(x, FP8)
    assert got.dtype == FP8
    assert got.float().tolist() == [FP8_MAX, -FP8_MAX, FP8_MAX, 0.3125, 0.0, -2.5]
    same = torch.randn(4, 3)
    assert torch.equal(to_kv_cache(same, torch.float32), same)  # "auto": no rounding


def test_to_kv_cache_clamps_before_a_cast_that_does_not_saturate(monkeypatch):
    """Older torch releases (pyproject allows 2.4) convert a float at or over 480 to e4m3's NaN,
    not to 448 (torch 2.13 saturates, so the test above passes without the clamp): with such a
    conversion the clamp alone keeps +-inf and out-of-range keys finite. NaN stays NaN, as in a
    bf16 cache."""
    cast = torch.Tensor.to

    def old_torch_to(self, *args, **kwargs):
        if FP8 in args or kwargs.get("dtype") == FP8:
            self = torch.where(self.abs() >= 480, float("nan"), self)
        return cast(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", old_torch_to)
    x = torch.tensor([1000.0, -480.0, float("inf"), float("-inf"), 447.0])
    assert torch.isnan(x.to(FP8).float()).sum() == 4  # the emulated old cast
    assert to_kv_cache(x, FP8).float().tolist() == [FP8_MAX, -FP8_MAX, FP8_MAX, -FP8_MAX, 448.0]
    assert torch.isnan(to_kv_cache(torch.tensor([float("nan")]), FP8).float()).all()
    bf16 = torch.tensor([1e4, -3e38], dtype=torch.bfloat16)
    assert to_kv_cache(bf16, FP8).float().tolist() == [FP8_MAX, -FP8_MAX]


@pytest.mark.parametrize("kind", ["v3", "qwen3"])
def test_fp8_cache_is_the_fp32_model_with_its_kv_rounded(kind, request, monkeypatch):
    """Token-identical (and the same logprobs) to an fp32 cache whose writes are rounded
    through FP8: chunked prefill, preemption, prefix-cache hits included. Not vacuous: the
    logprobs differ from the plain fp32 cache's."""
    path = request.getfixturevalue(kind)
    batch = prompts()
    llm = LLM(path, seed=0, kv_cache_dtype="fp8", **SMALL)
    try:
        caches = llm.engine.core.runner.kv_caches
        assert {c.dtype for c in caches} == {FP8}
        got, outs = run(llm, batch)
        core = llm.engine.core
        assert core.stats()[0].num_preemptions > 0
        assert core.prefix_cache_stats().hits > 0
        assert no_leak(llm)
    finally:
        llm.shutdown()
    plain = LLM(path, seed=0, **SMALL)
    try:
        _, plain_outs = run(plain, batch)
        plain.reset_prefix_cache()  # its blocks hold unrounded KV
        monkeypatch.setattr(models.attention, "to_kv_cache", qdq)
        want, ref_outs = run(plain, batch)
    finally:
        plain.shutdown()
    assert_rounded_reference(got, want, outs, ref_outs, plain_outs)


def test_pd_host_tier_and_graph_path_match_the_single_process(v3):
    """P/D (the prefill rank's FP8 blocks cross to the decode rank as they are), the host tier
    (evicted FP8 blocks copied to host memory and back) under preemption, and the CUDA-graph
    decode path (eager on CPU, its scratch block FP8): the single process's tokens."""
    batch = prompts()
    single = LLM(v3, seed=0, kv_cache_dtype="fp8", enable_prefix_caching=False, **SMALL)
    try:
        want, _ = run(single, batch)
        per_block = sum(c[0].numel() for c in single.engine.core.runner.kv_caches)  # 1 B each
    finally:
        single.shutdown()
    tiered = LLM(v3, seed=0, kv_cache_dtype="fp8", kv_offload_gb=64 * per_block / 2**30,
                 **SMALL)
    try:
        assert tiered.engine.core.host.buffers[0].dtype == FP8
        assert run(tiered, batch)[0] == want
        # again: the shared prefixes, evicted by now, come back from the host
        assert run(tiered, batch)[0] == want
        assert tiered.engine.core.prefix_cache_stats().host_hits > 0
        assert no_leak(tiered)
    finally:
        tiered.shutdown()
    graphs = LLM(v3, seed=0, kv_cache_dtype="fp8", enforce_eager=False, max_num_seqs=8,
                 **SMALL)
    try:
        assert graphs.engine.core.runner.graphs is not None
        assert run(graphs, batch)[0] == want
    finally:
        graphs.shutdown()
    pd = LLM(v3, seed=0, kv_cache_dtype="fp8", prefill=1, attention=1, ffn=1, timeout_s=30,
             prefill_block_size=8, **SMALL)
    try:
        assert pd.config.kv_cache_dtype == "fp8"
        assert run(pd, batch)[0] == want
    finally:
        pd.shutdown()


@pytest.fixture(scope="module")
def mtp_ckpt(tmp_path_factory):
    return mtp_checkpoint(str(tmp_path_factory.mktemp("mtp")))[0]


def test_mtp_drafts_with_an_fp8_cache_keep_plain_decoding(mtp_ckpt):
    """The MTP layer's cache (the last) is FP8 too; verifying its drafts gives plain greedy
    decoding's tokens over the same FP8 cache."""
    batch = prompts()
    plain = LLM(mtp_ckpt, seed=0, kv_cache_dtype="fp8", **SMALL)
    try:
        want, _ = run(plain, batch)
    finally:
        plain.shutdown()
    llm = LLM(mtp_ckpt, seed=0, kv_cache_dtype="fp8",
              speculative_config={"method": "mtp", "num_speculative_tokens": 2}, **SMALL)
    try:
        caches = llm.engine.core.runner.kv_caches
        assert len(caches) == load_config(mtp_ckpt).num_layers + 1
        assert {c.dtype for c in caches} == {FP8}
        assert run(llm, batch)[0] == want
        assert no_leak(llm)
    finally:
        llm.shutdown()


def test_fp8_cache_refused_at_allocation_on_a_gpu_triton_cannot_read_it_on(v3, monkeypatch):
    """Under compute capability 8.9 (A100) Triton has no e4m3: the rank refuses at start, naming
    the field and the capability, not at its first step's compile. Faked capability: the check
    raises before anything touches CUDA."""
    from afd.kv_cache import allocate_kv_caches, check_fp8_kv_device

    cfg = load_config(v3)
    monkeypatch.delenv("AFD_KERNEL_BACKEND", raising=False)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    with pytest.raises(ValueError, match=r"kv_cache_dtype='fp8' needs .* 8\.9.* is 8\.0"):
        allocate_kv_caches(cfg, 4, 4, FP8, "cuda")
    check_fp8_kv_device("cpu")
    monkeypatch.setenv("AFD_KERNEL_BACKEND", "torch")
    check_fp8_kv_device("cuda")  # the torch kernels cast what they gather
    monkeypatch.delenv("AFD_KERNEL_BACKEND")
    for cap in ((8, 9), (9, 0), (10, 0)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=cap: c)
        check_fp8_kv_device("cuda:0")
    assert allocate_kv_caches(cfg, 2, 4, FP8, "cpu")[0].dtype == FP8


@pytest.mark.parametrize("value, match", [
    ("fp8_e5m2", "kv_cache_dtype='fp8_e5m2' is not supported"),
    ("int8", "kv_cache_dtype must be one of"), ("FP8", "kv_cache_dtype must be one of"),
    (None, "kv_cache_dtype must be one of"), ("bfloat16", "kv_cache_dtype must be one of")])
def test_bad_kv_cache_dtype_is_named(v3, value, match):
    with pytest.raises(ValueError, match=match):
        resolve_engine_config(v3, load_config(v3), kv_cache_dtype=value)


def test_spellings_and_the_cache_dtype(v3):
    model_cfg = load_config(v3)
    for name, want in (("auto", torch.bfloat16), ("fp8", FP8), ("fp8_e4m3", FP8)):
        cfg = resolve_engine_config(v3, model_cfg, dtype="bfloat16", kv_cache_dtype=name)
        assert cfg.kv_cache_dtype == ("auto" if name == "auto" else "fp8")
        assert cfg.cache_dtype == want and cfg.dtype == torch.bfloat16


def test_a_config_built_without_resolve_still_means_what_it_says(v3):
    """An EngineConfig made directly or read from a dict (tests, a hand-written rank spec) with
    vLLM's other spelling is FP8 too, and a name afd does not know is refused by name, not run
    as the model's dtype."""
    from dataclasses import replace

    from afd.config import engine_config_from_dict, engine_config_to_dict

    cfg = resolve_engine_config(v3, load_config(v3), dtype="bfloat16")
    assert replace(cfg, kv_cache_dtype="fp8_e4m3").cache_dtype == FP8
    d = {**engine_config_to_dict(cfg), "kv_cache_dtype": "fp8_e4m3"}
    assert engine_config_from_dict(d).cache_dtype == FP8
    for bad in ("fp8_e5m2", "int8"):
        with pytest.raises(ValueError, match="kv_cache_dtype"):
            _ = replace(cfg, kv_cache_dtype=bad).cache_dtype
    assert cfg.cache_dtype == torch.bfloat16


def test_fp8_blocks_are_half_of_bf16s_and_the_pool_holds_twice_as_many(v3, monkeypatch):
    model_cfg = load_config(v3)
    args = dict(dtype="bfloat16", block_size=4, max_model_len=96, max_num_batched_tokens=32,
                max_num_seqs=8)
    bf16 = resolve_engine_config(v3, model_cfg, kv_cache_memory_gb=0.01, **args)
    fp8 = resolve_engine_config(v3, model_cfg, kv_cache_memory_gb=0.01, kv_cache_dtype="fp8",
                                **args)
    per_bf16 = bytes_per_block(model_cfg, 4, bf16.cache_dtype, False)
    per_fp8 = bytes_per_block(model_cfg, 4, fp8.cache_dtype, False)
    assert per_bf16 == 2 * per_fp8 == 2 * model_cfg.num_layers * 4 * model_cfg.kv_cache_dim
    assert bf16.num_kv_blocks == int(0.01 * 2**30 // per_bf16)
    assert fp8.num_kv_blocks == int(0.01 * 2**30 // per_fp8)
    assert fp8.num_kv_blocks in (2 * bf16.num_kv_blocks, 2 * bf16.num_kv_blocks + 1)
    # the host tier's blocks too
    off = resolve_engine_config(v3, model_cfg, num_kv_blocks=100, kv_offload_gb=0.01,
                                kv_cache_dtype="fp8", **args)
    assert off.num_offload_blocks == fp8.num_kv_blocks
    # sized from (faked) GPU memory: the same budget, twice the blocks
    mem = {"total": 64 * 2**30, "free": 64 * 2**30, "in_use": 50 * 2**30}
    monkeypatch.setenv(FAKE_MEMORY_ENV, json.dumps({"single": mem}))
    cpu = torch.device("cpu")
    sized = {}
    for name, cfg in (("bf16", bf16), ("fp8", fp8)):
        budget = int(0.9 * mem["total"]) - mem["in_use"] - activation_reserve(model_cfg, cfg)
        sized[name] = kv_blocks_from_memory(cfg, model_cfg, cpu, "single")
        assert sized[name] == budget // bytes_per_block(model_cfg, 4, cfg.cache_dtype, False)
    assert sized["fp8"] in (2 * sized["bf16"], 2 * sized["bf16"] + 1)


def test_serve_flag_and_the_config_every_rank_gets(v3, monkeypatch, capsys):
    """launch/serve.py's --kv-cache-dtype (auto by default; fp8_e5m2 refused by argparse,
    naming the flag), and the field's round trip through the dict the ranks are sent."""
    import sys

    from afd.config import engine_config_from_dict, engine_config_to_dict

    from launch import serve

    for argv, want in ((["serve.py"], "auto"), (["serve.py", "--kv-cache-dtype", "fp8"], "fp8"),
                       (["serve.py", "--kv-cache-dtype", "fp8_e4m3"], "fp8_e4m3")):
        monkeypatch.setattr(sys, "argv", argv)
        assert serve.parse_args().kv_cache_dtype == want
    monkeypatch.setattr(sys, "argv", ["serve.py", "--kv-cache-dtype", "fp8_e5m2"])
    with pytest.raises(SystemExit):
        serve.parse_args()
    assert "--kv-cache-dtype" in capsys.readouterr().err
    cfg = resolve_engine_config(v3, load_config(v3), kv_cache_dtype="fp8_e4m3")
    back = engine_config_from_dict(engine_config_to_dict(cfg))
    assert back.kv_cache_dtype == "fp8" and back.cache_dtype == FP8

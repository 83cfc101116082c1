"""KV pools sized from each rank's own GPU memory after its weights load (gpu_memory_utilization,
afd.kv_memory), run on CPU with the device-memory query faked (AFD_TEST_DEVICE_MEMORY): each
rank kind gets its own block count, the front end and router learn them, tokens are unchanged,
and a budget too small for one sequence is refused by name."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from afd import LLM, SamplingParams
from afd.config import bytes_per_block, resolve_engine_config
from afd.kv_memory import (FAKE_MEMORY_ENV, activation_reserve, graph_pool_reserve,
                           kv_blocks_from_memory, step_activations)
from afd.layouts import RankFailure
from ckpt_utils import build_hf_model, mixed_prompts, save_checkpoint
from models.config import load_config

GIB = 2**30
ARGS = dict(block_size=4, max_model_len=96, max_num_batched_tokens=32, max_num_seqs=8)
PREFILL_BLOCK = 8


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A tiny DeepSeek-V3 and its single-process greedy outputs with an explicit pool."""
    path = save_checkpoint(build_hf_model("deepseek_v3"), str(tmp_path_factory.mktemp("v3")))
    prompts = [{"prompt_token_ids": p} for p in mixed_prompts()]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    outs = LLM(path, num_kv_blocks=200, **ARGS).generate(prompts, params, use_tqdm=False)
    return path, prompts, params, [o.outputs[0].token_ids for o in outs]


def fake_memory(path: str, blocks: int, block_size: int, *, in_use: int, utilization=0.9,
                free_binds: bool = False, extra: int = 0) -> dict:
    """Device numbers under which a rank of ``path`` (ARGS, ``block_size``) gets ``blocks``:
    bound by utilization x total - in_use, or (``free_binds``) by what is free; ``extra``:
    bytes the rank reserves besides the activations (CUDA graphs' pool and scratch block)."""
    cfg = resolve_engine_config(path, load_config(path), num_kv_blocks=1000, **ARGS)
    per_block = bytes_per_block(load_config(path), block_size, cfg.dtype, False)
    need = activation_reserve(load_config(path), cfg) + extra + blocks * per_block \
        + per_block // 2
    if free_binds:
        return {"total": 64 * GIB, "free": need, "in_use": in_use}
    return {"total": int((need + in_use) / utilization) + 1, "free": 64 * GIB, "in_use": in_use}


def test_gpu_memory_utilization_is_checked_by_name(reference):
    path = reference[0]
    for bad in (0, 0.0, -0.5, 1.01, True, "0.9", float("nan")):
        with pytest.raises(ValueError, match="gpu_memory_utilization"):
            resolve_engine_config(path, load_config(path), gpu_memory_utilization=bad)
    cfg = resolve_engine_config(path, load_config(path), gpu_memory_utilization=1)
    assert cfg.gpu_memory_utilization == 1.0


def test_explicit_sizes_keep_priority_and_cpu_default_is_unchanged(reference, monkeypatch):
    path = reference[0]
    model_cfg = load_config(path)
    cpu = resolve_engine_config(path, model_cfg, device="cpu", **ARGS)
    assert cpu.num_kv_blocks == int(0.25 * GIB // bytes_per_block(model_cfg, 4, cpu.dtype,
                                                                  False))
    monkeypatch.setenv(FAKE_MEMORY_ENV, json.dumps({}))  # as on a GPU: sized on the ranks
    assert resolve_engine_config(path, model_cfg, **ARGS).num_kv_blocks is None
    assert resolve_engine_config(path, model_cfg, num_kv_blocks=77, **ARGS).num_kv_blocks == 77
    assert resolve_engine_config(path, model_cfg, kv_cache_memory_gb=0.25,
                                 **ARGS).num_kv_blocks == cpu.num_kv_blocks
    monkeypatch.setenv("AFD_KV_CACHE_GB", "0.25")
    assert resolve_engine_config(path, model_cfg, **ARGS).num_kv_blocks == cpu.num_kv_blocks


def test_budget_math_share_scratch_block_and_refusal(reference, monkeypatch):
    path = reference[0]
    model_cfg = load_config(path)
    cfg = resolve_engine_config(path, model_cfg, num_kv_blocks=1000, **ARGS)
    per_block = bytes_per_block(model_cfg, 4, cfg.dtype, False)
    reserve = activation_reserve(model_cfg, cfg)
    cpu = torch.device("cpu")

    def blocks(mem: dict, **kw) -> int:
        monkeypatch.setenv(FAKE_MEMORY_ENV, json.dumps({"single": mem}))
        return kv_blocks_from_memory(cfg, model_cfg, cpu, "single", **kw)

    mem = fake_memory(path, 500, 4, in_use=3 * GIB)
    assert blocks(mem) == 500
    # the graphs' pool estimate and scratch block (test_cuda_graph_pool_is_reserved)
    pool = graph_pool_reserve(model_cfg, cfg)
    assert blocks(fake_memory(path, 500, 4, in_use=3 * GIB, extra=pool), graphs=True) == 499
    # half the fraction each for two ranks on one GPU
    big = {"total": 8 * GIB, "free": 64 * GIB, "in_use": GIB}
    assert blocks(big, ranks_on_device=2) == (
        int(0.9 * 8 * GIB) // 2 - GIB - reserve) // per_block < blocks(big)
    assert blocks(fake_memory(path, 300, 4, in_use=GIB, free_binds=True)) == 300
    # more in use after loading: fewer blocks, the difference exactly
    assert blocks({**mem, "in_use": mem["in_use"] + 100 * per_block}) == 400
    # the MTP layer's cache is one more layer per block
    assert bytes_per_block(model_cfg, 4, cfg.dtype, True) == per_block // model_cfg.num_layers \
        * (model_cfg.num_layers + 1)
    # a larger step needs a larger reserve (the refusal's advice to lower it holds)
    larger = resolve_engine_config(path, model_cfg, num_kv_blocks=1000,
                                   **{**ARGS, "max_num_batched_tokens": 96})
    assert activation_reserve(model_cfg, larger) > reserve
    # one max_model_len sequence (96 tokens: 24 blocks) must fit
    assert blocks(fake_memory(path, 24, 4, in_use=GIB)) == 24
    with pytest.raises(ValueError, match=r"gpu_memory_utilization=0\.9 of .* GiB.*in use.*"
                                         r"23 blocks.*max_model_len=96.*needs 24 blocks"):
        blocks(fake_memory(path, 23, 4, in_use=GIB))


def test_cuda_graph_pool_is_reserved(reference, monkeypatch, caplog):
    """CUDA graphs' private pool comes off the budget where graphs are captured: the estimate
    is a decode step of the largest captured size (step_activations, no prefill expansion,
    its logits term covering the fp32 logits output) plus the static routing output and inputs,
    once for the largest size: every size writes its outputs into the same buffers, so sizes
    below the largest add nothing, with MTP drafts too (their hidden states, drafts and inputs
    once for the largest size, and the MTP passes' logits: see graph_pool_reserve). The sizing's
    log line names it, and 0 with no graphs. A single process with enforce_eager=False reserves
    it, one with enforce_eager=True does not."""
    path = reference[0]
    model_cfg = load_config(path)
    cfg = resolve_engine_config(path, model_cfg, num_kv_blocks=1000, **ARGS)
    assert cfg.cuda_graph_sizes == (1, 2, 4, 8)  # the default for max_num_seqs=8
    per_block = bytes_per_block(model_cfg, 4, cfg.dtype, False)
    routing = model_cfg.top_k * 8 * len([i for i in range(model_cfg.num_layers)
                                         if model_cfg.is_moe_layer(i)])
    inputs = 5 * 8 + (96 // 4) * 4  # ids, positions, slots, seq_lens, logits_index; tables
    one = step_activations(model_cfg, cfg, 8, 8, prefill=False) + 8 * (routing + inputs)
    pool = graph_pool_reserve(model_cfg, cfg)
    # the smaller sizes' outputs are views of the largest's: they add nothing
    assert pool == graph_pool_reserve(model_cfg, replace(cfg, cuda_graph_sizes=(8,))) == one
    assert graph_pool_reserve(model_cfg, replace(cfg, cuda_graph_sizes=(1, 2, 4, 8, 16))) > pool
    # MTP drafts (k = 2), once for the largest size: the shared hidden states and drafts, the
    # MTP inputs (next ids, drafting rows, chain order; one round's positions, slots, lengths;
    # chain tables) and the MTP passes' logits; the smaller sizes add nothing here either
    mtp = replace(cfg, num_speculative_tokens=2, speculative_method="mtp")
    element = torch.empty((), dtype=cfg.dtype).element_size()
    assert graph_pool_reserve(model_cfg, mtp) == pool + 8 * (
        model_cfg.hidden_size * element + 2 * 8 + 6 * 8 + (96 // 4) * 4
        + 2 * model_cfg.vocab_size * 4)
    assert graph_pool_reserve(model_cfg, replace(mtp, cuda_graph_sizes=(8,))) == \
        graph_pool_reserve(model_cfg, mtp)
    assert 0 < pool < activation_reserve(model_cfg, cfg)  # no MLA prefill expansion

    mem = fake_memory(path, 500, 4, in_use=3 * GIB, extra=pool + per_block)
    monkeypatch.setenv(FAKE_MEMORY_ENV, json.dumps({"single": mem}))
    with caplog.at_level("INFO", logger="afd.kv_memory"):
        on = kv_blocks_from_memory(cfg, model_cfg, torch.device("cpu"), "single", graphs=True)
        off = kv_blocks_from_memory(cfg, model_cfg, torch.device("cpu"), "single")
    assert on == 500  # the pool and the scratch block came off
    assert off == 500 + (pool + per_block + per_block // 2) // per_block
    logged = [r.getMessage() for r in caplog.records if r.name == "afd.kv_memory"]
    assert f"CUDA graph pool estimate of {pool / GIB:.2f} GiB for decode batches up to 8" \
        in logged[0]
    assert "CUDA graph pool estimate of 0.00 GiB (no CUDA graphs)" in logged[1]
    with pytest.raises(ValueError, match="CUDA graph pool estimate.*set enforce_eager"):
        kv_blocks_from_memory(replace(cfg, max_model_len=4 * 4 * 600), model_cfg,
                              torch.device("cpu"), "single", graphs=True)

    monkeypatch.setenv(FAKE_MEMORY_ENV, json.dumps({"single": fake_memory(
        path, 37, 4, in_use=5 * GIB, extra=pool + per_block)}))
    assert LLM(path, enforce_eager=False, **ARGS).config.num_kv_blocks == 37
    assert LLM(path, enforce_eager=True, **ARGS).config.num_kv_blocks == \
        37 + (pool + per_block + per_block // 2) // per_block


def test_single_process_sizes_its_pool_after_loading(reference, monkeypatch):
    path, prompts, params, expected = reference
    monkeypatch.setenv(FAKE_MEMORY_ENV, json.dumps(
        {"single": fake_memory(path, 37, 4, in_use=5 * GIB)}))
    # eager: on a CUDA box graphs are the default and their scratch block is one of the 37
    # (test_budget_math_share_scratch_block_and_refusal)
    llm = LLM(path, enforce_eager=True, **ARGS)
    assert llm.config.num_kv_blocks == 37
    assert llm.engine.core.allocator.num_free == 37
    outs = llm.generate(prompts, params, use_tqdm=False)  # 37 blocks: preemptions, same tokens
    assert [o.outputs[0].token_ids for o in outs] == expected


def test_single_process_refuses_a_budget_too_small(reference, monkeypatch):
    path = reference[0]
    monkeypatch.setenv(FAKE_MEMORY_ENV, json.dumps(
        {"single": fake_memory(path, 10, 4, in_use=GIB)}))
    with pytest.raises(ValueError, match="gpu_memory_utilization.*raise gpu_memory_utilization"):
        LLM(path, **ARGS)


def test_each_rank_reports_its_own_pool(reference, monkeypatch):
    """1P+1A+1F: the prefill rank (whole model, its own block size) and the decode attention
    rank get different memory, so different pools; the front end, its stats and the router
    use each rank's own, and the tokens are the single process's."""
    path, prompts, params, expected = reference
    monkeypatch.setenv(FAKE_MEMORY_ENV, json.dumps({
        "prefill": fake_memory(path, 30, PREFILL_BLOCK, in_use=8 * GIB, free_binds=True),
        "attention": fake_memory(path, 70, 4, in_use=2 * GIB)}))
    llm = LLM(path, prefill=1, attention=1, ffn=1, prefill_block_size=PREFILL_BLOCK,
              timeout_s=30, **ARGS)
    try:
        client = llm.engine.core
        assert llm.config.num_kv_blocks is None
        assert {r: i["num_kv_blocks"] for r, i in client.rank_info.items()} == {0: 30, 1: 70,
                                                                                  2: 0}
        assert client.router.caches[0].capacity == 30
        assert client.router.attention[1].free_blocks == 70
        assert client.rank_stats[1].num_free_blocks == 70
        outs = llm.generate(prompts, params, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in outs] == expected
    finally:
        llm.shutdown()


@pytest.mark.slow  # ~10-20 s on the shared 2-core CPU: two ranks start only to fail
def test_a_rank_refuses_a_budget_too_small(reference, monkeypatch):
    path = reference[0]
    monkeypatch.setenv(FAKE_MEMORY_ENV, json.dumps({
        "attention": fake_memory(path, 5, 4, in_use=GIB)}))
    with pytest.raises(RankFailure, match="attention rank.*gpu_memory_utilization"):
        LLM(path, attention=2, timeout_s=30, **ARGS)


def test_ranks_sharing_a_gpu_split_it(monkeypatch):
    from afd.config import EngineConfig
    from afd.workers import Layout, WorkerSpec, ranks_on_device

    cfg = EngineConfig("m", torch.float32, "cuda", 64, 4, None, 8, 32)

    def spec(rank: int, layout: Layout, local_rank: int | None = None) -> WorkerSpec:
        return WorkerSpec(rank, layout, cfg, None, 1, "torch", 5.0, "127.0.0.1", 0, "", (),
                          local_rank=local_rank)

    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert ranks_on_device(spec(1, Layout(1, 1, 1)), cuda) == 3
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert [ranks_on_device(spec(r, Layout(1, 1, 1)), cuda) for r in range(3)] == [2, 1, 2]
    assert ranks_on_device(spec(0, Layout(0, 4, 4)), cuda) == 4
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # torchrun: two ranks on this node
    assert ranks_on_device(spec(5, Layout(0, 4, 4), local_rank=1), cuda) == 1
    assert ranks_on_device(spec(0, Layout(1, 1, 1)), torch.device("cpu")) == 1


def test_dsa_sparse_path_is_in_the_activation_estimate(tmp_path):
    """DeepSeek-V3.2 past index_topk reserves its sparse path's scores and gathered context;
    within index_topk (every step dense) nothing more than DeepSeek-V3's terms."""
    from afd.kv_memory import dsa_activations
    from kernels.dsa import DSA_MAX_SCORES

    path = save_checkpoint(build_hf_model("deepseek_v32", num_hidden_layers=1), str(tmp_path))
    model_cfg = load_config(path)
    dense = resolve_engine_config(path, model_cfg, num_kv_blocks=1000,
                                  **dict(ARGS, max_model_len=8))
    sparse = resolve_engine_config(path, model_cfg, num_kv_blocks=1000, **ARGS)
    assert dsa_activations(model_cfg, dense) == 0
    extra = dsa_activations(model_cfg, sparse)
    assert extra >= 4 * DSA_MAX_SCORES * 4
    assert (step_activations(model_cfg, sparse, 32, 8, prefill=True)
            - step_activations(model_cfg, replace(sparse, max_model_len=8), 32, 8,
                               prefill=True)) >= extra


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float8_e4m3fn])
def test_a_cpu_pool_is_zeros_the_os_hands_out_untouched(dtype):
    """A CPU rank's KV pool (the default 0.25 GiB, afd.config) is zeros made of memory the OS
    zeroes page by page as it is first written (calloc), so a rank's start writes none of it
    and only the blocks written become resident; torch.zeros wrote all of it (0.35 s a rank).
    The tensors are plain CPU tensors of the asked shape and dtype, zero, and writable."""
    import psutil

    from afd.kv_cache import allocate_kv_caches
    from models.attention import kv_cache_shape
    from models.default_model import default_model_path

    cfg = load_config(default_model_path())
    me = psutil.Process()
    before = me.memory_info().rss
    caches = allocate_kv_caches(cfg, 32768, 16, dtype, "cpu")
    grown = me.memory_info().rss - before
    total = sum(c.numel() * c.element_size() for c in caches)
    assert total >= 128 * 2**20 and grown < total // 8, (total, grown)
    small = allocate_kv_caches(cfg, 3, 2, dtype, "cpu")
    for layer, c in enumerate(small):
        assert c.device.type == "cpu" and c.dtype == dtype and c.is_contiguous()
        assert c.shape == kv_cache_shape(cfg, 3, 2, layer)
        assert not c.view(torch.uint8).any()
        c.view(torch.uint8).view(-1)[0] = 1  # written as any tensor is
        assert c.view(torch.uint8).sum() == 1

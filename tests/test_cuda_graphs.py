"""CUDA graphs of decode steps (afd.cuda_graphs).

On CPU the graph path runs its static buffers and padding eagerly (no capture), so these check
what capture relies on: padded steps give the tokens of plain eager steps, padding rows touch
only the scratch block, and the decode forward reads nothing back to the host (a captured
forward cannot). On a GPU the same engine comparison runs with real graphs.
"""

from __future__ import annotations

import contextlib
import sys

import numpy as np
import pytest
import torch

from afd import LLM, SamplingParams
from afd.config import bytes_per_block, resolve_engine_config
from afd import cuda_graphs
from afd.cuda_graphs import DecodeGraphs, default_sizes
from kernels.testing import run_in_interpreter
from models.config import load_config
from models.default_model import default_model_path

KV_BLOCKS = 24  # small: finished sequences' blocks are reused, some steps preempt


def test_default_sizes():
    assert default_sizes(256) == (1, 2, 4, *range(8, 257, 8))
    assert default_sizes(20) == (1, 2, 4, 8, 16, 20)
    assert default_sizes(1) == (1,)
    assert default_sizes(1000)[-1] == 256


@pytest.mark.parametrize("kwargs, field", [
    (dict(cuda_graph_sizes=[0, 4]), "cuda_graph_sizes"),
    (dict(cuda_graph_sizes=[4, 300]), "cuda_graph_sizes"),
    (dict(cuda_graph_sizes=[]), "cuda_graph_sizes"),
    (dict(cuda_graph_sizes=[True]), "cuda_graph_sizes"),
    (dict(enforce_eager="no"), "enforce_eager"),
])
def test_bad_options_are_named(kwargs, field):
    path = default_model_path()
    with pytest.raises(ValueError, match=field):
        resolve_engine_config(path, load_config(path), **kwargs)


def _run(device: str, eager: bool, prompts: list[list[int]], params: list[SamplingParams],
         model: str | None = None):
    llm = LLM(model, device=device, dtype="float32", seed=3, enforce_eager=eager, max_num_seqs=8,
              num_kv_blocks=KV_BLOCKS, max_model_len=256, cuda_graph_sizes=[1, 2, 4, 8])
    runner = llm.engine.core.runner
    steps = _spy_outputs(runner.graphs)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    tokens = [[c.token_ids for c in o.outputs] for o in outs]
    caches = [c.cpu().clone() for c in runner.kv_caches]
    free = llm.engine.core.allocator.num_free
    llm.shutdown()
    return tokens, caches, steps, free, runner.graphs


def _ptr(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def _spy_outputs(graphs: DecodeGraphs | None) -> list:
    """Per ``run`` of ``graphs`` (none: no graph path): (rows, padded size, the storage of its
    logits, of its routing ids), and per ``run_mtp`` after it ("mtp", the storage of the
    target's kept hidden states the MTP graph read, of the drafts it returned)."""
    steps = []
    if graphs is None:
        return steps
    run, run_mtp = graphs.run, getattr(graphs, "run_mtp", None)

    def spy(ids, batch):
        out = run(ids, batch)  # and where its logits and routing ids are
        steps.append((batch.num_seqs, graphs.padded_size(batch.num_seqs), _ptr(out),
                      {_ptr(t) for _, t in graphs.last_routing()}))
        return out

    def spy_mtp():
        drafts = run_mtp()
        steps.append(("mtp", graphs.last[0].size, _ptr(graphs.last[0].hidden), _ptr(drafts)))
        return drafts

    graphs.run = spy
    if graphs.mtp_tokens:
        graphs.run_mtp = spy_mtp
    return steps


def assert_one_set_of_outputs(graphs: DecodeGraphs, all_steps: list) -> None:
    """Every size's logits and routing ids (with MTP drafts also the target's kept hidden
    states and the MTP graph's drafts) are views of one set of static outputs sized for the
    largest size (so the graphs' pool holds no per-size outputs): the steps' (``_spy_outputs``:
    the storage of each step's outputs), each graph's."""
    steps = [s for s in all_steps if s[0] != "mtp"]
    mtp = [s for s in all_steps if s[0] == "mtp"]
    assert len({logits for _, _, logits, _ in steps}) == 1, steps
    assert len(set().union(*(routing for *_, routing in steps))) == 1, steps
    logits = graphs.logits_out.untyped_storage().data_ptr()
    routing = graphs.topk_ids_out.untyped_storage().data_ptr()
    assert graphs.logits_out.shape[0] == graphs.topk_ids_out.shape[1] == graphs.max_size
    assert {ptr for _, _, ptr, _ in steps} == {logits}
    assert all(ptrs == {routing} for *_, ptrs in steps)
    captured = graphs.graphs[1].graph is not None
    for size, entry in graphs.graphs.items():
        assert entry.logits.shape[0] == size
        assert entry.logits.untyped_storage().data_ptr() == logits
        # captured: every size's routing since its capture; eager: the sizes that ran
        assert len(entry.routed) == len(graphs.moe_layers) > 0 or not captured
        assert all(ids.untyped_storage().data_ptr() == routing for _, ids in entry.routed)
    if not graphs.mtp_tokens:
        assert not mtp
        return
    hidden, drafts = _ptr(graphs.hidden_out), _ptr(graphs.drafts_out)
    assert graphs.hidden_out.shape[0] == graphs.drafts_out.shape[1] == graphs.max_size
    assert graphs.drafts_out.shape[0] == graphs.mtp_tokens
    assert len({size for _, size, _, _ in mtp}) >= 2, mtp  # the MTP graph ran at several sizes
    assert {h for _, _, h, _ in mtp} == {hidden} and {d for *_, d in mtp} == {drafts}, mtp
    for size, entry in graphs.graphs.items():
        # captured: every size's since its capture; eager: the sizes that ran
        assert entry.hidden is not None or not captured
        assert entry.hidden is None or (entry.hidden.shape[0] == size
                                        and _ptr(entry.hidden) == hidden)
        assert (entry.drafts is not None) == captured
        assert entry.drafts is None or (entry.drafts.shape == (graphs.mtp_tokens, size)
                                        and _ptr(entry.drafts) == drafts)


def _workload():
    gen = torch.Generator().manual_seed(0)
    # 11 prompts (13 sequences: n=3 on one) with different lengths and output lengths, at most 8
    # at a time: the decode batch grows and shrinks, so steps land on every size, most padded,
    # and padding rows follow larger steps whose blocks are by then another sequence's.
    prompts = [torch.randint(2, 500, (3 + 4 * i,), generator=gen).tolist() for i in range(11)]
    params = [SamplingParams(temperature=0, max_tokens=6 + 3 * i, ignore_eos=True)
              for i in range(11)]
    params[2] = SamplingParams(temperature=0.8, top_p=0.9, n=3, seed=7, max_tokens=20,
                               ignore_eos=True)
    params[5] = SamplingParams(temperature=1.0, top_k=20, seed=11, max_tokens=25,
                               ignore_eos=True, repetition_penalty=1.3)
    return prompts, params


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[
    pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                        reason="needs a CUDA device (real graph capture)")])])
def test_graph_steps_match_eager_steps(device):
    prompts, params = _workload()
    want, eager_kv, _, _, none = _run(device, True, prompts, params)
    got, graph_kv, steps, free, graphs = _run(device, False, prompts, params)
    assert none is None and graphs is not None
    assert (graphs.graphs[1].graph is not None) == (device == "cuda")
    assert got == want
    assert free == KV_BLOCKS  # every real block back, the scratch block never in the pool
    # the graph path ran, padded and not, at several sizes
    assert any(n < size for n, size, *_ in steps) and any(n == size for n, size, *_ in steps)
    assert len({size for _, size, *_ in steps}) >= 4, steps
    assert_one_set_of_outputs(graphs, steps)
    for eager, graph in zip(eager_kv, graph_kv):
        assert eager.shape[0] == KV_BLOCKS and graph.shape[0] == KV_BLOCKS + 1
        # real blocks: the same KV (to rounding: padded batches change matmul shapes)
        torch.testing.assert_close(graph[:KV_BLOCKS], eager, atol=1e-4, rtol=1e-4)
        assert graph[KV_BLOCKS].abs().sum() > 0  # padding rows wrote their scratch block


@pytest.fixture(scope="module")
def qwen3_path(tmp_path_factory) -> str:
    from ckpt_utils import build_hf_model, save_checkpoint

    return save_checkpoint(build_hf_model("qwen3_moe"), str(tmp_path_factory.mktemp("qwen3")))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[
    pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                        reason="needs a CUDA device (real graph capture)")])])
def test_qwen3_graph_steps_match_eager_steps(qwen3_path, device):
    """GQA decode (Qwen3-MoE) through the graph path gives the tokens of eager steps."""
    prompts, params = _workload()
    prompts, params = prompts[:6], params[:6]  # 8 sequences (n=3 on one), sizes 8 down to 1
    want, eager_kv, _, _, none = _run(device, True, prompts, params, qwen3_path)
    got, graph_kv, steps, free, graphs = _run(device, False, prompts, params, qwen3_path)
    assert none is None and graphs is not None
    assert (graphs.graphs[1].graph is not None) == (device == "cuda")
    assert got == want
    assert free == KV_BLOCKS
    assert any(n < size for n, size, *_ in steps) and len({size for _, size, *_ in steps}) >= 3
    assert_one_set_of_outputs(graphs, steps)
    for eager, graph in zip(eager_kv, graph_kv):
        torch.testing.assert_close(graph[:, :KV_BLOCKS], eager, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_outputs_land_in_the_shared_buffers_unchanged(dtype):
    """The graph path's forward writes its logits (fp32 model: the LM head's matmul; bf16: the
    head output's fp32 conversion) and every MoE layer's routing ids into rows [:size] of the
    static outputs every size shares, equal to what a forward that allocates them gives."""
    from dataclasses import replace

    from afd.cuda_graphs import RoutedTap
    from afd.kv_cache import allocate_kv_caches
    from models.model import LocalExperts
    from models.weights import load_model

    model = load_model(default_model_path(), "full", dtype=dtype, device="cpu")
    caches = allocate_kv_caches(model.cfg, 17, 16, dtype, "cpu")
    for cache in caches:
        cache.normal_()
    graphs = DecodeGraphs(model, caches, scratch_block=16, block_size=16, max_model_len=64,
                          sizes=(2, 4), capture=False)
    with torch.inference_mode():  # four sequences of 1-4 blocks; they write the scratch block
        graphs.input_ids[:4].copy_(torch.tensor([5, 9, 3, 7]))
        graphs.seq_lens.copy_(torch.tensor([1, 17, 30, 64]))
        graphs.positions.copy_(graphs.seq_lens - 1)
        graphs.block_tables[:, :4].copy_(torch.arange(16).view(4, 4))
        for size in (4, 2):
            batch = graphs.graphs[size].batch
            fresh = []
            want = model.forward(graphs.input_ids[:size], replace(batch, topk_ids_out=None),
                                 caches, graphs.logits_index[:size],
                                 RoutedTap(LocalExperts(model), lambda *r: fresh.append(r)))
            got = graphs._forward(size, batch)
            assert got.dtype == torch.float32 and torch.equal(got, want)
            assert got.data_ptr() == graphs.logits_out.data_ptr() != want.data_ptr()
            assert [layer for layer, _ in graphs.routed] == graphs.moe_layers == [
                layer for layer, _ in fresh] != []
            for (_, ids), (_, fresh_ids), row in zip(graphs.routed, fresh, graphs.topk_ids_out):
                assert torch.equal(ids, fresh_ids) and ids.data_ptr() == row.data_ptr()


def _stand_in_graphs(cfg_fields: dict | None = None, **graph_args) -> DecodeGraphs:
    """Graphs of sizes 2, 4, 8 (uncaptured) over a stand-in model (what the static outputs
    need, and ``cfg_fields``) and one cache of 10 blocks of 4 slots, block 10 the scratch."""
    from types import SimpleNamespace

    cfg = SimpleNamespace(num_layers=1, is_moe_layer=bool, vocab_size=5, top_k=2,
                          **(cfg_fields or {}))
    return DecodeGraphs(SimpleNamespace(cfg=cfg), [torch.zeros(11, 4, 3)], scratch_block=10,
                        block_size=4, max_model_len=16, sizes=(2, 4, 8), capture=False,
                        **graph_args)


def _decode_rows(num: int, **fields) -> tuple:
    """A batch of ``num`` decode rows at position 6 (7 cached tokens), row i's block table
    (2i, 2i + 1) mod 10 and its slot in the second block: (batch, block tables)."""
    from models.batch import ForwardBatch

    tables = torch.arange(num * 2, dtype=torch.int32).view(num, 2) % 10
    return ForwardBatch(positions=torch.full((num,), 6), slot_mapping=tables[:, 1] * 4 + 2,
                        block_tables=tables, seq_lens=torch.full((num,), 7),
                        query_lens=[1] * num, num_decodes=num, **fields), tables


def test_padding_rows_point_at_the_scratch_block():
    """Whatever earlier, larger steps left in the static buffers, the rows past a step's
    sequences read and write only the scratch block, one token long."""
    graphs = _stand_in_graphs()
    seen = []
    graphs._forward = lambda size, batch: seen.append(
        (size, graphs.input_ids[:size].clone(), graphs.slot_mapping[:size].clone(),
         graphs.seq_lens[:size].clone(), graphs.block_tables[:size].clone())
    ) or torch.zeros(size, 5)
    for num in (7, 3, 8, 1, 5):
        batch, tables = _decode_rows(num)
        assert graphs.run(torch.arange(1, num + 1), batch).shape == (num, 5)
        size, ids, slots, lens, table = seen[-1]
        assert size == graphs.padded_size(num) == next(s for s in (2, 4, 8) if s >= num)
        assert ids[:num].tolist() == list(range(1, num + 1)) and not ids[num:].any()
        assert torch.equal(slots[:num], tables[:, 1].long() * 4 + 2)
        assert (slots[num:] == 40).all() and (lens[num:] == 1).all() and (lens[:num] == 7).all()
        assert torch.equal(table[:num, :2], tables) and (table[num:, 0] == 10).all()


def test_padding_rows_point_at_the_scratch_state_slot():
    """A hybrid model's graphs: whatever earlier, larger steps left in the static buffers, the
    rows past a step's sequences carry the scratch state slot and position 0 (fresh: they
    read no state), the real rows their own slots, from the batch's device copy or, without
    one, its host list; a scratch slot is required exactly for a hybrid model."""
    hybrid = {"linear_attn": object()}
    for cfg_fields, scratch in ((hybrid, None), (None, 9)):
        with pytest.raises(ValueError, match="scratch_state_slot"):
            _stand_in_graphs(cfg_fields, scratch_state_slot=scratch)
    graphs = _stand_in_graphs(hybrid, scratch_state_slot=9)
    seen = []
    graphs._forward = lambda size, batch: seen.append(
        (size, batch.state_slot_ids.clone(), graphs.positions[:size].clone())
    ) or torch.zeros(size, 5)
    for num, device_copy in ((7, True), (3, True), (8, False), (1, True), (5, False)):
        slots = [(2 * i + num) % 9 for i in range(num)]
        batch, _ = _decode_rows(num, state_slots=slots,
                                state_slot_ids=torch.tensor(slots) if device_copy else None)
        graphs.run(torch.arange(1, num + 1), batch)
        size, ids, pos = seen[-1]
        assert size == graphs.padded_size(num) and ids.shape == (size,)
        assert ids[:num].tolist() == slots and (ids[num:] == 9).all()
        assert (pos[:num] == 6).all() and not pos[num:].any()


@pytest.mark.parametrize("windowed", [False, True])
def test_padding_rows_point_at_the_scratch_blocks_of_both_pools(windowed):
    """With a window pool (afd.window_pool: MiMo-V2-Flash's / gpt-oss's sliding layers) the
    padding rows' window tables and slots are its null block's, whatever a larger step left
    there, and the real rows' are theirs; without one the graphs hold no window buffers. A
    step whose window tables do not match how the graphs were built is refused."""
    from models.batch import ForwardBatch

    graphs = _stand_in_graphs(window_null_block=6 if windowed else None)
    assert (graphs.window_block_tables is None) == (not windowed)
    seen = []
    graphs._forward = lambda size, batch: seen.append(
        (size, batch.window_block_tables is None or batch.window_block_tables.clone(),
         batch.window_slot_mapping is None or batch.window_slot_mapping.clone())
    ) or torch.zeros(size, 5)
    for num in (7, 3, 8, 1, 5):
        batch, tables = _decode_rows(num)
        window = (tables + 1) % 6  # a window pool of 6 blocks (its null block: 6)
        window[::2, 0] = 6  # some rows' first block out of the window
        if windowed:
            batch.window_block_tables, batch.window_slot_mapping = window, window[:, 1] * 4 + 2
        graphs.run(torch.arange(1, num + 1), batch)
        size, got_tables, got_slots = seen[-1]
        assert size == graphs.padded_size(num)
        if not windowed:
            assert got_tables is True and got_slots is True  # (no window buffers on the batch)
            continue
        assert got_tables.shape == (size, graphs.width)
        assert torch.equal(got_tables[:num, :2], window)
        assert torch.equal(got_slots[:num], window[:, 1].long() * 4 + 2)
        assert (got_tables[num:, 0] == 6).all() and (got_slots[num:] == 24).all()
    other = ForwardBatch(positions=torch.zeros(1, dtype=torch.long),
                         slot_mapping=torch.zeros(1, dtype=torch.long),
                         block_tables=torch.zeros(1, 1, dtype=torch.int32),
                         seq_lens=torch.ones(1, dtype=torch.long), query_lens=[1], num_decodes=1)
    if not windowed:
        other.window_block_tables = torch.zeros(1, 1, dtype=torch.int32)
        other.window_slot_mapping = torch.zeros(1, dtype=torch.long)
    with pytest.raises(ValueError, match="window_block_tables"):
        graphs.run(torch.zeros(1, dtype=torch.long), other)


# ---- MiMo-V2-Flash and gpt-oss: full and sliding-window layers, with and without the window
# pool ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module", params=["gpt_oss", "mimo_v2_flash"])
def window_model(request, tmp_path_factory) -> str:
    """A tiny gpt-oss (sinks on every layer, window 8) or MiMo-V2-Flash (sliding layers with
    twice the KV heads and sinks, values scaled, window 8) checkpoint."""
    from ckpt_utils import save_checkpoint

    if request.param == "gpt_oss":
        from test_gpt_oss import build_hf_model
    else:
        from test_mimo_v2_flash import build_hf_model
    return save_checkpoint(build_hf_model(), str(tmp_path_factory.mktemp(request.param)))


def _run_window(path: str, eager: bool, window_blocks: int | None, prompts, params):
    """An engine over a window model: its tokens, caches (per layer: is it in the window
    pool, its rows), free blocks of both pools, and the graph path's steps."""
    from afd.window_pool import window_layers

    llm = LLM(path, dtype="float32", seed=3, enforce_eager=eager, max_num_seqs=4, block_size=4,
              num_kv_blocks=40, num_window_blocks=window_blocks, max_model_len=96,
              cuda_graph_sizes=[1, 2, 4])
    core = llm.engine.core
    runner = core.runner
    steps = _spy_outputs(runner.graphs)
    try:
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        pooled = window_layers(runner.model.cfg) if core.window else ()
        caches = [(i in pooled, c.clone()) for i, c in enumerate(runner.kv_caches)]
        free = (core.allocator.num_free, core.window.num_free if core.window else None)
    finally:
        llm.shutdown()
    return ([[c.token_ids for c in o.outputs] for o in outs], caches, free, steps,
            runner.graphs, llm.config.num_window_blocks or 0)


@pytest.mark.parametrize("window_blocks", [None, 0], ids=["window_pool", "one_pool"])
def test_window_model_graph_steps_match_eager_steps(window_model, window_blocks):
    """gpt-oss and MiMo-V2-Flash decode steps through the graph path (eagerly on CPU: the
    static buffers, padding and scratch blocks), prompts and decodes past the sliding window
    (8), with the window pool (its own static tables, padding on its null block) and without
    (num_window_blocks=0: every layer in the main pool): greedy and seeded tokens are eager
    steps'; the real blocks of both pools hold eager's KV, and the padding rows wrote only
    the main pool's scratch block and the window pool's null block."""
    from ckpt_utils import mixed_prompts

    prompts = mixed_prompts(6, seed=2, lengths=[30, 5, 23, 9, 12, 3])
    params = [SamplingParams(temperature=0, max_tokens=6 + 3 * i, ignore_eos=True)
              for i in range(6)]
    params[1] = SamplingParams(temperature=0.9, seed=11, max_tokens=14, ignore_eos=True, n=2)
    want, eager_kv, eager_free, _, none, pool = _run_window(window_model, True, window_blocks,
                                                           prompts, params)
    got, graph_kv, free, steps, graphs, _ = _run_window(window_model, False, window_blocks,
                                                        prompts, params)
    assert none is None and graphs is not None and graphs.graphs[1].graph is None
    assert (graphs.window_null_block is not None) == (window_blocks is None) == (pool > 0)
    assert got == want
    assert free == eager_free == (40, pool or None)  # every real block back, in both pools
    assert any(n < size for n, size, *_ in steps) and any(n == size for n, size, *_ in steps)
    assert len({size for _, size, *_ in steps}) == 3, steps
    assert_one_set_of_outputs(graphs, steps)
    for (pooled, eager), (_, graph) in zip(eager_kv, graph_kv, strict=True):
        real = pool if pooled else 40  # the pool's real blocks; after them its null / scratch
        assert eager.shape[0] == real + pooled and graph.shape[0] == real + 1
        torch.testing.assert_close(graph[:real], eager[:real], atol=1e-4, rtol=1e-4)
        assert graph[real].abs().sum() > 0  # the padding rows wrote there
        if pooled:  # no real row writes the null block
            assert not eager[real].any()
    assert any(pooled for pooled, _ in graph_kv) == (pool > 0)


@pytest.fixture(scope="module")
def next_path(tmp_path_factory) -> str:
    """A tiny Qwen3-Next checkpoint (Gated DeltaNet layers 0, 1, 3; gated GQA layer 2)."""
    from ckpt_utils import build_hf_model, save_checkpoint

    return save_checkpoint(build_hf_model("qwen3_next"), str(tmp_path_factory.mktemp("next")))


def _run_hybrid(path: str, eager: bool, prompts, params, **engine_args):
    """An engine over a hybrid model: its tokens, KV caches (full layers), the linear layers'
    state tensors (conv, recurrent; every slot), free blocks and state slots, the scratch
    state slot and the graph path's steps."""
    from models.hybrid import LinearStates

    llm = LLM(path, dtype="float32", seed=3, enforce_eager=eager, max_num_seqs=4, block_size=4,
              num_kv_blocks=40, max_model_len=96, cuda_graph_sizes=[1, 2, 4], **engine_args)
    core = llm.engine.core
    runner = core.runner
    steps = _spy_outputs(runner.graphs)
    try:
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        kv = [c.clone() for c in runner.kv_caches if isinstance(c, torch.Tensor)]
        states = [(c.conv.clone(), c.recurrent.clone()) for c in runner.kv_caches
                  if isinstance(c, LinearStates)]
        free = (core.allocator.num_free, len(core.scheduler.free_state_slots))
    finally:
        llm.shutdown()
    return ([[c.token_ids for c in o.outputs] for o in outs], kv, states, free,
            runner.scratch_state_slot, steps, runner.graphs)


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_hybrid_graph_steps_from_the_host_list(next_path, monkeypatch, async_scheduling):
    """Decode-only steps built from one-token prompt chunks (``max_num_batched_tokens=2``:
    ``flatten_rows``, no device copy of the rows' state slots) reach the graph path with the
    slots as a host list, which ``DecodeGraphs.run`` copies in row order: a row mid-prompt at
    position 0 among them; the tokens are eager steps'."""
    from ckpt_utils import mixed_prompts

    host_list = []
    run = DecodeGraphs.run

    def spied(self, input_ids, batch):
        host_list.append(batch.state_slot_ids is None)
        return run(self, input_ids, batch)

    monkeypatch.setattr(DecodeGraphs, "run", spied)
    prompts = mixed_prompts(4, seed=2, lengths=[3, 2, 9, 1])
    params = [SamplingParams(temperature=0, max_tokens=4 + i, ignore_eos=True)
              for i in range(4)]
    engine = dict(max_num_batched_tokens=2, async_scheduling=async_scheduling,
                  enable_chunked_prefill=True)
    want = _run_hybrid(next_path, True, prompts, params, **engine)[0]
    got = _run_hybrid(next_path, False, prompts, params, **engine)[0]
    assert any(host_list) and not all(host_list), host_list
    assert got == want


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_hybrid_graph_steps_match_eager_steps(next_path, async_scheduling):
    """Qwen3-Next decode steps through the graph path (eagerly on CPU: the static buffers,
    each row's state slot among them, padding rows on the scratch block and a scratch state
    slot past the sequences' and the snapshots'), a one-token prompt among them (a decode row
    at position 0: fresh states), greedy and seeded n=2: the tokens are eager steps'; the
    real blocks' KV and every real state slot (the sequences' and the snapshots') hold
    eager's, and the padding rows wrote only the scratch block and the scratch slot. With
    async scheduling too, against eager async steps (the rows' state slots come in the
    step's pinned copy)."""
    from ckpt_utils import mixed_prompts

    prompts = mixed_prompts(6, seed=2, lengths=[30, 5, 23, 9, 12, 1])
    params = [SamplingParams(temperature=0, max_tokens=6 + 3 * i, ignore_eos=True)
              for i in range(6)]
    params[1] = SamplingParams(temperature=0.9, seed=11, max_tokens=14, ignore_eos=True, n=2)
    want, eager_kv, eager_states, eager_free, none, _, no_graphs = _run_hybrid(
        next_path, True, prompts, params, async_scheduling=async_scheduling)
    got, graph_kv, graph_states, free, scratch, steps, graphs = _run_hybrid(
        next_path, False, prompts, params, async_scheduling=async_scheduling)
    assert none is None and no_graphs is None and graphs is not None
    assert graphs.graphs[1].graph is None
    assert scratch == 4 + 16  # max_num_seqs, then the default 16 snapshots, then it
    assert got == want
    assert free == eager_free == (40, 4)  # every block and state slot back
    assert any(n < size for n, size, *_ in steps) and any(n == size for n, size, *_ in steps)
    assert len({size for _, size, *_ in steps}) == 3, steps
    assert_one_set_of_outputs(graphs, steps)
    assert len(eager_kv) == len(graph_kv) == 1 and len(eager_states) == len(graph_states) == 3
    for eager, graph in zip(eager_kv, graph_kv):  # [2 (K, V), blocks, ...]
        assert eager.shape[1] == 40 and graph.shape[1] == 41
        torch.testing.assert_close(graph[:, :40], eager, atol=1e-4, rtol=1e-4)
        assert graph[:, 40].abs().sum() > 0  # the padding rows wrote their scratch block
    for eager, graph in zip(eager_states, graph_states):
        for e, g in zip(eager, graph):  # conv, recurrent
            assert e.shape[0] == scratch and g.shape[0] == scratch + 1
            torch.testing.assert_close(g[:scratch], e, atol=1e-4, rtol=1e-4)
            assert g[scratch].abs().sum() > 0  # the padding rows wrote the scratch slot


def test_hybrid_graph_steps_from_a_restored_snapshot(next_path):
    """Qwen3-Next with prefix caching: a prompt whose cached prefix (its linear layers' states
    restored from a snapshot into its slot) leaves one token to compute replays a decode graph
    from its first step, reading the restored states through the static slot buffer; its
    tokens (and the prompts' before it) equal eager steps'."""
    gen = torch.Generator().manual_seed(1)
    shared = torch.randint(2, 500, (48,), generator=gen).tolist()
    prompts = [shared + torch.randint(2, 500, (n,), generator=gen).tolist() for n in (1, 5)]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    results = {}
    for eager in (True, False):
        llm = LLM(next_path, dtype="float32", seed=3, enforce_eager=eager, max_num_seqs=4,
                  block_size=16, num_kv_blocks=40, max_model_len=96, cuda_graph_sizes=[1, 2, 4])
        graphs, replays = llm.engine.core.runner.graphs, []
        if graphs is not None:
            run = graphs.run
            graphs.run = lambda ids, batch: replays.append(batch.seq_lens.tolist()) or run(
                ids, batch)
        try:
            outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params,
                                use_tqdm=False)
            before = len(replays)
            hit = llm.generate({"prompt_token_ids": shared + [7]}, params, use_tqdm=False)[0]
            assert hit.num_cached_tokens == 48
            assert llm.engine.core.snapshots.num_restored >= 1
        finally:
            llm.shutdown()
        if graphs is not None:  # every step of the hit, its first included, replayed
            assert replays[before:] == [[49 + i] for i in range(8)], replays[before:]
        results[eager] = [o.outputs[0].token_ids for o in outs + [hit]]
    assert results[False] == results[True]


def test_pd_hybrid_decode_rank_with_graphs_matches_single_process(next_path, capfd):
    """A P/D decode rank of Qwen3-Next steps through the graph path: each prompt's states,
    moved in from the prefill rank into a state slot the decode rank gives it, are read
    through the static slot buffer (the scratch slot never handed out); greedy and seeded
    tokens equal a single eager process's."""
    from ckpt_utils import mixed_prompts

    prompts = mixed_prompts(5, seed=3, lengths=[20, 3, 11, 7, 1])
    params = [SamplingParams(temperature=0, max_tokens=5 + 2 * i, ignore_eos=True)
              for i in range(5)]
    params[2] = SamplingParams(temperature=0.9, seed=5, max_tokens=9, ignore_eos=True)
    want = _run_hybrid(next_path, True, prompts, params)[0]
    capfd.readouterr()
    llm = LLM(next_path, device="cpu", dtype="float32", seed=3, prefill=1, attention=1,
              enforce_eager=False, max_num_seqs=4, block_size=4, num_kv_blocks=40,
              max_model_len=96, cuda_graph_sizes=[1, 2, 4], timeout_s=120)
    try:
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    finally:
        llm.shutdown()
    logged = capfd.readouterr().err  # the decode rank's log: it took the graph path
    assert "no CUDA graphs" not in logged and "for batch sizes (1, 2, 4)" in logged, logged
    assert [[c.token_ids for c in o.outputs] for o in outs] == want


def test_hybrid_graphs_opt_in_and_sizing(next_path, monkeypatch):
    """Hybrid models: CUDA graphs opt-in on CUDA (enforce_eager unset: eager until a GPU has
    captured them), speculative decoding still refused; with graphs the KV memory holds one
    state slot more (the padding rows' scratch slot), and the graphs' pool estimate leaves
    out the torch decode path's per-row state copies but keeps a state slot id a row."""
    from types import SimpleNamespace

    from afd.config import state_bytes
    from afd.cuda_graphs import unsupported_reason
    import json

    from afd.kv_memory import (FAKE_MEMORY_ENV, activation_reserve, graph_pool_reserve,
                               kv_pools_from_memory, step_activations)

    cfg = load_config(next_path)
    assert cfg.linear_attn is not None and unsupported_reason(SimpleNamespace(cfg=cfg)) is None
    for device, given, want in (("cuda", None, True), ("cuda", False, False), ("cpu", None, True),
                                ("cpu", False, False)):
        assert resolve_engine_config(next_path, cfg, device=device, enforce_eager=given,
                                     num_kv_blocks=64, max_model_len=128).enforce_eager is want
    with pytest.raises(ValueError, match="speculative_config"):
        resolve_engine_config(next_path, cfg, device="cpu", enforce_eager=False,
                              speculative_config={"method": "ngram", "num_speculative_tokens": 2,
                                                  "prompt_lookup_max": 3})
    one = cfg.linear_attn.state_bytes(torch.float32)
    per = {}
    for eager in (True, False):  # 1 GiB of KV memory, 4 sequences' slots and 16 snapshots'
        sized = resolve_engine_config(next_path, cfg, device="cpu", dtype="float32",
                                      enforce_eager=eager, kv_cache_memory_gb=1, block_size=4,
                                      max_num_seqs=4, max_model_len=96)
        per_block = bytes_per_block(cfg, 4, torch.float32, False)
        slots = 4 + 16 + (not eager)
        assert sized.num_kv_blocks == (2**30 - slots * one) // per_block
        per[eager] = sized
    assert state_bytes(cfg, torch.float32, 1) == one > 0
    sized = per[False]
    lin, largest = cfg.linear_attn, max(sized.cuda_graph_sizes)
    copies = 16 * lin.num_v_heads * lin.k_head_dim * lin.v_head_dim * largest
    routing = cfg.top_k * 8 * sum(map(cfg.is_moe_layer, range(cfg.num_layers)))
    kept = largest * (routing + 6 * 8 + -(-sized.max_model_len // 4) * 4)
    pool = graph_pool_reserve(cfg, sized)
    assert pool == step_activations(cfg, sized, largest, largest, prefill=False) - copies + kept

    def rank_blocks(free: int, graphs: bool) -> int:  # a rank sizing its own pool
        monkeypatch.setenv(FAKE_MEMORY_ENV, json.dumps(
            {"single": {"total": 64 * 2**30, "free": free, "in_use": 0}}))
        return kv_pools_from_memory(sized, cfg, torch.device("cpu"), "single",
                                    graphs=graphs)["num_kv_blocks"]

    per_block, free = bytes_per_block(cfg, 4, torch.float32, False), 2**30
    # with graphs (their pool given on top): the scratch block and, as its blocks, the
    # scratch state slot's bytes come off
    left = free - activation_reserve(cfg, sized)
    assert rank_blocks(free + pool, True) == (left - 21 * one) // per_block - 1
    assert rank_blocks(free, False) == (left - 20 * one) // per_block


def test_graphs_only_where_they_apply():
    """Prefill ranks and layouts with FFN ranks step eagerly; so does enforce_eager (default).
    On CPU, with the device said (left out, a GPU box resolves to cuda, and capture of the
    model loaded on CPU fails)."""
    from afd.core import EngineCore
    from models.model import LocalExperts
    from models.weights import load_model

    path = default_model_path()
    cfg = resolve_engine_config(path, load_config(path), device="cpu", dtype="float32",
                                enforce_eager=False, num_kv_blocks=32, max_model_len=128,
                                max_num_seqs=4)
    model = load_model(path, "full", dtype=cfg.dtype, device="cpu")
    assert EngineCore(model, cfg).runner.graphs.sizes == (1, 2, 4)
    assert EngineCore(model, cfg, prefill_only=True).runner.graphs is None
    assert EngineCore(model, cfg, experts=LocalExperts(model)).runner.graphs is None
    default = resolve_engine_config(path, load_config(path), device="cpu", num_kv_blocks=32,
                                    max_model_len=128)
    assert default.enforce_eager and EngineCore(model, default).runner.graphs is None
    assert EngineCore(model, default).runner.kv_caches[0].shape[0] == 32


# ---- MTP drafts: the target's graph, then the MTP layer's ----------------------------------

@pytest.fixture(scope="module")
def mtp_path(tmp_path_factory) -> str:
    from ckpt_utils import mtp_checkpoint

    return mtp_checkpoint(str(tmp_path_factory.mktemp("mtp")))[0]


def _run_mtp(path: str, device: str, eager: bool, k: int, prompts, params, monkeypatch,
             undo: bool = True):
    """One engine with MTP drafts (k per step): its tokens, every set of drafts it kept (in
    the order made), its caches, its free blocks and, on the graph path, per MTP replay
    (padded size, rows, drafting rows, each chain entry's rounds)."""
    import afd.core
    import afd.model_runner

    drafts, replays = [], []
    keep = afd.core.EngineCore._keep_mtp_drafts

    def spy_keep(taken, draft_tokens):
        drafts.append([list(d) for d in draft_tokens])
        keep(taken, draft_tokens)

    def spy_inputs(size, k, next_ids, rows, order, rounds, *args):
        replays.append((size, len(next_ids), len(rows), list(rounds)))
        return cuda_graphs.mtp_host_inputs(size, k, next_ids, rows, order, rounds, *args)

    monkeypatch.setattr(afd.core.EngineCore, "_keep_mtp_drafts", staticmethod(spy_keep))
    monkeypatch.setattr(afd.model_runner, "mtp_host_inputs", spy_inputs, raising=False)
    llm = LLM(path, device=device, dtype="float32", seed=3, enforce_eager=eager, max_num_seqs=4,
              block_size=4, num_kv_blocks=KV_BLOCKS * 2, max_model_len=96,
              cuda_graph_sizes=[s for s in (1, 2, 4, 8, 16) if s <= 4 * (1 + k)],
              speculative_config={"method": "mtp", "num_speculative_tokens": k})
    runner = llm.engine.core.runner
    steps = _spy_outputs(runner.graphs)
    try:
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        caches = [c.cpu().clone() for c in runner.kv_caches]
        free = llm.engine.core.allocator.num_free
        drafted = llm.engine.core.stats()[0].num_draft_tokens
    finally:
        llm.shutdown()
        if undo:  # the next engine's spies wrap the originals
            monkeypatch.undo()
    if runner.graphs is not None:
        runner.graphs.steps = steps  # for assert_one_set_of_outputs
    return ([[c.token_ids for c in o.outputs] for o in outs], drafts, caches, free, replays,
            runner.graphs, drafted)


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[
    pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                        reason="needs a CUDA device (real graph capture)")])])
def test_mtp_graph_steps_match_eager_steps(mtp_path, device, k, monkeypatch):
    """With MTP drafts, decode and verify steps replay the target's graph and then the MTP
    layer's (its first pass and k - 1 chained rounds): greedy, seeded (n=2) and penalized
    requests give the eager engine's tokens, every draft made is the eager one, and the
    padding rows (padded steps, chain entries past their rounds) wrote only the scratch
    block: the real blocks' KV, the MTP layer's included, is the eager engine's. Prefill steps
    stay eager."""
    from ckpt_utils import mixed_prompts

    prompts = mixed_prompts(6, seed=2, lengths=[30, 5, 23, 9, 12, 3])
    params = [SamplingParams(temperature=0, max_tokens=8 + 3 * i, ignore_eos=True)
              for i in range(6)]
    params[1] = SamplingParams(temperature=0.9, seed=11, max_tokens=16, ignore_eos=True, n=2)
    params[4] = SamplingParams(temperature=1.0, seed=4, max_tokens=14, ignore_eos=True,
                               repetition_penalty=1.3)
    want, want_drafts, eager_kv, _, none_replayed, none, _ = _run_mtp(
        mtp_path, device, True, k, prompts, params, monkeypatch)
    got, got_drafts, graph_kv, free, replays, graphs, drafted = _run_mtp(
        mtp_path, device, False, k, prompts, params, monkeypatch)
    assert none is None and not none_replayed
    assert graphs is not None and graphs.mtp_tokens == k
    assert (graphs.graphs[1].mtp_graph is not None) == (device == "cuda")
    assert got == want
    assert got_drafts == want_drafts and drafted > 0
    assert free == KV_BLOCKS * 2
    # the MTP graph ran, padded and not, at several sizes; chains cut short (lookahead or
    # max_tokens) left padding entries in the later rounds
    assert any(n < size for size, n, _, _ in replays), replays
    assert any(n == size for size, n, _, _ in replays), replays
    assert len({size for size, *_ in replays}) >= 3, replays
    if k > 1:
        assert any(rounds and min(rounds) < k - 1 for *_, rounds in replays), replays
    assert len(eager_kv) == len(graph_kv)  # the target layers, then the MTP layer
    for eager, graph in zip(eager_kv, graph_kv):
        torch.testing.assert_close(graph[:KV_BLOCKS * 2], eager, atol=1e-4, rtol=1e-4)
    assert graph_kv[-1][KV_BLOCKS * 2].abs().sum() > 0  # the MTP padding's scratch block
    assert_one_set_of_outputs(graphs, graphs.steps)


class _StandInGraph:
    """A CUDA graph's stand-in on CPU: capture runs its body eagerly (as the capture's
    outputs), and ``replay`` (set per entry by ``_stand_in_capture``) reruns it eagerly into
    those same output tensors, as a replay rewrites them (a replay during capture, before it
    is set: the outputs as the capture left them)."""

    rerun = None

    def replay(self):
        if self.rerun is not None:
            self.rerun()


def _stand_in_capture(monkeypatch):
    """DecodeGraphs capture on CPU through the capture path (``_capture_all``: the kept
    outputs, the MTP graph after each target graph, replays reading them) with stand-ins."""
    import contextlib

    import afd.model_runner

    monkeypatch.setattr(torch.cuda, "CUDAGraph", _StandInGraph)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: "pool")
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(torch.cuda, "graph",
                        lambda graph, pool, capture_error_mode: contextlib.nullcontext())

    def rerun_target(graphs, entry):
        entry.logits.copy_(graphs._forward(entry.size, entry.batch))
        if entry.hidden is not None:
            entry.hidden.copy_(graphs.hidden)
        for (_, kept), (_, new) in zip(entry.routed, graphs.routed, strict=True):
            kept.copy_(new)

    class Captured(DecodeGraphs):
        def __init__(self, *args, capture, **kwargs):
            super().__init__(*args, capture=True, **kwargs)
            for entry in self.graphs.values():
                entry.graph.rerun = lambda e=entry: rerun_target(self, e)
                if entry.mtp_graph is not None:
                    entry.mtp_graph.rerun = lambda e=entry: e.drafts.copy_(
                        self._mtp_forward(e.size, e.hidden))

    monkeypatch.setattr(afd.model_runner, "DecodeGraphs", Captured)


def test_mtp_capture_path_with_stand_in_graphs(mtp_path, monkeypatch):
    """The capture path itself (``_capture_all`` and replays, graphs stood in for on CPU):
    with MTP drafts (k = 3) every size has its MTP graph, the target's kept hidden output is
    what that graph reads, and an engine replaying them gives MTP eager's tokens and drafts."""
    from ckpt_utils import mixed_prompts

    prompts = mixed_prompts(4, seed=2, lengths=[30, 5, 23, 9])
    params = [SamplingParams(temperature=0, max_tokens=10 + 2 * i, ignore_eos=True)
              for i in range(4)]
    params[1] = SamplingParams(temperature=0.9, seed=11, max_tokens=12, ignore_eos=True)
    want, want_drafts, *_ = _run_mtp(mtp_path, "cpu", True, 3, prompts, params, monkeypatch)
    _stand_in_capture(monkeypatch)
    replays = []
    run_mtp = DecodeGraphs.run_mtp
    monkeypatch.setattr(DecodeGraphs, "run_mtp",
                        lambda self: replays.append(self.last[0].size) or run_mtp(self))
    got, got_drafts, _, _, _, graphs, _ = _run_mtp(mtp_path, "cpu", False, 3, prompts, params,
                                                   monkeypatch, undo=False)
    assert all(isinstance(e.mtp_graph, _StandInGraph) and e.drafts.shape == (3, e.size)
               and e.hidden.shape[0] == e.size for e in graphs.graphs.values())
    assert got == want and got_drafts == want_drafts
    assert len(replays) > 10 and len(set(replays)) >= 2, replays
    assert_one_set_of_outputs(graphs, graphs.steps)


def test_mtp_padding_entries_point_at_the_scratch_block():
    """The MTP graph's chained rounds: an entry past its rounds, and every row past the
    entries, writes the scratch slot at position 0, one token long; live entries take their
    own position p + r, slot and length."""
    tables = np.array([[3, 4, 8], [5, 6, 7]], dtype=np.int32)  # 2 entries, block size 4
    host = cuda_graphs.mtp_host_inputs(4, 4, [9, 8, 7], [2, 0], [1, 0], [3, 1],
                           np.array([5, 1]), tables, 4, 40)
    next_ids, rows, order, per_round = host[:4], host[4:8], host[8:12], host[12:]
    assert next_ids.tolist() == [9, 8, 7, 0] and rows.tolist() == [2, 0, 0, 0]
    assert order.tolist() == [1, 0, 0, 0]
    pos, slots, lens = per_round.reshape(3, 3, 4)
    assert pos.tolist() == [[6, 2, 0, 0], [7, 0, 0, 0], [8, 0, 0, 0]]
    assert slots.tolist() == [[4 * 4 + 2, 5 * 4 + 2, 40, 40], [4 * 4 + 3, 40, 40, 40],
                              [8 * 4 + 0, 40, 40, 40]]
    assert lens.tolist() == [[7, 3, 1, 1], [8, 1, 1, 1], [9, 1, 1, 1]]
    with pytest.raises(ValueError, match="mtp_tokens=2 needs a model with its MTP layer"):
        DecodeGraphs(torch.nn.Module(), [torch.zeros(11, 4, 3)], scratch_block=10,
                     block_size=4, max_model_len=16, sizes=(4,), capture=False, mtp_tokens=2)


# ---- no host reads in the decode forward ---------------------------------------------------

HOST_READS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "numpy")
SHAPE_FROM_DATA = ("nonzero", "masked_select", "unique", "bincount", "repeat_interleave")
# ops that hand a tensor's value to the host (what item() and bool() dispatch to)
HOST_READ_OPS = ("_local_scalar_dense", "is_nonzero")


@contextlib.contextmanager
def host_read_audit(record):
    """Inside: ``record(what)`` for every read of tensor data on the host (``HOST_READS``, and
    the ops they dispatch to) and every op whose output shape depends on tensor data, outside
    Triton's own interpreter (which reads tensors to emulate the GPU)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    def ours() -> bool:
        frame = sys._getframe(2)
        while frame is not None:
            if "/triton/" in frame.f_code.co_filename.replace("\\", "/"):
                return False  # Triton's interpreter reads tensors to emulate the GPU
            frame = frame.f_back
        return True

    class Audit(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            op = func.__name__.split(".")[0]
            bool_index = op == "index" and any(
                isinstance(t, torch.Tensor) and t.dtype == torch.bool
                for t in (args[1] if len(args) > 1 else ()) if t is not None)
            # repeat_interleave by an int, or given its output_size: a shape known on the host
            sized = op == "repeat_interleave" and (
                func.__name__.split(".")[1] == "self_int"
                or (kwargs or {}).get("output_size") is not None)
            if (op in SHAPE_FROM_DATA and not sized or op in HOST_READ_OPS or bool_index) \
                    and ours():
                record(str(func))
            return func(*args, **(kwargs or {}))

    originals = {m: getattr(torch.Tensor, m) for m in HOST_READS}

    def watch(method: str):
        def read(self, *args, **kwargs):
            if ours():
                record(f"Tensor.{method}")
            return originals[method](self, *args, **kwargs)
        return read

    for method in HOST_READS:
        setattr(torch.Tensor, method, watch(method))
    try:
        with Audit():
            yield
    finally:
        for method, fn in originals.items():
            setattr(torch.Tensor, method, fn)


# host reads of data that lives on the host by construction, allowed while a step is in flight:
# a seeded request's CPU generator's draw of its step seed (afd.sampler.draw_step_seed)
HOST_SIDE = {"afd/sampler.py:draw_step_seed"}


def _reader() -> str:
    """The innermost afd / models / kernels frame of the stack: "path:function"."""
    import os

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep
    frame = sys._getframe(1)
    while frame is not None:
        path = frame.f_code.co_filename
        if path.startswith(root) and path[len(root):].split(os.sep)[0] in ("afd", "models",
                                                                             "kernels"):
            return f"{path[len(root):]}:{frame.f_code.co_name}"
        frame = frame.f_back
    return "?"


def async_case(name: str, seed: int) -> dict:
    """An async-scheduled engine (every kernel through Triton) run through two batches,
    recording each host read of tensor data (``host_read_audit``) made while a step is in
    flight: in ``EngineCore.step`` outside ``_read``, the one place that reads the previous
    step's samples (the placeholders' gather, the inputs, the forward and the sampler in
    between). ``mixed``: 8 rows, greedy, seeded, temperature + top-p, top-k, min_p,
    min_tokens, logit_bias and allowed_token_ids, ending at different lengths (later steps'
    placeholders move rows), eager steps; then ``both``: 3 rows with top_p and top_k both.
    ``async``: a tiny DeepSeek-V3 (MLA, MoE), the 3-row batch's decode steps through
    afd.cuda_graphs' path (eagerly; 8 rows are wider than its one size). ``async_window``: a tiny
    MiMo-V2-Flash with its window pool (window 8, blocks of 4, prompts of 19 in chunks of
    16); ``async_hybrid``: a tiny Qwen3-Next (state slots, prefix caching's snapshots); in
    both, ``again``: the first 2 rows of ``both``, whose prompts hit the prefix cache. Returns
    per batch the reads of each step as "op @ path:function", its graph replays and tokens."""
    import os

    from afd.core import EngineCore

    import tempfile

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from ckpt_utils import build_hf_model, save_checkpoint

    os.environ["AFD_KERNEL_BACKEND"] = "triton"
    tmp = tempfile.mkdtemp()
    # Two layers each, one of every kind the model has (attention, MLP): a third layer would
    # run the same code again, under the interpreter a third more of each step's time.
    if name == "async":  # dense, then MoE
        path = save_checkpoint(build_hf_model("deepseek_v3", num_hidden_layers=2), tmp)
        llm = LLM(path, seed=seed, async_scheduling=True, dtype="float32", max_model_len=64,
                  enforce_eager=False, cuda_graph_sizes=[4])
    else:
        if name == "async_window":
            from test_mimo_v2_flash import build_hf_model as build_mimo

            # sliding with a dense MLP, then full with the MoE
            path = save_checkpoint(build_mimo(layers=2), tmp)
            llm = LLM(path, seed=seed, async_scheduling=True, block_size=4, max_model_len=64,
                      max_num_batched_tokens=16)
        else:
            # linear attention (state slots) with the MoE, then full attention with a dense MLP
            path = save_checkpoint(build_hf_model(
                "qwen3_next", num_hidden_layers=2, mlp_only_layers=[1],
                layer_types=["linear_attention", "full_attention"]), tmp)
            llm = LLM(path, seed=seed, async_scheduling=True, max_model_len=64)
    live = {"on": False, "reads": []}
    steps: list[list[str]] = []
    replay, replays = llm.engine.core.runner._replay, []
    llm.engine.core.runner._replay = lambda *args: replays.append(1) or replay(*args)

    def record(what: str) -> None:
        if live["on"]:
            live["reads"].append(f"{what} @ {_reader()}")

    read, step = EngineCore._read, EngineCore.step

    def unaudited_read(self, *args):
        live["on"] = False
        try:
            return read(self, *args)
        finally:
            live["on"] = True

    def audited_step(self):
        live["on"], live["reads"] = True, []
        try:
            return step(self)
        finally:
            live["on"] = False
            steps.append(live["reads"])

    go = dict(ignore_eos=True, max_tokens=3)
    allowed = [3, 8, 40, 41]
    batches = {"mixed": [SamplingParams(temperature=0, ignore_eos=True, max_tokens=2),
                         SamplingParams(temperature=0.9, seed=11, **go),
                         SamplingParams(temperature=0.8, top_p=0.7, ignore_eos=True,
                                        max_tokens=2),
                         SamplingParams(temperature=1.0, top_k=7, **go),
                         SamplingParams(temperature=1.0, min_p=0.2, **go),
                         SamplingParams(temperature=0, min_tokens=3, max_tokens=3),
                         SamplingParams(temperature=0.5, logit_bias={5: 3.0, 9: -2.0}, **go),
                         SamplingParams(temperature=1.0, allowed_token_ids=allowed, **go)],
               "both": [SamplingParams(temperature=0.8, top_p=0.9, top_k=5, seed=7, **go),
                        SamplingParams(temperature=1.0, top_p=0.5, top_k=20, **go),
                        SamplingParams(temperature=0.7, top_p=0.95, top_k=3, min_p=0.05,
                                       **go)]}
    if name == "async":
        def prompt(i: int) -> list[int]:
            return [0, 17 + i, 4 * i + 3]
    else:  # past the window (8) and a block of 16, a shared start: the second batch's hits
        def prompt(i: int) -> list[int]:
            return [*range(100, 118), 4 * i + 3]
        batches["again"] = batches.pop("both")[:2]
    result = {}
    EngineCore._read, EngineCore.step = unaudited_read, audited_step
    try:
        with torch.inference_mode(), host_read_audit(record):
            for batch, params in batches.items():
                steps.clear(), replays.clear()
                outs = llm.generate([{"prompt_token_ids": prompt(i)}
                                     for i in range(len(params))], params, use_tqdm=False)
                result[batch], result[batch + "_replays"] = list(steps), len(replays)
                result[batch + "_tokens"] = [o.outputs[0].token_ids for o in outs]
        result["hits"] = llm.engine.core.scheduler.prefix_cache_hits
    finally:
        EngineCore._read, EngineCore.step = read, step
        llm.shutdown()
    result["allowed_kept"] = set(result["mixed_tokens"][-1]) <= set(allowed)
    return result


def interpreter_case(name: str, seed: int) -> dict:
    """One padded decode forward through the Triton kernels, recording every read of tensor data on
    the host and every op whose output shape depends on tensor data, outside Triton's own
    interpreter (which reads tensors to emulate the GPU). Cases: a tiny DeepSeek-V3 (MLA; a dense
    layer, then a MoE one) with the MoE routed inline or through the align kernel, a tiny Qwen3-MoE
    (GQA, one KV head for four query heads, a table wide enough that the GQA kernel splits), a tiny
    DeepSeek-V3.2 whose index_topk (8) is below the table's width (64: every row through the DSA
    decode kernels, lengths on both sides of it), a tiny GLM-5 likewise (layers full, shared,
    shared, full, shared: the shared layers' rows through the selected-attention kernel over the
    full layer's indices), a tiny DeepSeek-V4 (CSA at compress rate 2, HCA at 4, sliding; its
    index_topk 3 below the table's 32 CSA entries; rows closing a CSA window, both, none, and
    position 0) through its static decode path's kernels; a tiny MiMo-V2-Flash ("mimo": full and
    sliding layers, sinks, scaled values) with its window pool (the sliding layers' own tables,
    blocks out of the window on the null block) and a tiny gpt-oss ("gpt_oss": sinks on every layer,
    biased attention and experts, one pool), rows past the window (8), through the window decode
    kernels; "*torch": the same through the torch references, which do read on the host: the audit
    must catch them."""
    import os
    import tempfile

    import kernels.dsa_triton as dsa
    import kernels.fused_moe_triton as fmt
    import kernels.gated_delta_triton as gdt
    import kernels.gqa_decode_triton as gqa
    import kernels.mla_decode_triton as mla
    import kernels.v4_decode_triton as v4t
    from afd.kv_cache import allocate_kv_caches
    from models.weights import load_model

    if name.startswith("async"):
        return async_case(name, seed)
    qwen, v32, glm5 = name.startswith("qwen3"), name.startswith("v32"), name.startswith("glm5")
    hybrid = name.startswith("next")  # a tiny Qwen3-Next (models.hybrid)
    v4 = name.startswith("v4")
    windowed = name.startswith(("mimo", "gpt_oss"))  # (not "mtp": it starts "mt")
    os.environ["AFD_KERNEL_BACKEND"] = "torch" if name.endswith("torch") else "triton"
    os.environ["AFD_MOE_INLINE"] = "1" if name == "inline" else "0"
    fmt._env_features.cache_clear()
    found: list[str] = []
    calls = {"fused_moe": 0, "mla_decode": 0, "gqa_decode": 0, "dsa_decode": 0,
             "dsa_selected": 0, "v4_decode": 0, "v4_index": 0, "window_decode": 0,
             "conv_decode": 0, "delta_decode": 0}
    counted_fns = ((fmt, "fused_moe_triton", "fused_moe"),
                   (mla, "mla_decode_attention_triton", "mla_decode"),
                   (gqa, "gqa_decode_attention_triton", "gqa_decode"),
                   (dsa, "dsa_decode_attention_triton", "dsa_decode"),
                   (dsa, "dsa_selected_attention_triton", "dsa_selected"),
                   (v4t, "v4_decode_attention_triton", "v4_decode"),
                   (v4t, "v4_index_scores_triton", "v4_index"),
                   (gqa, "window_decode_attention_triton", "window_decode"),
                   (gdt, "conv_decode_triton", "conv_decode"),
                   (gdt, "delta_rule_decode_triton", "delta_decode"))
    # Patched for this case only (the cases share a process), restored at the end.
    saved = [(module, fn_name, getattr(module, fn_name)) for module, fn_name, _ in counted_fns]
    saved.append((gqa, "choose_num_splits", gqa.choose_num_splits))
    for module, fn_name, key in counted_fns:
        def counted(*args, _fn=getattr(module, fn_name), _key=key, **kwargs):
            calls[_key] += 1
            return _fn(*args, **kwargs)
        setattr(module, fn_name, counted)
    splits: list[int] = []
    choose = gqa.choose_num_splits
    gqa.choose_num_splits = lambda *args: splits.append(choose(*args)) or splits[-1]

    mtp = name.startswith("mtp")
    if windowed:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from ckpt_utils import save_checkpoint

        if name.startswith("gpt_oss"):
            from test_gpt_oss import build_hf_model as build_window_model
        else:
            from test_mimo_v2_flash import build_hf_model as build_window_model
        with tempfile.TemporaryDirectory() as tmp:
            path = save_checkpoint(build_window_model(), tmp)
            model = load_model(path, "full", dtype=torch.float32, device="cpu")
    elif qwen or mtp or v32 or glm5 or v4 or hybrid:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from ckpt_utils import build_hf_model, mtp_checkpoint, save_checkpoint

        with tempfile.TemporaryDirectory() as tmp:
            path = (mtp_checkpoint(tmp)[0] if mtp else
                    save_checkpoint(build_hf_model("deepseek_v32"), tmp) if v32 else
                    save_checkpoint(build_hf_model("glm_moe_dsa"), tmp) if glm5 else
                    save_checkpoint(build_hf_model("deepseek_v4"), tmp) if v4 else
                    save_checkpoint(build_hf_model("qwen3_next"), tmp) if hybrid else
                    save_checkpoint(build_hf_model("qwen3_moe", num_key_value_heads=1), tmp))
            model = load_model(path, "full", dtype=torch.float32, device="cpu", mtp=mtp)
    else:  # MLA and the MoE: a tiny DeepSeek-V3 of two layers, dense then MoE (the embedded
        # model's four, wider, ran the same code three times over, ~2 s more a case)
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from ckpt_utils import build_hf_model, save_checkpoint

        with tempfile.TemporaryDirectory() as tmp:
            path = save_checkpoint(build_hf_model("deepseek_v3", num_hidden_layers=2), tmp)
            model = load_model(path, "full", dtype=torch.float32, device="cpu")
    # MiMo-V2-Flash's window pool: 9 blocks, its null block 9
    window_null = 9 if name.startswith("mimo") else None
    # Qwen3-Next: 6 state slots, the last (5) the scratch one
    caches = allocate_kv_caches(model.cfg, 17, 16, torch.float32, "cpu",
                                len(model.all_layers()), window_blocks=window_null or 0,
                                state_slots=6 if hybrid else 0)
    for cache in caches:
        for t in (cache.conv, cache.recurrent) if hasattr(cache, "conv") else (cache,):
            t.normal_()
    graphs = DecodeGraphs(model, caches, scratch_block=16, block_size=16,
                          max_model_len=1024 if qwen else 64, sizes=(4,), capture=False,
                          mtp_tokens=3 if mtp else 0, window_null_block=window_null,
                          scratch_state_slot=5 if hybrid else None)
    with torch.inference_mode():  # four sequences of 1-4 blocks (the buffers' own mode)
        graphs.seq_lens.copy_(torch.tensor([1, 17, 30, 64]))
        graphs.block_tables[:, :4].copy_(torch.arange(16).view(4, 4))
        if hybrid:  # rows 0-2 of sequences in slots 3, 0, 4 (row 0 at position 0: fresh),
            # row 3 padding (position 0, the scratch slot)
            graphs.seq_lens.copy_(torch.tensor([1, 17, 30, 1]))
            graphs.positions.copy_(graphs.seq_lens - 1)
            graphs.state_slot_ids.copy_(torch.tensor([3, 0, 4, 5]))
        if window_null is not None:  # window 8: the blocks below each row's window are null
            graphs.window_block_tables[:, :4].copy_(torch.tensor(
                [[0, 9, 9, 9], [1, 2, 9, 9], [9, 3, 4, 9], [9, 9, 5, 6]]))
    if mtp:  # drafting rows 0, 2, 3; chained entries (rows 2, 0) of 2 and 1 rounds, a padding one
        graphs.last = (graphs.graphs[4], 4)
        tables = np.arange(8, dtype=np.int32).reshape(2, 4)
        graphs.set_mtp_inputs(cuda_graphs.mtp_host_inputs(
            4, 3, [5, 6, 7, 8], [0, 2, 3], [1, 0], [2, 1], np.array([29, 10]), tables, 16, 256),
            tables)
    drafts = None
    try:
        with torch.inference_mode(), host_read_audit(found.append):
            logits = graphs._forward(4, graphs.graphs[4].batch)
            if mtp:  # the MTP graph's region, after the target's
                drafts = graphs._mtp_forward(4, graphs.hidden)
    finally:
        for module, fn_name, fn in saved:
            setattr(module, fn_name, fn)
    return {"found": found, "finite": bool(torch.isfinite(logits).all()),
            "shape": list(logits.shape), "calls": calls, "gqa_splits": splits,
            "drafts": None if drafts is None else list(drafts.shape)}


def test_decode_forward_reads_nothing_on_the_host():
    """Through the Triton kernels (MLA with the MoE routed inline and through the align kernel;
    GQA through its split path; DeepSeek-V3.2's DSA decode past index_topk; DeepSeek-V4's
    static decode path), a padded decode forward reads no tensor data on the host and runs no
    op whose shape follows tensor data; through the torch references it does."""
    # one worker: each case loads a model, and a second worker's imports cost more than running
    # beside the first saved on the shared 2-core machine (docs/testing.md#where-the-time-goes)
    results = run_in_interpreter(__file__, ["inline", "aligned", "torch", "qwen3",
                                            "qwen3_torch", "v32", "v32_torch", "glm5", "v4"],
                                 seed=0, workers=1)
    for route, attention in (("inline", "mla_decode"), ("aligned", "mla_decode"),
                             ("qwen3", "gqa_decode"), ("v32", "dsa_decode"),
                             ("glm5", "dsa_decode"), ("v4", "v4_decode")):
        result = results[route]
        assert "error" not in result, result.get("error")
        assert result["finite"] and result["shape"][0] == 4
        assert result["calls"]["fused_moe"] > 0 and result["calls"][attention] > 0
        assert result["found"] == [], (route, result["found"])
    assert results["qwen3"]["gqa_splits"] and min(results["qwen3"]["gqa_splits"]) > 1
    assert results["v32"]["calls"]["mla_decode"] == 0  # every row sparse: no dense kernel
    # GLM-5's 2 full layers score and attend (the selected-attention kernel inside the decode
    # op), its 3 shared ones attend over their indices through that kernel alone
    glm5 = results["glm5"]["calls"]
    assert glm5["mla_decode"] == 0 and (glm5["dsa_decode"], glm5["dsa_selected"]) == (2, 5)
    # DeepSeek-V4's 3 layers attend through its kernel, its CSA layer's indexer scores too
    assert (results["v4"]["calls"]["v4_decode"], results["v4"]["calls"]["v4_index"]) == (3, 1)
    for name in ("torch", "qwen3_torch", "v32_torch"):
        torch_case = results[name]
        assert "error" not in torch_case, torch_case.get("error")
        assert set(torch_case["calls"].values()) == {0}, torch_case["calls"]
        # int(seq_lens.max()) in the MLA/GQA references (the DSA one: seq_lens.tolist()); the
        # MoE reference's bool mask, bincount, tolist
        host = "Tensor.tolist" if name == "v32_torch" else "Tensor.__int__"
        assert {host, "aten.index.Tensor", "aten.bincount.default",
                "Tensor.tolist"} <= set(torch_case["found"]), (name, torch_case["found"])


def test_window_model_decode_forward_reads_nothing_on_the_host():
    """MiMo-V2-Flash (with its window pool's tables) and gpt-oss (one pool), rows past the
    sliding window: a padded decode forward through the Triton kernels (every layer's
    attention through the window decode kernels, full and sliding; rope, routing, experts)
    reads no tensor data on the host and runs no op whose shape follows tensor data; through
    the torch references it does (the window attention's lengths read back)."""
    results = run_in_interpreter(__file__, ["mimo", "gpt_oss", "mimo_torch"], seed=0,
                                 workers=1)
    for name, layers in (("mimo", 4), ("gpt_oss", 3)):
        result = results[name]
        assert "error" not in result, (name, result.get("error"))
        assert result["finite"] and result["shape"][0] == 4
        assert result["calls"]["window_decode"] == layers and result["calls"]["fused_moe"] > 0
        assert result["found"] == [], (name, result["found"])
    torch_case = results["mimo_torch"]
    assert "error" not in torch_case, torch_case.get("error")
    assert set(torch_case["calls"].values()) == {0}, torch_case["calls"]
    assert "Tensor.tolist" in torch_case["found"], torch_case["found"]


def test_hybrid_decode_forward_reads_nothing_on_the_host():
    """Qwen3-Next (Gated DeltaNet layers 0, 1, 3; a gated GQA layer 2): a padded decode forward
    through the Triton kernels (the linear layers' decode rows through the conv and delta-rule
    decode kernels, their state slots and fresh rows from the graph's static buffers; the full
    layer through the GQA decode kernel) reads no tensor data on the host and runs no op
    whose shape follows tensor data; through the torch references it does (the GQA
    reference's lengths read back)."""
    results = run_in_interpreter(__file__, ["next", "next_torch"], seed=0, workers=1)
    result = results["next"]
    assert "error" not in result, result.get("error")
    assert result["finite"] and result["shape"][0] == 4
    calls = result["calls"]
    assert (calls["conv_decode"], calls["delta_decode"], calls["gqa_decode"]) == (3, 3, 1)
    assert calls["fused_moe"] > 0
    assert result["found"] == [], result["found"]
    torch_case = results["next_torch"]
    assert "error" not in torch_case, torch_case.get("error")
    assert set(torch_case["calls"].values()) == {0}, torch_case["calls"]
    assert "Tensor.__int__" in torch_case["found"], torch_case["found"]


def test_mtp_graph_forward_reads_nothing_on_the_host():
    """With MTP drafts, the target's padded decode forward (keeping every row's hidden state)
    and the MTP graph's region (its first pass, then two chained rounds with a live entry, an
    entry past its rounds and padding rows) read no tensor data on the host through the Triton
    kernels; through the torch references they do."""
    results = run_in_interpreter(__file__, ["mtp", "mtp_torch"], seed=0, workers=1)
    result = results["mtp"]
    assert "error" not in result, result.get("error")
    assert result["finite"] and result["shape"][0] == 4 and result["drafts"] == [3, 4]
    # 3 target layers + 3 MTP passes: the MTP layer's decode attention ran in the region
    assert result["calls"]["fused_moe"] > 0 and result["calls"]["mla_decode"] >= 6
    assert result["found"] == [], result["found"]
    torch_case = results["mtp_torch"]
    assert "error" not in torch_case, torch_case.get("error")
    assert torch_case["drafts"] == [3, 4]
    assert {"Tensor.__int__", "Tensor.tolist"} <= set(torch_case["found"]), torch_case["found"]


def test_async_steps_read_nothing_in_flight_on_the_host():
    """Async scheduling through the Triton kernels: while a step is in flight (from launching
    the next one until reading its samples), neither the next step's inputs (placeholder ids
    gathered from the previous samples), its forward (eager, or the graph path) nor its
    sampler reads tensor data on the host, over greedy, seeded, top-p, top-k, min_p,
    min_tokens, logit_bias and allowed_token_ids rows; nor, over the same rows, a window pool's
    steps (MiMo-V2-Flash, chunked prompts past its window) or a hybrid model's (Qwen3-Next,
    its state slots, a second batch restoring a prefix's state snapshot), nor rows with top_p
    and top_k both (the sampler's candidates' path: whether a row's ties at its k-th value
    reach past them no longer read on the host)."""
    # two workers (the default here): three engines, each its own model
    results = run_in_interpreter(__file__, ["async", "async_window", "async_hybrid"], seed=0)

    def in_flight(reads: list[str]) -> list[str]:
        return [r for r in reads if r.split(" @ ")[1] not in HOST_SIDE]

    for name, result in results.items():
        assert "error" not in result, (name, result.get("error"))
        both = "both" if name == "async" else "again"
        # a prefill step (a window pool's: chunks) and two decode steps each
        assert len(result["mixed"]) >= 3 and len(result[both]) == 3, (name, result)
        assert result["allowed_kept"] and all(len(t) == 3 for t in result[both + "_tokens"])
        for batch in ("mixed", both):
            assert [in_flight(s) for s in result[batch]] == [[]] * len(result[batch]), \
                (name, batch, result[batch])
    # the 8-row batch's steps eager (wider than the one graph size), the 3-row one's decode
    # steps through the graph path
    assert results["async"]["mixed_replays"] == 0 and results["async"]["both_replays"] == 2
    assert results["async_hybrid"]["hits"] > 0  # a state snapshot restored


def test_pd_decode_rank_with_graphs_matches_single_process():
    """A P/D decode rank (no FFN ranks) steps through the graph path; KV moved in from the
    prefill rank lands in allocator blocks, never in the scratch block. Both engines on one
    device: seeded requests draw their noise from a generator on the device, whose stream on
    cuda is not the one on CPU (afd/sampler.py), so tokens agree only device for device."""
    prompts, params = _workload()
    prompts, params = prompts[:6], params[:6]  # 8 sequences (n=3 on one), sizes 8 down to 1
    device = "cuda" if torch.cuda.is_available() else "cpu"
    want = _run(device, True, prompts, params)[0]
    llm = LLM(device=device, dtype="float32", seed=3, prefill=1, attention=1, enforce_eager=False,
              max_num_seqs=8, num_kv_blocks=KV_BLOCKS, max_model_len=256,
              cuda_graph_sizes=[1, 2, 4, 8], timeout_s=120)
    try:
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    finally:
        llm.shutdown()
    assert [[c.token_ids for c in o.outputs] for o in outs] == want


def test_pd_decode_rank_with_mtp_graphs_matches_single_process(mtp_path, capfd):
    """A P/D decode rank (no FFN ranks) with MTP drafts (k = 2) steps through the target's
    and the MTP layer's graphs (the first drafts came from the prefill rank with the first
    token): greedy and seeded tokens are the single eager process's (one device: see above)."""
    from ckpt_utils import mixed_prompts

    prompts = [{"prompt_token_ids": p} for p in mixed_prompts(4, seed=3, lengths=[17, 4, 9, 26])]
    params = [SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
              SamplingParams(temperature=0.9, seed=5, max_tokens=12, ignore_eos=True, n=2),
              SamplingParams(temperature=0, max_tokens=7, ignore_eos=True),
              SamplingParams(temperature=1.0, seed=2, max_tokens=10, ignore_eos=True)]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    kw = dict(device=device, dtype="float32", seed=3, max_num_seqs=4, num_kv_blocks=KV_BLOCKS * 2,
              max_model_len=96, speculative_config={"method": "mtp", "num_speculative_tokens": 2})
    base = LLM(mtp_path, enforce_eager=True, **kw)
    try:
        want = base.generate(prompts, params, use_tqdm=False)
    finally:
        base.shutdown()
    capfd.readouterr()
    llm = LLM(mtp_path, prefill=1, attention=1, enforce_eager=False, cuda_graph_sizes=[1, 2, 4, 8],
              timeout_s=120, **kw)
    try:
        got = llm.generate(prompts, params, use_tqdm=False)
    finally:
        llm.shutdown()
    # the decode rank's log (its process writes to this one's stderr): its graphs hold the MTP
    # layer's passes too
    logged = capfd.readouterr().err
    graph_log = "for batch sizes (1, 2, 4, 8), then the MTP layer's 2 draft passes"
    assert "no CUDA graphs" not in logged and graph_log in logged, logged
    assert ([[c.token_ids for c in o.outputs] for o in got]
            == [[c.token_ids for c in o.outputs] for o in want])
    assert sum(o.metrics.spec_num_draft_tokens for o in got) > 0


def test_graph_steps_with_prefix_cache_hits():
    """A prompt whose cached prefix leaves one token to compute is a one-token step: it replays
    a decode graph over the cached blocks. Tokens equal eager steps'."""
    gen = torch.Generator().manual_seed(1)
    shared = torch.randint(2, 500, (48,), generator=gen).tolist()
    prompts = [shared + torch.randint(2, 500, (n,), generator=gen).tolist() for n in (1, 5, 17)]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    results = {}
    for eager in (True, False):
        llm = LLM(dtype="float32", seed=3, enforce_eager=eager, max_num_seqs=8,
                  num_kv_blocks=KV_BLOCKS, max_model_len=256, cuda_graph_sizes=[1, 2, 4, 8])
        graphs, replays = llm.engine.core.runner.graphs, []
        if graphs is not None:
            run = graphs.run
            graphs.run = lambda ids, batch: replays.append(batch.seq_lens.tolist()) or run(
                ids, batch)
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        # all but the last token cached: every step of this one, its first included, replays
        before = len(replays)
        hit = llm.generate({"prompt_token_ids": shared + [7]}, params, use_tqdm=False)[0]
        assert hit.num_cached_tokens == 48
        if graphs is not None:
            assert replays[before:] == [[49 + i] for i in range(12)], replays[before:]
        results[eager] = [o.outputs[0].token_ids for o in outs + [hit]]
        llm.shutdown()
    assert results[False] == results[True]


@pytest.mark.parametrize("mtp_tokens", [0, 3])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[
    pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                        reason="needs a CUDA device (real graph capture)")])])
def test_bf16_capture_replays_into_the_shared_buffers(mtp_path, device, mtp_tokens,
                                                      monkeypatch):
    """The production dtype (bf16: the LM head's output converted into the fp32 shared logits,
    the engine tests run fp32's matmul path) through ``_capture_all`` (on CPU with stand-in
    graphs; on CUDA real capture, which must not fall back): every size captured, with MTP
    drafts its MTP graph too; no out= op resized its output (no warning, the shared buffers'
    storage unchanged); a replay of each size, largest first then smaller, rewrites rows
    [:size] of the shared outputs as an eager forward over the same static inputs does."""
    import warnings

    from afd.kv_cache import allocate_kv_caches
    from models.weights import load_model

    if device == "cpu":  # the capture path with stand-ins: a replay reruns the body eagerly
        import contextlib

        monkeypatch.setattr(torch.cuda, "CUDAGraph", _StandInGraph)
        monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: "pool")
        monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
        monkeypatch.setattr(torch.cuda, "graph",
                            lambda graph, pool, capture_error_mode: contextlib.nullcontext())
    model = load_model(mtp_path, "full", dtype=torch.bfloat16, device=device, mtp=True)
    caches = allocate_kv_caches(model.cfg, 17, 16, torch.bfloat16, device,
                                len(model.all_layers()))
    for cache in caches:
        cache.normal_()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        graphs = DecodeGraphs(model, caches, scratch_block=16, block_size=16, max_model_len=64,
                              sizes=(2, 4), capture=True, mtp_tokens=mtp_tokens)
    assert not [str(w.message) for w in caught if "resiz" in str(w.message)]
    shared = {"logits_out": graphs.logits_out, "topk_ids_out": graphs.topk_ids_out}
    if mtp_tokens:
        shared |= {"hidden_out": graphs.hidden_out, "drafts_out": graphs.drafts_out}
    ptrs = {name: t.data_ptr() for name, t in shared.items()}
    if device == "cpu":
        for entry in graphs.graphs.values():  # as _stand_in_capture's: eager into the outputs
            entry.graph.rerun = lambda e=entry: graphs._forward(e.size, e.batch)
            if entry.mtp_graph is not None:
                entry.mtp_graph.rerun = lambda e=entry: graphs._mtp_forward(e.size, e.hidden)
    for entry in graphs.graphs.values():
        assert entry.graph is not None and (entry.mtp_graph is not None) == bool(mtp_tokens)
    # chained entries: rows 1 (two rounds) and 0 (one), past their lengths in their own blocks
    # (what no pass reads before a round writes it: a rerun over the same inputs reads the same)
    tables = np.array([[4, 5, 6, 7], [0, 1, 2, 3]], dtype=np.int32)
    with torch.inference_mode():  # four sequences of 1-4 blocks; their slots: the scratch one
        graphs.input_ids[:4].copy_(torch.tensor([5, 9, 3, 7]))
        graphs.seq_lens.copy_(torch.tensor([1, 17, 30, 64]))
        graphs.positions.copy_(graphs.seq_lens - 1)
        graphs.block_tables[:, :4].copy_(torch.arange(16).view(4, 4))
        for size in (4, 2):
            entry = graphs.graphs[size]
            entry.graph.replay()
            got = [entry.logits.clone(), *(ids.clone() for _, ids in entry.routed)]
            if mtp_tokens:
                got.append(entry.hidden.clone())
                graphs.last = (entry, size)
                graphs.set_mtp_inputs(cuda_graphs.mtp_host_inputs(
                    size, mtp_tokens, list(range(5, 5 + size)), list(range(size)), [1, 0],
                    [2, 1], np.array([16, 0]), tables, 16, graphs.scratch_slot), tables)
                entry.mtp_graph.replay()
                got.append(entry.drafts.clone())
            assert all(t.data_ptr() == ptrs[name] for name, t in shared.items())
            want = [graphs._forward(size, graphs._batch(size)).clone(),
                    *(ids.clone() for _, ids in graphs.routed)]
            if mtp_tokens:
                want += [graphs.hidden.clone(), graphs._mtp_forward(size, graphs.hidden).clone()]
            assert got[0].dtype == torch.float32 and got[0].shape == (size, model.cfg.vocab_size)
            torch.testing.assert_close(got[0], want[0], atol=2e-2, rtol=2e-2)
            for g, w in zip(got[1:], want[1:]):
                assert g.shape == w.shape and g.dtype == w.dtype
                if g.dtype == torch.long:  # routing ids (sorted: top-k's order is free), drafts
                    assert torch.equal(g.sort(-1).values, w.sort(-1).values)
                else:
                    torch.testing.assert_close(g, w, atol=2e-2, rtol=2e-2)

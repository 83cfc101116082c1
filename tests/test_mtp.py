"""MTP speculative decoding (DeepSeek-V3's multi-token-prediction layer as the draft): the
layer computes DeepSeek's formula (checked against transformers' modules), its drafts follow
the cached path step by step, and the token stream is exactly the plain engine's."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file, save_file

import afd.core
from afd import LLM, SamplingParams
from afd.config import check_mtp_checkpoint
from afd.kv_cache import allocate_kv_caches
from afd.kv_transfer import Pull, gather_kv, token_slots
from afd.rank_attention import start_decoding
from afd.sequence import CoreRequest, Sequence
from afd.placement import ExpertPlacement
from afd.spec_decode import parse_speculative_config
from ckpt_utils import (mixed_prompts, mtp_chain_reference,
                        mtp_checkpoint, mtp_reference)
from models.batch import ForwardBatch
from models.config import config_from_dict
from models.model import LocalExperts, run_stages
from models.weights import load_model

MTP = {"method": "mtp", "num_speculative_tokens": 1}


def mtp(k: int) -> dict:
    return {"method": "mtp", "num_speculative_tokens": k}


@pytest.fixture(scope="module")
def mtp_ckpt(tmp_path_factory):
    """(folder, transformers model, MTP weights): a tiny DeepSeek-V3 with a random MTP layer."""
    return mtp_checkpoint(str(tmp_path_factory.mktemp("mtp")))


def _prefill_batch(n: int, block_size: int = 8) -> ForwardBatch:
    """One sequence of n tokens, prefilled in one chunk into blocks 0, 1, ..."""
    blocks = -(-n // block_size)
    return ForwardBatch(positions=torch.arange(n), slot_mapping=torch.arange(n),
                        block_tables=torch.arange(blocks, dtype=torch.int32)[None],
                        seq_lens=torch.tensor([n]), query_lens=[n], num_decodes=0,
                        context_lens=[n])


@pytest.fixture(scope="module", params=["glm4_moe", "glm4_moe_lite"])
def glm_mtp_ckpt(request, tmp_path_factory):
    """GLM-4.5 (GQA) and GLM-4.7-Flash (MLA) with a random MTP layer (DeepSeek's module)."""
    return mtp_checkpoint(str(tmp_path_factory.mktemp(request.param)), request.param)


def test_mtp_layer_matches_the_formula_at_every_position(mtp_ckpt):
    """The MTP layer over a prefill's rows (target hidden states kept by the forward) gives
    DeepSeek's draft logits at every position, as transformers' decoder layer with the MTP
    weights computes them over the whole sequence without cache (fp32)."""
    _check_layer_formula(mtp_ckpt)


def test_glm_mtp_layer_matches_the_formula(glm_mtp_ckpt):
    """GLM-4.5's and GLM-4.7-Flash's MTP layer: DeepSeek's formula around their own decoder
    layer (GLM-4.5's: GQA with partial rotary, its own KV cache)."""
    _check_layer_formula(glm_mtp_ckpt)


def test_an_mtp_layer_without_its_embedding_and_head_uses_the_models(glm_mtp_ckpt, tmp_path):
    """An MTP layer shipped without its own embed_tokens / shared_head.head (reported of
    GLM-4.6's release; DeepSeek-V3's has both) loads and runs on the model's: DeepSeek's
    formula with the model's embedding and LM head."""
    folder, hf, weights = glm_mtp_ckpt
    bare = str(tmp_path / "bare")
    shutil.copytree(folder, bare)
    name = os.path.join(bare, "model-mtp.safetensors")
    prefix = f"model.layers.{hf.config.num_hidden_layers}."
    tensors = load_file(name)
    del tensors[prefix + "embed_tokens.weight"], tensors[prefix + "shared_head.head.weight"]
    save_file(tensors, name)
    model = load_model(bare, mtp=True)
    assert model.mtp.embed_tokens.weight is model.model.embed_tokens.weight
    assert model.mtp.shared_head.head.weight is model.lm_head.weight
    _check_layer_formula((bare, hf, {**weights, "embed_tokens.weight": hf.model.embed_tokens.weight,
                                     "shared_head.head.weight": hf.lm_head.weight}))


def test_glm_drafts_follow_the_cached_path_step_by_step(glm_mtp_ckpt, monkeypatch):
    """As ``test_drafts_follow_the_cached_path_step_by_step`` (k = 3, chained drafts)."""
    _check_drafts(glm_mtp_ckpt, monkeypatch, 3)


def test_glm_greedy_identical_with_mtp(glm_mtp_ckpt):
    """GLM with MTP drafts: the plain engine's greedy tokens, drafts verified."""
    prompts = [{"prompt_token_ids": p} for p in mixed_prompts(3, seed=2, lengths=[30, 5, 23])]
    want, got, stats = _plain_and_mtp(glm_mtp_ckpt[0], PARAMS[0], prompts, 2,
                                      max_num_batched_tokens=16)
    _assert_same(want, got)
    assert stats[0].num_draft_tokens > 0


def _check_layer_formula(ckpt) -> None:
    folder, hf, weights = ckpt
    model = load_model(folder, mtp=True)
    tokens = mixed_prompts(1, seed=3, lengths=[21])[0]
    n = len(tokens)
    batch = _prefill_batch(n)
    kv = allocate_kv_caches(model.cfg, 4, 8, torch.float32, "cpu", len(model.all_layers()))
    assert len(kv) == model.cfg.num_layers + 1
    experts = LocalExperts(model)
    out = run_stages(model.forward_stages(torch.tensor(tokens), batch, kv, torch.arange(n),
                                          keep_hidden=True), experts)
    next_ids = torch.tensor(tokens[1:] + [0])
    got = run_stages(model.mtp.stages(next_ids, out.hidden, batch, kv[-1], torch.arange(n - 1)),
                     experts).logits
    want = mtp_reference(hf, weights, tokens)
    torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-4)
    assert torch.equal(got.argmax(-1), want.argmax(-1))
    assert kv[-1].abs().sum() > 0  # the MTP layer wrote its own cache


def _record_drafts(monkeypatch) -> list[tuple[list[int], list[int]]]:
    """Every set of MTP drafts a core keeps: (the sequence's tokens, its drafts after them)."""
    seen = []
    keep = afd.core.EngineCore._keep_mtp_drafts

    def spy(taken, draft_tokens):
        keep(taken, draft_tokens)
        for seq, *_ in taken:
            if seq.mtp_drafts_for == len(seq.token_ids):
                seen.append((list(seq.token_ids), list(seq.mtp_drafts)))

    monkeypatch.setattr(afd.core.EngineCore, "_keep_mtp_drafts", staticmethod(spy))
    return seen


@pytest.mark.parametrize("k", [1, 3])
def test_drafts_follow_the_cached_path_step_by_step(mtp_ckpt, monkeypatch, k):
    """Chunked prefills, decodes and verify steps: each draft the engine makes is the
    reference MTP argmax at the sequence's second-to-last position (its MTP KV cache written
    chunk by chunk and step by step, rejected rows overwritten); with k = 3 the chained drafts
    are the reference chain's (``mtp_chain_reference``: each chained row from the draft before
    and the MTP output before it after shared_head.norm), so the chained rows' MTP KV written
    past the computed tokens is overwritten before any later row reads it."""
    _check_drafts(mtp_ckpt, monkeypatch, k)


def _check_drafts(ckpt, monkeypatch, k: int) -> None:
    folder, hf, weights = ckpt
    seen = _record_drafts(monkeypatch)
    prompts = mixed_prompts(3, seed=5, lengths=[30, 3, 17])
    llm = LLM(folder, seed=0, block_size=8, max_num_batched_tokens=16,
              speculative_config=mtp(k))
    try:
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                            SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
                            use_tqdm=False)
    finally:
        llm.shutdown()
    full = [p + list(o.outputs[0].token_ids) for p, o in zip(prompts, outs)]
    refs = [mtp_reference(hf, weights, f).argmax(-1).tolist() for f in full]
    checked = chained = 0
    for tokens, drafts in seen:
        i = next(i for i, f in enumerate(full) if f[:len(tokens)] == tokens)
        assert drafts[0] == refs[i][len(tokens) - 2], (i, len(tokens))
        # k at most, fewer only where max_tokens leaves no room to verify them
        left = len(prompts[i]) + 12 - len(tokens) - 1
        assert len(drafts) == max(1, min(k, left)), (i, len(tokens), drafts)
        if len(drafts) > 1:
            assert drafts == mtp_chain_reference(hf, weights, tokens, len(drafts))
            chained += 1
        checked += 1
    assert checked >= 3 * (11 if k == 1 else 4)  # drafts after every emitting step
    assert chained >= (0 if k == 1 else 3 * 3)


def _mtp_kv_after_prefill(folder, earlier: list[list[int]], prompt: list[int],
                          **kw) -> torch.Tensor:
    """The MTP layer's KV at every prompt position of ``prompt`` once it is prefilled, after
    ``earlier`` prompts ran on the same engine (their blocks left in the prefix cache)."""
    llm = LLM(folder, seed=0, block_size=8, speculative_config=mtp(1), **kw)
    try:
        params = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)
        for p in earlier:  # one at a time: each finds what those before it left cached
            llm.generate([{"prompt_token_ids": p}], params, use_tqdm=False)
        llm.engine.add_request("b", {"prompt_token_ids": prompt}, params)
        llm.engine.step()
        core = llm.engine.core
        seq = core.seqs["b"]
        assert seq.num_computed_tokens == len(prompt)
        slots = token_slots(seq.block_ids, len(prompt), 8, torch.device("cpu"))
        return gather_kv(core.runner.kv_caches[-1:], slots)[0].clone()
    finally:
        llm.shutdown()


def test_a_prefix_cache_hit_leaves_the_mtp_kv_of_its_own_next_token(mtp_ckpt):
    """The MTP layer's KV at position p is made from token p + 1, so a cached block's last
    position holds the KV of the token that followed it in the sequence that computed it: a
    prompt that shares two full blocks with an earlier one and differs right after them gets
    the MTP KV a run without the cache computes at every position (the hit's last block is
    recomputed, as vLLM does for EAGLE/MTP), not the earlier prompt's at position 15."""
    folder, _, _ = mtp_ckpt
    shared = mixed_prompts(1, seed=8, lengths=[16])[0]  # two blocks of 8
    a, b = shared + [3, 4, 5, 6, 7], shared + [9, 4, 5, 6, 7]
    want = _mtp_kv_after_prefill(folder, [], b, enable_prefix_caching=False)
    got = _mtp_kv_after_prefill(folder, [a], b)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_a_prefill_rank_recomputes_the_hits_last_block_for_the_mtp_kv(mtp_ckpt):
    """A prefill-only core (P/D's prefill rank) runs the MTP pass and sends the MTP KV, but
    verifies no drafts: its prefix-cache hits drop their last block as the single process's
    do, so the MTP KV it sends at position 15 is made from the prompt's own next token, not
    from the token that followed the block where an earlier prompt computed it."""
    folder, _, _ = mtp_ckpt
    shared = mixed_prompts(1, seed=8, lengths=[16])[0]
    a, b = shared + [3, 4, 5, 6, 7], shared + [9, 4, 5, 6, 7]
    single = LLM(folder, seed=0, block_size=8, speculative_config=mtp(1))
    cfg, model = single.engine.core.cfg, single.engine.core.runner.model
    params = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)
    got = []
    try:
        for caching in (False, True):
            core = afd.core.EngineCore(model, replace(cfg, enable_prefix_caching=caching),
                                       prefill_only=True)
            for rid, prompt in (("a", a), ("b", b)):
                core.add_request(CoreRequest(rid, prompt, params))
                while not core.newly_parked:
                    core.step()
                seq = core.newly_parked.pop()
                slots = token_slots(seq.block_ids, len(prompt), 8, torch.device("cpu"))
                kv = gather_kv(core.runner.kv_caches[-1:], slots)[0].clone()
                core.release(rid)
            got.append(kv)
            hits = core.scheduler.prefix_cache_hits
    finally:
        single.shutdown()
    torch.testing.assert_close(got[1], got[0], atol=1e-4, rtol=1e-4)
    assert hits == 8  # b's first block came from the cache


def _plain_and_mtp(folder, params, prompts, k=1, **kw):
    kw = {"seed": 0, "block_size": 8, **kw}
    base = LLM(folder, **kw)
    want = base.generate(prompts, params, use_tqdm=False)
    base.shutdown()
    spec = LLM(folder, speculative_config=mtp(k), **kw)
    try:
        got = spec.generate(prompts, params, use_tqdm=False)
        core = spec.engine.core
        if hasattr(core, "allocator"):  # single process: no KV block leaks
            assert not core.seqs and core.allocator.num_free == core.allocator.num_blocks
        stats = core.stats()
    finally:
        spec.shutdown()
    return want, got, stats


def _assert_same(want, got) -> None:
    for w, g in zip(want, got, strict=True):
        for cw, cg in zip(w.outputs, g.outputs, strict=True):
            assert cg.token_ids == cw.token_ids
            assert cg.finish_reason == cw.finish_reason


PARAMS = [SamplingParams(temperature=0, max_tokens=16, ignore_eos=True),
          SamplingParams(temperature=0.9, seed=11, max_tokens=16, ignore_eos=True, n=2),
          SamplingParams(temperature=0, max_tokens=9, ignore_eos=True, logprobs=2),
          SamplingParams(temperature=1.0, seed=4, max_tokens=16, ignore_eos=True,
                         repetition_penalty=1.3),  # penalized: speculates too
          # structured output speculates too (drafts cut where the grammar refuses one)
          SamplingParams(temperature=0.7, seed=5, max_tokens=16,
                         structured_outputs={"regex": "[a-z ]{4,40}"})]


@pytest.mark.parametrize("k", [1, 2, 3])
def test_greedy_and_seeded_identical_chunked_and_preempted(mtp_ckpt, k):
    """Greedy, seeded with n=2, logprobs, a constrained and a penalized request, all
    speculating, with chunked prefill (16 tokens a step) and a KV pool small enough to preempt
    (and, for k > 1, to leave sequences without lookahead slots at times): the plain engine's
    tokens, no leaked block (lookahead blocks included)."""
    folder, _, _ = mtp_ckpt
    prompts = [{"prompt_token_ids": p}
               for p in mixed_prompts(5, seed=2, lengths=[30, 5, 23, 9, 12])]
    want, got, stats = _plain_and_mtp(folder, PARAMS, prompts, k, block_size=4,
                                      num_kv_blocks=16, max_model_len=64,
                                      max_num_batched_tokens=16)
    _assert_same(want, got)
    assert stats[0].num_preemptions > 0, "the pool was meant to force preemption"
    assert stats[0].num_draft_tokens > 0
    assert got[4].metrics.spec_num_draft_tokens > 0  # the constrained one verified drafts
    assert got[3].metrics.spec_num_draft_tokens > 0  # so did the penalized one


def test_graph_path_matches_eager_chunked_and_preempted(mtp_ckpt):
    """The CUDA-graph path (enforce_eager=False; on CPU its static buffers run uncaptured,
    tests/test_cuda_graphs.py) with MTP drafts, k = 2, on the workload above (logprobs, a
    constrained and a penalized request, chunked prefill, preemption): the eager engine's
    tokens, the MTP graph run on decode steps, no leaked block."""
    folder, _, _ = mtp_ckpt
    prompts = [{"prompt_token_ids": p}
               for p in mixed_prompts(5, seed=2, lengths=[30, 5, 23, 9, 12])]
    kw = dict(seed=0, block_size=4, num_kv_blocks=16, max_model_len=64, max_num_batched_tokens=16,
              speculative_config=mtp(2))
    runs = []
    for eager in (True, False):
        llm = LLM(folder, enforce_eager=eager, **kw)
        graphs, replays = llm.engine.core.runner.graphs, []
        if graphs is not None:
            run_mtp = graphs.run_mtp
            graphs.run_mtp = lambda: replays.append(1) or run_mtp()
        try:
            runs.append(llm.generate(prompts, PARAMS, use_tqdm=False))
            core = llm.engine.core
            assert core.allocator.num_free == core.allocator.num_blocks
            assert core.stats()[0].num_preemptions > 0
        finally:
            llm.shutdown()
        assert (graphs is None) == eager and (len(replays) > 10) != eager
    _assert_same(*runs)


def test_disable_by_batch_size_with_mtp_drafts(mtp_ckpt, monkeypatch):
    """speculative_config.disable_by_batch_size with MTP (k = 3, every other request
    penalised): while 3 or more sequences run no step verifies drafts (the MTP layer still
    runs, its KV kept whole), so the two shortest requests finish without any; drafting
    resumes once two are left. The plain engine's tokens, no leaked block."""
    folder, _, _ = mtp_ckpt
    monkeypatch.setitem(globals(), "mtp", lambda k: {"method": "mtp", "num_speculative_tokens": k,
                                                     "disable_by_batch_size": 3})
    prompts = [{"prompt_token_ids": p}
               for p in mixed_prompts(5, seed=2, lengths=[30, 5, 23, 9, 12])]
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True,
                             repetition_penalty=1.2 if i % 2 else 1.0)
              for i, m in enumerate([4, 6, 9, 20, 30])]
    want, got, _ = _plain_and_mtp(folder, params, prompts, 3, block_size=4, num_kv_blocks=40,
                                  max_model_len=64)
    _assert_same(want, got)
    drafts = [g.metrics.spec_num_draft_tokens for g in got]
    assert drafts[0] == drafts[1] == 0, drafts
    assert drafts[3] > 0 and drafts[4] > 0, drafts


def _constant_model(folder: str, dest: str) -> str:
    """A copy of ``folder`` whose target and MTP final norms are zero: every logit is 0, so
    greedy picks token 0 always and every MTP draft (argmax 0) is right."""
    shutil.copytree(folder, dest)
    for file, name in (("model.safetensors", "model.norm.weight"),
                       ("model-mtp.safetensors", None)):
        path = os.path.join(dest, file)
        tensors = load_file(path)
        for k in tensors:
            if k == name or (name is None and k.endswith("shared_head.norm.weight")):
                tensors[k] = torch.zeros_like(tensors[k])
        save_file(tensors, path)
    return dest


def _record_decode_groups(monkeypatch) -> list[list[int]]:
    """The rows per group of every grouped MLA decode attention call."""
    import kernels

    seen, decode = [], kernels.mla_decode_attention

    def spy(*args, groups=None, **kwargs):
        if groups is not None:
            seen.append(groups.rows)
        return decode(*args, groups=groups, **kwargs)

    monkeypatch.setattr(kernels, "mla_decode_attention", spy)
    return seen


@pytest.fixture(scope="module")
def const_ckpt(mtp_ckpt, tmp_path_factory):
    return _constant_model(mtp_ckpt[0], str(tmp_path_factory.mktemp("const") / "ckpt"))


@pytest.mark.parametrize("k", [1, 2, 3])
def test_an_mtp_that_predicts_well_gets_its_drafts_accepted(const_ckpt, monkeypatch, k):
    """Every draft right (the degenerate constant model): each step after the first emits
    k + 1 tokens, fewer only where max_tokens leaves less room (the chained drafts' lookahead
    slots were there every step: a missing slot would cut a chain and show here)."""
    folder = const_ckpt
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    prompts = [{"prompt_token_ids": p} for p in mixed_prompts(3, seed=4, lengths=[7, 12, 3])]
    groups = _record_decode_groups(monkeypatch)
    want, got, stats = _plain_and_mtp(folder, params, prompts, k)
    _assert_same(want, got)
    # each verifying sequence's k + 1 rows went to decode attention as one group (target and
    # MTP layers alike), never one per row
    assert [k + 1] * 3 in groups
    assert all(o.outputs[0].token_ids == [0] * 12 for o in got)
    drafts, emitted, steps = 0, 1, 0  # per sequence, after the prefill step's first token
    while emitted < 12:
        step = min(k, 12 - emitted - 1)
        drafts, emitted, steps = drafts + step, emitted + step + 1, steps + 1
    assert steps == -(-11 // (k + 1))  # k + 1 tokens a step
    assert stats[0].num_accepted_tokens == stats[0].num_draft_tokens == 3 * drafts
    assert all(o.metrics.spec_num_accepted_tokens == drafts for o in got)


@pytest.mark.parametrize(("config", "field"), [
    ({"method": "mtp", "num_speculative_tokens": 5}, "num_speculative_tokens must be at most 4"),
    ({"method": "mtp", "num_speculative_tokens": 1, "prompt_lookup_max": 2},
     "prompt_lookup_max is for method 'ngram'"),
    ({"method": "eagle", "num_speculative_tokens": 1}, "method must be"),
])
def test_bad_mtp_config_is_named(config, field):
    with pytest.raises(ValueError, match=field):
        parse_speculative_config(config)


def test_mtp_spellings():
    for method in ("mtp", "deepseek_mtp"):
        spec = parse_speculative_config({"method": method, "num_speculative_tokens": 1})
        assert spec.method == "mtp" and spec.num_speculative_tokens == 1


def test_checkpoints_without_an_mtp_layer_are_refused(mtp_ckpt, tmp_path):
    folder = mtp_ckpt[0]
    with pytest.raises(ValueError, match="num_nextn_predict_layers is 0 or absent"):
        LLM(seed=0, speculative_config=MTP)  # the embedded default model has none
    no_weights = str(tmp_path / "noweights")
    shutil.copytree(folder, no_weights)
    os.remove(os.path.join(no_weights, "model-mtp.safetensors"))
    with pytest.raises(ValueError, match=r"no MTP weights \(model.layers.3.eh_proj.weight"):
        LLM(no_weights, seed=0, speculative_config=MTP)
    qwen = config_from_dict(dict(
        model_type="qwen3_moe", vocab_size=64, hidden_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, num_experts_per_tok=2, num_experts=8,
        moe_intermediate_size=16, intermediate_size=32, num_nextn_predict_layers=1))
    with pytest.raises(ValueError, match="not supported for architecture .qwen3_moe"):
        check_mtp_checkpoint(folder, qwen)
    dots = config_from_dict(dict(
        architectures=["Dots1ForCausalLM"], vocab_size=64, hidden_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, num_experts_per_tok=2, n_routed_experts=8,
        moe_intermediate_size=16, intermediate_size=32, num_nextn_predict_layers=1))
    with pytest.raises(ValueError, match="method 'mtp' is not supported for architecture .dots1"):
        check_mtp_checkpoint(folder, dots)


def test_mtp_copies_of_the_embedding_and_head_are_shared(mtp_ckpt, tmp_path):
    """An MTP layer whose embed_tokens / shared_head.head equal the model's (DeepSeek-V3's
    release) runs on the model's tensors, its copies dropped; one whose differ keeps its own."""
    folder, hf, weights = mtp_ckpt
    own = load_model(folder, mtp=True)
    assert own.share_mtp_copies() == 0 and own.mtp.embed_tokens.weight is not \
        own.model.embed_tokens.weight
    assert torch.equal(own.mtp.embed_tokens.weight, weights["embed_tokens.weight"])
    copy = str(tmp_path / "copies")
    shutil.copytree(folder, copy)
    name = os.path.join(copy, "model-mtp.safetensors")
    tensors = load_file(name)
    prefix = f"model.layers.{hf.config.num_hidden_layers}."
    tensors[prefix + "embed_tokens.weight"] = hf.model.embed_tokens.weight.detach().clone()
    tensors[prefix + "shared_head.head.weight"] = hf.lm_head.weight.detach().clone()
    save_file(tensors, name)
    shared = load_model(copy, mtp=True)
    assert shared.mtp.embed_tokens.weight is shared.model.embed_tokens.weight
    assert shared.mtp.shared_head.head.weight is shared.lm_head.weight
    dropped = own.mtp.embed_tokens.weight.numel() + own.mtp.shared_head.head.weight.numel()
    assert sum(p.numel() for p in shared.parameters()) == \
        sum(p.numel() for p in own.parameters()) - dropped  # the copies are gone


def test_config_without_mtp_still_loads_a_checkpoint_that_has_one(mtp_ckpt):
    """The MTP tensors are ignored unless asked for (as before), and the model's KV pool
    sizing counts the MTP layer only with MTP on."""
    folder = mtp_ckpt[0]
    model = load_model(folder)
    assert model.mtp is None and len(model.all_layers()) == model.cfg.num_layers
    with open(os.path.join(folder, "config.json")) as f:
        assert json.load(f)["num_nextn_predict_layers"] == 1


@pytest.mark.parametrize("ffn", [pytest.param(0, marks=pytest.mark.slow), 1])
def test_attention_ranks_with_and_without_ffn_ranks_match_single_process(const_ckpt, ffn):
    """Two attention ranks (experts in-process, or on FFN ranks that run the MTP layer's
    MoE as k = 3 more collective rounds each step: the MTP pass and two chained rounds, an
    idle attention rank taking part with zero rows, as does one whose sequences chain fewer
    rounds: the requests end at different steps): the single process's tokens, greedy and
    seeded, on a model whose greedy MTP drafts are accepted. (ffn=0 is marked slow: 22 s on
    the 2-core CPU; ffn=1, 33 s, runs by default as the P/D + FFN n-gram test does.)"""
    folder = const_ckpt
    prompts = [{"prompt_token_ids": p} for p in mixed_prompts(3, seed=6, lengths=[9, 20, 4])]
    params = [SamplingParams(temperature=0, max_tokens=6, ignore_eos=True),
              SamplingParams(temperature=0.8, seed=5, max_tokens=14, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)]
    base = LLM(folder, seed=0)
    want = base.generate(prompts, params, use_tqdm=False)
    base.shutdown()
    placement = None
    if ffn:  # two FFN ranks, each decoder layer its own table (replicas, uneven counts); the
        # MTP layer (past the tables) takes the contiguous one; a load record skips it
        cfg = json.load(open(os.path.join(folder, "config.json")))
        num_experts, ffn = cfg["n_routed_experts"], 2
        everyone = list(range(num_experts))
        placement = ExpertPlacement(num_experts, layers=tuple(
            (everyone[:1 + layer], everyone[1 + layer:] + [0]) if layer % 2 else
            (everyone[::2] + [1], everyone[1::2]) for layer in range(cfg["num_hidden_layers"])))
    llm = LLM(folder, seed=0, attention=2, ffn=ffn, timeout_s=60, speculative_config=mtp(3),
              expert_placement=placement)
    try:
        if ffn:
            llm.start_expert_load_record()
        got = llm.generate(prompts, params, use_tqdm=False)
        stats = llm.engine.core.stats()
        record = llm.dump_expert_load_record() if ffn else None
    finally:
        llm.shutdown()
    _assert_same(want, got)
    assert len(stats) == 2 and sum(s.num_accepted_tokens for s in stats) > 0
    assert all(s.kv_usage == 0 and s.num_running == 0 for s in stats)  # no block held
    if ffn:  # the decoder layers' rows only, every MoE layer's the same total
        assert len(record["counts"]) == cfg["num_hidden_layers"]
        totals = {sum(row) for row in record["counts"] if sum(row)}
        assert len(totals) == 1 and totals.pop() > 0


def test_the_mtp_row_is_the_one_that_takes_the_last_emitted_token():
    """Per sampling sequence the MTP layer drafts from the row that takes the last token it
    emits (its accepted drafts' run, then the first differing sample: the bonus row when all
    are accepted); a sequence keeps those drafts, none once finished."""
    from types import SimpleNamespace as NS

    from afd.model_runner import mtp_inputs
    from afd.scheduler import ScheduledSeq

    def seq(tokens, computed, finished=None):
        return NS(token_ids=tokens, num_computed_tokens=computed, finish_reason=finished,
                  mtp_drafts=[], mtp_drafts_for=-1)

    a = ScheduledSeq(seq([1, 2, 3], 2), 1)  # a decode
    b = ScheduledSeq(seq([4, 5, 6, 7], 3), 3, [8, 9])  # verifies 2 drafts: 8 right, 9 wrong
    c = ScheduledSeq(seq([1, 2, 3, 4, 5], 0), 5)  # a whole prompt
    d = ScheduledSeq(seq([1, 2, 3, 4, 5, 6], 0), 3)  # a chunk: no sample
    e = ScheduledSeq(seq([4, 5], 1), 3, [8, 9])  # both drafts right: the bonus row
    # rows: decodes first (a: 0, b: 1-3, e: 4-6), then the chunks (c: 7-11, d: 12-14)
    next_ids, rows, emitted = mtp_inputs([a, b, c, d, e], [7, 8, 5, 1, 6, 8, 9, 3])
    assert next_ids == [7, 8, 5, 1, 8, 9, 3, 2, 3, 4, 5, 6, 2, 3, 4]
    assert rows == [0, 2, 11, 6] and emitted == [1, 2, 1, 3]

    f, g = seq([1, 9], 1), seq([1], 0, "length")
    afd.core.EngineCore._keep_mtp_drafts([(f, [9], None, None, None),
                                          (g, [1], None, None, None)], [[10, 11], [20]])
    assert (f.mtp_drafts, f.mtp_drafts_for) == ([10, 11], 2)
    assert g.mtp_drafts == []


def _running(pool, prompt: list[int], max_tokens: int = 50, drafts=(), **params):
    """A sequence with its prompt's KV computed and one output token (not computed), holding
    blocks for its prompt, with MTP drafts after its tokens."""
    seq = Sequence(CoreRequest("r", prompt, SamplingParams(temperature=0, max_tokens=max_tokens,
                                                           **params)), 4096)
    seq.token_ids.append(7)
    seq.block_ids = pool.allocate(pool.blocks_for(len(prompt)))
    seq.num_computed_tokens = len(prompt)
    seq.mtp_drafts, seq.mtp_drafts_for = list(drafts), len(seq.token_ids)
    return seq


def test_chained_drafts_get_lookahead_slots_from_empty_blocks_only():
    """k = 3: a sampling sequence gets KV slots for its chained MTP rows (k - 1 past the
    step's tokens, drafts included) from empty blocks, after everyone's tokens; fewer (and so a
    shorter chain: ``DraftChain``) when the pool has none, none past what max_tokens lets it
    verify, none in a step that preempted; a penalised sequence speculates as any other."""
    from afd.block_pool import BlockPool
    from afd.model_runner import DraftChain
    from afd.scheduler import Scheduler
    from afd.spec_decode import SpecConfig

    spec = SpecConfig(3, 0, 0, "mtp")
    pool = BlockPool(num_blocks=8, block_size=2, enable_caching=False)
    a = _running(pool, [1, 2, 3, 4, 5], drafts=[8, 9, 10])  # 3 blocks for 6 tokens
    sched = Scheduler(pool, max_num_seqs=4, max_num_batched_tokens=64, spec=spec)
    sched.add_running(a)
    plan = sched.schedule()
    assert plan.seqs[0].draft_token_ids == [8, 9, 10]
    # positions 5..8 verified, then chained rows up to 8 + 2 = 10: 6 blocks (one lookahead)
    assert len(a.block_ids) == 6 and pool.num_empty == 2
    chain = DraftChain.plan(plan.seqs, [4], 2, 2)  # all accepted: rounds at 9 and 10
    assert chain.rounds == [2] and chain.positions.tolist() == [8]
    assert DraftChain.plan(plan.seqs, [1], 2, 2).positions.tolist() == [5]  # none accepted

    pool = BlockPool(num_blocks=5, block_size=2, enable_caching=False)
    a = _running(pool, [1, 2, 3, 4, 5], drafts=[8, 9, 10])
    sched = Scheduler(pool, max_num_seqs=4, max_num_batched_tokens=64, spec=spec)
    sched.add_running(a)
    plan = sched.schedule()  # verifying takes every block: no lookahead, no preemption
    assert plan.seqs[0].draft_token_ids == [8, 9, 10] and len(a.block_ids) == 5
    assert not plan.num_preempted
    assert DraftChain.plan(plan.seqs, [4], 2, 2).rounds == [1]  # position 9 only
    assert DraftChain.plan(plan.seqs, [2], 2, 2).rounds == [2]  # fewer accepted: room
    assert DraftChain.plan(plan.seqs, [4], 2, 4).rounds == [2]

    pool = BlockPool(num_blocks=16, block_size=2, enable_caching=False)
    short = _running(pool, [1, 2, 3, 4, 5], max_tokens=4, drafts=[8, 9, 10])
    penalized = _running(pool, [1, 2, 3], drafts=[8], repetition_penalty=1.2)
    sched = Scheduler(pool, max_num_seqs=4, max_num_batched_tokens=64, spec=spec)
    for seq in (short, penalized):
        sched.add_running(seq)
    sched.add(Sequence(CoreRequest("c", [1, 2, 3], SamplingParams(temperature=0)), 4096))
    plan = sched.schedule()
    # 2 drafts at most (max_tokens 4, one emitted): positions 5..7, nothing chained past 7
    verifying = next(s for s in plan.seqs if s.seq is short)
    assert verifying.draft_token_ids == [8, 9] and len(short.block_ids) == 4
    # penalised: its draft verified (positions 3, 4) and chained rows up to 4 + 2 = 6
    assert next(s for s in plan.seqs if s.seq is penalized).draft_token_ids == [8]
    assert len(penalized.block_ids) == 4
    prompt = plan.seqs[-1].seq
    assert prompt.request_id == "c" and len(prompt.block_ids) == 3  # 2, then rows at 3, 4

    pool = BlockPool(num_blocks=8, block_size=2, enable_caching=False)
    a = _running(pool, [1, 2, 3, 4, 5, 6, 7, 8], drafts=[8, 9, 10])  # 4 full blocks
    b = _running(pool, [1, 2, 3, 4, 5, 6, 7])  # the other 4
    sched = Scheduler(pool, max_num_seqs=4, max_num_batched_tokens=64, spec=spec)
    for seq in (a, b):
        sched.add_running(seq)
    plan = sched.schedule()  # a's token needs a block: b is preempted
    assert plan.num_preempted == 1 and [s.seq for s in plan.seqs] == [a]
    assert plan.seqs[0].draft_token_ids == [] and len(a.block_ids) == 5  # no lookahead


def test_transferred_kv_gives_the_reference_drafts(mtp_ckpt, monkeypatch):
    """P/D's path in one process: a prefill-only core (block size 8) runs the prompts and the
    MTP pass over them; each prompt's KV, every layer in token order as a prefill rank sends it
    (``gather_kv``: the MTP layer's is the last), goes into a decode core's blocks (block size
    4) through the attention rank's ``start_decoding``, with the draft made after the first
    token. The decode core's pool is small enough to preempt (its recompute rebuilds the MTP
    KV). Every draft either core makes is the reference MTP argmax after the sequence's tokens
    (random MTP weights: a draft depends on the MTP KV it attends over, so a transfer without
    the MTP layer's rows gives other drafts; k = 3: the chained ones are the reference
    chain's, the prefill core's three included), and the tokens are the single process's."""
    folder, hf, weights = mtp_ckpt
    prompts = mixed_prompts(4, seed=8, lengths=[21, 6, 30, 13])
    params = [SamplingParams(temperature=0, max_tokens=10, ignore_eos=True),
              SamplingParams(temperature=0.9, seed=3, max_tokens=10, ignore_eos=True)] * 2
    single = LLM(folder, seed=0, block_size=4, speculative_config=mtp(3))
    try:
        want = single.generate([{"prompt_token_ids": p} for p in prompts], params,
                               use_tqdm=False)
        cfg, model = single.engine.core.cfg, single.engine.core.runner.model
    finally:
        single.shutdown()
    seen = _record_drafts(monkeypatch)
    prefill = afd.core.EngineCore(model, replace(cfg, block_size=8), prefill_only=True)
    decode = afd.core.EngineCore(model, replace(cfg, num_kv_blocks=14, max_model_len=48))
    requests = [CoreRequest(str(i), p, params[i]) for i, p in enumerate(prompts)]
    for req in requests:
        prefill.add_request(req)
    while len(prefill.newly_parked) < len(requests):
        prefill.step()
    got, pulls = {}, []
    for req, seq in zip(requests, prefill.newly_parked):
        n = seq.num_computed_tokens
        buffer = gather_kv(prefill.runner.kv_caches, token_slots(seq.block_ids, n, 8, "cpu"))
        got[req.request_id] = [seq.token_ids[-1]]
        pulls.append((Pull(req, seq.token_ids[-1], n, src=0, tag=0, drafts=seq.mtp_drafts),
                      buffer))
        prefill.release(req.request_id)
    alloc, sched = decode.allocator, decode.scheduler
    while pulls or decode.has_unfinished():
        # admitted as the attention rank admits: while one fits beside a block per runner
        while pulls and not sched.waiting and (alloc.num_free - len(sched.running)
                                               >= alloc.blocks_for(pulls[0][0].num_kv_tokens + 1)):
            pull, buffer = pulls.pop(0)
            blocks = alloc.allocate(alloc.blocks_for(pull.num_kv_tokens + 1))
            assert start_decoding(decode, pull, blocks, buffer) == []
        for out in decode.step():
            got[out.request_id] += out.new_token_ids
    assert [got[str(i)] for i in range(len(prompts))] == [o.outputs[0].token_ids for o in want]
    stats = decode.stats()[0]
    assert stats.num_preemptions > 0, "the decode pool was meant to force preemption"
    assert stats.num_draft_tokens > 0
    for core in (prefill, decode):
        assert not core.seqs and core.allocator.num_free == core.allocator.num_blocks
    full = [p + got[str(i)] for i, p in enumerate(prompts)]
    refs = [mtp_reference(hf, weights, f).argmax(-1).tolist() for f in full]
    assert len(seen) >= len(prompts) * 6
    chained = 0
    for tokens, drafts in seen:
        i = next(i for i, f in enumerate(full) if f[:len(tokens)] == tokens)
        assert drafts[0] == refs[i][len(tokens) - 2], (i, len(tokens))
        if len(drafts) > 1:
            assert drafts == mtp_chain_reference(hf, weights, tokens, len(drafts))
            chained += 1
    assert chained >= len(prompts) * 4


@pytest.mark.parametrize("ffn", [1, pytest.param(0, marks=pytest.mark.slow)])
def test_pd_matches_single_process(const_ckpt, ffn):
    """1 prefill rank (block size 8) + 1 decode attention rank (block size 4; with an FFN rank,
    or, marked slow, without), MTP with k = 3, on a model whose greedy MTP drafts are always
    right. First batch, no preemption: per request the drafts verified and accepted are the
    single process's (9 tokens: 2 steps of 4 after the first, 6 drafts, as the prefill rank's
    3 drafts after the first token came with it; with one of them, or none, 5 drafts in 3
    steps). Second batch, a decode pool that preempts, a
    transfer that never comes and a request aborted while its KV waits for room: greedy and
    seeded tokens (a uniform draw each here: drafts rejected, the generator rewound) are the
    single process's, the lost transfer ends its request alone (the prefill rank's zeros
    complete the receive: L + 1 layers), and no KV block stays held on either side. (That the
    MTP KV that arrives is right: test_transferred_kv_gives_the_reference_drafts; here every
    MTP logit is 0 whatever its KV.)"""
    from ckpt_utils import run_until_done
    from test_pd import SMALL_POOL, wait_all_free

    folder = const_ckpt
    greedy = SamplingParams(temperature=0, max_tokens=9, ignore_eos=True)
    first = [{"prompt_token_ids": p} for p in mixed_prompts(3, seed=6, lengths=[9, 20, 4])]
    second = [{"prompt_token_ids": p} for p in mixed_prompts(6, seed=7)]
    mixed = [SamplingParams(temperature=1.0, seed=i, max_tokens=20, ignore_eos=True)
             if i % 2 else SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
             for i in range(len(second))]
    base = LLM(folder, seed=0, speculative_config=mtp(3))
    want_first = base.generate(first, greedy, use_tqdm=False)
    want_second = base.generate(second, mixed, use_tqdm=False)
    base.shutdown()
    spec = [(o.metrics.spec_num_draft_tokens, o.metrics.spec_num_accepted_tokens)
            for o in want_first]
    assert spec == [(6, 6)] * 3
    llm = LLM(folder, seed=0, prefill=1, attention=1, ffn=ffn, timeout_s=12,
              prefill_block_size=8, speculative_config=mtp(3), **SMALL_POOL)
    try:
        got = llm.generate(first, greedy, use_tqdm=False)
        _assert_same(want_first, got)
        assert [(o.metrics.spec_num_draft_tokens, o.metrics.spec_num_accepted_tokens)
                for o in got] == spec
        assert llm.engine.core.stats()[0].num_preemptions == 0
        engine = llm.engine
        engine.core.drop_transfer("victim")
        engine.add_request("victim", second[1], greedy)
        for i, (prompt, params) in enumerate(zip(second, mixed)):
            engine.add_request(str(i), prompt, params)
        engine.add_request("gone", second[1], greedy)  # aborted while its KV waits for room
        while engine.core.placed["gone"].stage != "transfer":
            assert engine.core.placed["gone"].stage == "prefill", "it was meant to wait"
            engine.step()
        engine.abort_request("gone")
        done = run_until_done(llm, ["victim", *map(str, range(len(second)))])
        assert done.pop("victim").outputs[0].finish_reason == "error"
        _assert_same(want_second, [done[str(i)] for i in range(len(second))])
        stats = llm.engine.core.stats()[0]
        assert stats.num_preemptions > 0, "the decode pool was meant to force preemption"
        assert stats.num_accepted_tokens > 0
        wait_all_free(llm)
    finally:
        llm.shutdown()


def test_live_rebalance_moves_the_mtp_layers_experts_too(mtp_ckpt):
    """A live rebalance (afd.rebalance) with MTP drafts on FFN ranks: to a one-table placement
    (the two ranks' experts swapped, the MTP layer's with them), then from the record (per
    layer; the MTP layer back to the contiguous table, as at start), each across running
    requests: the single process's tokens, and the FFN ranks report the MTP layer's experts."""
    from ckpt_utils import run_until_done

    folder = mtp_ckpt[0]
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    prompts = [{"prompt_token_ids": list(range(3 + 5 * i, 12 + 5 * i))} for i in range(3)]
    with LLM(folder, speculative_config=mtp(2), enable_prefix_caching=False) as llm:
        expected = [o.outputs[0].token_ids for o in llm.generate(prompts, params,
                                                                 use_tqdm=False)]
    swapped = ExpertPlacement(8, ((4, 5, 6, 7), (0, 1, 2, 3)))
    with LLM(folder, attention=1, ffn=2, speculative_config=mtp(2), timeout_s=30,
             enable_prefix_caching=False) as llm:
        client = llm.engine.core
        llm.start_expert_load_record()
        for tag, rebalance in (("swap", lambda: llm.rebalance_experts(placement=swapped)),
                               ("record", llm.rebalance_experts)):
            ids = [f"{tag}-{i}" for i in range(len(prompts))]
            for rid, prompt in zip(ids, prompts, strict=True):
                llm.engine.add_request(rid, prompt, params)
            while not any(out.outputs[0].token_ids for out in llm.engine.step()):
                pass
            assert rebalance()["moved"] > 0
            done = run_until_done(llm, ids)
            assert [done[rid].outputs[0].token_ids for rid in ids] == expected, tag
            mtp_layer = 3  # past the 3 decoder layers
            want = (4, 5, 6, 7) if tag == "swap" else (0, 1, 2, 3)
            assert client.rank_experts[0][mtp_layer] == list(want)


def test_periodic_rebalance_refuses_a_start_whose_mtp_layer_cannot_follow(mtp_ckpt):
    """With MTP drafts on FFN ranks, a one-table start with a copy a rank (5 + 5 slots of 8
    experts) gives the MTP layer 5 slots a rank; every placement a rebalance computes gives it
    the contiguous 4 + 4, so every rebalance is refused: eplb_interval_steps is refused before
    any rank starts (it started, then skipped every interval with a warning)."""
    copies = ExpertPlacement(8, ((0, 1, 2, 3, 4), (4, 5, 6, 7, 0)))
    with pytest.raises(ValueError, match="eplb_interval_steps.*MTP layer"):
        LLM(mtp_ckpt[0], attention=1, ffn=2, speculative_config=mtp(2), timeout_s=30,
            expert_placement=copies, eplb_interval_steps=4).shutdown()


def _turn_hits(spec) -> list[int]:
    """Prefix-cache hits (tokens) of four prompts run one after another, each prefilled with
    one token sampled, then finished (block size 2): x and y share their first two blocks and
    part at the first token of the third; z is a follow-up turn of y, z2 of z."""
    from afd.block_pool import BlockPool
    from afd.scheduler import Scheduler

    sched = Scheduler(BlockPool(num_blocks=64, block_size=2), 4, 64, spec=spec)
    shared, hits = [1, 2, 3, 4], []
    for rid, tail in (("x", [5, 6, 7]), ("y", [8, 9, 10, 11, 12]),
                      ("z", [8, 9, 10, 11, 12, 13, 14]),
                      ("z2", [8, 9, 10, 11, 12, 13, 14, 15, 16])):
        seq = Sequence(CoreRequest(rid, shared + tail,
                                   SamplingParams(temperature=0, max_tokens=1)), 4096)
        before = sched.prefix_cache_hits
        sched.add(seq)
        plan = sched.schedule()
        seq.append(20)
        sched.update(plan)
        sched.finish(seq)
        hits.append(sched.prefix_cache_hits - before)
    return hits


def test_hits_without_mtp_are_whole():
    """Without the MTP layer (no drafts, or n-gram drafts) no hit is cut: each hit is every
    full block of the prompt before its last token's."""
    from afd.spec_decode import SpecConfig

    assert _turn_hits(None) == [0, 4, 8, 10]
    assert _turn_hits(SpecConfig(2, 3, 1, "ngram")) == [0, 4, 8, 10]


def test_follow_ups_of_a_prompt_parting_at_a_block_boundary_hit_past_it():
    """With MTP, y's hit gives up its last block (x's, filled before x's token 5): y computes
    it again, a copy the cache does not take, and caches its blocks after it. Its follow-ups
    z and z2 hit through x's block and y's after it, minus their last (6 and 8 tokens). A
    hit cut where a block's next token was another sequence's gave them 2 tokens on every
    turn while x's block stayed cached (their MTP KV at position 3 is x's: drafts only)."""
    from afd.spec_decode import SpecConfig

    assert _turn_hits(SpecConfig(1, 0, 0, "mtp")) == [0, 2, 6, 8]

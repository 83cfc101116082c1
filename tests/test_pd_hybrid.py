"""Prefill/decode disaggregation for the hybrid linear-attention models (models.hybrid:
Qwen3-Next, Qwen3.5-MoE), CPU and gloo: the prefill rank sends each prompt's linear-layer
states (its state slot) in the message that carries its KV (afd.kv_transfer), the decode rank
receives them into a state slot it reserved at admission. Tiny random checkpoints against
transformers' greedy tokens and the single process's: prompts of several lengths chunked on
the prefill rank, max_tokens 1, n=2; every block and state slot free on both sides at the
end, after a failed transfer and after an abort while the transfer is in flight too."""

from __future__ import annotations

import time

import pytest

from afd import LLM, SamplingParams, protocol
from ckpt_utils import greedy, greedy_tokens, oracle_case, run_until_done

# the decode rank's pool holds a couple of these prompts at a time; the prefill rank chunks
# them (16 tokens a step) at its own block size
POOL = dict(block_size=4, num_kv_blocks=48, max_model_len=128, max_num_batched_tokens=16,
            max_num_seqs=3)


@pytest.fixture(scope="module")
def next_case(tmp_path_factory):
    return oracle_case(tmp_path_factory, "qwen3_next")


@pytest.fixture(scope="module")
def next_pd(next_case):
    llm = LLM(next_case[1], prefill=1, attention=1, timeout_s=8, prefill_block_size=8, **POOL)
    yield llm
    llm.shutdown()


def wait_all_free(llm: LLM, limit_s: float = 20) -> None:
    """Every KV block and state slot free on the decode and prefill ranks (a hang guard)."""
    client, slots = llm.engine.core, POOL["max_num_seqs"]
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        decode = client.stats()
        prefill = list(client.prefill_stats.values())
        if (prefill and all(s.num_free_blocks == llm.config.num_kv_blocks
                            and s.num_free_state_slots == slots for s in decode)
                and all(s.kv_usage == 0.0 and s.num_running == 0
                        and s.num_free_state_slots == slots for s in prefill)):
            return
        client.step(0.05)
    pytest.fail(f"blocks or state slots not freed: decode {client.stats()}, "
                f"prefill {client.prefill_stats}")


def test_states_pack_and_unpack_into_another_slot(next_case):
    """A hybrid model's message: the KV as gather_kv's, then every linear layer's conv and
    recurrent state of one slot, back into another slot of another core's states."""
    import torch

    from afd.kv_transfer import _parts, gather_transfer, scatter_states, token_slots, transfer_kv

    path = next_case[1]
    src, dst = (LLM(path, max_num_seqs=3, num_kv_blocks=8, block_size=4, max_model_len=32)
                .engine.core.runner.kv_caches for _ in range(2))
    states = [c for c in src if not isinstance(c, torch.Tensor)]
    assert states and len(states) < len(src)
    gen = torch.Generator().manual_seed(0)
    for s in states:
        s.conv.copy_(torch.randn(s.conv.shape, generator=gen))
        s.recurrent.copy_(torch.randn(s.recurrent.shape, generator=gen))
    for c in src:
        if isinstance(c, torch.Tensor):
            c.copy_(torch.randn(c.shape, generator=gen))
    n = 6
    buffer = gather_transfer(src, token_slots([3, 1], n, 4, torch.device("cpu")), 2)
    assert buffer.dtype == torch.uint8 and buffer.numel() == _parts(src, n)[-1][0]
    scatter_states(dst, n, buffer, 0)
    for a, b in zip(states, (c for c in dst if not isinstance(c, torch.Tensor))):
        assert torch.equal(b.conv[0], a.conv[2]) and torch.equal(b.recurrent[0], a.recurrent[2])
        assert not b.conv[1:].any() and not b.recurrent[1:].any()
    kv = transfer_kv(dst, n, buffer)
    first = next(c for c in src if isinstance(c, torch.Tensor))
    assert torch.equal(kv[0][:, :4], first[:, 3])


def test_states_at_qwen3_next_80b_dims():
    """One sequence's states at Qwen3-Next-80B-A3B's dims (36 linear layers; conv 8192 x 3
    bf16, recurrent 32 x 128 x 128 fp32): 73.7 MiB in the message beside its KV (the figure
    in docs/limits.md#msg-size-caps)."""
    import torch

    from afd.kv_transfer import _parts

    from models.hybrid import LinearStates

    class Lin:
        conv_dim, conv_kernel, num_v_heads, k_head_dim, v_head_dim = 8192, 4, 32, 128, 128

    kv = [torch.zeros(2, 1, 1, 2, 256, dtype=torch.bfloat16)]  # one token: 2 KiB a layer
    caches = kv + [LinearStates.allocate(Lin, 1, torch.bfloat16, "cpu") for _ in range(36)]
    size = _parts(caches, 1)[-1][0]
    assert size - 2048 == 36 * (8192 * 3 * 2 + 32 * 128 * 128 * 4) == 77_266_944
    assert round(77_266_944 / 2**20, 1) == 73.7


def test_pd_matches_transformers_and_the_single_process(next_case, next_pd):
    """1P+1A: prompts of 5, 40 and 100 tokens (chunked on the prefill rank), more of them
    than the decode rank's max_num_seqs (transfers wait for a state slot): transformers'
    greedy tokens, the single process's; then again, where the prefill rank's prefix cache
    restores a state snapshot; everything freed at the end."""
    _, path, prompts, expected = next_case
    want = [t for t, _ in expected]
    single = greedy_tokens(LLM(path, **POOL), prompts)
    assert single == want
    assert greedy_tokens(next_pd, prompts + prompts[::-1]) == want + want[::-1]
    assert greedy_tokens(next_pd, prompts[1:]) == want[1:]  # prefix hits on the prefill rank
    wait_all_free(next_pd)
    # the prefill rank's prefix cache (state snapshots) served the repeats; the decode rank
    # caches nothing it received
    client = next_pd.engine.core
    assert sum(s.prefix_cache_hits for s in client.prefill_stats.values()) > 0
    assert all(s.prefix_cache_hits == 0 for s in client.stats())


def test_one_token_and_two_samples(next_case, next_pd):
    """max_tokens 1 (the prefill rank's token is the last: nothing moves) and n=2 (two
    sequences of one prompt, each its own transfer and slot)."""
    _, _, prompts, expected = next_case
    one = next_pd.generate([{"prompt_token_ids": p} for p in prompts], greedy(1),
                           use_tqdm=False)
    assert [o.outputs[0].token_ids for o in one] == [t[:1] for t, _ in expected]
    two = next_pd.generate([{"prompt_token_ids": prompts[1]}],
                           SamplingParams(n=2, temperature=0.0, max_tokens=len(expected[1][0]),
                                          ignore_eos=True), use_tqdm=False)[0]
    assert [c.token_ids for c in two.outputs] == [expected[1][0]] * 2
    wait_all_free(next_pd)


def test_router_places_transfers_by_max_num_seqs(next_pd):
    """The front end's router knows the decode ranks' max_num_seqs (their state slots), so it
    places a transfer on a rank that holds fewer sequences (tests/test_router.py)."""
    assert next_pd.engine.core.router.max_num_seqs == POOL["max_num_seqs"]


def test_failed_transfer_frees_the_slot(next_case, next_pd):
    """A transfer the prefill rank never sends: the decode rank gives up at its deadline,
    the request fails alone, its blocks and state slot are freed on both sides, and the
    slots serve the next prompts from the right states."""
    _, _, prompts, expected = next_case
    engine = next_pd.engine
    engine.core.drop_transfer("victim")
    engine.add_request("victim", {"prompt_token_ids": prompts[2]}, greedy())
    engine.add_request("ok", {"prompt_token_ids": prompts[1]}, greedy())
    done = run_until_done(next_pd, ["victim", "ok"])
    assert done["victim"].outputs[0].finish_reason == "error"
    assert "transfer" in (done["victim"].error or "")
    assert done["ok"].outputs[0].token_ids == expected[1][0]
    wait_all_free(next_pd)
    assert greedy_tokens(next_pd, prompts) == [t for t, _ in expected]


def test_abort_while_receiving_frees_the_slot(next_case, next_pd):
    """An abort after the decode rank posted the receive (its blocks and slot reserved),
    before the KV and states arrive: both freed at once; the withheld send is then completed
    (as a receiver's cancel does) and the rank serves on."""
    _, _, prompts, expected = next_case
    engine, client = next_pd.engine, next_pd.engine.core
    engine.core.drop_transfer("victim")
    engine.add_request("victim", {"prompt_token_ids": prompts[2]}, greedy())
    deadline = time.monotonic() + 30
    while not (client.placed.get("victim") is not None and client.placed["victim"].admitted):
        assert time.monotonic() < deadline, "the decode rank never admitted the transfer"
        client.step(0.01)
    wire_id = client.placed["victim"].wire_id
    while client.stats()[0].num_free_state_slots == POOL["max_num_seqs"]:
        assert time.monotonic() < deadline, "the decode rank never reported the reserved slot"
        client.step(0.01)
    engine.abort_request("victim")
    wait_all_free(next_pd)
    client._tell(0, protocol.Cancel(wire_id, 1, 1, 1))  # the withheld send completes
    assert greedy_tokens(next_pd, prompts) == [t for t, _ in expected]
    wait_all_free(next_pd)


def test_qwen3_5_moe_with_an_ffn_rank(tmp_path_factory):
    """Qwen3.5-MoE, 1P+1A+1F: transformers' tokens, everything freed."""
    _, path, prompts, expected = oracle_case(tmp_path_factory, "qwen3_5_moe_text")
    llm = LLM(path, prefill=1, attention=1, ffn=1, timeout_s=30, **POOL)
    try:
        assert greedy_tokens(llm, prompts) == [t for t, _ in expected]
        wait_all_free(llm)
    finally:
        llm.shutdown()


def test_two_prefill_ranks_expert_parallel(next_case):
    """2P (prefill_expert_parallel: the pool splits the experts and steps together) + 1A:
    each prefill rank sends its own prompts' states; transformers' tokens."""
    _, path, prompts, expected = next_case
    llm = LLM(path, prefill=2, attention=1, prefill_expert_parallel=True, timeout_s=30, **POOL)
    try:
        assert greedy_tokens(llm, prompts + prompts) == [t for t, _ in expected + expected]
        wait_all_free(llm)
    finally:
        llm.shutdown()


def test_decode_ranks_keep_no_state_snapshots(next_case):
    """A P/D decode rank never caches what it receives, so it keeps no state snapshots (their
    slots would take memory from its pool) and its prefix cache is off; the prefill rank and
    attention ranks that run prompts (no prefill pool) keep both."""
    import torch

    from afd.config import resolve_engine_config
    from afd.workers import Layout, WorkerSpec, core_config
    from models.config import load_config

    path = next_case[1]
    cfg = resolve_engine_config(path, load_config(path), **POOL)
    assert cfg.num_state_snapshots > 0 and cfg.enable_prefix_caching

    def local(rank: int, layout: Layout):
        spec = WorkerSpec(rank, layout, cfg, None, 1, "torch", 5.0, "127.0.0.1", 0, "", ())
        return core_config(spec, torch.device("cpu"))

    pd = Layout(1, 1, 0)
    for kept in (local(0, pd), local(0, Layout(0, 2, 0))):
        assert kept.num_state_snapshots == cfg.num_state_snapshots
        assert kept.enable_prefix_caching
    decode = local(1, pd)
    assert decode.num_state_snapshots == 0 and not decode.enable_prefix_caching
    assert decode.num_state_slots == cfg.max_num_seqs

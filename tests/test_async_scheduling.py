"""Async scheduling (EngineConfig.async_scheduling, afd.core): the same greedy and seeded tokens
as synchronous steps over mixed batches, with aborts, preemption, prefix-cache hits and
requests arriving mid-run; the KV pool full again at the end; what falls back or is refused."""

from __future__ import annotations

import pytest

from afd import LLM, SamplingParams
from afd.core import PLACEHOLDER, EngineCore

# prompts as token ids: short, long (chunked at max_num_batched_tokens=48), shared prefixes
BASE = [(7 * i + 3) % 900 + 5 for i in range(70)]
PROMPTS = [BASE[:3], BASE[:60], BASE[:25], [11], BASE[:60] + [42, 43], BASE[5:45], BASE[:33]]


def make(async_scheduling: bool, **kw) -> LLM:
    return LLM(seed=0, max_num_batched_tokens=48, async_scheduling=async_scheduling, **kw)


@pytest.fixture(scope="module")
def pair():
    llms = make(False), make(True)
    yield llms
    for llm in llms:
        llm.shutdown()


def pool_full(llm: LLM) -> bool:
    core = llm.engine.core
    alloc = core.allocator
    return (alloc.num_free == alloc.num_blocks and not core.seqs and core._inflight is None
            and not core.scheduler.running and not core.scheduler.waiting)


def drive(llm: LLM, arrivals: list[tuple[int, str, list[int], SamplingParams]],
          aborts: dict[int, list[str]] = ()) -> dict[str, list[list[int]]]:
    """Step ``llm``'s engine: request (step, id, prompt, params) added before that step,
    ``aborts`` {step: ids} aborted before it; every completion's final tokens by request."""
    engine, out, step = llm.engine, {}, 0
    pending = sorted(arrivals, key=lambda a: a[0])
    aborts = dict(aborts)
    while pending or engine.has_unfinished_requests():
        while pending and pending[0][0] <= step:
            _, rid, prompt, params = pending.pop(0)
            engine.add_request(rid, {"prompt_token_ids": prompt}, params)
        for rid in aborts.pop(step, []):
            engine.abort_request(rid)
        for r in engine.step():
            out[r.request_id] = [list(c.token_ids) for c in r.outputs]
        step += 1
        assert step < 2000
    return out


def mixed(stop_ids: list[int]) -> list[tuple[int, str, list[int], SamplingParams]]:
    """Greedy and seeded requests: max_tokens 1, 2 and many, stop tokens mid-batch, n=2,
    the same prompt twice (prefix-cache hits), some arriving while others run."""
    g = dict(temperature=0, ignore_eos=True)
    s = dict(temperature=0.9, top_p=0.9, ignore_eos=True)
    return [
        (0, "g1", PROMPTS[0], SamplingParams(max_tokens=1, **g)),
        (0, "g2", PROMPTS[1], SamplingParams(max_tokens=2, **g)),
        (0, "g3", PROMPTS[2], SamplingParams(max_tokens=17, **g)),
        (0, "s1", PROMPTS[3], SamplingParams(max_tokens=12, seed=5, **s)),
        (0, "stop", PROMPTS[2], SamplingParams(max_tokens=30, stop_token_ids=stop_ids, **g)),
        (1, "n2", PROMPTS[4], SamplingParams(max_tokens=9, n=2, seed=3, **s)),
        (2, "hit", PROMPTS[1], SamplingParams(max_tokens=6, **g)),
        (3, "late", PROMPTS[5], SamplingParams(max_tokens=1, **g)),
        (5, "late2", PROMPTS[6], SamplingParams(max_tokens=8, seed=9, **s)),
        (9, "after", PROMPTS[1], SamplingParams(max_tokens=4, **g)),
    ]


def stop_ids_for(llm: LLM) -> list[int]:
    """A token the 'stop' request's greedy output reaches mid-way (its 6th)."""
    [ref] = llm.generate({"prompt_token_ids": PROMPTS[2]},
                         SamplingParams(temperature=0, max_tokens=30, ignore_eos=True),
                         use_tqdm=False)
    return [ref.outputs[0].token_ids[5]]


def test_mixed_batches_match_sync(pair):
    sync, async_ = pair
    stop = stop_ids_for(sync)
    want = drive(sync, mixed(stop))
    got = drive(async_, mixed(stop))
    assert got == want
    assert len(want["g1"][0]) == 1 and len(want["g2"][0]) == 2 and len(want["n2"]) == 2
    assert want["stop"][0][-1] == stop[0] and len(want["stop"][0]) < 30  # stopped mid-run
    assert pool_full(sync) and pool_full(async_)
    assert async_.engine.core.scheduler.prefix_cache_hits > 0


def test_steps_overlap(pair, monkeypatch):
    """Step N + 1 is launched before step N's samples are read on the host, and its input id
    for a placeholder comes from step N's samples on the device."""
    _, llm = pair
    core = llm.engine.core
    events, launch, read = [], core.runner.launch, EngineCore._read

    def spy_launch(plan, placeholders, prev_tokens):
        events.append(("launch", len(placeholders)))
        for i, _ in placeholders:
            assert plan.seqs[i].seq.token_ids[-1] == PLACEHOLDER
        return launch(plan, placeholders, prev_tokens)

    def spy_read(self, step):
        events.append(("read",))
        return read(self, step)

    monkeypatch.setattr(core.runner, "launch", spy_launch)
    monkeypatch.setattr(EngineCore, "_read", spy_read)
    llm.generate([{"prompt_token_ids": p} for p in PROMPTS[:3]],
                 SamplingParams(temperature=0, max_tokens=5, ignore_eos=True), use_tqdm=False)
    # launch 1, launch 2 (placeholders from 1), read 1, launch 3, read 2, ...
    assert events[:3] == [("launch", 0), ("launch", 3), ("read",)]
    assert events.count(("read",)) == sum(1 for e in events if e[0] == "launch")
    assert pool_full(llm)


def test_aborts_while_in_flight(pair):
    """An aborted request emits nothing after its abort; the others keep their tokens; an
    abort of the last request frees every block at once (no further step)."""
    sync, async_ = pair
    g = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    arrivals = [(0, f"r{i}", p, g) for i, p in enumerate(PROMPTS[:5])]
    want = drive(sync, arrivals)
    got = drive(async_, arrivals, {4: ["r1"], 6: ["r3", "r0"]})
    for rid in ("r2", "r4"):
        assert got[rid] == want[rid]
    for rid in ("r0", "r1", "r3"):  # cut short, never past what it had
        assert want[rid][0][:len(got[rid][0])] == got[rid][0]
        assert len(got[rid][0]) < 20
    assert pool_full(async_)
    engine = async_.engine
    engine.add_request("last", {"prompt_token_ids": PROMPTS[1]}, g)
    for _ in range(4):
        engine.step()
    assert async_.engine.core._inflight is not None
    engine.abort_request("last")
    assert pool_full(async_)


def test_preemption_on_a_tiny_pool():
    """A pool too small for every sequence at once: preemptions, the same tokens, every block
    back at the end."""
    g = dict(temperature=0, ignore_eos=True)
    arrivals = [(0, f"p{i}", p, SamplingParams(max_tokens=40, seed=i, temperature=0.8,
                                               ignore_eos=True) if i % 2 else
                 SamplingParams(max_tokens=40, **g)) for i, p in enumerate(PROMPTS)]
    runs = []
    for flag in (False, True):
        llm = make(flag, num_kv_blocks=24, max_model_len=128)
        runs.append(drive(llm, arrivals))
        assert llm.engine.core.scheduler.num_preemptions > 0
        assert pool_full(llm)
        llm.shutdown()
    assert runs[0] == runs[1]


def test_fallbacks_keep_tokens(pair):
    """Requests whose sampling reads their output tokens (penalties, bad_words), or that ask
    for prompt logprobs or logprobs, run beside plain ones: the same tokens and logprobs."""
    sync, async_ = pair
    g = dict(temperature=0, ignore_eos=True)
    arrivals = [
        (0, "plain", PROMPTS[1], SamplingParams(max_tokens=10, **g)),
        (0, "pen", PROMPTS[2], SamplingParams(max_tokens=10, repetition_penalty=1.3,
                                              frequency_penalty=0.5, **g)),
        (1, "plp", PROMPTS[6], SamplingParams(max_tokens=3, prompt_logprobs=2, **g)),
        (1, "lp", PROMPTS[0], SamplingParams(max_tokens=6, logprobs=2, **g)),
        (2, "minp", PROMPTS[5], SamplingParams(max_tokens=6, min_tokens=4, **g)),
    ]
    probe = drive(sync, [(0, "probe", PROMPTS[3], SamplingParams(max_tokens=8, **g))])
    word = sync.get_tokenizer().decode(probe["probe"][0][2:4])  # what it would say
    arrivals.append((0, "bad", PROMPTS[3], SamplingParams(max_tokens=8, bad_words=[word], **g)))
    want = drive(sync, arrivals)
    got = drive(async_, arrivals)
    assert got == want
    assert pool_full(async_)


def test_logprobs_match(pair):
    sync, async_ = pair
    p = SamplingParams(temperature=0, max_tokens=6, logprobs=3, prompt_logprobs=1,
                       ignore_eos=True)
    prompts = [{"prompt_token_ids": q} for q in PROMPTS[:4]]
    a = sync.generate(prompts, p, use_tqdm=False)
    b = async_.generate(prompts, p, use_tqdm=False)
    for x, y in zip(a, b):
        assert x.outputs[0].token_ids == y.outputs[0].token_ids
        # (float rounding: the batches differ by the rows of sequences that stopped)
        for step_x, step_y in zip(x.outputs[0].logprobs, y.outputs[0].logprobs,
                                  strict=True):
            assert step_x.keys() == step_y.keys()
            for tid, lp in step_x.items():
                assert (lp.rank, lp.logprob) == (step_y[tid].rank,
                                                 pytest.approx(step_y[tid].logprob, abs=1e-4))
        assert x.prompt_logprobs == y.prompt_logprobs
    assert pool_full(async_)


def test_refused_where_unsupported():
    with pytest.raises(ValueError, match="async_scheduling must be True or False"):
        LLM(async_scheduling="yes")
    with pytest.raises(ValueError, match="async_scheduling=True with speculative_config"):
        LLM(async_scheduling=True, speculative_config={"method": "ngram",
                                                       "num_speculative_tokens": 2,
                                                       "prompt_lookup_max": 3})
    for layout in (dict(ffn=1), dict(prefill=1, ffn=1), dict(attention=2, ffn=1)):
        with pytest.raises(ValueError, match="async_scheduling=True needs ffn=0 .*got ffn=1"):
            LLM(async_scheduling=True, **layout)


def test_cli_flags(capsys):
    """``python -m afd --async-scheduling`` generates; ``afd serve --async-scheduling`` is
    taken with attention ranks alone and with prefill ranks, refused by name with FFN ranks."""
    from afd.__main__ import main

    main(["--async-scheduling", "--max-tokens", "3", "Hello"])
    assert "[3 tokens, finish_reason=length]" in capsys.readouterr().out
    from launch import serve

    assert serve.parse_args(["--async-scheduling", "--attention", "2"]).async_scheduling
    assert serve.parse_args(["--async-scheduling", "--prefill", "1"]).async_scheduling
    for layout in (["--ffn", "1"], ["--prefill", "1", "--ffn", "1"]):
        with pytest.raises(SystemExit):
            serve.parse_args(["--async-scheduling", *layout])
        assert "--async-scheduling needs --ffn 0, got --ffn 1" in capsys.readouterr().err


@pytest.mark.parametrize("layout", [dict(attention=2), dict(prefill=1, attention=2)],
                         ids=["attention", "pd"])
def test_ranks_match_sync(pair, layout):
    """Rank processes: two attention ranks without FFN ranks (each stepping on its own), or
    P/D with one prefill rank and two decode ranks (the decode ranks step asynchronously, the
    prefill rank synchronously): the single-process engine's greedy and seeded tokens,
    aborts included, and every (decode) rank's pool full again after."""
    sync, _ = pair
    stop = stop_ids_for(sync)
    want = drive(sync, mixed(stop))
    llm = make(True, timeout_s=60, **layout)
    try:
        assert drive(llm, mixed(stop)) == want
        g = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
        arrivals = [(0, f"r{i}", p, g) for i, p in enumerate(PROMPTS[:5])]
        full = drive(sync, arrivals)
        got = drive(llm, arrivals, {4: ["r1"], 6: ["r3"]})
        for rid in ("r0", "r2", "r4"):
            assert got[rid] == full[rid]
        stats = llm.engine.core.stats()
        assert all(s.num_free_blocks == llm.engine.engine_cfg.num_kv_blocks for s in stats)
    finally:
        llm.shutdown()


def checkpoint(kind: str, tmp_path_factory) -> str | None:
    """The embedded model (None), or a tiny random checkpoint of a model with per-sequence
    state (Qwen3-Next: linear-attention state slots) or a window pool (MiMo-V2-Flash)."""
    from ckpt_utils import build_hf_model, save_checkpoint

    if kind.startswith("qwen3_next"):
        model = build_hf_model("qwen3_next")
    elif kind == "mimo":
        from test_mimo_v2_flash import build_hf_model as build_mimo

        model = build_mimo()
    else:
        return None
    return save_checkpoint(model, str(tmp_path_factory.mktemp(kind)))


@pytest.mark.parametrize("kind", ["graphs", "qwen3_next", "qwen3_next_graphs", "mimo"])
def test_other_paths_match_sync(kind, tmp_path_factory):
    """The CUDA-graph path (run eagerly on CPU, the same static buffers), a hybrid model's
    state slots (and its prefix cache's state snapshots; also through the graph path, whose
    tokens are then eager steps' too) and a window pool: the same tokens, preemption and
    prefix hits included, pools full after."""
    path = checkpoint(kind, tmp_path_factory)
    kw = dict(dtype="float32", max_num_batched_tokens=32, max_num_seqs=4, block_size=4,
              num_kv_blocks=28, max_model_len=112)
    graphs = kind.endswith("graphs")
    runs = []
    # (the graph path: also eager sync steps, last)
    for flag, eager in ((False, not graphs), (True, not graphs), (False, True))[:2 + graphs]:
        llm = LLM(path, seed=0, async_scheduling=flag, enforce_eager=eager, **kw)
        assert (llm.engine.core.runner.graphs is not None) == (not eager)
        vocab = llm.engine.model_cfg.vocab_size
        prompts = [[t % (vocab - 2) + 1 for t in p] for p in PROMPTS]
        arrivals = [(i // 2, f"q{i}", p, SamplingParams(
            max_tokens=(1, 2, 40)[i % 3], temperature=0.8 if i % 2 else 0, seed=i,
            ignore_eos=True)) for i, p in enumerate(prompts)]
        runs.append(drive(llm, arrivals))
        core = llm.engine.core
        assert core.scheduler.num_preemptions > 0
        assert core.scheduler.prefix_cache_hits > 0  # (a hybrid's: restored state snapshots)
        assert pool_full(llm)
        if core.window is not None:
            assert core.window.num_free == core.window.num_blocks
        if core.scheduler.free_state_slots is not None:
            assert len(core.scheduler.free_state_slots) == kw["max_num_seqs"]
        llm.shutdown()
    assert all(run == runs[0] for run in runs[1:])


def test_no_dropped_row_at_max_tokens(pair, monkeypatch):
    """A sequence whose next sample is its last by length leaves the queues when that step
    is launched: greedy requests that all end by max_tokens take as many rows as sync."""
    rows = []
    for llm in pair:
        sched = llm.engine.core.scheduler
        schedule, count = sched.schedule, []

        def spy(schedule=schedule, count=count):
            plan = schedule()
            count.append(len(plan.seqs))
            return plan

        monkeypatch.setattr(sched, "schedule", spy)
        llm.generate([{"prompt_token_ids": p} for p in PROMPTS],
                     [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True)
                      for m in (1, 2, 3, 9, 1, 5, 2)], use_tqdm=False)
        rows.append(sum(count))
        assert pool_full(llm)
    assert rows[0] == rows[1]


def test_abort_keeps_a_last_token_in_flight(pair):
    """Aborting the only other request while a sequence's last token is in flight leaves
    nothing to schedule: that token is read at once and comes with the next step."""
    _, llm = pair
    engine, core = llm.engine, llm.engine.core
    g = dict(temperature=0, ignore_eos=True)
    engine.add_request("short", {"prompt_token_ids": PROMPTS[0]}, SamplingParams(max_tokens=4,
                                                                                 **g))
    engine.add_request("long", {"prompt_token_ids": PROMPTS[2]}, SamplingParams(max_tokens=40,
                                                                                **g))
    got = {}
    for _ in range(20):
        for r in engine.step():
            got[r.request_id] = r
        if core._inflight is not None and core._inflight.final:
            break
    assert [s.request_id for s in core.scheduler.running] == ["long"]
    engine.abort_request("long")
    assert core._ready and core._inflight is None  # read, kept for the next step
    for _ in range(5):
        for r in engine.step():
            got[r.request_id] = r
    assert not engine.has_unfinished_requests()
    assert got["short"].finished and len(got["short"].outputs[0].token_ids) == 4
    assert pool_full(llm)


def test_abort_drops_a_read_output(pair):
    """An output read at an abort (kept for the next step) of a request aborted after it is
    never emitted: a request added again under its id at once gets none of the old one's
    tokens (in-process, outputs go by request id), the tokens it gets alone."""
    sync, llm = pair
    engine, core = llm.engine, llm.engine.core
    g = dict(temperature=0, ignore_eos=True)
    engine.add_request("short", {"prompt_token_ids": PROMPTS[0]}, SamplingParams(max_tokens=4,
                                                                                 **g))
    engine.add_request("long", {"prompt_token_ids": PROMPTS[2]}, SamplingParams(max_tokens=40,
                                                                                **g))
    for _ in range(20):
        engine.step()
        if core._inflight is not None and core._inflight.final:
            break
    engine.abort_request("long")
    assert [o.request_id for o in core._ready] == ["short"]  # its last token, read
    engine.abort_request("short")
    again = SamplingParams(max_tokens=7, **g)
    want = drive(sync, [(0, "short", PROMPTS[5], again)])
    assert drive(llm, [(0, "short", PROMPTS[5], again)]) == want
    assert pool_full(llm)


def test_placeholder_rows_after_a_one_token_chunk(tmp_path_factory):
    """A prompt's last chunk of one token (a hybrid's prefill cut at its last full block
    boundary) in a decode row before a sequence whose input is the step in flight's sample,
    at the same row there (a sequence before both ended by max_tokens): each row takes its
    own input, the same tokens as sync."""
    path = checkpoint("qwen3_next", tmp_path_factory)
    runs = []
    for flag in (False, True):
        llm = LLM(path, seed=0, async_scheduling=flag, dtype="float32", block_size=4,
                  max_num_batched_tokens=32, max_num_seqs=4, num_kv_blocks=32,
                  max_model_len=64)
        vocab = llm.engine.model_cfg.vocab_size
        prompts = [[t % (vocab - 2) + 1 for t in p] for p in (BASE[:3], BASE[10:19], BASE[30:33])]
        g = dict(temperature=0, ignore_eos=True)
        arrivals = [(0, "z", prompts[0], SamplingParams(max_tokens=1, **g)),
                    (0, "w", prompts[1], SamplingParams(max_tokens=5, **g)),
                    (0, "a", prompts[2], SamplingParams(max_tokens=5, **g))]
        runs.append(drive(llm, arrivals))
        assert pool_full(llm)
        llm.shutdown()
    assert runs[0] == runs[1]


def test_serve_refuses_drafts_by_name(capsys):
    """``afd serve --async-scheduling --speculative-config ...``: a usage error naming both
    flags, before any rank starts (not the engine config's ValueError on rank 0)."""
    from launch import serve

    with pytest.raises(SystemExit):
        serve.parse_args(["--async-scheduling", "--speculative-config",
                          '{"method": "ngram", "num_speculative_tokens": 2, '
                          '"prompt_lookup_max": 3}'])
    assert ("--async-scheduling with --speculative-config (method 'ngram')"
            in capsys.readouterr().err)

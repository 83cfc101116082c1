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


def test_vllm_keywords_at_what_afd_does_anyway_are_taken():
    """vLLM scripts pass tensor_parallel_size=1, enable_chunked_prefill=True or
    disable_log_stats: at the value that is what afd always does (or any bool for the stats
    log) they are dropped before the engine sees them; another value is a TypeError naming the
    keyword and the one value afd takes, before anything loads."""
    from afd.llm import check_engine_args

    neutral = {"tensor_parallel_size": 1, "pipeline_parallel_size": 1, "data_parallel_size": 1,
               "enable_chunked_prefill": True, "disable_log_stats": False}
    assert check_engine_args({**neutral, "max_num_seqs": 8}) == {"max_num_seqs": 8}
    with pytest.raises(TypeError, match=r"'enable_chunked_prefill' = False: afd takes it only "
                                        r"as True"):
        check_engine_args({"enable_chunked_prefill": False})
    with pytest.raises(TypeError, match=r"'pipeline_parallel_size'.*attention="):
        check_engine_args({"pipeline_parallel_size": 2})
    with pytest.raises(TypeError, match=r"'disable_log_stats'"):
        check_engine_args({"disable_log_stats": "yes"})
    llm = LLM(tensor_parallel_size=1, enable_chunked_prefill=True, disable_log_stats=True)
    try:
        out = llm.generate("Hello", GREEDY, use_tqdm=False)[0].outputs[0]
        assert len(out.token_ids) == 3
    finally:
        llm.shutdown()


def test_lora_request_none_is_taken_an_adapter_is_named(llm):
    """vLLM code passes ``lora_request=None`` to generate and chat when it runs the base
    model: the same outputs as without it; an adapter is a ValueError naming the field and
    queues nothing."""
    want = llm.generate("Hello", GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    got = llm.generate("Hello", GREEDY, use_tqdm=False, lora_request=None)
    assert got[0].outputs[0].token_ids == want
    conv = [{"role": "user", "content": "Hi"}]
    assert llm.chat(conv, GREEDY, use_tqdm=False, lora_request=None)[0].outputs[0].token_ids \
        == llm.chat(conv, GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    for call in (lambda: llm.generate("Hello", GREEDY, use_tqdm=False, lora_request=object()),
                 lambda: llm.chat(conv, GREEDY, use_tqdm=False, lora_request=object())):
        with pytest.raises(ValueError, match="lora_request must be None") as err:
            call()
        assert err.value.param == "lora_request"
    assert not llm.engine.requests


def test_detokenize_and_spaces_between_special_tokens(llm):
    """vLLM's ``detokenize`` (its throughput benchmark passes False) and
    ``spaces_between_special_tokens`` are SamplingParams fields (they were TypeErrors):
    detokenize=False gives the same tokens, logprobs and finish with an empty text; stop
    strings, which match the text, need it, named; spaces_between_special_tokens=False is
    taken where it changes nothing (skip_special_tokens) and named where afd cannot honour it."""
    p = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, logprobs=1)
    [want] = llm.generate("Hello", p, use_tqdm=False)
    quiet = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, logprobs=1,
                           detokenize=False, spaces_between_special_tokens=True)
    [got] = llm.generate("Hello", quiet, use_tqdm=False)
    assert want.outputs[0].text and got.outputs[0].text == ""
    assert got.outputs[0].token_ids == want.outputs[0].token_ids
    assert got.outputs[0].finish_reason == want.outputs[0].finish_reason == "length"
    assert [list(e) for e in got.outputs[0].logprobs] == [list(e) for e in want.outputs[0].logprobs]
    [same] = llm.generate("Hello", SamplingParams(temperature=0, max_tokens=4, ignore_eos=True,
                                                  spaces_between_special_tokens=False),
                          use_tqdm=False)
    assert same.outputs[0].text == want.outputs[0].text
    with pytest.raises(ValueError, match="detokenize") as err:
        SamplingParams(stop=["x"], detokenize=False)
    assert err.value.param == "stop"
    with pytest.raises(ValueError, match="skip_special_tokens=False") as err:
        SamplingParams(spaces_between_special_tokens=False, skip_special_tokens=False)
    assert err.value.param == "spaces_between_special_tokens"
    for name in ("detokenize", "spaces_between_special_tokens"):
        with pytest.raises(ValueError, match=f"{name} must be true or false") as err:
            SamplingParams(**{name: "no"})
        assert err.value.param == name


def test_shutdown_releases_the_single_process_model():
    """The single process's ``shutdown`` gives back the model and its KV cache, as a
    multi-rank engine's ranks do when they exit (it did nothing: a caller that kept the
    ``LLM`` and started another held both on the GPU), drops what was queued, and a later
    ``generate`` is a RuntimeError, as with ranks, not a run on released memory."""
    import gc
    import weakref

    llm = LLM(seed=0, max_model_len=64, num_kv_blocks=8)
    model = weakref.ref(llm.engine.core.runner.model)
    kv = weakref.ref(llm.engine.core.runner.kv_caches[0])
    assert llm.generate("Hello", GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    llm.engine.add_request("queued", "Hello", GREEDY)
    llm.shutdown()
    llm.shutdown()  # twice: nothing more
    gc.collect()
    assert model() is None and kv() is None
    assert not llm.engine.core.seqs and not llm.engine.core.has_unfinished()
    with pytest.raises(RuntimeError, match="shut down"):
        llm.generate("Hello", GREEDY, use_tqdm=False)


def test_numpy_values_and_tuples_are_taken_as_python_ones(llm):
    """Values a numpy sweep or a tokenizer's arrays give (numpy scalars, arrays, tuples) are
    taken as the Python numbers and lists they stand for, as vLLM takes them: they were
    refused with messages that contradicted themselves ("temperature must be >= 0 and
    finite, got np.float32(0.5)"), and a tuple of allowed_token_ids was refused where one of
    stop_token_ids was taken. The same outputs as with Python values; a wrong type is still
    named."""
    np = pytest.importorskip("numpy")
    ids = llm.get_tokenizer().encode("Hello, my name is")
    plain = SamplingParams(temperature=0.5, top_p=0.9, seed=3, max_tokens=3, n=2, top_k=20,
                           stop_token_ids=[7], allowed_token_ids=list(range(400)),
                           logit_bias={5: 1.5}, logprobs=1)
    numpyish = SamplingParams(temperature=np.float32(0.5), top_p=np.float64(0.9),
                              seed=np.int64(3), max_tokens=np.int32(3), n=np.int64(2),
                              top_k=np.int16(20), stop_token_ids=(np.int64(7),),
                              allowed_token_ids=np.arange(400), logit_bias={np.int64(5): 1.5},
                              logprobs=np.int8(1))
    assert numpyish == SamplingParams(**{**plain.to_dict(), "temperature": float(np.float32(0.5))})
    assert type(numpyish.seed) is int and type(numpyish.allowed_token_ids[0]) is int
    assert SamplingParams(allowed_token_ids=(1, 2)).allowed_token_ids == [1, 2]
    assert SamplingParams(bad_words=("x",)).bad_words == ["x"]
    want = llm.generate({"prompt_token_ids": ids}, plain, use_tqdm=False)[0]
    for prompt_ids in (np.array(ids), [np.int64(t) for t in ids], tuple(ids)):
        got = llm.generate({"prompt_token_ids": prompt_ids}, plain, use_tqdm=False)[0]
        assert got.prompt_token_ids == ids and type(got.prompt_token_ids[0]) is int
        assert [c.token_ids for c in got.outputs] == [c.token_ids for c in want.outputs]
    with pytest.raises(ValueError, match="temperature") as err:
        SamplingParams(temperature="0.5")
    assert err.value.param == "temperature"
    with pytest.raises(ValueError, match="top_k") as err:
        SamplingParams(top_k=np.float32(2.0))
    assert err.value.param == "top_k"
    with pytest.raises(ValueError, match="prompt_token_ids must be a list of integers"):
        llm.generate({"prompt_token_ids": np.array([1.0, 2.0])}, GREEDY, use_tqdm=False)


def test_completion_output_finished_method(llm):
    """vLLM's ``CompletionOutput.finished()`` (code checks ``out.outputs[0].finished()``): True
    once a completion has its finish_reason, False before (a DELTA step output)."""
    from afd.outputs import CompletionOutput

    [out] = llm.generate("Hello", GREEDY, use_tqdm=False)
    assert out.outputs[0].finished() is True
    assert CompletionOutput(0, "", []).finished() is False


def test_chat_errors_say_where_once(llm):
    """A conversation that does not validate is named by its place, as Python indexes it,
    once: ``messages[1][0].role`` (conversation 1, message 0); it was "messages[1]:
    messages.0.role", and an empty conversation "messages: messages: List should have at
    least 1 item"."""
    conv = [{"role": "user", "content": "Hi"}]
    for messages, where in (([], "messages: List should have at least 1 item"),
                            ([conv, [{"role": "wizard", "content": "x"}]],
                             "messages[1][0].role: Input should be"),
                            ([{"content": "x"}], "messages[0].role: Field required"),
                            ([conv, []], "messages[1]: List should have at least 1 item")):
        with pytest.raises(ValueError) as err:
            llm.chat(messages, GREEDY, use_tqdm=False)
        assert str(err.value).startswith(where), err.value
        assert err.value.param == "messages"
    with pytest.raises(ValueError) as err:
        llm.chat(conv, GREEDY, use_tqdm=False, tools=[{"type": "function"}])
    assert err.value.param == "tools" and str(err.value).startswith("tools[0]"), err.value


def test_use_tqdm_callable_makes_the_bar(llm):
    """vLLM's ``use_tqdm`` may be a callable that makes the progress bar (a tqdm class, or
    ``functools.partial(tqdm, leave=False)``): it is called with the batch's total and its
    bar counts every prompt (it was taken as True and tqdm's own bar shown)."""
    made = []

    class Bar:  # what generate calls on a tqdm bar
        def __init__(self, total, **kwargs):
            self.total, self.n, self.closed = total, 0, False
            made.append(self)

        def update(self, n):
            self.n += n

        def set_postfix_str(self, text):
            pass

        def close(self):
            self.closed = True

    def bar(**kwargs):
        return Bar(**kwargs)

    outs = llm.generate(["a", "b", "c"], GREEDY, use_tqdm=bar)
    assert len(outs) == 3 and len(made) == 1
    assert made[0].total == 3 and made[0].n == 3 and made[0].closed
    llm.chat([{"role": "user", "content": "Hi"}], GREEDY, use_tqdm=bar)
    assert len(made) == 2 and made[1].total == 1


def test_multimodal_prompt_keys_are_named_not_dropped(llm):
    """A vLLM prompt dict with an image (``multi_modal_data``) or embeddings was run on its
    text alone, the image silently dropped; it is a ValueError naming the key, nothing
    queued. Empty values (what generic code fills in) change nothing."""
    with pytest.raises(ValueError, match="'multi_modal_data'.*multimodal") as err:
        llm.generate({"prompt": "Describe <image>", "multi_modal_data": {"image": object()}},
                     GREEDY, use_tqdm=False)
    assert err.value.param == "prompt" and not llm.engine.requests
    import torch

    with pytest.raises(ValueError, match="'prompt_embeds'"):
        llm.generate([{"prompt": "x"}, {"prompt": "y", "prompt_embeds": torch.zeros(2, 4)}],
                     GREEDY, use_tqdm=False)
    want = llm.generate("Hello", GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    got = llm.generate({"prompt": "Hello", "multi_modal_data": None, "mm_processor_kwargs": {}},
                       GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    assert got == want


def test_sampling_params_clone():
    """vLLM's ``SamplingParams.clone()`` (code copies a base params object, then changes the
    copy): a deep copy; it was an AttributeError."""
    base = SamplingParams(temperature=0.5, stop=["x"], logit_bias={3: 1.0}, max_tokens=8)
    copy = base.clone()
    assert copy == base and copy is not base
    copy.stop.append("y")
    copy.logit_bias[4] = 2.0
    copy.max_tokens = 2
    assert base.stop == ["x"] and base.logit_bias == {3: 1.0} and base.max_tokens == 8


def test_priority_takes_numpy_integers():
    """``priority`` as a numpy array (or holding numpy ints) is the Python ints it stands
    for, as SamplingParams' numbers are: it was refused as "priority must be a 64-bit
    integer, got np.int64(1)". A float is still named."""
    np = pytest.importorskip("numpy")
    with LLM(seed=0, scheduling_policy="priority", max_model_len=64, num_kv_blocks=16) as llm:
        prompts = ["a", "b", "c"]
        want = llm.generate(prompts, GREEDY, use_tqdm=False, priority=[2, 0, 1])
        for given in (np.array([2, 0, 1]), [np.int64(2), np.int32(0), 1]):
            got = llm.generate(prompts, GREEDY, use_tqdm=False, priority=given)
            assert [o.outputs[0].token_ids for o in got] == \
                [o.outputs[0].token_ids for o in want]
        with pytest.raises(ValueError, match="priority") as err:
            llm.generate(prompts, GREEDY, use_tqdm=False, priority=np.array([1.5, 0, 0]))
        assert err.value.param == "priority"


def test_vllm_prompt_types(llm):
    """``afd.inputs`` has vLLM's TextPrompt / TokensPrompt (``from vllm.inputs import
    TokensPrompt`` ports as ``from afd.inputs import TokensPrompt``); generate takes them as
    the plain dicts they are."""
    from afd.inputs import TextPrompt, TokensPrompt

    ids = llm.get_tokenizer().encode("Hello")
    want = llm.generate("Hello", GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    outs = llm.generate([TextPrompt(prompt="Hello"), TokensPrompt(prompt_token_ids=ids),
                         TextPrompt(prompt="Hello", cache_salt="a")], GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == [want] * 3
    assert outs[0].prompt == "Hello" and outs[1].prompt is None


def test_prompts_that_are_no_prompt_are_named(llm):
    """``generate(None)`` (or a number, or bytes) is a ValueError naming the prompt and what
    it must be: it was "'NoneType' object is not iterable" (a TypeError from inside)."""
    for prompts in (None, 5, b"Hello"):
        with pytest.raises(ValueError, match="prompts must be a prompt") as err:
            llm.generate(prompts, GREEDY, use_tqdm=False)
        assert err.value.param == "prompt"


def test_a_layout_past_one_machines_rank_cap_is_refused_before_any_rank_starts():
    """prefill=1000 (a typo) would start 1001 rank processes and leave them to the startup
    timeout; past MAX_LOCAL_RANKS it is a ValueError naming the sum and the limit, before any
    process starts (psutil: no child), and afd serve refuses it as well."""
    import psutil

    from afd import cli
    from afd.llm import MAX_LOCAL_RANKS

    before = set(psutil.Process().children(recursive=True))
    with pytest.raises(ValueError, match=rf"prefill \+ attention \+ ffn = 1001 rank processes "
                                         rf"on this machine; at most {MAX_LOCAL_RANKS}"):
        LLM(prefill=1000, attention=1)
    assert set(psutil.Process().children(recursive=True)) <= before
    with pytest.raises(SystemExit, match=r"--prefill \+ --attention \+ --ffn = 65 rank"):
        cli.serve(["--attention", "1", "--ffn", "64"])

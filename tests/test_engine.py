"""Engine behaviour on the embedded default model: sampling, stops, bad input, KV accounting."""

from __future__ import annotations

import json
import pytest
import torch

from afd import LLM, SamplingParams
from afd.sampler import Sampler
from afd.sampling_params import ParamError


@pytest.fixture(scope="module")
def llm():
    return LLM(seed=0)


def blocks_all_free(llm: LLM) -> bool:
    alloc = llm.engine.core.allocator
    return alloc.num_free == alloc.num_blocks and not llm.engine.core.seqs


PROMPTS = ["Hello, my name is", "The capital of France is", "Tell me a story", "a"]


def test_prompt_forms(llm):
    ids = llm.get_tokenizer().encode("Hello, my name is")
    p = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    by_str = llm.generate("Hello, my name is", p, use_tqdm=False)
    by_ids = llm.generate({"prompt_token_ids": ids}, p, use_tqdm=False)
    by_list = llm.generate(["Hello, my name is", {"prompt_token_ids": ids}], p, use_tqdm=False)
    assert by_str[0].prompt_token_ids == ids
    assert by_str[0].outputs[0].token_ids == by_ids[0].outputs[0].token_ids
    assert [o.outputs[0].token_ids for o in by_list] == [by_str[0].outputs[0].token_ids] * 2
    assert by_str[0].prompt == "Hello, my name is"


def test_chat_renders_the_template_then_generates(llm):
    """LLM.chat: a conversation's prompt is the tokenizer's chat template (the server's
    rendering), one or many conversations, template kwargs and an explicit template; a
    conversation that does not render names its field and queues nothing."""
    tok = llm.get_tokenizer()
    p = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    conv = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    text = tok.apply_chat_template(conv, add_generation_prompt=True, tokenize=False)
    want = llm.generate({"prompt_token_ids": tok.encode(text, add_special_tokens=False)}, p,
                        use_tqdm=False)[0]
    [one] = llm.chat(conv, p, use_tqdm=False)
    assert one.prompt == text and one.prompt_token_ids == want.prompt_token_ids
    assert one.outputs[0].token_ids == want.outputs[0].token_ids
    other = [{"role": "user", "content": "Something else"}]
    both = llm.chat([conv, other], p, use_tqdm=False)
    assert [o.prompt_token_ids for o in both][0] == one.prompt_token_ids
    assert both[1].prompt == tok.apply_chat_template(other, add_generation_prompt=True,
                                                     tokenize=False)
    [cont] = llm.chat(conv + [{"role": "assistant", "content": "Hel"}], p, use_tqdm=False,
                      add_generation_prompt=False, continue_final_message=True)
    assert cont.prompt.endswith("Hel")
    [own] = llm.chat(conv, p, use_tqdm=False,
                     chat_template="{% for m in messages %}<{{ m.role }}>{{ m.content }}"
                                   "{% endfor %}{{ suffix }}",
                     chat_template_kwargs={"suffix": "!"})
    assert own.prompt == "<system>Be brief.<user>Hi there!"
    with pytest.raises(ValueError, match="messages") as err:
        llm.chat([conv, [{"role": "wizard", "content": "x"}]], p, use_tqdm=False)
    assert "messages[1]" in str(err.value) and err.value.param == "messages"
    with pytest.raises(ValueError, match="continue_final_message") as err:
        llm.chat(conv, p, continue_final_message=True, use_tqdm=False)
    assert err.value.param == "continue_final_message"
    # a bad field beside the messages is named as itself (vLLM's arguments), in every form
    for field, value in (("tools", [{"type": "function"}]), ("tools", "x"),
                         ("chat_template_kwargs", 5)):
        with pytest.raises(ValueError, match=field) as err:
            llm.chat([conv, other], p, use_tqdm=False, **{field: value})
        assert err.value.param == field and not str(err.value).startswith("messages"), err.value
    # nested deeper than the server takes (it would blow the template's stack): named too
    deep = json.loads('{"a": ' * 200 + "{}" + "}" * 200)
    for field, value in (("tools", [{"type": "function", "function": {"name": "f",
                                                                       "parameters": deep}}]),
                         ("chat_template_kwargs", {"x": deep}),
                         ("messages", [*conv, {"role": "user", "content": "x", "x": deep}])):
        with pytest.raises(ValueError, match="deeper than") as err:
            llm.chat(value if field == "messages" else conv, p, use_tqdm=False,
                     **({} if field == "messages" else {field: value}))
        assert err.value.param == field, err.value
    assert blocks_all_free(llm)


def test_text_is_incremental_decode_of_tokens(llm):
    tok = llm.get_tokenizer()
    outs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True),
                        use_tqdm=False)
    for o in outs:
        c = o.outputs[0]
        assert c.finish_reason == "length" and len(c.token_ids) == 40
        full = tok.decode(o.prompt_token_ids + c.token_ids, skip_special_tokens=True)
        prompt_text = tok.decode(o.prompt_token_ids, skip_special_tokens=True)
        assert full.startswith(prompt_text)
        tail = full[len(prompt_text):]
        # the detokenizer holds back only a trailing, still-incomplete character
        assert tail.startswith(c.text) and set(tail[len(c.text):]) <= {"\ufffd"}
    assert blocks_all_free(llm)


def test_seeded_sampling_reproducible_and_batch_independent(llm):
    p = SamplingParams(temperature=0.9, top_p=0.95, top_k=50, max_tokens=24, seed=1234,
                       ignore_eos=True)
    alone = llm.generate("Tell me a story", p, use_tqdm=False)[0].outputs[0].token_ids
    again = llm.generate("Tell me a story", p, use_tqdm=False)[0].outputs[0].token_ids
    other = SamplingParams(temperature=1.0, max_tokens=30, ignore_eos=True)
    mixed = llm.generate(["Hello", "Tell me a story", "x y z"], [other, p, other],
                         use_tqdm=False)[1].outputs[0].token_ids
    assert alone == again == mixed
    other_seed = SamplingParams(temperature=0.9, top_p=0.95, top_k=50, max_tokens=24, seed=99,
                                ignore_eos=True)
    assert llm.generate("Tell me a story", other_seed, use_tqdm=False)[0].outputs[0].token_ids \
        != alone


def test_n_completions(llm):
    outs = llm.generate("Hello", SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=12,
                                                ignore_eos=True), use_tqdm=False)
    comps = outs[0].outputs
    assert [c.index for c in comps] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in comps}) > 1, "seeded children should differ"
    greedy = llm.generate("Hello", SamplingParams(n=2, temperature=0, max_tokens=12),
                          use_tqdm=False)[0].outputs
    assert greedy[0].token_ids == greedy[1].token_ids
    assert blocks_all_free(llm)


def test_stop_strings_and_stop_tokens(llm):
    base = llm.generate("The capital of France is",
                        SamplingParams(temperature=0, max_tokens=40, ignore_eos=True),
                        use_tqdm=False)[0].outputs[0]
    # choose a stop string from the middle of the greedy text
    text = base.text
    stop = text[10:13]
    assert stop and "\ufffd" not in stop
    cut = llm.generate("The capital of France is",
                       SamplingParams(temperature=0, max_tokens=40, stop=[stop], ignore_eos=True),
                       use_tqdm=False)[0].outputs[0]
    assert cut.finish_reason == "stop" and cut.stop_reason == stop
    assert cut.text == text[: text.index(stop)]
    keep = llm.generate("The capital of France is",
                        SamplingParams(temperature=0, max_tokens=40, stop=stop, ignore_eos=True,
                                       include_stop_str_in_output=True),
                        use_tqdm=False)[0].outputs[0]
    assert keep.text == text[: text.index(stop) + len(stop)]
    token = base.token_ids[5]
    by_id = llm.generate("The capital of France is",
                         SamplingParams(temperature=0, max_tokens=40, stop_token_ids=[token],
                                        ignore_eos=True), use_tqdm=False)[0].outputs[0]
    first = base.token_ids.index(token)
    assert by_id.token_ids == base.token_ids[: first + 1]
    assert by_id.finish_reason == "stop" and by_id.stop_reason == token
    assert blocks_all_free(llm)


def test_stop_token_text_is_left_out_unless_asked_for(llm):
    """As in vLLM (and SGLang): a stop token id or EOS ends the completion and stays in
    token_ids, but its text is not in the output unless include_stop_str_in_output."""
    tok = llm.get_tokenizer()
    prompt = "The capital of France is"
    base = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True),
                        use_tqdm=False)[0].outputs[0]
    first = next(i for i, t in enumerate(base.token_ids)
                 if tok.decode([t]) and base.token_ids.index(t) == i and i >= 3)
    token = base.token_ids[first]
    for include in (False, True):
        out = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=40,
                                                  stop_token_ids=[token], ignore_eos=True,
                                                  include_stop_str_in_output=include),
                           use_tqdm=False)[0].outputs[0]
        assert out.token_ids == base.token_ids[: first + 1] and out.stop_reason == token
        upto = first + 1 if include else first
        assert out.text == tok.decode(base.token_ids[:upto]), (include, out.text)
    engine = llm.engine
    saved = engine.eos_token_ids
    engine.eos_token_ids = (token,)  # EOS, here a token with text, shown as text
    try:
        out = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=40,
                                                  skip_special_tokens=False),
                           use_tqdm=False)[0].outputs[0]
        assert out.finish_reason == "stop" and out.token_ids == base.token_ids[: first + 1]
        assert out.text == tok.decode(base.token_ids[:first], skip_special_tokens=False)
    finally:
        engine.eos_token_ids = saved
    assert blocks_all_free(llm)


def test_eos_ends_generation_unless_ignored(llm):
    # Make EOS the greedy choice after a few tokens by declaring the 4th greedy token to be EOS.
    base = llm.generate("Hello", SamplingParams(temperature=0, max_tokens=10, ignore_eos=True),
                        use_tqdm=False)[0].outputs[0]
    engine = llm.engine
    saved = engine.eos_token_ids
    engine.eos_token_ids = (base.token_ids[3],)
    try:
        out = llm.generate("Hello", SamplingParams(temperature=0, max_tokens=10),
                           use_tqdm=False)[0].outputs[0]
        assert out.finish_reason == "stop" and out.stop_reason is None
        assert out.token_ids == base.token_ids[: base.token_ids.index(base.token_ids[3]) + 1]
        ignored = llm.generate("Hello", SamplingParams(temperature=0, max_tokens=10,
                                                       ignore_eos=True), use_tqdm=False)
        assert ignored[0].outputs[0].token_ids == base.token_ids
    finally:
        engine.eos_token_ids = saved


@pytest.mark.parametrize("kwargs, field", [
    (dict(temperature=-0.5), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(max_tokens=0), "max_tokens"),
    (dict(top_k=-3), "top_k"),
    (dict(min_p=2.0), "min_p"),
    (dict(n=0), "n"),
    (dict(n=129), "n"),
    (dict(seed=2 ** 64), "seed"),
    (dict(seed=2 ** 63 - 2, n=3), "seed"),  # completion i uses seed + i
    (dict(top_k=2 ** 64), "top_k"),
    (dict(max_tokens=2 ** 64), "max_tokens"),
    (dict(temperature=float("inf")), "temperature"),
    (dict(logprobs=-1), "logprobs"),
    (dict(logprobs=21), "logprobs"),
    (dict(logprobs=True), "logprobs"),
    (dict(logprobs=2.0), "logprobs"),
    (dict(prompt_logprobs=-1), "prompt_logprobs"),
    (dict(prompt_logprobs=21), "prompt_logprobs"),
    (dict(prompt_logprobs=True), "prompt_logprobs"),
    (dict(prompt_logprobs=2.0), "prompt_logprobs"),
    # containers of the wrong type once raised TypeError (or a ValueError naming nothing)
    (dict(stop=5), "stop"),
    (dict(stop={"a": 1}), "stop"),
    (dict(stop_token_ids=5), "stop_token_ids"),
    (dict(logit_bias=[1, 2]), "logit_bias"),
    (dict(logit_bias="ab"), "logit_bias"),
    (dict(ignore_eos="yes"), "ignore_eos"),
    (dict(skip_special_tokens=None), "skip_special_tokens"),
    (dict(include_stop_str_in_output=1), "include_stop_str_in_output"),
])
def test_bad_sampling_params_raise(kwargs, field):
    with pytest.raises(ParamError, match=field) as caught:
        SamplingParams(**kwargs)
    assert caught.value.param == field


def test_sampling_params_containers_set_after_construction():
    """validate() (run again by generate) reads a container set after construction as the
    constructor does, and names the field of one of the wrong type."""
    p = SamplingParams(stop=("a", "b"), stop_token_ids=(3,))
    assert p.stop == ["a", "b"] and p.stop_token_ids == [3]
    p.stop, p.stop_token_ids = "ab", None
    p.validate()
    assert p.stop == ["ab"] and p.stop_token_ids == []
    p.stop = 5
    with pytest.raises(ParamError, match="stop"):
        p.validate()


def test_bad_prompts_raise_and_engine_keeps_serving(llm):
    p = SamplingParams(temperature=0, max_tokens=4)
    vocab = llm.engine.model_cfg.vocab_size
    max_len = llm.config.max_model_len
    cases = [
        ("", "prompt"),
        ({"prompt_token_ids": []}, "empty"),
        ({"prompt_token_ids": [5, vocab]}, "vocabulary"),
        ({"prompt_token_ids": [5, -1]}, "vocabulary"),
        ({"prompt_token_ids": [3] * max_len}, "max_model_len"),
        (12345, "prompt"),
    ]
    good = llm.generate("Hello", p, use_tqdm=False)[0].outputs[0].token_ids
    for prompt, match in cases:
        with pytest.raises(ValueError, match=match):
            llm.generate(["Hello", prompt], p, use_tqdm=False)
        assert blocks_all_free(llm)
    bad_params = SamplingParams(temperature=0, max_tokens=4)
    bad_params.temperature = -1.0  # mutated after construction: still caught
    with pytest.raises(ValueError, match="temperature"):
        llm.generate("Hello", bad_params, use_tqdm=False)
    assert llm.generate("Hello", p, use_tqdm=False)[0].outputs[0].token_ids == good
    assert blocks_all_free(llm)


def test_lone_surrogates_name_the_field(llm):
    """A string with a lone surrogate (JSON can carry one) cannot be tokenized or packed for
    the ranks: a ParamError naming the field, not the tokenizer's TypeError; nothing queued."""
    p = SamplingParams(temperature=0, max_tokens=2)
    for prompt in ("a\ud800b", {"prompt": "\udfff"}):
        with pytest.raises(ParamError, match="surrogate") as caught:
            llm.generate(["Hello", prompt], p, use_tqdm=False)
        assert caught.value.param == "prompt"
    for field in ("stop", "bad_words"):
        with pytest.raises(ParamError, match="surrogate") as caught:
            SamplingParams(**{field: ["ok", "x\ud800"]})
        assert caught.value.param == field
    with pytest.raises(ParamError, match="surrogate") as caught:
        llm.chat([{"role": "user", "content": "hi \ud800"}], p, use_tqdm=False)
    assert caught.value.param == "messages"
    assert SamplingParams(stop=["\u00e9t\u00e9"]).stop == ["\u00e9t\u00e9"]  # real non-ASCII
    assert llm.generate("\u00e9t\u00e9", p, use_tqdm=False)[0].outputs[0].token_ids
    assert blocks_all_free(llm)


def test_a_failing_add_queues_nothing(llm, monkeypatch):
    """If the core refuses the second of n children (or LLM.generate's second prompt), nothing
    of the request (or the call) stays queued or holds blocks."""
    engine, real_add = llm.engine, llm.engine.core.add_request
    calls = []

    def add_then_fail(req):
        calls.append(req.request_id)
        if len(calls) == 2:
            raise RuntimeError("refused")
        real_add(req)

    monkeypatch.setattr(engine.core, "add_request", add_then_fail)
    with pytest.raises(RuntimeError, match="refused"):
        engine.add_request("n3", "Hello", SamplingParams(n=3, max_tokens=4))
    assert not engine.requests and not engine._child and not engine.core.seqs
    calls.clear()
    with pytest.raises(RuntimeError, match="refused"):
        llm.generate(["Hello", "World"], SamplingParams(max_tokens=4), use_tqdm=False)
    assert not engine.requests and not engine._child and not engine.core.seqs
    monkeypatch.undo()
    assert llm.generate("Hello", SamplingParams(temperature=0, max_tokens=4),
                        use_tqdm=False)[0].outputs[0].token_ids
    assert blocks_all_free(llm)


def test_request_ids_never_collide_with_completion_ids(llm):
    """"a" with n=2 runs as "a#0" and "a#1": a new request may not take either id, nor may a
    request with n > 1 derive one that is taken; the running one is untouched."""
    engine = llm.engine
    params = SamplingParams(n=2, temperature=0.8, seed=3, max_tokens=5, ignore_eos=True)
    engine.add_request("a", "Hello", params)
    engine.add_request("b#1", "Hello", SamplingParams(max_tokens=5, ignore_eos=True))
    with pytest.raises(ValueError, match="collides"):
        engine.add_request("a#0", "Hello", SamplingParams(max_tokens=5))
    with pytest.raises(ValueError, match="collides"):
        engine.add_request("b", "Hello", params)
    done = {}
    while engine.has_unfinished_requests():
        done.update({o.request_id: o for o in engine.step() if o.finished})
    assert sorted(done) == ["a", "b#1"]
    assert [len(c.token_ids) for c in done["a"].outputs] == [5, 5]
    assert blocks_all_free(llm)


@pytest.mark.parametrize("arrival", ["yesterday", float("nan"), True])
def test_bad_arrival_time_raises(llm, arrival):
    with pytest.raises(ValueError, match="arrival_time"):
        llm.engine.add_request("t", "Hello", SamplingParams(max_tokens=2), arrival_time=arrival)
    assert not llm.engine.requests and blocks_all_free(llm)


def test_ttft_includes_the_step_that_makes_the_first_token(llm, monkeypatch):
    """The first token exists once its step has run: the front end used to read the clock
    before stepping the in-process core, so TTFT left out the prefill itself (about 0 for a
    request alone)."""
    import time

    core, real_step = llm.engine.core, llm.engine.core.step

    def slow_step():
        time.sleep(0.3)
        return real_step()

    monkeypatch.setattr(core, "step", slow_step)
    out = llm.generate("Hello", SamplingParams(temperature=0, max_tokens=2), use_tqdm=False)[0]
    assert out.metrics.ttft >= 0.3
    assert out.metrics.finished_time - out.metrics.first_token_time >= 0.3


def test_streamed_text_never_takes_back_a_stop_prefix(llm):
    """A stop string spanning two tokens: the visible text of every intermediate output is a
    prefix of the final one (its first character is held back until the stop is ruled out)."""
    engine = llm.engine
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    engine.add_request("full", "Tell me a story", params)
    texts = []
    while engine.has_unfinished_requests():
        texts += [o.outputs[0].text for o in engine.step()]
    pieces = [b[len(a):] for a, b in zip([""] + texts, texts)]
    # a stop made of the last character of one token's text and the first of the next one's
    bounds = [len(texts[i]) for i in range(len(pieces) - 1) if pieces[i] and pieces[i + 1]]
    full = texts[-1]
    stops = [full[b - 1:b + 1] for b in bounds if full.find(full[b - 1:b + 1]) == b - 1]
    assert stops, pieces
    stop = stops[0]
    engine.add_request("cut", "Tell me a story", SamplingParams(
        temperature=0, max_tokens=16, ignore_eos=True, stop=[stop]))
    seen = []
    while engine.has_unfinished_requests():
        seen += [o.outputs[0].text for o in engine.step()]
    assert seen[-1] == full[:full.index(stop)]
    assert all(seen[-1].startswith(t) for t in seen), (stop, seen)
    assert blocks_all_free(llm)


def test_text_without_stop_strings_is_never_held_back(llm):
    """Only stop strings make a running completion hold text back (a stop's first characters
    could still be cut): without them every output shows all the text decoded so far."""
    engine = llm.engine
    engine.add_request("all", "Tell me a story", SamplingParams(temperature=0, max_tokens=12,
                                                                ignore_eos=True))
    shown = 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            req = engine.requests.get("all")
            if req is not None and not out.finished:
                assert out.outputs[0].text == req.completions[0].text
                shown += bool(out.outputs[0].text)
    assert shown > 3
    assert blocks_all_free(llm)


def test_max_model_len_caps_output(tmp_path):
    small = LLM(max_model_len=32, num_kv_blocks=8, block_size=4)
    out = small.generate({"prompt_token_ids": [5] * 20},
                         SamplingParams(temperature=0, max_tokens=100, ignore_eos=True),
                         use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) == 12 and out.finish_reason == "length"


def test_bad_engine_arguments():
    with pytest.raises(ValueError, match="num_kv_blocks"):
        LLM(num_kv_blocks=2, block_size=4, max_model_len=64)
    with pytest.raises(ValueError, match="max_model_len"):
        LLM(max_model_len=10**7)
    with pytest.raises(ValueError, match="dtype"):
        LLM(dtype="int3")


@pytest.mark.parametrize("seed", [2 ** 64, -2 ** 63 - 1, 1.5, True])
def test_bad_engine_seed_is_named_before_start(seed):
    """An engine seed torch cannot take used to pass LLM() and fail every sampled request
    (a multi-rank engine's ranks died) with "Overflow when unpacking long long"."""
    with pytest.raises(ValueError, match="seed"):
        LLM(seed=seed)


def test_engine_seed_none_is_random():
    """As vLLM: seed=None draws a seed at start, so unseeded samples differ between engines."""
    params = SamplingParams(temperature=1.0, max_tokens=16, ignore_eos=True)
    seeds, outs = set(), set()
    for _ in range(2):
        llm = LLM(seed=None)
        seeds.add(llm.config.seed)
        outs.add(tuple(llm.generate("Hello", params, use_tqdm=False)[0].outputs[0].token_ids))
        llm.shutdown()
    assert len(seeds) == 2 and len(outs) == 2


DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device")])]


def test_logit_bias_and_min_tokens(llm):
    """logit_bias moves a token's logit (greedy follows it); min_tokens keeps EOS, stop token
    ids and stop strings from ending the completion early."""
    greedy = dict(temperature=0.0, max_tokens=8)
    base = llm.generate("Hello", SamplingParams(**greedy, ignore_eos=True),
                        use_tqdm=False)[0].outputs[0]
    forced = llm.generate("Hello", SamplingParams(**greedy, ignore_eos=True,
                                                  logit_bias={7: 100.0}),
                          use_tqdm=False)[0].outputs[0]
    assert forced.token_ids == [7] * 8 and base.token_ids != forced.token_ids
    banned = llm.generate("Hello", SamplingParams(**greedy, ignore_eos=True,
                                                  logit_bias={base.token_ids[0]: -100.0}),
                          use_tqdm=False)[0].outputs[0]
    assert banned.token_ids[0] != base.token_ids[0]
    # a stop token id that greedy decoding reaches second ends it there, unless min_tokens
    stop = base.token_ids[1]
    assert stop not in base.token_ids[:1]
    early = llm.generate("Hello", SamplingParams(**greedy, ignore_eos=True,
                                                 stop_token_ids=[stop]),
                         use_tqdm=False)[0].outputs[0]
    assert early.token_ids == base.token_ids[:2] and early.finish_reason == "stop"
    # with min_tokens it cannot be sampled before then, and ends the completion once it is
    longer = dict(temperature=0.0, max_tokens=40, ignore_eos=True)
    free = llm.generate("Hello", SamplingParams(**longer), use_tqdm=False)[0].outputs[0]
    late = llm.generate("Hello", SamplingParams(**longer, stop_token_ids=[stop], min_tokens=5),
                        use_tqdm=False)[0].outputs[0]
    assert len(late.token_ids) >= 5 and stop not in late.token_ids[:5]
    # a stop id greedy decoding first reaches after min_tokens still ends it there
    j, t = next((j, t) for j, t in enumerate(free.token_ids) if free.token_ids.index(t) >= 5)
    ends = llm.generate("Hello", SamplingParams(**longer, stop_token_ids=[t], min_tokens=5),
                        use_tqdm=False)[0].outputs[0]
    assert ends.token_ids == free.token_ids[:j + 1] and ends.finish_reason == "stop", ends
    # a stop string inside the first min_tokens tokens' text does not end it; a later one does
    text = free.text
    string = llm.generate("Hello", SamplingParams(**longer, stop=[text[:3]], min_tokens=8),
                          use_tqdm=False)[0].outputs[0]
    assert string.token_ids == free.token_ids  # text[:3] only occurs at the start
    later = free.text[len(llm.get_tokenizer().decode(free.token_ids[:10])):][:4]
    assert later and text.find(later) >= len(text[:3])
    string = llm.generate("Hello", SamplingParams(**longer, stop=[text[:3], later], min_tokens=8),
                          use_tqdm=False)[0].outputs[0]
    assert string.finish_reason == "stop" and string.stop_reason == later, string
    assert len(string.token_ids) < len(free.token_ids)
    p = SamplingParams(**greedy)
    p.logit_bias = None  # set after construction: no bias
    assert llm.generate("Hello", p, use_tqdm=False)[0].outputs[0].token_ids
    for bad in (dict(logit_bias={5: 101}), dict(logit_bias={-1: 1.0}),
                dict(min_tokens=9, max_tokens=8), dict(min_tokens=-1)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            SamplingParams(**bad)
    with pytest.raises(ValueError, match="logit_bias"):
        llm.generate("Hello", SamplingParams(logit_bias={10**6: 1.0}), use_tqdm=False)


class TestSampler:
    def test_penalties_match_a_reference(self):
        """presence / frequency over the output, repetition over prompt and output (divide a
        positive logit, multiply a negative one), then greedy; rows without penalties and
        sampled rows beside them are unchanged."""
        from afd.sampler import apply_penalties

        torch.manual_seed(0)
        vocab = 12
        logits = torch.randn(4, vocab) * 3
        hist = [([1, 2, 4, 4, 4, 5, 5, 7], 3), ([3, 3, 4], 1), ([1, 2, 4, 4, 4, 5, 5, 7], 3),
                ([0, 9], 2)]  # row 0's argmax (4) is in its output twice
        params = [SamplingParams(temperature=0, presence_penalty=0.7, frequency_penalty=0.4,
                                 repetition_penalty=1.8),
                  SamplingParams(temperature=0, presence_penalty=-1.0),
                  SamplingParams(temperature=0),
                  SamplingParams(temperature=0, repetition_penalty=0.5)]
        want = logits.clone()
        for row, (p, (ids, num_prompt)) in enumerate(zip(params, hist)):
            for t in set(ids):
                v = want[row, t]
                want[row, t] = v / p.repetition_penalty if v > 0 else v * p.repetition_penalty
            for t in set(ids[num_prompt:]):
                count = ids[num_prompt:].count(t)
                want[row, t] -= p.frequency_penalty * count + p.presence_penalty
        got = apply_penalties(logits, params, hist)
        assert torch.allclose(got, want) and torch.equal(got[2], logits[2])
        tokens = Sampler(seed=0)(logits, params, [None] * 4, hist)
        assert tokens == want.argmax(-1).tolist()
        assert tokens != logits.argmax(-1).tolist()  # the penalties changed something
        for bad in (dict(presence_penalty=2.5), dict(frequency_penalty=-3),
                    dict(repetition_penalty=0), dict(repetition_penalty=float("inf"))):
            with pytest.raises(ValueError, match=next(iter(bad))):
                SamplingParams(**bad)

    def test_filters_that_leave_one_token_are_greedy(self):
        logits = torch.randn(6, 50)
        s = Sampler(seed=0)
        greedy = logits.argmax(-1).tolist()
        for p in (SamplingParams(top_k=1), SamplingParams(top_p=1e-6), SamplingParams(min_p=1.0),
                  SamplingParams(temperature=1e-4)):
            assert s(logits, [p] * 6, [None] * 6) == greedy

    def test_top_k_of_all_but_one_token_beside_top_p(self):
        """top_k = vocab - 1 with top_p sorts the k + 1 largest: the whole vocabulary, the
        widest the top-k candidates can be."""
        logits = torch.randn(3, 6, generator=torch.Generator().manual_seed(0))
        tokens = Sampler(seed=0)(logits, [SamplingParams(top_k=5, top_p=1e-6)] * 3, [None] * 3)
        assert tokens == logits.argmax(-1).tolist()

    def test_ties_at_the_kth_value_past_the_candidates_all_stay(self):
        """top_k = 2 with top_p: the k + 1 = 3 largest logits are candidates, but three tokens
        tie at the 2nd value, so the k-th value's ties reach past them: every tied token stays
        (the full sort), none is cut for being the fourth."""
        logits = torch.tensor([[3.0, 1.0, 1.0, 1.0, -9.0, -9.0]])
        s, p = Sampler(seed=0), SamplingParams(top_k=2, top_p=0.999)
        assert {s(logits, [p], [None])[0] for _ in range(300)} == {0, 1, 2, 3}

    def test_allowed_token_ids_beside_free_rows_without_grammars(self):
        """A batch where one row has allowed_token_ids and the others nothing, called without
        grammars (they are optional): the masked row takes its one allowed token, the others
        their own argmax."""
        logits = torch.randn(3, 8, generator=torch.Generator().manual_seed(0))
        logits[0, 3] = -5.0  # not the masked row's argmax
        rows = [SamplingParams(temperature=0, allowed_token_ids=[3]), SamplingParams(temperature=0),
                SamplingParams(top_k=1)]
        hist = [([1], 1, ())] * 3
        tokens = Sampler(seed=0)(logits, rows, [None] * 3, hist)
        assert tokens == [3] + logits[1:].argmax(-1).tolist()

    def test_distribution_matches_softmax(self):
        logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
        s = Sampler(seed=0)
        p = SamplingParams(temperature=0.7)
        counts = torch.zeros(4)
        for _ in range(4000):
            counts[s(logits, [p], [None])[0]] += 1
        expected = torch.softmax(logits[0] / 0.7, -1)
        assert torch.allclose(counts / 4000, expected, atol=0.03)

    def test_top_p_and_top_k_exclude_tail(self):
        logits = torch.tensor([[3.0, 2.9, 0.0, -5.0]])
        s = Sampler(seed=0)
        seen_p = {s(logits, [SamplingParams(top_p=0.6)], [None])[0] for _ in range(300)}
        seen_k = {s(logits, [SamplingParams(top_k=2)], [None])[0] for _ in range(300)}
        assert seen_p == {0, 1} and seen_k == {0, 1}

    @pytest.mark.parametrize("device", DEVICES)
    @pytest.mark.parametrize("shared", [None, SamplingParams(top_p=0.99)],
                             ids=["threshold_path", "sorted_path"])
    def test_mixed_batch_each_row_its_own_filter(self, shared, device):
        """One batch, one filter per row (and a greedy row): each row's samples follow its own
        renormalized distribution, whether the batch takes the top-k threshold path or, with a
        top-p row in it, the sorted one."""
        row = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5])
        logits = row.repeat(5, 1).to(device)
        rows = [SamplingParams(top_k=2), SamplingParams(), SamplingParams(min_p=0.5),
                SamplingParams(temperature=0), SamplingParams(top_k=3, temperature=2.0)]
        if shared is not None:
            rows[1] = shared
        s, draws = Sampler(seed=0), 3000
        counts = torch.zeros(5, 6)
        for _ in range(draws):
            for i, tok in enumerate(s(logits, rows, [None] * 5)):
                counts[i, tok] += 1
        freq = counts / draws

        def renormed(keep: int, temperature: float = 1.0) -> torch.Tensor:
            p = torch.softmax(row / temperature, -1)
            p[keep:] = 0
            return p / p.sum()

        probs = torch.softmax(row, -1)
        expect_1 = probs if shared is None else renormed(6)  # top_p 0.99 keeps all six here
        expected = torch.stack([renormed(2), expect_1, renormed(int((probs >= probs[0] / 2).sum())),
                                torch.eye(6)[0], renormed(3, 2.0)])
        assert torch.allclose(freq, expected, atol=0.03), (freq, expected)

    @pytest.mark.parametrize("mates", [[], [SamplingParams(temperature=1.0)],
                                       [SamplingParams(top_p=0.8), SamplingParams(top_k=7)],
                                       [SamplingParams(top_k=250, top_p=0.5)]],
                             ids=["alone", "threshold", "full_sort", "top_k_candidates"])
    @pytest.mark.parametrize("device", DEVICES)
    def test_seeded_rows_do_not_depend_on_the_batch(self, mates, device):
        """The seeded row's 20 samples are the same alone and beside rows that send the batch
        down each path (top-k threshold, full sort, top-k candidates)."""
        logits = torch.randn(1 + len(mates), 300,
                             generator=torch.Generator().manual_seed(0)).to(device)
        p = SamplingParams(temperature=1.0, top_k=100, min_p=0.01, seed=1)

        def run(rows: list[SamplingParams]) -> list[int]:
            gen, sampler = torch.Generator().manual_seed(9), Sampler(seed=len(rows))
            return [sampler(logits[:len(rows)], rows, [gen] + [None] * (len(rows) - 1))[0]
                    for _ in range(20)]

        alone = run([p])
        assert len(set(alone)) > 5
        assert run([p] + mates) == alone

    @pytest.mark.parametrize("device", DEVICES)
    def test_ties_past_the_candidates_sample_as_the_full_sort(self, device):
        """Rows with top_k and top_p whose ties at the k-th value reach past the k_max + 1
        candidates (logits of few distinct values: wide ties; one tied class at the very top)
        take, on the device (``keep_device``, async scheduling: no read on the host), the
        samples the full sort gives them (as without it, or a mate row without top_k sends the
        batch down that path): the same seeded tokens, with min_p and temperatures, the tied
        tokens past the candidates among them."""
        gen = torch.Generator().manual_seed(3)
        logits = torch.randint(0, 3, (6, 64), generator=gen).float()
        for i in range(5):  # a few distinct values above the ties
            logits[i, torch.randperm(64, generator=gen)[:i]] = torch.arange(3.0, 3.0 + i)
        logits[5] = 1.0  # every token tied: the k-th value is the largest
        logits[5, :3] = 0.0
        logits = torch.cat([logits, logits[:1]]).to(device)  # the mate's row: row 0's
        rows = [SamplingParams(top_k=5, top_p=0.9, seed=1),
                SamplingParams(top_k=3, top_p=0.6, temperature=0.7, seed=2),
                SamplingParams(top_k=9, top_p=0.99, min_p=0.3, seed=3),
                SamplingParams(top_k=4, top_p=0.4, temperature=2.0, seed=4),
                SamplingParams(top_k=7, top_p=0.95, temperature=0.5, seed=7),
                SamplingParams(top_k=4, top_p=0.5, seed=5)]
        values = logits.sort(dim=-1, descending=True).values
        for i, p in enumerate(rows):  # each row's ties reach past the 9 + 1 candidates
            assert values[i, p.top_k - 1] == values[i, 9], i
        mate = SamplingParams(top_p=0.99, seed=6)

        def run(batch: list[SamplingParams], n: int, on_device: bool = False
                ) -> list[list[int]]:
            gens = [torch.Generator().manual_seed(9 + i) for i in range(len(batch))]
            sampler = Sampler(seed=0)
            if on_device:
                return [sampler.sample(logits[:len(batch)], batch, gens,
                                       keep_device=True).device_tokens.tolist()[:n]
                        for _ in range(200)]
            return [sampler(logits[:len(batch)], batch, gens)[:n] for _ in range(200)]

        want = run(rows + [mate], len(rows))
        got = run(rows, len(rows), on_device=True)
        assert got == want == run(rows, len(rows))
        tied = [sum(logits[i, t] == values[i, rows[i].top_k - 1] for t in set(col))
                for i, col in enumerate(zip(*got))]
        # several tied tokens sampled (rows 2 and 4 cut them: min_p, a low temperature)
        assert [t > 1 for t in tied] == [True, True, False, True, False, True], tied

    @pytest.mark.parametrize("device", DEVICES)
    @pytest.mark.parametrize("seeded", [SamplingParams(temperature=5.0, top_k=50, seed=1),
                                        SamplingParams(temperature=5.0, top_k=50, top_p=0.9,
                                                       seed=1)],
                             ids=["top_k", "top_k_top_p"])
    def test_ties_do_not_make_seeded_rows_depend_on_the_batch(self, seeded, device):
        """bf16 logits tie often, here at the 50th largest value: every path (threshold, top-k
        candidates, full sort) must keep the same tokens and order ties the same way."""
        gen = torch.Generator().manual_seed(0)
        logits = (torch.randn(4, 4000, generator=gen) * 2.5).bfloat16().float().to(device)
        top = logits[0].topk(51).values
        assert top[49] == top[50], "the test needs a tie at the k-th value"
        mates = [[], [SamplingParams(temperature=1.0)], [SamplingParams(top_p=0.5)],
                 [SamplingParams(top_k=60, top_p=0.5)]]

        def run(rows: list[SamplingParams]) -> list[int]:
            gen, sampler = torch.Generator().manual_seed(9), Sampler(seed=len(rows))
            return [sampler(logits[:len(rows)], rows, [gen] + [None] * (len(rows) - 1))[0]
                    for _ in range(300)]

        alone = run([seeded])
        for batch in mates[1:]:
            assert run([seeded] + batch) == alone, batch


    @pytest.mark.parametrize("device", DEVICES)
    def test_nan_rows_are_marked_not_sampled(self, device):
        """A row whose logits hold a NaN has no distribution: it used to come back as token 0
        (every probability NaN) or the NaN's index (greedy). It is -1 now, the other rows
        sampled as usual, on each path (threshold, full sort, top-k candidates)."""
        logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0)).to(device)
        logits[1, 7] = float("nan")
        for mate in (SamplingParams(top_k=5), SamplingParams(top_p=0.5),
                     SamplingParams(top_k=5, top_p=0.5), SamplingParams(temperature=0)):
            for nan_row in (SamplingParams(), SamplingParams(temperature=0),
                            SamplingParams(top_k=3, top_p=0.9)):
                rows = [SamplingParams(temperature=0), nan_row, mate]
                tokens = Sampler(seed=0)(logits, rows, [None] * 3)
                assert tokens[1] == -1 and tokens[0] == int(logits[0].argmax())
                assert tokens[2] >= 0


    @pytest.mark.parametrize("device", DEVICES)
    def test_logprobs_are_the_raw_distribution(self, device, monkeypatch):
        """Rows that ask get the log_softmax of their raw logits (before penalties, temperature
        and filters): the sampled token's with its rank, then the k likeliest. Only those rows
        pay for a log_softmax, and asking changes no sample."""
        logits = (torch.randn(5, 40, generator=torch.Generator().manual_seed(0)) * 3).to(device)
        ref = logits.cpu().log_softmax(dim=-1)
        top = int(ref[3].argmax())
        hist = [([1], 1)] * 3 + [([1, top, top], 1), ([1], 1)]  # row 3's argmax is penalized
        rows = [SamplingParams(temperature=0, logprobs=3),
                SamplingParams(temperature=0.5, top_k=5, seed=1, logprobs=0),
                SamplingParams(temperature=1.0),
                SamplingParams(temperature=0, frequency_penalty=2, presence_penalty=2, logprobs=2),
                SamplingParams(temperature=2.0, top_p=0.8, logprobs=20)]
        plain = [SamplingParams(**{**p.to_dict(), "logprobs": None}) for p in rows]

        def run(params: list[SamplingParams]):
            gens = [torch.Generator().manual_seed(7) if p.seed is not None else None
                    for p in params]
            return Sampler(seed=0).sample(logits, params, gens, hist)

        softmaxed = []
        log_softmax = torch.Tensor.log_softmax
        monkeypatch.setattr(torch.Tensor, "log_softmax",
                            lambda t, *a, **k: softmaxed.append(t.shape) or log_softmax(t, *a, **k))
        without = run(plain)
        assert softmaxed == [] and without.logprobs == [None] * 5
        out = run(rows)
        assert softmaxed == [(4, 40)]
        assert out.tokens == without.tokens and out.logprobs[2] is None
        assert out.tokens[3] != top, "the penalty was meant to move row 3 off its argmax"
        for i, p in enumerate(rows):
            if p.logprobs is None:
                continue
            ids, lps, rank = out.logprobs[i]
            token, want = out.tokens[i], ref[i].topk(p.logprobs)
            assert ids == [token] + want.indices.tolist()
            torch.testing.assert_close(torch.tensor(lps), torch.cat([ref[i, token:token + 1],
                                                                     want.values]))
            assert rank == int((ref[i] >= ref[i, token]).sum())
        assert out.logprobs[0][2] == 1 and out.logprobs[3][2] > 1

    def test_logprobs_cross_the_wire(self):
        from afd import protocol
        from afd.sampler import PromptLogprobs
        from afd.sequence import CoreOutput

        def across(out: CoreOutput) -> CoreOutput:
            back = protocol.decode_from_rank(protocol.encode(protocol.Out([out], rank=1)))
            return back.outs[0]

        out = CoreOutput("r", [5], None, None, logprobs=[([5, 2, 5], [-0.25, -0.2, -0.25], 2)])
        assert across(out) == out
        # prompt logprobs travel as flat per-token arrays: two prompt tokens, k = 1
        out.prompt_logprobs = PromptLogprobs(1, [3, 1], [7, 9], [-2.5, -0.5, -0.125, -0.125])
        assert across(out) == out


def test_logprobs_in_a_mixed_batch(llm):
    """Greedy and sampled rows, with and without logprobs, n > 1: one {token id: Logprob} per
    generated token holding the sampled token and ranks 1..k, a cumulative_logprob that sums the
    sampled ones; rows without logprobs have None, and asking changes no token."""
    tok = llm.get_tokenizer()
    prompts = [PROMPTS[0], PROMPTS[1], PROMPTS[1], PROMPTS[2]]
    common = dict(max_tokens=6, ignore_eos=True)
    params = [SamplingParams(temperature=0, logprobs=2, **common),
              SamplingParams(temperature=0.8, seed=3, n=2, logprobs=0, **common),
              SamplingParams(temperature=0.8, seed=3, **common),
              SamplingParams(temperature=1.5, top_k=3, logprobs=4, **common)]
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert outs[1].outputs[0].token_ids == outs[2].outputs[0].token_ids
    assert outs[2].outputs[0].logprobs is None and outs[2].outputs[0].cumulative_logprob is None
    for out, p in zip(outs, params):
        if p.logprobs is None:
            continue
        for c in out.outputs:
            assert len(c.logprobs) == len(c.token_ids) == 6
            assert c.cumulative_logprob == pytest.approx(
                sum(e[t].logprob for t, e in zip(c.token_ids, c.logprobs)))
            for token, entry in zip(c.token_ids, c.logprobs):
                assert list(entry)[0] == token and len(entry) in (p.logprobs, p.logprobs + 1)
                top = sorted(entry.values(), key=lambda e: e.rank)[:p.logprobs]
                assert [e.rank for e in top] == list(range(1, p.logprobs + 1))
                assert [e.logprob for e in top] == sorted((e.logprob for e in top), reverse=True)
                assert all(e.decoded_token == tok.decode([t]) for t, e in entry.items())
                assert entry[token].logprob <= 0 and entry[token].rank >= 1
                if p.greedy:
                    assert entry[token].rank == 1
    assert blocks_all_free(llm)


def test_nan_logits_fail_only_their_request(llm, monkeypatch):
    """NaN logits end their request with an error instead of a made-up token; the request
    beside it in the batch is unaffected and the engine keeps serving."""
    import afd.model_runner

    p = SamplingParams(temperature=0.8, max_tokens=6, seed=3, ignore_eos=True)
    prompts = ["Hello, my name is", "The capital of France is"]
    expected = [o.outputs[0].token_ids for o in llm.generate(prompts, p, use_tqdm=False)]
    real = afd.model_runner.run_micro_batches

    calls = []

    def poisoned(*args):
        logits = real(*args)
        if not calls:  # the first step's first sampled row: the first prompt
            logits[0][0, 3] = float("nan")
        calls.append(1)
        return logits

    monkeypatch.setattr(afd.model_runner, "run_micro_batches", poisoned)
    for params in (p, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)):
        calls.clear()
        outs = llm.generate(prompts, params, use_tqdm=False)
        assert outs[0].outputs[0].finish_reason == "error" and outs[0].outputs[0].token_ids == []
        assert "NaN" in outs[0].error
        assert outs[1].outputs[0].finish_reason == "length" and outs[1].error is None
        if params is p:
            assert outs[1].outputs[0].token_ids == expected[1]
    monkeypatch.setattr(afd.model_runner, "run_micro_batches", real)
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, p, use_tqdm=False)] == expected
    assert blocks_all_free(llm)


def test_generation_config_gives_sampling_defaults(tmp_path):
    """As vLLM's --generation-config auto: the checkpoint's generation_config.json sets the
    sampling defaults (a request's own values win); "vllm" ignores it; a bad value is named."""
    import json
    import shutil

    from afd.llm import generation_defaults
    from afd.openai_protocol import CompletionRequest
    from models.default_model import default_model_path

    path = str(tmp_path / "ckpt")
    shutil.copytree(default_model_path(), path)
    with open(f"{path}/generation_config.json") as f:
        gen = json.load(f)
    with open(f"{path}/generation_config.json", "w") as f:
        json.dump({**gen, "temperature": 0.0, "top_k": 5, "repetition_penalty": 1.0}, f)
    assert generation_defaults(path) == {"temperature": 0.0, "top_k": 5,
                                         "repetition_penalty": 1.0}
    assert generation_defaults(path, "vllm") == {}
    with pytest.raises(ValueError, match="generation_config"):
        generation_defaults(path, "hf")
    prompts = ["Hello, my name is", "The capital of France is"]
    greedy = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    llm = LLM(path)
    want = [o.outputs[0].token_ids for o in llm.generate(prompts, greedy, use_tqdm=False)]
    defaults = llm.get_default_sampling_params()
    assert defaults.temperature == 0.0 and defaults.top_k == 5
    defaults.max_tokens, defaults.ignore_eos = 8, True
    got = [o.outputs[0].token_ids for o in llm.generate(prompts, defaults, use_tqdm=False)]
    assert got == want
    # the server's requests: unset fields take the defaults, set ones keep their values
    params = CompletionRequest(prompt="x").sampling_params(8, llm.engine.default_sampling)
    assert params.temperature == 0.0 and params.top_k == 5 and params.top_p == 1.0
    params = CompletionRequest(prompt="x", temperature=0.7, top_k=-1).sampling_params(
        8, llm.engine.default_sampling)
    assert params.temperature == 0.7 and params.top_k == -1
    assert LLM(path, generation_config="vllm").get_default_sampling_params().temperature == 1.0
    with open(f"{path}/generation_config.json", "w") as f:
        json.dump({**gen, "top_p": 1.5}, f)
    with pytest.raises(ValueError, match="top_p"):
        generation_defaults(path)


def test_direct_decode_is_the_tokenizers_decode(llm):
    """The detokenizer calls the Rust backend directly (afd.detokenizer._direct_decode): it
    must give exactly transformers' decode, special tokens and split characters included, and
    must not be used for a tokenizer class that decodes its own way."""
    import random

    from afd.detokenizer import _direct_decode

    tok = llm.get_tokenizer()
    rng = random.Random(0)
    vocab = llm.engine.model_cfg.vocab_size
    for skip in (True, False):
        decode = _direct_decode(tok, skip)
        assert decode is not None
        for _ in range(200):
            ids = [rng.randrange(vocab) for _ in range(rng.randrange(0, 8))]
            assert decode(ids) == tok.decode(ids, skip_special_tokens=skip), ids

    class OwnDecode(type(tok)):
        def decode(self, token_ids, skip_special_tokens=False, **kwargs):
            return "x"

    tok.__class__ = OwnDecode
    try:
        assert _direct_decode(tok, True) is None
    finally:
        tok.__class__ = OwnDecode.__bases__[0]


def test_finished_only_steps_give_the_same_outputs(llm):
    """FINAL_ONLY requests (what generate() runs) skip the outputs of running requests only:
    finished ones are those of cumulative steps, with requests finishing at different steps,
    one stopped by a stop string, one with n=2 and logprobs, and one aborted mid-batch."""
    from dataclasses import replace

    from afd.sampling_params import RequestOutputKind

    engine = llm.engine
    params = [SamplingParams(temperature=0, max_tokens=3, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=9, ignore_eos=True),
              SamplingParams(n=2, temperature=0.8, seed=5, max_tokens=6, ignore_eos=True,
                             logprobs=1),
              SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, stop=["e"]),
              SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)]

    def run(finished_only: bool) -> dict:
        for i, p in enumerate(params):
            if finished_only:
                p = replace(p, output_kind=RequestOutputKind.FINAL_ONLY)
            engine.add_request(f"{finished_only}{i}", PROMPTS[i % len(PROMPTS)], p)
        done, steps = {}, 0
        while engine.has_unfinished_requests():
            outs = engine.step()
            steps += 1
            if steps == 2:
                engine.abort_request(f"{finished_only}4")
            assert not finished_only or all(o.finished for o in outs)
            done.update({o.request_id[len(str(finished_only)):]: o for o in outs if o.finished})
        return {rid: [(c.token_ids, c.text, c.finish_reason, c.stop_reason,
                       c.cumulative_logprob, c.logprobs) for c in o.outputs]
                for rid, o in done.items()}

    plain = run(False)
    assert sorted(plain) == ["0", "1", "2", "3"]
    assert plain["3"][0][2] == "stop" or len(plain["3"][0][0]) == 12
    assert run(True) == plain
    assert blocks_all_free(llm)


def tokenizer_with_own_code(folder) -> str:
    """The embedded tokenizer made to need its own Python code, as Kimi K2's does: its
    tokenizer_config.json names a class in a local file through ``auto_map`` (no network)."""
    import json
    import os
    import shutil

    from models.default_model import default_model_path

    src, folder = default_model_path(), str(folder)
    os.makedirs(folder, exist_ok=True)
    shutil.copy(os.path.join(src, "tokenizer.json"), folder)
    with open(os.path.join(src, "tokenizer_config.json")) as f:
        cfg = json.load(f)
    cfg.update(tokenizer_class="OwnTokenizer",
               auto_map={"AutoTokenizer": [None, "own_tokenizer.OwnTokenizer"]})
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump(cfg, f)
    with open(os.path.join(folder, "own_tokenizer.py"), "w") as f:
        f.write("from transformers import PreTrainedTokenizerFast\n\n\n"
                "class OwnTokenizer(PreTrainedTokenizerFast):\n    ran_own_code = True\n")
    return folder


def test_trust_remote_code_reaches_every_tokenizer_load(tmp_path):
    """A tokenizer that needs its own code loads with trust_remote_code=True, in the front end
    and in the rank that builds structured-output grammars, and is refused without it, with
    an error that names the flag (vLLM's default: False)."""
    from afd.llm import load_tokenizer

    folder = tokenizer_with_own_code(tmp_path / "tok")
    for load in (lambda: load_tokenizer(folder), lambda: LLM(tokenizer=folder)):
        with pytest.raises(ValueError, match=r"pass trust_remote_code=True to LLM\(\) "
                                             r"\(--trust-remote-code to launch/serve.py\)"):
            load()
    assert load_tokenizer(folder, trust_remote_code=True).ran_own_code
    llm = LLM(tokenizer=folder, trust_remote_code=True)
    assert llm.config.trust_remote_code and llm.get_tokenizer().ran_own_code
    params = SamplingParams(max_tokens=8, structured_outputs={"choice": ["yes", "no"]})
    assert llm.generate("Ready?", params, use_tqdm=False)[0].outputs[0].text in ("yes", "no")
    assert llm.engine.core._grammars._hf_tokenizer.ran_own_code
    with pytest.raises(ValueError, match="trust_remote_code must be True or False"):
        LLM(trust_remote_code="yes")


def test_serve_trust_remote_code_flag(monkeypatch):
    """launch/serve.py's --trust-remote-code (off by default) reaches the EngineConfig that
    the front end and every rank are given."""
    import sys

    from afd.config import engine_config_from_dict, engine_config_to_dict

    from launch import serve

    for argv, want in ((["serve.py"], False), (["serve.py", "--trust-remote-code"], True)):
        monkeypatch.setattr(sys, "argv", argv)
        assert serve.parse_args().trust_remote_code is want
    cfg = LLM(trust_remote_code=True).config
    assert engine_config_from_dict(engine_config_to_dict(cfg)).trust_remote_code is True


def test_generate_freezes_the_collector_while_it_runs_and_gives_it_back(llm, monkeypatch):
    """generate() keeps the objects alive at its start out of the garbage collector's full
    passes while it steps (bench/gc_pause.py: the 79-88 ms stall at batch 256), then unfreezes
    them, also when a step raises; a caller who froze objects or turned the collector off is
    left alone."""
    import gc

    seen, step = [], llm.engine.step

    def watched():
        seen.append(gc.get_freeze_count())
        return step()

    monkeypatch.setattr(llm.engine, "step", watched)
    params = SamplingParams(temperature=0, max_tokens=3)
    assert gc.get_freeze_count() == 0
    llm.generate(["a b"], params, use_tqdm=False)
    assert seen and all(n > 0 for n in seen) and gc.get_freeze_count() == 0

    def fails():
        seen.append(gc.get_freeze_count())
        raise RuntimeError("step failed")

    monkeypatch.setattr(llm.engine, "step", fails)
    seen.clear()
    with pytest.raises(RuntimeError, match="step failed"):
        llm.generate(["a b"], params, use_tqdm=False)
    assert seen[0] > 0 and gc.get_freeze_count() == 0 and blocks_all_free(llm)

    monkeypatch.setattr(llm.engine, "step", watched)
    gc.freeze()  # the caller's own freeze: generate neither adds to it nor undoes it
    try:
        mine = gc.get_freeze_count()
        seen.clear()
        llm.generate(["a b"], params, use_tqdm=False)
        # (frozen objects freed by reference counting leave the count, none join it)
        assert max(seen) <= mine and 0 < gc.get_freeze_count() <= mine
    finally:
        gc.unfreeze()
    gc.disable()
    try:
        seen.clear()
        llm.generate(["a b"], params, use_tqdm=False)
        assert set(seen) == {0}
    finally:
        gc.enable()


def test_a_request_is_checked_once_for_all_its_completions(llm, monkeypatch):
    """The single-process engine checks a prompt's token ids once (LLMEngine.validate), not
    again in the core for each of n completions (an O(prompt) scan each). A rank checks every
    request it is sent (EngineCore.add_or_refuse; over real ranks: test_pd)."""
    import afd.core
    import afd.engine
    from afd.sequence import CoreRequest

    calls = []
    for module in (afd.core, afd.engine):
        real = module.check_token_ids
        monkeypatch.setattr(module, "check_token_ids",
                            lambda *a, real=real: (calls.append(len(a[0])), real(*a))[1])
    engine = llm.engine
    engine.add_request("once", "Hello", SamplingParams(n=4, max_tokens=2))
    assert calls == [len(engine.requests["once"].prompt_token_ids)]
    while engine.has_unfinished_requests():
        engine.step()
    refused = engine.core.add_or_refuse(CoreRequest("forged", [10**9], SamplingParams()))
    assert refused[0].finish_reason == "error" and "vocabulary" in refused[0].error
    assert blocks_all_free(llm)


@pytest.mark.parametrize("model", ["deepseek", "deepseek+mtp", "qwen3"])
def test_nan_in_kv_rows_no_sequence_owns_changes_no_token(model, tmp_path):
    """Every KV cache row filled with NaN between two runs of the same greedy batch (no prefix
    cache, so nothing is reused): each step writes its own rows, and what a sequence's
    attention gathers past its length (the rest of its last block, the blocks its table's
    padding names) still holds NaN, as a freed block of a request whose numerics blew up
    would. The tokens are the clean run's. On the CPU the torch attention paths run: MLA
    (per row, and grouped for MTP's verify rows) and GQA decode, their prefill paths."""
    path, spec = None, None
    if model == "deepseek+mtp":
        import shutil

        from models.default_model import add_mtp_layer, default_model_path

        path = str(tmp_path / "mtp")
        shutil.copytree(default_model_path(), path)
        add_mtp_layer(path)
        spec = {"method": "mtp", "num_speculative_tokens": 2}
    elif model == "qwen3":
        from ckpt_utils import build_hf_model, save_checkpoint

        path = save_checkpoint(build_hf_model("qwen3_moe"), str(tmp_path))
    llm = LLM(path, seed=0, enable_prefix_caching=False, speculative_config=spec)
    prompts = [{"prompt_token_ids": p} for p in ([0, 17, 423, 45, 8], [0, *range(100, 121)])]
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    clean = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    assert blocks_all_free(llm)
    for cache in llm.engine.core.runner.kv_caches:
        cache.fill_(float("nan"))
    got = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    assert got == clean

"""Reasoning parsers on /v1/chat/completions: the splitter on hand-written model text (streamed in
any split), and the server with the ``openai`` client. The embedded model has random weights, so
a structured-output choice makes it write the text under test. Its tokenizer spells ``</think>``
in several tokens, so a grammar cannot wait for it and applies from the first token: the
reasoning then counts only where the output opens it with ``<think>``, which is how these
forced outputs are written. A tokenizer with ``<think>``/``</think>`` as special tokens (as
reasoning models have) shows the grammar waiting for the end of the reasoning."""

from __future__ import annotations

import random

import pytest

from asgi_utils import call_app

from afd.reasoning_parsers import (PARSERS, ReasoningStream, grammar_waits_for, marker_token_ids,
                                   prompt_ends_reasoning, reasoning_mode)

R1 = PARSERS["deepseek_r1"]


def split(text: str, mode: str = "open") -> tuple[str | None, str | None]:
    out = ReasoningStream(R1, mode).parse(text)
    return out.reasoning, out.content


@pytest.mark.parametrize("text,want", [
    # the template opened the reasoning in the prompt: no <think> in the output
    ("Let me see.\n</think>\n\nIt is 4.", ("Let me see.\n", "\n\nIt is 4.")),
    # the model opened it itself (older Qwen3 templates): the tag is dropped
    ("<think>\nLet me see.</think>It is 4.", ("\nLet me see.", "It is 4.")),
    ("\n<think>a</think>b", ("a", "b")),
    # max_tokens hit inside the reasoning: all of it is reasoning, no content
    ("Let me see, 2 + 2 is", ("Let me see, 2 + 2 is", None)),
    ("<think>Let me", ("Let me", None)),
    ("", ("", None)),
    # empty reasoning; nothing after the reasoning
    ("<think></think>It is 4.", ("", "It is 4.")),
    ("</think>It is 4.", ("", "It is 4.")),
    ("Done.</think>", ("Done.", None)),
    # only the first </think> ends the reasoning; a <think> later on is content
    ("a</think>b</think>c", ("a", "b</think>c")),
    ("a</think>b<think>c", ("a", "b<think>c")),
])
def test_reasoning_ends_at_the_first_end_marker(text, want):
    assert split(text) == want


def test_modes_tag_and_off():
    # under a grammar ("tag"): reasoning only if the output opens with <think>
    assert split("<think>abc</think>answer", "tag") == ("abc", "answer")
    assert split("abc</think>answer", "tag") == (None, "abc</think>answer")
    assert split('{"a": 1}', "tag") == (None, '{"a": 1}')
    assert split("<think>abc", "tag") == ("abc", None)
    assert split("", "tag") == (None, None)
    # the request does not think: all content, tags and all
    assert split("<think>abc</think>answer", "off") == (None, "<think>abc</think>answer")


def test_when_a_request_thinks():
    def mode(parser, kwargs, constrained=False):
        return reasoning_mode(PARSERS[parser], kwargs, constrained)

    assert mode("deepseek_r1", None) == "open"
    assert mode("deepseek_r1", {"enable_thinking": False}) == "open"  # R1 always thinks
    assert mode("qwen3", None) == "open" and mode("qwen3", {"enable_thinking": True}) == "open"
    assert mode("qwen3", {"enable_thinking": False}) == "off"
    assert mode("deepseek_v3", None) == "off"  # DeepSeek-V3.1 thinks when asked
    assert mode("deepseek_v3", {"thinking": True}) == "open"
    assert mode("deepseek_v3", {"enable_thinking": True}) == "open"
    assert mode("kimi_k2", None) == "open"  # K2-Thinking thinks unless told not to
    assert mode("kimi_k2", {"thinking": False}) == "off"
    assert mode("kimi_k2", None, constrained=True) == "tag"
    assert mode("qwen3", None, constrained=True) == "tag"
    assert mode("qwen3", {"enable_thinking": False}, constrained=True) == "off"
    # GLM-4.5 thinks unless told not to, and writes <think> itself: "tag" even unconstrained
    assert mode("glm45", None) == "tag" and mode("glm45", {"enable_thinking": True}) == "tag"
    assert mode("glm45", {"enable_thinking": False}) == "off"
    assert mode("glm45", None, constrained=True) == "tag"
    # MiniMax-M2 always thinks
    assert mode("minimax_m2", None) == mode("minimax_m2", {"enable_thinking": False}) == "open"
    out = ReasoningStream(PARSERS["minimax_m2"], "open").parse("<think>\nHm.\n</think>\n\nHi.")
    assert (out.reasoning, out.content) == ("\nHm.\n", "\n\nHi.")
    # GLM-4.7's template opens <think> in the prompt itself (or closes it: thinking off)
    assert mode("glm47", None) == "open" and mode("glm47", {"enable_thinking": False}) == "off"


GLM_CALL = ("<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>12</arg_value>\n"
            "</tool_call>")


@pytest.mark.parametrize("text,want", [
    ("\n<think>I should look.</think>\nIt is 4.", ("I should look.", "\nIt is 4.")),
    ("It is 4.", (None, "It is 4.")),  # no <think>: all content
    ("<think></think>\nIt is 4.", ("", "\nIt is 4.")),  # a /nothink turn
    ("<think>cut short by max_tok", ("cut short by max_tok", None)),
    ("a</think>b", (None, "a</think>b")),
    ("\n<think>I should look.</think>\n" + GLM_CALL, ("I should look.", "\n" + GLM_CALL)),
])
def test_glm45_reasoning_is_what_the_model_opens(text, want):
    """GLM-4.5's template leaves <think> to the model: an answer is reasoning up to </think>
    only if it starts with <think>; streamed in any split, the same."""
    glm = PARSERS["glm45"]
    mode = reasoning_mode(glm, None, False)
    out = ReasoningStream(glm, mode).parse(text)
    assert (out.reasoning, out.content) == want
    for cut in range(len(text) + 1):
        stream = ReasoningStream(glm, mode)
        pieces = [stream.update(text[:cut], False), stream.update(text[cut:], True)]
        assert ("".join(p.reasoning for p in pieces) if want[0] is not None else None,
                "".join(p.content for p in pieces) or None) == want, cut


def test_glm45_reasoning_then_tool_calls_in_any_split():
    """GLM-4.5's reasoning, then a call: the server's per-choice reader splits the reasoning
    off and reads the call from the content, typed by the tools, one character at a time or
    in any two pieces."""
    from afd.api_server import _ChoiceReader
    from afd.tool_parsers import PARSERS as TOOL_PARSERS
    from afd.tool_parsers import MarkerStream

    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}}}}]
    text = "\n<think>I should look.</think>\n" + GLM_CALL + "\n" + GLM_CALL
    want_call = {"name": "get_weather", "arguments": '{"city": "12"}'}
    for cuts in [list(range(1, len(text)))] + [[k] for k in range(len(text) + 1)]:
        reader = _ChoiceReader(ReasoningStream(PARSERS["glm45"], "tag"),
                               MarkerStream(TOOL_PARSERS["glm45"], None, tools))
        reasoning, content, calls, start = "", "", {}, 0
        for end in [*cuts, len(text)]:
            delta = reader.delta(text[start:end], end == len(text))
            start = end
            reasoning += delta.get("reasoning", "")
            content += delta.get("content", "")
            for t in delta.get("tool_calls", []):
                f = calls.setdefault(t["index"], {"name": "", "arguments": ""})
                f["name"] += t["function"].get("name", "")
                f["arguments"] += t["function"]["arguments"]
        assert (reasoning, content) == ("I should look.", ""), cuts
        assert calls == {0: want_call, 1: want_call}, cuts


def test_kimi_k2_tool_section_ends_the_reasoning():
    """K2-Thinking may open a tool-call section without closing its reasoning: the section
    ends the reasoning and is content (for the tool-call parser), streamed in any split."""
    k2 = PARSERS["kimi_k2"]
    calls = "<|tool_calls_section_begin|><|tool_call_begin|>functions.f:0"
    for text, want in [
        ("I should look.</think>Checking." + calls, ("I should look.", "Checking." + calls)),
        ("I should look." + calls, ("I should look.", calls)),
        ("<think>Hm." + calls.replace("calls_section", "call_section"),
         ("Hm.", calls.replace("calls_section", "call_section"))),
        # after the reasoning a section is content like any text
        ("a</think>b<|tool_calls_section_begin|>c</think>",
         ("a", "b<|tool_calls_section_begin|>c</think>")),
    ]:
        out = ReasoningStream(k2, "open").parse(text)
        assert (out.reasoning, out.content) == want
        for cut in range(1, len(text)):
            stream = ReasoningStream(k2, "open")
            pieces = [stream.update(text[:cut], False), stream.update(text[cut:], True)]
            assert ("".join(p.reasoning for p in pieces),
                    "".join(p.content for p in pieces)) == want, cut
    # DeepSeek-R1's parser keeps such a section in the reasoning
    assert ReasoningStream(R1, "open").parse("x" + calls).content is None


TEXTS = ["Let me see.\n</think>\n\nIt is 4.", "<think>\nLet me see.</think>It is 4.",
         "  <think>x</think>", "Let me </thin", "<thi", "a</think>b</think>c", "",
         "<think></think>", "no end marker < / think >"]


@pytest.mark.parametrize("mode", ["open", "tag", "off"])
def test_streaming_in_any_split_gives_the_unstreamed_answer(mode):
    rng = random.Random(0)
    for text in TEXTS:
        want = ReasoningStream(R1, mode).parse(text)
        splits = [list(range(1, len(text)))]  # one character at a time
        splits += [sorted(rng.sample(range(1, len(text)), rng.randint(1, len(text) - 1)))
                   for _ in range(40) if len(text) > 1]
        for cuts in splits:
            stream, reasoning, content, start = ReasoningStream(R1, mode), "", "", 0
            for end in [*cuts, len(text)]:
                piece = stream.update(text[start:end], end == len(text))
                start = end
                reasoning += piece.reasoning
                content += piece.content
            assert (reasoning if want.reasoning is not None else None) == want.reasoning, cuts
            assert (content or None) == want.content, (text, cuts)
            assert stream.result() == want


def test_a_marker_split_across_updates_is_held_back():
    stream = ReasoningStream(R1, "open")
    assert stream.update("abc</th", False).reasoning == "abc"  # "</th" may begin </think>
    piece = stream.update("ink>ans", False)
    assert (piece.reasoning, piece.content) == ("", "ans")
    stream = ReasoningStream(R1, "open")
    assert stream.update("<th", False).reasoning == ""  # may be a <think> to drop
    assert stream.update("x", False).reasoning == "<thx"


# ---------------------------------------------------------------------------------------------
# the server, in process, with the openai client
# ---------------------------------------------------------------------------------------------
ASK = [{"role": "user", "content": "What is 2 + 2?"}]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}}}}]
# a small Qwen3-like template: enable_thinking=False closes an empty reasoning in the prompt
QWEN3_LIKE = ("{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% endfor %}"
              "{% if add_generation_prompt %}<|assistant|>{% if enable_thinking is defined and "
              "not enable_thinking %}<think>\n\n</think>\n\n{% endif %}{% endif %}")


H_ANALYSIS = "<|channel|>analysis<|message|>"
H_FINAL = "<|start|>assistant<|channel|>final<|message|>"
H_CALL = "<|start|>assistant<|channel|>commentary to=functions.f <|constrain|>json<|message|>"


@pytest.mark.parametrize("text,want", [
    (H_ANALYSIS + "Think.<|end|>" + H_FINAL + "It is 4.<|return|>", ("Think.", "It is 4.")),
    # <|return|> is a stop token: its text is usually left out
    (H_ANALYSIS + "Think.<|end|>" + H_FINAL + "It is 4.", ("Think.", "It is 4.")),
    # max_tokens hit while reasoning (no final channel), or inside the final's header
    (H_ANALYSIS + "Let me se", ("Let me se", None)),
    (H_ANALYSIS + "a<|end|><|start|>assistant<|channel|>fi", ("a", None)),
    (H_ANALYSIS + "Only analysis.<|end|>", ("Only analysis.", None)),
    (H_ANALYSIS, ("", None)),
    # no channel markers at all (a grammar from the first token): all content
    ("It is 4.", (None, "It is 4.")), ("", (None, None)), ("<|chan", (None, "<|chan")),
    ("<|channel|>final<|message|>It is 4.", (None, "It is 4.")),
    # two analysis messages: joined by a newline (vLLM's); a model that skips <|end|>
    (H_ANALYSIS + "a<|end|>" + H_ANALYSIS.replace("<|ch", "<|start|>assistant<|ch") + "b<|end|>"
     + H_FINAL + "c", ("a\nb", "c")),
    (H_ANALYSIS + "a<|channel|>final<|message|>b", ("a", "b")),
    # a preamble (commentary, no recipient) is content; a call passes as written, for the
    # tool-call parser
    ("<|start|>assistant<|channel|>commentary<|message|>Checking.<|end|>" + H_CALL + "{}<|call|>",
     (None, "Checking." + H_CALL + "{}<|call|>")),
    (H_ANALYSIS + "x<|end|>" + H_CALL + '{"a": 1}', ("x", H_CALL + '{"a": 1}')),
])
def test_gpt_oss_reads_harmony_channels(text, want):
    from afd.reasoning_parsers import reasoning_stream

    for mode in ("open", "tag"):
        out = reasoning_stream(PARSERS["gpt_oss"], mode).parse(text)
        assert (out.reasoning, out.content) == want
    out = reasoning_stream(PARSERS["openai_gptoss"], "off").parse(text)  # vLLM's name
    assert (out.reasoning, out.content) == (None, text or None)


@pytest.fixture(scope="module")
def apps():
    """Front ends over one engine: no reasoning parser, deepseek_r1, qwen3 with hermes, glm45
    with glm45, gpt_oss with gpt_oss."""
    from afd import LLM
    from afd.api_server import ServerState, build_app
    from afd.async_engine import AsyncEngine
    from afd.metrics import ServerMetrics

    llm = LLM()
    engine = AsyncEngine(llm.engine)

    def app(reasoning: str | None, tools: str | None = None):
        return build_app(ServerState(engine, "m", None, ServerMetrics("m"),
                                     tool_call_parser=tools, enable_auto_tool_choice=bool(tools),
                                     reasoning_parser=reasoning))

    try:
        yield {"plain": app(None), "deepseek_r1": app("deepseek_r1"),
               "qwen3": app("qwen3", "hermes"), "glm45": app("glm45", "glm45"),
               "gpt_oss": app("gpt_oss", "gpt_oss"),
               "tokenizer": llm.engine.tokenizer}
    finally:
        engine.shutdown()


def chat(app, text: str | None, **body):
    """The model forced to write ``text`` (None: as ``body`` says): (the unstreamed response,
    the streamed one added up: reasoning, content, calls, finish)."""
    forced = {} if text is None else {"structured_outputs": {"choice": [text]}}
    body = {"model": "m", "messages": ASK, "temperature": 0, "max_tokens": 200,
            "extra_body": {**forced, **body.pop("extra_body", {})}, **body}

    async def both(c, _):
        plain = await c.chat.completions.create(**body)
        reasoning, content, calls, finish = None, None, [], None
        async for chunk in await c.chat.completions.create(**body, stream=True):
            for choice in chunk.choices:
                delta = choice.delta
                if getattr(delta, "reasoning", None) is not None:
                    reasoning = (reasoning or "") + delta.reasoning
                if delta.content:
                    content = (content or "") + delta.content
                for t in delta.tool_calls or []:
                    if t.id is not None:
                        calls.append([t.function.name, ""])
                    calls[t.index][1] += t.function.arguments or ""
                finish = choice.finish_reason or finish
        return plain, (reasoning, content, [tuple(c) for c in calls], finish)

    return call_app(app, both)


def message_of(response) -> tuple[str | None, str | None, list, str]:
    choice = response.choices[0]
    calls = [(t.function.name, t.function.arguments) for t in choice.message.tool_calls or []]
    return choice.message.reasoning, choice.message.content, calls, choice.finish_reason


def test_reasoning_comes_back_split_streamed_and_not(apps):
    text = "<think>abc</think>answer"
    plain, streamed = chat(apps["deepseek_r1"], text)
    assert message_of(plain) == ("abc", "answer", [], "stop")
    assert streamed == ("abc", "answer", [], "stop")
    # the same output without a parser: all content, no reasoning field; usage is the same
    raw, raw_streamed = chat(apps["plain"], text)
    assert raw.choices[0].message.content == text and raw_streamed[1] == text
    assert not hasattr(raw.choices[0].message, "reasoning")
    assert raw.usage == plain.usage
    # /v1/completions is not split (as vLLM)
    done = call_app(apps["deepseek_r1"], lambda c, _: c.completions.create(
        model="m", prompt="hi", max_tokens=200, temperature=0,
        extra_body={"structured_outputs": {"choice": [text]}}))
    assert done.choices[0].text == text


def test_include_reasoning_false_drops_the_reasoning(apps):
    """vLLM's include_reasoning (default true): false still splits the reasoning off but
    leaves it out, streamed or not; the content is the same."""
    text = "<think>abc</think>answer"
    plain, streamed = chat(apps["deepseek_r1"], text, extra_body={"include_reasoning": False})
    assert message_of(plain) == (None, "answer", [], "stop")
    assert streamed == (None, "answer", [], "stop")


def test_include_reasoning_false_sends_no_token_metadata(apps):
    """As vLLM's serving_chat: with include_reasoning false the logprobs and token_ids, which
    would name the reasoning's tokens, are left out, streamed or not (they were sent whole);
    the prompt's token ids still come. With it true they come."""
    text = "<think>abc</think>answer"
    body = {"model": "m", "messages": ASK, "temperature": 0, "max_tokens": 200,
            "logprobs": True, "top_logprobs": 1}
    extra = {"structured_outputs": {"choice": [text]}, "return_token_ids": True}

    async def run(c, _):
        out = {}
        for include in (True, False):
            kw = {**body, "extra_body": {**extra, "include_reasoning": include}}
            out[include] = (await c.chat.completions.create(**kw),
                            [ch async for ch in await c.chat.completions.create(
                                **kw, stream=True)])
        return out

    out = call_app(apps["deepseek_r1"], run)
    for include, (plain, chunks) in out.items():
        choice = plain.choices[0].model_dump()
        assert plain.model_dump()["prompt_token_ids"], include
        assert (choice["logprobs"] is not None) == include, choice
        assert (choice.get("token_ids") is not None) == include, choice
        streamed = [ch.choices[0].model_dump() for ch in chunks if ch.choices]
        assert any(c["logprobs"] is not None for c in streamed) == include
        assert any(c.get("token_ids") for c in streamed) == include
        assert chunks[0].model_dump()["prompt_token_ids"]
        assert "".join(c["delta"].get("content") or "" for c in streamed) == "answer"


def test_max_tokens_inside_the_reasoning(apps):
    """Cut before </think>: all reasoning, content null, finish_reason length."""
    plain, streamed = chat(apps["deepseek_r1"], "<think>abcdefghij</think>answer", max_tokens=9)
    reasoning, content, calls, finish = message_of(plain)
    assert (content, calls, finish) == (None, [], "length")
    assert reasoning and "abcdefghij".startswith(reasoning)
    assert streamed == (reasoning, None, [], "length")


def test_tool_calls_are_read_after_the_reasoning_only(apps):
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    plain, streamed = chat(apps["qwen3"], "<think>I need the weather.</think>\n" + call,
                           tools=TOOLS)
    want = ("I need the weather.", None, [("get_weather", '{"city": "Paris"}')], "tool_calls")
    assert message_of(plain) == want and streamed == want
    # a call written inside the reasoning is reasoning, not a call
    plain, streamed = chat(apps["qwen3"], "<think>" + call + "</think>No call.", tools=TOOLS)
    want = (call, "No call.", [], "stop")
    assert message_of(plain) == want and streamed == want


def test_glm45_reasoning_and_calls_through_the_server(apps):
    """--reasoning-parser glm45 with --tool-call-parser glm45: the reasoning, then a call whose
    string parameter stays a string (the request's tools); enable_thinking false: content."""
    call = ("<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>12</arg_value>\n"
            "</tool_call>")
    plain, streamed = chat(apps["glm45"], "\n<think>I need the weather.</think>\n" + call,
                           tools=TOOLS)
    want = ("I need the weather.", None, [("get_weather", '{"city": "12"}')], "tool_calls")
    assert message_of(plain) == want and streamed == want
    text = "<think>abc</think>answer"
    off = {"chat_template_kwargs": {"enable_thinking": False}}
    plain, streamed = chat(apps["glm45"], text, extra_body=off)
    assert message_of(plain) == (None, text, [], "stop") and streamed == (None, text, [], "stop")


def test_enable_thinking_false_gives_content_only(apps):
    tok = apps["tokenizer"]
    saved, tok.chat_template = tok.chat_template, QWEN3_LIKE
    try:
        text = "<think>abc</think>answer"
        off = {"chat_template_kwargs": {"enable_thinking": False}}
        plain, streamed = chat(apps["qwen3"], text, extra_body=off)
        assert message_of(plain) == (None, text, [], "stop")
        assert streamed == (None, text, [], "stop")
        prompt = call_app(apps["qwen3"], lambda _, http: http.post("/tokenize", json={
            "model": "m", "messages": ASK, **off}))
        assert prompt.json()["count"] == len(tok.encode(
            "<|user|>What is 2 + 2?<|assistant|><think>\n\n</think>\n\n",
            add_special_tokens=False))
        plain, _ = chat(apps["qwen3"], text)  # thinking on (Qwen3's default)
        assert message_of(plain) == ("abc", "answer", [], "stop")
    finally:
        tok.chat_template = saved


def test_gpt_oss_splits_the_channels_on_the_server(apps):
    """The server reads a gpt-oss answer's channels (streamed too); a grammar from the first
    token (no single end-of-reasoning token: ``marker_token_ids`` None) leaves it alone."""
    text = H_ANALYSIS + "Let me see.<|end|>" + H_FINAL + "It is 4."
    plain, streamed = chat(apps["gpt_oss"], text)
    assert message_of(plain) == ("Let me see.", "It is 4.", [], "stop") == streamed
    assert marker_token_ids(PARSERS["gpt_oss"], apps["tokenizer"]) is None
    # a call on the commentary channel, through --tool-call-parser gpt_oss
    call = H_CALL.replace("functions.f", "functions.get_weather") + '{"city": "Paris"}'
    plain, streamed = chat(apps["gpt_oss"], H_ANALYSIS + "I look.<|end|>" + call, tools=TOOLS)
    want = ("I look.", None, [("get_weather", '{"city": "Paris"}')], "tool_calls")
    assert message_of(plain) == want == streamed


def test_reasoning_parser_name_is_checked_and_special_markers_kept(apps):
    import copy
    import sys
    from types import SimpleNamespace

    from afd.api_server import ServerState
    from afd.metrics import ServerMetrics

    tok = copy.deepcopy(apps["tokenizer"])
    engine = SimpleNamespace(engine=SimpleNamespace(tokenizer=tok))
    with pytest.raises(ValueError, match="--reasoning-parser"):
        ServerState(engine, "m", None, ServerMetrics("m"), reasoning_parser="r1")
    state = ServerState(engine, "m", None, ServerMetrics("m"), reasoning_parser="qwen3")
    assert not state.reasoning_markers_are_special()
    tok.add_special_tokens({"additional_special_tokens": ["<think>", "</think>"]})
    state = ServerState(engine, "m", None, ServerMetrics("m"), reasoning_parser="qwen3")
    assert state.reasoning_markers_are_special()
    state = ServerState(engine, "m", None, ServerMetrics("m"), reasoning_parser="gpt_oss")
    assert not state.reasoning_markers_are_special()
    tok.add_special_tokens({"additional_special_tokens": ["<|channel|>", "<|message|>"]})
    state = ServerState(engine, "m", None, ServerMetrics("m"), reasoning_parser="gpt_oss")
    assert state.reasoning_markers_are_special()
    assert marker_token_ids(PARSERS["gpt_oss"], tok) is None  # a grammar cannot wait
    from launch import serve

    saved = sys.argv
    sys.argv = ["serve.py", "--reasoning-parser", "r1"]
    try:
        with pytest.raises(SystemExit):
            serve.parse_args()
    finally:
        sys.argv = saved
    sys.argv = ["serve.py", "--reasoning-parser", "deepseek_v3"]
    try:
        assert serve.parse_args().reasoning_parser == "deepseek_v3"
    finally:
        sys.argv = saved


# ---------------------------------------------------------------------------------------------
# structured output after the reasoning: </think> one token of the tokenizer
# ---------------------------------------------------------------------------------------------
def test_when_the_grammar_waits():
    r1, qwen3, v3 = PARSERS["deepseek_r1"], PARSERS["qwen3"], PARSERS["deepseek_v3"]
    S, E = 10, 11  # <think>, </think>
    assert not prompt_ends_reasoning([1, 2, 3], S, E)  # nothing: the template opened nothing
    assert not prompt_ends_reasoning([1, S, 2], S, E)  # DeepSeek-R1: ends with <think>\n
    assert prompt_ends_reasoning([1, S, 2, E, 2], S, E)  # Qwen3, enable_thinking false
    assert prompt_ends_reasoning([1, 2, E], S, E)  # DeepSeek-V3.1, not thinking
    assert not prompt_ends_reasoning([1, S, E, 2, S], S, E)  # reopened after an old turn
    assert grammar_waits_for(r1, None, (S, E), [1, S, 2]) == [E]
    assert grammar_waits_for(r1, None, (S, E), [1, S, E]) is None
    assert grammar_waits_for(r1, None, None, [1, S, 2]) is None  # </think> is several tokens
    assert grammar_waits_for(qwen3, {"enable_thinking": False}, (S, E), [1, 2]) is None
    assert grammar_waits_for(v3, None, (S, E), [1, 2]) is None  # V3.1 thinks when asked
    assert grammar_waits_for(v3, {"thinking": True}, (S, E), [1, S]) == [E]
    # GLM-4.5: every past assistant turn holds <think></think>, and the prompt opens nothing
    # (the model writes <think>): only a </think> that ends the prompt closed the reasoning
    glm = PARSERS["glm45"]
    assert prompt_ends_reasoning([1, S, E, 2, 3], S, E)
    assert not prompt_ends_reasoning([1, S, E, 2, 3], S, E, last_only=True)
    assert grammar_waits_for(glm, None, (S, E), [1, S, E, 2, 3]) == [E]
    assert grammar_waits_for(glm, None, (S, E), [1, S, E, 2, 3, S, E]) is None  # thinking off
    assert grammar_waits_for(glm, {"enable_thinking": False}, (S, E), [1, 2]) is None


# an R1-like template: the prompt opens the reasoning, or closes an empty one when asked
THINK_TEMPLATE = ("{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% endfor %}"
                  "{% if add_generation_prompt %}<|assistant|>{% if enable_thinking is defined "
                  "and not enable_thinking %}<think>\n\n</think>\n\n{% else %}<think>\n"
                  "{% endif %}{% endif %}")
ANSWER = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"enum": [1, 2]}},
          "required": ["ok", "n"], "additionalProperties": False}


@pytest.fixture(scope="module")
def thinking(tmp_path_factory):
    """The embedded model with a tokenizer whose <think> and </think> are special tokens (ids 4
    and 5): front ends with deepseek_r1, with qwen3, and with no parser."""
    from afd import LLM
    from afd.api_server import ServerState, build_app
    from afd.async_engine import AsyncEngine
    from afd.metrics import ServerMetrics
    from models.default_model import SPECIAL_TOKENS, TINY_DEEPSEEK_V3, build_tokenizer_files

    folder = str(tmp_path_factory.mktemp("think-tokenizer"))
    build_tokenizer_files(folder, TINY_DEEPSEEK_V3["vocab_size"],
                          [*SPECIAL_TOKENS, "<think>", "</think>"])
    llm = LLM(tokenizer=folder)
    tok = llm.engine.tokenizer
    tok.chat_template = THINK_TEMPLATE
    engine = AsyncEngine(llm.engine)

    def app(reasoning: str | None):
        return build_app(ServerState(engine, "m", None, ServerMetrics("m"),
                                     reasoning_parser=reasoning))

    try:
        yield {"deepseek_r1": app("deepseek_r1"), "qwen3": app("qwen3"), "plain": app(None),
               "tokenizer": tok}
    finally:
        engine.shutdown()


def thinking_chat(app, tok, **body):
    """The model pushed to write "aa" and then </think> (logit_bias, and bad_words banning a
    third "a"), and an ANSWER after it under the grammar, which forbids both: (the unstreamed
    response, the streamed one added up)."""
    a, end = tok.encode("a", add_special_tokens=False)[0], tok.convert_tokens_to_ids("</think>")
    extra = body.pop("extra_body", {})
    so = {} if "tools" in body else {
        "structured_outputs": {"json": ANSWER, "disable_any_whitespace": True}}
    return chat(app, None, **{"logit_bias": {str(a): 100, str(end): 90}, "max_tokens": 60,
                            **body, "extra_body": {"bad_words": ["aaa"], **so, **extra}})


def test_structured_output_starts_after_the_reasoning(thinking):
    """With a reasoning parser the grammar waits for </think>: the reasoning holds text the
    grammar forbids, the content parses as the schema. Without the parser the grammar applies
    from the first token (as it always did): no "aa", the JSON alone."""
    import json

    import jsonschema

    assert marker_token_ids(PARSERS["deepseek_r1"], thinking["tokenizer"]) == (4, 5)
    for parser in ("deepseek_r1", "qwen3"):
        plain, streamed = thinking_chat(thinking[parser], thinking["tokenizer"])
        reasoning, content, calls, finish = message_of(plain)
        assert (reasoning, calls, finish) == ("aa", [], "stop"), parser
        jsonschema.validate(json.loads(content), ANSWER)
        assert streamed == (reasoning, content, [], "stop")
    plain, _ = thinking_chat(thinking["plain"], thinking["tokenizer"])
    assert plain.choices[0].message.content == content  # the same answer, from token one
    # max_tokens inside the reasoning: no answer
    plain, streamed = thinking_chat(thinking["deepseek_r1"], thinking["tokenizer"], max_tokens=2)
    assert message_of(plain) == ("aa", None, [], "length") == streamed


def test_responses_text_format_starts_after_the_reasoning(thinking):
    """/v1/responses takes the chat path's rule: with a reasoning parser its text.format grammar
    waits for </think>, so a reasoning item holds the free "aa" and the message the schema."""
    import json

    import jsonschema

    tok = thinking["tokenizer"]
    a, end = tok.encode("a", add_special_tokens=False)[0], tok.convert_tokens_to_ids("</think>")
    body = {"model": "m", "input": ASK, "temperature": 0, "max_output_tokens": 60,
            "text": {"format": {"type": "json_schema", "name": "answer", "schema": ANSWER}},
            "extra_body": {"logit_bias": {str(a): 100, str(end): 90}, "bad_words": ["aaa"],
                           "allowed_token_ids": [i for i in range(len(tok))
                                                 if not tok.decode([i]).isspace()]}}

    async def create(c, _):
        return await c.responses.create(**body)

    r = call_app(thinking["deepseek_r1"], create)
    [reasoning, message] = r.output
    assert reasoning.type == "reasoning" and reasoning.content[0].text == "aa"
    assert message.type == "message" and r.status == "completed"
    jsonschema.validate(json.loads(r.output_text), ANSWER)


def test_a_prompt_that_closed_the_reasoning_is_constrained_from_the_first_token(thinking):
    """enable_thinking false: the template closes an empty reasoning in the prompt. deepseek_r1
    (which always thinks) reads that from the prompt, qwen3 from the flag: the grammar applies
    from the first token, all of the answer is content."""
    import json

    import jsonschema

    off = {"chat_template_kwargs": {"enable_thinking": False}}
    plain, _ = thinking_chat(thinking["deepseek_r1"], thinking["tokenizer"])  # thinking on
    assert plain.choices[0].message.reasoning == "aa"
    for parser in ("deepseek_r1", "qwen3"):
        plain, streamed = thinking_chat(thinking[parser], thinking["tokenizer"], extra_body=off)
        reasoning, content, calls, finish = message_of(plain)
        assert (reasoning, calls, finish) == (None, [], "stop"), parser
        jsonschema.validate(json.loads(content), ANSWER)
        assert streamed == (None, content, [], "stop")


def test_tool_choice_named_calls_after_the_reasoning(thinking):
    """A named function goes through structured output: the call comes after the reasoning."""
    import json

    tools = [{"type": "function", "function": {"name": "answer", "parameters": ANSWER}}]
    tok = thinking["tokenizer"]
    compact = [i for i in range(len(tok)) if not any(ch.isspace() for ch in tok.decode([i]))]
    plain, streamed = thinking_chat(
        thinking["deepseek_r1"], tok, tools=tools, extra_body={"allowed_token_ids": compact},
        tool_choice={"type": "function", "function": {"name": "answer"}})
    reasoning, content, calls, finish = message_of(plain)
    assert (reasoning, content, finish) == ("aa", None, "tool_calls")
    [(name, arguments)] = calls
    assert name == "answer" and set(json.loads(arguments)) == {"ok", "n"}
    assert streamed == (reasoning, content, calls, finish)


def test_thinking_token_budget_forces_the_end_of_the_reasoning(thinking):
    """vLLM's thinking_token_budget: the model pushed to write "a" for ever thinks for exactly
    the budget's tokens, then </think> is forced and the rest is the answer (streamed the
    same); 0 ends it at once; without a budget it never ends; a prompt that closed the
    reasoning has nothing to cap; without a parser, or on completions, a 400 naming it."""
    tok = thinking["tokenizer"]
    a = tok.encode("a", add_special_tokens=False)[0]
    push = {"logit_bias": {str(a): 100}, "max_tokens": 10}
    r1 = thinking["deepseek_r1"]
    for budget, want in ((3, ("aaa", "a" * 6)), (0, (None, "a" * 9))):
        plain, streamed = chat(r1, None, **push, extra_body={"thinking_token_budget": budget})
        reasoning, content, calls, finish = message_of(plain)
        assert (reasoning or None, content, calls, finish) == (*want, [], "length"), budget
        assert (streamed[0] or None, *streamed[1:]) == (*want, [], "length")
        assert plain.usage.completion_tokens == 10
    plain, _ = chat(r1, None, **push)
    assert message_of(plain) == ("a" * 10, None, [], "length")
    off = {"chat_template_kwargs": {"enable_thinking": False}, "thinking_token_budget": 2}
    plain, _ = chat(thinking["qwen3"], None, **push, extra_body=off)
    assert message_of(plain) == (None, "a" * 10, [], "length")

    async def refused(c, http):
        return (await http.post("/v1/chat/completions", json={
                    "model": "m", "messages": ASK, "max_tokens": 4, "thinking_token_budget": 2}),
                await http.post("/v1/completions", json={
                    "model": "m", "prompt": "Hi", "max_tokens": 4, "thinking_token_budget": 2}),
                await http.post("/v1/chat/completions", json={
                    "model": "m", "messages": ASK, "max_tokens": 4,
                    "thinking_token_budget": -1}))

    no_parser, _, _ = call_app(thinking["plain"], refused)
    _, completions, negative = call_app(r1, refused)
    for r, says in ((no_parser, "needs a reasoning parser"), (completions, "not supported"),
                    (negative, "thinking_token_budget")):
        assert r.status_code == 400 and r.json()["error"]["param"] == "thinking_token_budget"
        assert says in r.json()["error"]["message"], r.text


def test_a_bad_thinking_token_budget_is_refused_where_nothing_thinks(thinking):
    """A negative (or past 64-bit) thinking_token_budget is a 400 naming it even where the
    request does not think (the prompt closed the reasoning: the budget has nothing to cap),
    as it is where it does."""
    off = {"chat_template_kwargs": {"enable_thinking": False}}

    async def send(c, http):
        return [await http.post("/v1/chat/completions", json={
                    "model": "m", "messages": ASK, "max_tokens": 2, **off,
                    "thinking_token_budget": budget}) for budget in (-1, 2**63)]

    for r in call_app(thinking["qwen3"], send):
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == "thinking_token_budget", r.text

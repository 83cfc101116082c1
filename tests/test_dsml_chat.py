"""DeepSeek-V3.2 / V4 chat: their Python chat encodings (the releases ship no Jinja template),
checked against prompts written out by hand from the encoders' documented format, and a tiny
V3.2 checkpoint (random weights, its tokenizer without a chat template) served with the
``openai`` client: the prompt the server built, and a DSML call (forced by a structured-output
choice) read by the ``deepseek_v32`` parser, with reasoning split by ``deepseek_v3``."""

from __future__ import annotations

import json
import os

import pytest

from asgi_utils import call_app, post_app
from ckpt_utils import build_hf_model, save_checkpoint

from afd.chat_encodings import encode_v4, encode_v32

B, E = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
U, A = "<｜User｜>", "<｜Assistant｜>"
D = "｜DSML｜"
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather now",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                    "days": {"type": "integer"}}}}}]
SCHEMA = ('{"name": "get_weather", "description": "Weather now", "parameters": {"type": '
          '"object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}}}')
# DeepSeek-V3.2's tools section (encoding_dsv32.py's TOOLS_SYSTEM_TEMPLATE, written out)
V32_TOOLS = (
    "## Tools\nYou have access to a set of tools you can use to answer the user's question.\n"
    f'You can invoke functions by writing a "<{D}function_calls>" block like the following as '
    f"part of your reply to the user:\n<{D}function_calls>\n"
    f'<{D}invoke name="$FUNCTION_NAME">\n'
    f'<{D}parameter name="$PARAMETER_NAME" string="true|false">$PARAMETER_VALUE</{D}parameter>'
    f"\n...\n</{D}invoke>\n"
    f'<{D}invoke name="$FUNCTION_NAME2">\n...\n</{D}invoke>\n</{D}function_calls>\n'
    "String and scalar parameters should be specified as is without any escaping or quotes, "
    "while lists and objects should use JSON format. The \"string\" attribute should be set "
    "to \"true\" for string type parameters and \"false\" for other types (numbers, booleans, "
    "arrays, objects).\n"
    "If the thinking_mode is enabled, then after function results you should strongly "
    "consider outputting a thinking block. Here is an example:\n"
    f"<{D}function_calls>\n...\n</{D}function_calls>\n<function_results>\n...\n"
    "</function_results>\n<think>...thinking about results</think>\n"
    "Here are the functions available in JSONSchema format:\n<functions>\n"
    f"{SCHEMA}\n</functions>\n")
CALL = {"id": "c1", "type": "function",
        "function": {"name": "get_weather", "arguments": {"city": "杭州", "days": 2}}}
DSML_CALL = (f'<{D}invoke name="get_weather">\n'
             f'<{D}parameter name="city" string="true">杭州</{D}parameter>\n'
             f'<{D}parameter name="days" string="false">2</{D}parameter>\n</{D}invoke>')
TOOL_TURN = [{"role": "user", "content": "Weather in Hangzhou?"},
             {"role": "assistant", "content": "", "reasoning": "I need the tool.",
              "tool_calls": [CALL]},
             {"role": "tool", "tool_call_id": "c1", "content": "sunny"}]


def test_v32_chat_and_thinking_prompts():
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello", "reasoning": "greet"},
            {"role": "user", "content": "Bye"}]
    assert encode_v32(chat, None, thinking=False) == (
        f"{B}Be brief.{U}Hi{A}</think>Hello{E}{U}Bye{A}</think>")
    # thinking: only the last user turn opens the reasoning; earlier reasoning is dropped
    assert encode_v32(chat, None, thinking=True) == (
        f"{B}Be brief.{U}Hi{A}</think>Hello{E}{U}Bye{A}<think>")
    # continue_final_message: the last assistant turn stays open
    assert encode_v32(chat[:3], None, thinking=False, open_last=True) == (
        f"{B}Be brief.{U}Hi{A}</think>Hello")
    assert encode_v4(chat[1:3], None, thinking=False, open_last=True) == f"{B}{U}Hi{A}</think>Hello"


def test_v32_tools_calls_and_results():
    """The tools go first (an empty system message), a call is DSML typed by string=,
    results follow in <function_results>, the turn in progress keeps its reasoning."""
    calls = f"\n\n<{D}function_calls>\n{DSML_CALL}\n</{D}function_calls>"
    assert encode_v32(TOOL_TURN, TOOLS, thinking=True) == (
        f"{B}\n\n{V32_TOOLS}{U}Weather in Hangzhou?{A}<think>I need the tool.</think>{calls}{E}"
        "\n\n<function_results>\n<result>sunny</result>\n</function_results>\n\n<think>")
    assert encode_v32(TOOL_TURN, TOOLS, thinking=False) == (
        f"{B}\n\n{V32_TOOLS}{U}Weather in Hangzhou?{A}</think>{calls}{E}"
        "\n\n<function_results>\n<result>sunny</result>\n</function_results>\n\n</think>")
    with pytest.raises(ValueError, match="tool result must follow"):
        encode_v32([{"role": "user", "content": "x"}, {"role": "tool", "content": "r"}], None,
                   thinking=False)


def test_v4_prompts():
    """V4: tool results become a user turn of <tool_result> blocks (in the calls' order),
    calls are grouped in tool_calls, reasoning is kept when tools are given, and
    reasoning_effort "max" puts its preamble first."""
    two = [{**CALL, "id": "c1"}, {**CALL, "id": "c2", "function": {
        "name": "get_weather", "arguments": '{"city": "Paris"}'}}]
    messages = [TOOL_TURN[0], {**TOOL_TURN[1], "tool_calls": two},
                {"role": "tool", "tool_call_id": "c2", "content": "rain"},
                {"role": "tool", "tool_call_id": "c1", "content": "sunny"}]
    text = encode_v4(messages, TOOLS, thinking=True)
    paris = (f'<{D}invoke name="get_weather">\n<{D}parameter name="city" string="true">Paris'
             f"</{D}parameter>\n</{D}invoke>")
    assert text.startswith(f"{B}\n\n## Tools\n\nYou have access to a set of tools")
    assert text.endswith(
        f"{U}Weather in Hangzhou?{A}<think>I need the tool.</think>\n\n<{D}tool_calls>\n"
        f"{DSML_CALL}\n{paris}\n</{D}tool_calls>{E}"
        f"{U}<tool_result>sunny</tool_result>\n\n<tool_result>rain</tool_result>{A}<think>")
    assert f"### Available Tool Schemas\n\n{SCHEMA}\n\nYou MUST strictly follow" in text
    chat = [{"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello", "reasoning": "greet"},
            {"role": "user", "content": "Bye"}]
    assert encode_v4(chat, None, thinking=True) == f"{B}{U}Hi{A}</think>Hello{E}{U}Bye{A}<think>"
    assert encode_v4(chat, None, thinking=False) == (
        f"{B}{U}Hi{A}</think>Hello{E}{U}Bye{A}</think>")
    assert encode_v4(chat, None, thinking=True, drop_thinking=False) == (
        f"{B}{U}Hi{A}<think>greet</think>Hello{E}{U}Bye{A}<think>")
    assert encode_v4(chat, None, thinking=True, reasoning_effort="max").startswith(
        f"{B}Reasoning Effort: Absolute maximum with no shortcuts permitted.\n")
    assert encode_v4(chat, None, thinking=True, reasoning_effort="high").startswith(f"{B}{U}")


def test_arguments_that_are_not_an_object_are_refused():
    bad = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "f", "arguments": "[1]"}}]}]
    with pytest.raises(ValueError, match=r"messages\[1\]\.tool_calls\[0\]\.function\.arguments"):
        encode_v32(bad, None, thinking=False)


# ---------------------------------------------------------------------------------------------
# a tiny V3.2 checkpoint through the server
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from afd import LLM
    from afd.api_server import ServerState, build_app
    from afd.async_engine import AsyncEngine
    from afd.metrics import ServerMetrics

    path = save_checkpoint(build_hf_model("deepseek_v32", max_position_embeddings=2048),
                           str(tmp_path_factory.mktemp("v32")))
    config = os.path.join(path, "tokenizer_config.json")
    with open(config) as f:
        tok_cfg = json.load(f)
    tok_cfg.pop("chat_template", None)  # as the release: no Jinja template
    with open(config, "w") as f:
        json.dump(tok_cfg, f)
    llm = LLM(path, max_model_len=2048)
    engine = AsyncEngine(llm.engine)

    def app(**kw):
        return build_app(ServerState(engine, "m", None, ServerMetrics("m"), **kw))

    try:
        yield {"llm": llm, "engine": engine, "plain": app(),
               "dsml": app(tool_call_parser="deepseek_v32", enable_auto_tool_choice=True,
                           reasoning_parser="deepseek_v3")}
    finally:
        engine.shutdown()


def chat(app, **body):
    """(the unstreamed response as JSON, the streamed one: reasoning, content, calls)."""
    body = {"model": "m", "temperature": 0, "max_tokens": 300, **body}

    async def both(c, _):
        extra = body.pop("extra_body", {})
        plain = await c.chat.completions.create(**body, extra_body={
            **extra, "return_prompt_text": True})
        reasoning, content, calls = "", "", {}
        async for chunk in await c.chat.completions.create(**body, extra_body=extra,
                                                           stream=True):
            for choice in chunk.choices:
                delta = choice.delta.model_dump()
                reasoning += delta.get("reasoning") or ""
                content += delta.get("content") or ""
                for t in delta.get("tool_calls") or []:
                    if t.get("id") is not None:
                        calls[t["index"]] = [t["function"]["name"], ""]
                    calls[t["index"]][1] += t["function"]["arguments"] or ""
        return plain.model_dump(), (reasoning or None, content or None,
                                    [tuple(v) for _, v in sorted(calls.items())])

    return call_app(app, both)


ASK = [{"role": "user", "content": "Weather in Hangzhou?"}]


def test_server_renders_with_the_encoding_and_reads_dsml_calls(served):
    answer = ("\n\n<" + D + "function_calls>\n" + DSML_CALL + "\n</" + D + "function_calls>")
    plain, streamed = chat(served["dsml"], messages=ASK, tools=TOOLS,
                           extra_body={"structured_outputs": {"choice": [answer]}})
    assert plain["prompt_text"] == f"{B}\n\n{V32_TOOLS}{U}Weather in Hangzhou?{A}</think>"
    choice = plain["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    calls = [(t["function"]["name"], json.loads(t["function"]["arguments"]))
             for t in choice["message"]["tool_calls"]]
    assert calls == [("get_weather", {"city": "杭州", "days": 2})]
    assert streamed[0] is None and streamed[1] is None
    assert [(n, json.loads(a)) for n, a in streamed[2]] == calls
    # thinking: the reasoning, then the calls
    plain, streamed = chat(served["dsml"], messages=ASK, tools=TOOLS, extra_body={
        "structured_outputs": {"choice": ["<think>Look it up.</think>" + answer]},
        "chat_template_kwargs": {"thinking": True}})
    message = plain["choices"][0]["message"]
    assert (message["reasoning"], message["content"]) == ("Look it up.", None)
    assert [(t["function"]["name"], json.loads(t["function"]["arguments"]))
            for t in message["tool_calls"]] == calls
    assert streamed[0] == "Look it up." and len(streamed[2]) == 1
    # the call goes back into the history as DSML, its result after it
    history = [*ASK, {"role": "assistant", "content": None,
                      "tool_calls": choice["message"]["tool_calls"]},
               {"role": "tool", "tool_call_id": choice["message"]["tool_calls"][0]["id"],
                "content": "sunny"}]
    plain, _ = chat(served["dsml"], messages=history, tools=TOOLS, max_tokens=2)
    assert plain["prompt_text"].endswith(
        f"{A}</think>\n\n<{D}function_calls>\n{DSML_CALL}\n</{D}function_calls>{E}\n\n"
        "<function_results>\n<result>sunny</result>\n</function_results>\n\n</think>")


@pytest.mark.parametrize("kwargs,thinks", [
    ({"chat_template_kwargs": {"thinking": True}}, True),
    ({"chat_template_kwargs": {"enable_thinking": True}}, True),
    ({"reasoning_effort": "high"}, True),
    ({"reasoning_effort": "none"}, False),
    ({}, False)])
def test_thinking_switch_reaches_prompt_and_reasoning_parser(served, kwargs, thinks):
    # the toy tokenizer has no </think> token, so the forced answer constrains from its first
    # token and is read as reasoning where it opens with <think> (afd.reasoning_parsers)
    text = "<think>Let me think.</think>It is sunny."
    plain, streamed = chat(served["dsml"], messages=ASK,
                           extra_body={"structured_outputs": {"choice": [text]}, **kwargs})
    assert plain["prompt_text"] == f"{B}{U}Weather in Hangzhou?{A}" + (
        "<think>" if thinks else "</think>")
    message = plain["choices"][0]["message"]
    if thinks:
        assert (message["reasoning"], message["content"]) == ("Let me think.", "It is sunny.")
    else:  # thinking off: all of it is content
        assert message.get("reasoning") is None and message["content"] == text
    assert streamed[:2] == (message.get("reasoning"), message["content"])


def test_chat_template_overrides_the_encoding_and_llm_chat_uses_it(served):
    import asyncio

    from afd import SamplingParams

    def llm_chat(**kw):
        """LLM.chat on the engine thread: the server's loop steps the same engine, and two
        threads stepping it at once corrupt its state (an IndexError in the scheduler's
        prefix caching, one run in two here, before)."""
        return asyncio.run(served["engine"].call(lambda: served["llm"].chat(
            ASK, SamplingParams(max_tokens=1), use_tqdm=False, **kw)))

    out = llm_chat(chat_template_kwargs={"thinking": True})
    assert out[0].prompt == f"{B}{U}Weather in Hangzhou?{A}<think>"
    out = llm_chat(chat_template="{% for m in messages %}[{{ m.content }}]{% endfor %}")
    assert out[0].prompt == "[Weather in Hangzhou?]"
    # a history whose call arguments are no JSON object: a 400 naming messages
    bad = [*ASK, {"role": "assistant", "tool_calls": [
        {"id": "x", "type": "function", "function": {"name": "f", "arguments": "[1]"}}]}]
    response = post_app(served["plain"], "/v1/chat/completions",
                        {"model": "m", "messages": bad, "max_tokens": 1})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "messages"
    assert "arguments" in response.json()["error"]["message"]

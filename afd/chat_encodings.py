"""Chat encodings written in Python, for models whose release ships no Jinja chat template.

DeepSeek-V3.2 and DeepSeek-V4 ship their prompt format as a Python encoder
(``encoding/encoding_dsv32.py``, ``encoding/encoding_dsv4.py`` in their model repos) instead of
a ``chat_template`` in tokenizer_config.json. afd renders their conversations itself, as vLLM
does for these architectures (its deepseek_v32 / deepseek_v4 tokenizers):

- a request's ``tools`` go into a system message put first (empty content, so the prompt
  starts ``<BOS>\\n\\n## Tools``), written as that model's tools section; its calls are DSML
  (``<｜DSML｜function_calls>`` for V3.2, ``<｜DSML｜tool_calls>`` for V4: the
  ``deepseek_v32`` / ``deepseek_v4`` tool-call parsers read both);
- thinking is on when ``chat_template_kwargs`` sets ``thinking`` or ``enable_thinking`` (a
  ``reasoning_effort`` other than "none" sets ``enable_thinking``, as for templates that read
  it): the last user turn then ends ``<｜Assistant｜><think>``, else ``<｜Assistant｜></think>``
  (the ``deepseek_v3`` reasoning parser reads the answer the same way);
- the reasoning of the assistant turns after the last user turn (a tool-calling turn in
  progress) is written back as ``REASONING</think>`` in thinking mode; earlier turns' is
  dropped, as the encoders drop it;
- the generation prompt is part of a user (or, V3.2, tool-result) turn, so
  ``add_generation_prompt`` changes nothing; ``continue_final_message`` leaves the final
  assistant turn open (no end-of-sentence token).

V3.2 writes tool results after the calls as ``<function_results><result>...</result>...``;
V4 turns them into a user turn of ``<tool_result>...</tool_result>`` blocks (in the order of
the calls, by ``tool_call_id``), reads ``reasoning_effort`` "max" as a preamble at the very
start of a thinking prompt, and keeps earlier turns' reasoning when tools are given
(``drop_thinking`` false in ``chat_template_kwargs`` keeps it too).
"""

from __future__ import annotations

import json
from typing import Any, Callable

BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
USER, ASSISTANT = "<｜User｜>", "<｜Assistant｜>"
THINK, END_THINK = "<think>", "</think>"
DSML = "｜DSML｜"

_V32_TOOLS = f"""## Tools
You have access to a set of tools you can use to answer the user's question.
You can invoke functions by writing a "<{DSML}function_calls>" block like the following as part of your reply to the user:
<{DSML}function_calls>
<{DSML}invoke name="$FUNCTION_NAME">
<{DSML}parameter name="$PARAMETER_NAME" string="true|false">$PARAMETER_VALUE</{DSML}parameter>
...
</{DSML}invoke>
<{DSML}invoke name="$FUNCTION_NAME2">
...
</{DSML}invoke>
</{DSML}function_calls>
String and scalar parameters should be specified as is without any escaping or quotes, while lists and objects should use JSON format. The "string" attribute should be set to "true" for string type parameters and "false" for other types (numbers, booleans, arrays, objects).
If the thinking_mode is enabled, then after function results you should strongly consider outputting a thinking block. Here is an example:
<{DSML}function_calls>
...
</{DSML}function_calls>
<function_results>
...
</function_results>
{THINK}...thinking about results{END_THINK}
Here are the functions available in JSONSchema format:
<functions>
{{schemas}}
</functions>
"""  # noqa: E501 - the model's own text

_V4_TOOLS = f"""## Tools

You have access to a set of tools to help answer the user's question. You can invoke tools by writing a "<{DSML}tool_calls>" block like the following:

<{DSML}tool_calls>
<{DSML}invoke name="$TOOL_NAME">
<{DSML}parameter name="$PARAMETER_NAME" string="true|false">$PARAMETER_VALUE</{DSML}parameter>
...
</{DSML}invoke>
<{DSML}invoke name="$TOOL_NAME2">
...
</{DSML}invoke>
</{DSML}tool_calls>

String parameters should be specified as is and set `string="true"`. For all other types (numbers, booleans, arrays, objects), pass the value in JSON format and set `string="false"`.

If thinking_mode is enabled (triggered by {THINK}), you MUST output your complete reasoning inside {THINK}...{END_THINK} BEFORE any tool calls or final response.

Otherwise, output directly after {END_THINK} with tool calls or final response.

### Available Tool Schemas

{{schemas}}

You MUST strictly follow the above defined tool name and parameter schemas to invoke tool calls.
"""  # noqa: E501

# DeepSeek-V4's preamble for reasoning_effort "max" (thinking mode only)
_V4_EFFORT_MAX = (
    "Reasoning Effort: Absolute maximum with no shortcuts permitted.\n"
    "You MUST be very thorough in your thinking and comprehensively decompose the problem to "
    "resolve the root cause, rigorously stress-testing your logic against all potential "
    "paths, edge cases, and adversarial scenarios.\n"
    "Explicitly write out your entire deliberation process, documenting every intermediate "
    "step, considered alternative, and rejected hypothesis to ensure absolutely no assumption "
    "is left unchecked.\n\n")

# the chat_template_kwargs the encoders read (for reasoning_effort -> enable_thinking)
VARIABLES = frozenset({"thinking", "enable_thinking", "reasoning_effort", "drop_thinking"})


def _json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def _tools_section(template: str, tools: list[dict[str, Any]]) -> str:
    return template.replace("{schemas}", "\n".join(_json(t.get("function", t)) for t in tools))


def _arguments(call: dict[str, Any], where: str) -> dict[str, Any]:
    args = call.get("function", {}).get("arguments")
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except ValueError:
            args = None
    if not isinstance(args, dict):
        raise ValueError(f"{where}.function.arguments: DSML writes a call's arguments as "
                         "named parameters, so they must be a JSON object")
    return args


def _dsml_calls(calls: list[dict[str, Any]], block: str, where: str) -> str:
    """An assistant turn's calls as DSML (``\\n\\n`` and the ``block`` element)."""
    invokes = []
    for j, call in enumerate(calls):
        params = "\n".join(
            f'<{DSML}parameter name="{key}" string="{"true" if isinstance(v, str) else "false"}">'
            f'{v if isinstance(v, str) else _json(v)}</{DSML}parameter>'
            for key, v in _arguments(call, f"{where}.tool_calls[{j}]").items())
        invokes.append(f'<{DSML}invoke name="{call["function"]["name"]}">\n{params}\n'
                       f'</{DSML}invoke>')
    return f"\n\n<{DSML}{block}>\n" + "\n".join(invokes) + f"\n</{DSML}{block}>"


def _last_user(messages: list[dict[str, Any]]) -> int:
    return max((i for i, m in enumerate(messages) if m["role"] in ("user", "developer")),
               default=-1)


def _reasoning(msg: dict[str, Any]) -> str:
    return msg.get("reasoning") or msg.get("reasoning_content") or ""


def encode_v32(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None,
               thinking: bool, open_last: bool = False, **_: Any) -> str:
    """DeepSeek-V3.2's prompt (encoding_dsv32's ``encode_messages``, "thinking" or "chat"
    mode). ``open_last``: the final assistant turn is left without its end-of-sentence."""
    if tools:
        messages = [{"role": "system", "content": "", "tools": tools}, *messages]
    last_user = _last_user(messages)
    out = [BOS]
    for i, msg in enumerate(messages):
        role, content, where = msg["role"], msg.get("content") or "", f"messages[{i}]"
        if role == "system":
            out.append(content)
            if msg.get("tools"):
                out.append("\n\n" + _tools_section(_V32_TOOLS, msg["tools"]))
        elif role in ("user", "developer"):
            if role == "developer":
                content = f"\n\n# The user's message is: {content}"
            out.append(f"{USER}{content}{ASSISTANT}")
            out.append(THINK if thinking and i == last_user else END_THINK)
        elif role == "tool":
            start = i
            while start > 0 and messages[start - 1]["role"] == "tool":
                start -= 1
            calls = messages[start - 1].get("tool_calls") if start > 0 else None
            order = i - start + 1
            if not calls or order > len(calls):
                raise ValueError(f"{where}: a tool result must follow an assistant message "
                                 "with at least as many tool_calls as its results")
            if order == 1:
                out.append("\n\n<function_results>")
            out.append(f"\n<result>{content}</result>")
            if order == len(calls):
                out.append("\n</function_results>\n\n")
                out.append(THINK if thinking and i >= last_user else END_THINK)
        else:  # assistant
            calls = msg.get("tool_calls")
            if thinking and i > last_user:
                out.append(_reasoning(msg) + END_THINK)
            out.append(content)
            if calls:
                out.append(_dsml_calls(calls, "function_calls", where))
            if not (open_last and i == len(messages) - 1):
                out.append(EOS)
    return "".join(out)


def _v4_merge_tools(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """V4 has no tool role: tool results and user messages in a row become the blocks of one
    user turn, the results in the order of the calls before them (by tool_call_id)."""
    merged: list[dict[str, Any]] = []
    for msg in messages:
        role = msg["role"]
        if role in ("tool", "user"):
            block = (("result", msg.get("tool_call_id") or "", msg.get("content") or "")
                     if role == "tool" else ("text", "", msg.get("content") or ""))
            if merged and merged[-1]["role"] == "user":  # every merged user turn has blocks
                merged[-1]["blocks"].append(block)
            else:
                merged.append({"role": "user", "blocks": [block]})
        else:
            merged.append(msg)
    order: dict[str, int] = {}  # the last assistant turn's calls: id -> place
    for msg in merged:
        if msg["role"] == "assistant" and msg.get("tool_calls"):
            order = {c["id"]: j for j, c in enumerate(msg["tool_calls"]) if c.get("id")}
        results = [b for b in msg.get("blocks") or () if b[0] == "result"]
        if len(results) > 1 and order:
            ranked = iter(sorted(results, key=lambda b: order.get(b[1], 0)))
            msg["blocks"] = [next(ranked) if b[0] == "result" else b for b in msg["blocks"]]
    return merged


def encode_v4(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None,
              thinking: bool, open_last: bool = False, reasoning_effort: str | None = None,
              drop_thinking: bool = True, **_: Any) -> str:
    """DeepSeek-V4's prompt (encoding_dsv4's ``encode_messages``)."""
    if tools:
        messages = [{"role": "system", "content": "", "tools": tools}, *messages]
    messages = _v4_merge_tools(messages)
    drop = drop_thinking and not tools
    if thinking and drop:  # earlier turns: no reasoning, no developer messages
        last = _last_user(messages)
        messages = [m for i, m in enumerate(messages)
                    if i >= last or m["role"] != "developer"]
    last_user = _last_user(messages)
    out = [BOS]
    if thinking and reasoning_effort == "max":
        out.append(_V4_EFFORT_MAX)
    for i, msg in enumerate(messages):
        role, content, where = msg["role"], msg.get("content") or "", f"messages[{i}]"
        if role == "system":
            out.append(content)
            if msg.get("tools"):
                out.append("\n\n" + _tools_section(_V4_TOOLS, msg["tools"]))
        elif role == "developer":
            out.append(USER + content)
        elif role == "user":
            out.append(USER + "\n\n".join(
                text if kind == "text" else f"<tool_result>{text}</tool_result>"
                for kind, _, text in msg["blocks"]))
        else:  # assistant
            calls = msg.get("tool_calls")
            if thinking and (not drop or i > last_user):
                out.append(_reasoning(msg) + END_THINK)
            out.append(content)
            if calls:
                out.append(_dsml_calls(calls, "tool_calls", where))
            if not (open_last and i == len(messages) - 1):
                out.append(EOS)
        following = messages[i + 1]["role"] if i + 1 < len(messages) else None
        if role in ("user", "developer") and following in (None, "assistant"):
            out.append(ASSISTANT + (THINK if thinking and (not drop or i >= last_user)
                                    else END_THINK))
    return "".join(out)


# architecture (models.config.ARCHITECTURES' values) -> its encoder
ENCODINGS: dict[str, Callable[..., str]] = {"deepseek_v32": encode_v32, "deepseek_v4": encode_v4}


def thinking_on(kwargs: dict[str, Any]) -> bool:
    """Whether ``chat_template_kwargs`` turn thinking on, as vLLM's encoders read them."""
    return bool(kwargs.get("thinking", False)) or bool(kwargs.get("enable_thinking", False))


def attach(tokenizer: Any, architecture: str | None) -> Any:
    """Marks a tokenizer without a chat template of an architecture that has an encoder
    (``tokenizer.afd_chat_encoding``: its name): the server and ``LLM.chat`` then render with
    it unless given a template. Returns the tokenizer."""
    if architecture in ENCODINGS and not getattr(tokenizer, "chat_template", None):
        tokenizer.afd_chat_encoding = architecture
    return tokenizer


def encoding_of(tokenizer: Any) -> str | None:
    return getattr(tokenizer, "afd_chat_encoding", None)

"""Host cost per streamed step of a chat choice read by a tool-call or reasoning parser.

    python bench/host_parsers.py [--tokens 256,2048,8192] [--repeats 3] [--json out]

No model runs: each case is a synthetic answer (a tool call whose arguments carry a long
string, a long reasoning, a long plain answer with a tool parser on, ...) tokenized with the
embedded default model's tokenizer and cut to exactly N tokens (the long part is cut; the call
or the reasoning around it stays whole). Its token ids go through the engine's incremental
detokenizer once, outside the clock, which gives each step's text delta as a streamed
(RequestOutputKind.DELTA) output carries it. Then, per step with text, the clock runs over
what ``afd.api_server._sse`` does for one chat choice that has readers: ``_Pending.add`` and
``take``, then ``_ChoiceReader.safe_delta`` (the reasoning parser, then the tool-call parser on
its content) fed as the server feeds it. The ``plain`` case has no readers (the text goes out
as it comes: the floor). ``us_per_step`` is the mean over the whole answer and
``us_per_step_last_tenth`` the mean over its last tenth of steps (where a cost that grows with
the text shows); best of ``--repeats`` runs, process CPU time. ``engine_text_extend`` times
the engine's own per-completion text (``_Completion.text += delta``, afd/engine.py) over the
same deltas: the other string every step extends.
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from results_io import commit_id, write_result  # noqa: E402

# the long part of each answer: JSON-string-safe prose (escaped quotes and newlines, no markers)
FILL_JSON = ('The quick brown fox \\"jumps\\" over 12 lazy dogs; {braces} and [brackets] stay '
             'inside the string.\\n')
FILL_TEXT = "The quick brown fox jumps over 12 lazy dogs, then thinks about it again.\n"
SAVE = '{"path": "notes.txt", "content": "'
DS_BEGIN = "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>"
DS_END = "<｜tool▁call▁end｜><｜tool▁calls▁end｜>"
KIMI_BEGIN = "<|tool_calls_section_begin|><|tool_call_begin|>functions.write_file:0"
KIMI_END = "<|tool_call_end|><|tool_calls_section_end|>"
GLM_HEAD = ("I will save it.\n<tool_call>write_file\n<arg_key>path</arg_key>\n<arg_value>"
            "notes.txt</arg_value>\n<arg_key>content</arg_key>\n<arg_value>")
GLM_TAIL = "</arg_value>\n</tool_call>"
# the request's tools, which GLM's reader takes its arguments' types from
TOOLS = [{"type": "function", "function": {"name": "write_file", "parameters": {
    "type": "object", "properties": {"path": {"type": "string"},
                                     "content": {"type": "string"}}}}}]
# name: (tool readers: ("auto", parser) | ("required",) | ("named",) | None,
#        reasoning parser or None, head, the long part, tail)
CASES: dict[str, tuple] = {
    "plain": (None, None, "", FILL_TEXT, ""),
    "hermes_text": (("auto", "hermes"), None, "", FILL_TEXT, ""),
    "hermes_call": (("auto", "hermes"), None,
                    'I will save it.\n\n<tool_call>\n{"name": "write_file", "arguments": '
                    + SAVE, FILL_JSON, '"}}\n</tool_call>'),
    "deepseek_v3_call": (("auto", "deepseek_v3"), None,
                         "I will save it." + DS_BEGIN + "function<｜tool▁sep｜>write_file\n"
                         "```json\n" + SAVE, FILL_JSON, '"}\n```' + DS_END),
    "deepseek_v31_call": (("auto", "deepseek_v31"), None,
                          "I will save it." + DS_BEGIN + "write_file<｜tool▁sep｜>" + SAVE,
                          FILL_JSON, '"}' + DS_END),
    "kimi_k2_call": (("auto", "kimi_k2"), None,
                     "I will save it." + KIMI_BEGIN + "<|tool_call_argument_begin|>" + SAVE,
                     FILL_JSON, '"}' + KIMI_END),
    "required": (("required",), None, '[{"name": "write_file", "parameters": ' + SAVE,
                 FILL_JSON, '"}}]'),
    "named": (("named",), None, SAVE, FILL_JSON, '"}'),
    "deepseek_r1_reasoning": (None, "deepseek_r1", "", FILL_TEXT, "</think>The answer is 42."),
    "qwen3_content": (None, "qwen3", "A short thought.</think>\n\n", FILL_TEXT, ""),
    "kimi_k2_reasoning_call": (("auto", "kimi_k2"), "kimi_k2",
                               "I should save the file.</think>I will save it." + KIMI_BEGIN
                               + "<|tool_call_argument_begin|>" + SAVE, FILL_JSON,
                               '"}' + KIMI_END),
    # GLM-4.5: the arguments are key/value pairs made into JSON; "content" is a string
    # parameter of TOOLS' write_file, so its value streams as it is written
    "glm45_call": (("auto", "glm45"), None, GLM_HEAD, FILL_TEXT, GLM_TAIL),
    "glm45_reasoning_call": (("auto", "glm45"), "glm45",
                             "<think>I should save the file.</think>\n" + GLM_HEAD, FILL_TEXT,
                             GLM_TAIL),
}


def case_ids(tokenizer, head: str, fill: str, tail: str, tokens: int) -> list[int]:
    """``head``, then ``fill`` repeated and cut, then ``tail``: exactly ``tokens`` ids."""
    enc = lambda s: tokenizer.encode(s, add_special_tokens=False)  # noqa: E731
    head_ids, tail_ids, unit = enc(head), enc(tail), enc(fill)
    room = tokens - len(head_ids) - len(tail_ids)
    if room < 0:
        raise ValueError(f"{tokens} tokens: the case's head and tail alone take more")
    return head_ids + (unit * (room // len(unit) + 1))[:room] + tail_ids


def readers_of(tools: tuple | None, reasoning: str | None):
    from afd.api_server import _ChatReaders
    from afd.reasoning_parsers import PARSERS as REASONING, ReasoningStream, reasoning_mode
    from afd.tool_parsers import PARSERS, MarkerStream, NamedStream, RequiredStream

    tool_streams = None
    if tools is not None:
        tool_streams = {"auto": lambda: (lambda: MarkerStream(PARSERS[tools[1]], None, TOOLS)),
                        "required": lambda: RequiredStream,
                        "named": lambda: (lambda: NamedStream("write_file"))}[tools[0]]()
    reasoning_streams = None
    if reasoning is not None:
        fmt = REASONING[reasoning]
        mode = reasoning_mode(fmt, None, False)  # the server's, for a request without kwargs
        reasoning_streams = lambda: ReasoningStream(fmt, mode)  # noqa: E731
    if tool_streams is None and reasoning_streams is None:
        return None
    return _ChatReaders(tools=tool_streams, reasoning=reasoning_streams)


def server_step():
    """One step of ``_sse`` for a chat choice, as this checkout's server does it: a function
    (pending, reader, output) -> the delta dict (None: no readers)."""
    from afd.api_server import _ChoiceReader, _Pending

    # the readers' interface: fed the whole text so far (before), or what is new (after)
    whole = "keep_text" in inspect.signature(_Pending.add).parameters

    def step(p: _Pending, reader, c) -> dict | None:
        if whole:
            p.add(c, reader is not None)
            out = p.take(0)
            return _ChoiceReader.safe_delta(reader, p.full_text, out.finish_reason is not None)
        p.add(c)
        out = p.take(0)
        return _ChoiceReader.safe_delta(reader, out.text, out.finish_reason is not None)

    return step, _Pending, whole


def time_case(tokenizer, name: str, tokens: int, repeats: int) -> dict:
    from afd.detokenizer import IncrementalDetokenizer
    from afd.outputs import CompletionOutput

    tools, reasoning, head, fill, tail = CASES[name]
    ids = case_ids(tokenizer, head, fill, tail, tokens)
    detok = IncrementalDetokenizer(tokenizer, [], skip_special_tokens=False)
    deltas = [detok.push([t]) for t in ids]
    outputs = [CompletionOutput(0, d, [t], "stop" if i == len(ids) - 1 else None)
               for i, (t, d) in enumerate(zip(ids, deltas))]
    sent = [c for c in outputs if c.text or c.finish_reason]  # _sse skips empty steps
    tenth = len(sent) - max(1, len(sent) // 10)
    step, pending, _ = server_step()
    readers = readers_of(tools, reasoning)
    best_all = best_last = float("inf")
    digest = hashlib.sha256()  # what the choice streamed (made-up call ids left out)
    p, reader = pending(False), (readers.stream() if readers else None)
    for c in sent:
        delta = step(p, reader, c) or {"content": c.text}
        for call in delta.get("tool_calls", []):
            if call.get("id", "").startswith("chatcmpl-tool-"):
                call["id"] = "chatcmpl-tool-*"
        digest.update(json.dumps(delta, sort_keys=True).encode())
    for _ in range(repeats):
        p, reader = pending(False), (readers.stream() if readers else None)
        start = time.process_time()
        for c in sent[:tenth]:
            step(p, reader, c)
        mid = time.process_time()
        for c in sent[tenth:]:
            step(p, reader, c)
        end = time.process_time()
        best_all = min(best_all, (end - start) / len(sent) * 1e6)
        best_last = min(best_last, (end - mid) / (len(sent) - tenth) * 1e6)
    return {"case": name, "tokens": tokens, "steps": len(sent),
            "chars": sum(len(d) for d in deltas),
            "us_per_step": round(best_all, 2), "us_per_step_last_tenth": round(best_last, 2),
            "deltas_sha256": digest.hexdigest()[:16]}


def text_extend_row(tokenizer, tokens: int, repeats: int) -> dict:
    """The engine's ``comp.text += delta`` (an attribute: CPython copies the string each
    time) over the same deltas as the ``plain`` case."""
    from afd.detokenizer import IncrementalDetokenizer

    _, _, head, fill, tail = CASES["plain"]
    detok = IncrementalDetokenizer(tokenizer, [], skip_special_tokens=False)
    deltas = [d for d in (detok.push([t]) for t in case_ids(tokenizer, head, fill, tail, tokens))
              if d]
    tenth = len(deltas) - max(1, len(deltas) // 10)

    class Comp:
        text = ""

    best_all = best_last = float("inf")
    for _ in range(repeats):
        comp = Comp()
        start = time.process_time()
        for d in deltas[:tenth]:
            comp.text += d
        mid = time.process_time()
        for d in deltas[tenth:]:
            comp.text += d
        end = time.process_time()
        best_all = min(best_all, (end - start) / len(deltas) * 1e6)
        best_last = min(best_last, (end - mid) / (len(deltas) - tenth) * 1e6)
    return {"tokens": tokens, "steps": len(deltas), "us_per_step": round(best_all, 3),
            "us_per_step_last_tenth": round(best_last, 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", default="256,2048,8192")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    from afd.llm import load_tokenizer
    from models.default_model import default_model_path

    tokenizer = load_tokenizer(default_model_path())
    lengths = [int(x) for x in args.tokens.split(",")]
    rows = []
    for name in args.cases.split(","):
        for tokens in lengths:
            row = time_case(tokenizer, name, tokens, args.repeats)
            rows.append(row)
            print(f"{name:>24} {tokens:>6} tokens ({row['steps']:>5} steps, {row['chars']:>6} "
                  f"chars): {row['us_per_step']:9.2f} us/step, last tenth "
                  f"{row['us_per_step_last_tenth']:9.2f}", flush=True)
    extend = [text_extend_row(tokenizer, tokens, args.repeats) for tokens in lengths]
    for row in extend:
        print(f"engine text extend {row['tokens']:>6} tokens: {row['us_per_step']:.3f} us/step,"
              f" last tenth {row['us_per_step_last_tenth']:.3f}")
    result = {"bench": "host_parsers", "commit": commit_id(),
              "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "machine": f"{platform.machine()}, {os.cpu_count()} cores",
              "python": platform.python_version(),
              "readers_fed": "whole text" if server_step()[2] else "delta",
              "clock": "process CPU time, best of repeats", "repeats": args.repeats,
              "cases": rows, "engine_text_extend": extend}
    write_result(result, args.json, "host_parsers.json")


if __name__ == "__main__":
    main()

"""Structured output (llguidance), allowed_token_ids and bad_words on the single-process engine
and the HTTP server. The embedded model has random weights, so its free text is gibberish: an
output that still parses shows the grammar's mask at work."""

from __future__ import annotations

import json
import re

import jsonschema
import msgpack
import openai
import pytest
import torch

from asgi_utils import call_app

from afd import LLM, SamplingParams
from afd.sampling_params import MAX_BAD_WORDS, ParamError, StructuredOutputsParams as SO

SCHEMA = {"type": "object",
          "properties": {"name": {"type": "string", "maxLength": 6},
                         "age": {"type": "integer", "minimum": 0, "maximum": 150},
                         "tags": {"type": "array", "items": {"enum": ["x", "y"]},
                                  "maxItems": 2}},
          "required": ["name", "age", "tags"], "additionalProperties": False}
REGEX = r"[a-z]{2,6}@[a-z]{2,5}\.(com|org)"
CHOICE = ["red", "green", "blue"]
LARK = 'start: "(" NUM ("+" NUM)? ")"\nNUM: /[0-9]{1,3}/'
GBNF = 'root ::= "x" [0-9] [0-9]? "y"'
PROMPTS = ["Hello, my name is", "The capital of France is"]


def valid(kind: str, text: str) -> bool:
    if kind == "json":
        try:
            jsonschema.validate(json.loads(text), SCHEMA)
        except (ValueError, jsonschema.ValidationError):
            return False
        return True
    if kind == "json_object":
        try:
            return isinstance(json.loads(text), dict)
        except ValueError:
            return False
    if kind == "regex":
        return re.fullmatch(REGEX, text) is not None
    if kind == "choice":
        return text in CHOICE
    if kind == "lark":
        return re.fullmatch(r"\([0-9]{1,3}(\+[0-9]{1,3})?\)", text) is not None
    return re.fullmatch(r"x[0-9]{1,2}y", text) is not None  # gbnf


# With free whitespace between JSON tokens (the default, as vLLM's) the random model often
# spends its tokens on whitespace, so the batch test asks for compact JSON; the server test
# runs the default.
CONSTRAINTS = {"json": SO(json=SCHEMA, disable_any_whitespace=True),
               "json_object": SO(json_object=True), "regex": SO(regex=REGEX),
               "choice": SO(choice=CHOICE), "lark": SO(grammar=LARK), "gbnf": SO(grammar=GBNF)}


@pytest.fixture(scope="module")
def llm():
    llm = LLM()
    yield llm
    llm.shutdown()


def test_outputs_follow_the_constraint_greedy_and_sampled(llm):
    """Every kind, greedy and sampled (n=2), in one batch beside an unconstrained request; each
    completion parses and finishes "stop" (the grammar's end, or EOS where it may go on)."""
    params = []
    for so in CONSTRAINTS.values():
        params += [SamplingParams(temperature=0, max_tokens=120, structured_outputs=so),
                   SamplingParams(temperature=1.0, seed=5, n=2, max_tokens=120,
                                  structured_outputs=so)]
    params.append(SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    prompts = [PROMPTS[i % 2] for i in range(len(params))]
    outs = llm.generate(prompts, params, use_tqdm=False)
    kinds = [k for k in CONSTRAINTS for _ in range(2)]
    for kind, out in zip(kinds, outs):
        for c in out.outputs:
            assert c.finish_reason == "stop" and valid(kind, c.text), (kind, c.text)
    free = outs[-1].outputs[0]
    assert not valid("json_object", free.text) and len(free.token_ids) == 8  # gibberish
    # the unconstrained row is unchanged by its neighbours' masks
    alone = llm.generate(prompts[-1], params[-1], use_tqdm=False)[0].outputs[0]
    assert alone.token_ids == free.token_ids


def test_max_tokens_cuts_json_early(llm):
    """max_tokens ends the output where it is: finish_reason "length", not valid JSON."""
    out = llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=4,
                                                  structured_outputs=SO(json=SCHEMA)),
                       use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 4
    assert not valid("json", out.text) and out.text.startswith("{")


def test_allowed_token_ids(llm):
    allowed = [101, 102, 290, 429]
    outs = llm.generate(PROMPTS, [SamplingParams(temperature=0, max_tokens=16, ignore_eos=True,
                                                 allowed_token_ids=allowed),
                                  SamplingParams(temperature=1.0, seed=1, n=2, max_tokens=16,
                                                 ignore_eos=True, allowed_token_ids=allowed)],
                        use_tqdm=False)
    for out in outs:
        for c in out.outputs:
            assert len(c.token_ids) == 16 and set(c.token_ids) <= set(allowed), c.token_ids


def test_bad_words_never_appear(llm):
    """"ab" is tokens [101, 102] (and " ab" [263, 102]); sampling among 101 and 102 only puts
    102 after 101 within a few tokens, unless bad_words bans it. A one-token word ("dog", 429)
    forced by logit_bias never comes out once banned."""
    tok = llm.get_tokenizer()
    assert tok.encode("ab", add_special_tokens=False) == [101, 102]
    common = dict(temperature=1.0, seed=0, max_tokens=24, ignore_eos=True,
                  allowed_token_ids=[101, 102])
    free, banned = llm.generate(PROMPTS[:1] * 2, [SamplingParams(**common),
                                                  SamplingParams(**common, bad_words=["ab"])],
                                use_tqdm=False)

    def pairs(ids: list[int]) -> set:
        return set(zip(ids, ids[1:]))

    assert (101, 102) in pairs(free.outputs[0].token_ids)
    out = banned.outputs[0]
    assert (101, 102) not in pairs(out.token_ids) and "ab" not in out.text
    assert len(out.token_ids) == 24
    forced = dict(temperature=0, max_tokens=10, ignore_eos=True, logit_bias={429: 100})
    free, banned = llm.generate(PROMPTS[:1] * 2, [SamplingParams(**forced),
                                                  SamplingParams(**forced, bad_words=["dog"])],
                                use_tqdm=False)
    assert 429 in free.outputs[0].token_ids and 429 not in banned.outputs[0].token_ids


def reasoning_end_at(free: list[int], k: int) -> int:
    """The greedy output's token k as the end of a reasoning: its first occurrence there."""
    assert free[k] not in free[:k], free
    return free[k]


def test_grammar_waits_for_the_end_of_the_reasoning(llm):
    """reasoning_end_token_ids (what the server sets from its reasoning parser): no mask and
    no matcher step until one of them is sampled, the end token included; the tokens after it
    follow the grammar. The greedy output's first tokens are ones the grammar forbids, so they
    come out only while the grammar waits; without the field it applies from the first token.
    The end sampled first, or max_tokens hit before it, work too."""
    tok = llm.get_tokenizer()
    free = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True),
                        use_tqdm=False)
    free = [o.outputs[0].token_ids for o in free]
    choice = SO(choice=CHOICE)
    cases = [(free[0], 3), (free[1], 3), (free[0], 0)]
    params = [SamplingParams(temperature=0, max_tokens=30, structured_outputs=choice,
                             reasoning_end_token_ids=[reasoning_end_at(ids, k)])
              for ids, k in cases]
    params += [SamplingParams(temperature=0, max_tokens=30, structured_outputs=choice),
               SamplingParams(temperature=0, max_tokens=3, structured_outputs=choice,
                              reasoning_end_token_ids=[reasoning_end_at(free[0], 4)])]
    outs = llm.generate([PROMPTS[0], PROMPTS[1], PROMPTS[0], PROMPTS[0], PROMPTS[0]], params,
                        use_tqdm=False)
    outs = [o.outputs[0] for o in outs]
    for (ids, k), out in zip(cases, outs):
        assert out.token_ids[:k + 1] == ids[:k + 1], out.token_ids  # unconstrained
        assert tok.decode(out.token_ids[k + 1:]) in CHOICE and out.finish_reason == "stop"
    # without it: constrained from the first token, which the free output's first is not
    plain = outs[3]
    assert plain.text in CHOICE and plain.token_ids[0] != free[0][0]
    # max_tokens inside the reasoning: cut there, the grammar never started
    assert outs[4].token_ids == free[0][:3] and outs[4].finish_reason == "length"


def test_a_preempted_sequence_keeps_its_reasoning_state(llm):
    """A KV pool too small for the batch preempts and recomputes sequences mid-reasoning and
    mid-answer: the same tokens as the roomy engine, each answer valid."""
    prompts = PROMPTS + ["Tell me a story", "a b a b a b a b a b", "What is the capital"]
    free = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True),
                        use_tqdm=False)
    free = [o.outputs[0].token_ids for o in free]
    params = [SamplingParams(temperature=0, max_tokens=30, structured_outputs=SO(choice=CHOICE),
                             reasoning_end_token_ids=[reasoning_end_at(ids, 5)])
              for ids in free]
    want = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    small = LLM(block_size=4, num_kv_blocks=12, max_model_len=48, max_num_batched_tokens=16)
    try:
        got = [o.outputs[0].token_ids for o in small.generate(prompts, params, use_tqdm=False)]
        assert small.engine.core.stats()[0].num_preemptions > 0, "meant to force preemption"
    finally:
        small.shutdown()
    assert got == want
    tok = llm.get_tokenizer()
    assert all(ids[:6] == f[:6] and tok.decode(ids[6:]) in CHOICE for ids, f in zip(got, free))


def test_bad_requests_are_refused_by_field_and_the_engine_serves_on(llm):
    bad = [(dict(structured_outputs=SO(json={"type": "foo"})), "structured_outputs"),
           (dict(structured_outputs=SO(regex="[a-")), "structured_outputs"),
           (dict(structured_outputs=SO(grammar="start: nowhere")), "structured_outputs"),
           (dict(allowed_token_ids=[10**6]), "allowed_token_ids"),
           (dict(reasoning_end_token_ids=[512]), "reasoning_end_token_ids"),
           (dict(bad_words=[str(i) for i in range(200)]), "bad_words")]  # over 128 sequences
    for fields, param in bad:
        with pytest.raises(ParamError) as err:
            llm.generate(PROMPTS[0], SamplingParams(**fields), use_tqdm=False)
        assert err.value.param == param, (fields, err.value)
    for fields in (dict(structured_outputs=SO(regex="a", choice=["b"])),
                   dict(structured_outputs={"json": SCHEMA, "nope": 1}),
                   dict(structured_outputs=SO(choice=[])), dict(allowed_token_ids=[]),
                   dict(reasoning_end_token_ids=[]), dict(reasoning_end_token_ids=[-1]),
                   dict(structured_outputs=SO(json={"enum": {1, 2}})),
                   dict(bad_words=[" "])):
        with pytest.raises(ParamError) as err:
            SamplingParams(**fields)
        assert err.value.param == next(iter(fields)), (fields, err.value)
    # masks that leave no token end that request with an error, not the rank or its neighbour
    dead, fine = llm.generate(PROMPTS, [SamplingParams(allowed_token_ids=[429], bad_words=["dog"]),
                                        SamplingParams(temperature=0, max_tokens=3,
                                                       ignore_eos=True)],
                              use_tqdm=False)
    assert dead.outputs[0].finish_reason == "error" and "no token" in dead.error
    assert fine.outputs[0].finish_reason == "length" and len(fine.outputs[0].token_ids) == 3


def test_a_grammar_that_fails_while_decoding_ends_its_request_with_an_error(llm):
    """Grammars that compile can fail as the output grows (llguidance's lexer and parser
    limits) or allow nothing (a schema that refers only to itself). Such a request ends with
    finish_reason "error" and the matcher's reason, not "stop" with an output the grammar never
    accepted; the request beside it runs as before and no KV block stays held."""
    failing = [(SO(regex="a{1000000}"), "too many expressions"),
               (SO(grammar='root ::= "a" root'), "Too many items"),
               (SO(json={"type": "object",
                         "properties": {f"p{i}": {"type": "string"} for i in range(3000)}}),
                "max is 2000"),
               (SO(json={"$ref": "#/definitions/a",
                         "definitions": {"a": {"$ref": "#/definitions/a"}}}), "failed after 0")]
    plain = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    want = llm.generate(PROMPTS[1], plain, use_tqdm=False)[0].outputs[0].token_ids
    for so, reason in failing:
        dead, fine = llm.generate(PROMPTS[:2], [SamplingParams(max_tokens=6,
                                                               structured_outputs=so), plain],
                                  use_tqdm=False)
        assert dead.outputs[0].finish_reason == "error", (so, dead.outputs[0])
        assert "structured_outputs: the grammar failed" in dead.error and reason in dead.error
        assert fine.outputs[0].token_ids == want
    alloc = llm.engine.core.allocator
    assert alloc.num_free == alloc.num_blocks and not llm.engine.core.seqs


def test_too_many_bad_words_are_refused_before_tokenizing():
    """Each bad word makes at least one token sequence: more words than the limit are refused
    by SamplingParams itself, before the front end tokenizes them (100,000 words held the
    server's event loop for about 5 s on the 2-core CPU machine before the same 400)."""
    with pytest.raises(ParamError, match="129 entries") as err:
        SamplingParams(bad_words=["w"] * (MAX_BAD_WORDS + 1))
    assert err.value.param == "bad_words"
    assert SamplingParams(bad_words=["w"] * MAX_BAD_WORDS).bad_words == ["w"] * MAX_BAD_WORDS


def test_params_cross_msgpack_as_plain_data():
    p = SamplingParams(structured_outputs=SO(json=SCHEMA), allowed_token_ids=[1, 2],
                       bad_words=["ab"], bad_words_token_ids=[[101, 102]],
                       reasoning_end_token_ids=[5])
    wire = msgpack.unpackb(msgpack.packb(p.to_dict()), strict_map_key=False)
    assert SamplingParams.from_dict(wire) == p
    tag = {"structures": [{"begin": "<f=a>", "schema": SCHEMA, "end": "</f>"}],
           "triggers": ["<f="]}
    p = SamplingParams(structured_outputs=SO(structural_tag=tag))
    wire = msgpack.unpackb(msgpack.packb(p.to_dict()), strict_map_key=False)
    assert SamplingParams.from_dict(wire) == p


def _chat(app, **body):
    return call_app(app, lambda c, _: c.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "Describe a person."}], **body), 60)


def test_server_response_format_and_errors():
    from afd.api_server import ServerState, build_app
    from afd.async_engine import AsyncEngine
    from afd.metrics import ServerMetrics

    engine = AsyncEngine(LLM().engine)
    try:
        app = build_app(ServerState(engine, "m", None, ServerMetrics("m")))
        fmt = {"type": "json_schema",
               "json_schema": {"name": "person", "schema": SCHEMA, "strict": True}}
        r = _chat(app, response_format=fmt, max_tokens=120, temperature=0)
        assert r.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(r.choices[0].message.content), SCHEMA)
        r = _chat(app, max_tokens=30, temperature=0, extra_body={"guided_choice": CHOICE})
        assert r.choices[0].message.content in CHOICE
        r = _chat(app, max_tokens=30, temperature=0,
                  extra_body={"structured_outputs": {"regex": REGEX, "json": None}})
        assert re.fullmatch(REGEX, r.choices[0].message.content)
        for body, param in (
                ({"response_format": {"type": "json_schema",
                                      "json_schema": {"name": "x", "schema": {"type": "foo"}}}},
                 "response_format"),
                ({"extra_body": {"guided_regex": "[a-"}}, "guided_regex"),
                ({"response_format": {"type": "json_object"},
                  "extra_body": {"guided_regex": "a"}}, "guided_regex"),
                ({"extra_body": {"bad_words": [""]}}, "bad_words"),
                ({"extra_body": {"allowed_token_ids": [10**6]}}, "allowed_token_ids")):
            with pytest.raises(openai.BadRequestError) as err:
                _chat(app, max_tokens=4, **body)
            assert err.value.status_code == 400 and err.value.body["param"] == param, err.value
        r = _chat(app, max_tokens=2)  # still serving
        assert r.choices[0].finish_reason == "length"
    finally:
        engine.shutdown()


class _FixedMask:
    """A grammar row stand-in: ``words`` int32 words of bitmask allowing ``tokens``."""

    def __init__(self, tokens: list[int], words: int):
        values = [sum(1 << (t % 32) for t in tokens if t // 32 == w) for w in range(words)]
        self.words = words
        self.bits = torch.tensor([v - (1 << 32) if v >= 1 << 31 else v for v in values],
                                 dtype=torch.int32)

    def fill(self, row: torch.Tensor) -> None:
        row.copy_(self.bits)


@pytest.mark.parametrize("vocab", [50, 64, 70])
def test_grammar_masks_fit_a_model_vocabulary_larger_or_smaller_than_the_bitmask(vocab):
    """The bitmask has 32 bits a word over the tokenizer's vocabulary (here 2 words: 64 ids);
    the model's logits may be wider (DeepSeek-V3's 129,280 ids over its tokenizer's: the ids
    past the bitmask are never allowed) or narrower (bits past the logits are dropped). Rows
    without a grammar and the caller's logits are left as they are."""
    from afd.token_masks import apply_grammar_masks

    logits = torch.randn(3, vocab, generator=torch.Generator().manual_seed(0))
    before = logits.clone()
    allowed = [1, 31, 33, 45, 63]
    out = apply_grammar_masks(logits, [_FixedMask(allowed, 2), None, _FixedMask([2], 2)])
    assert torch.equal(logits, before) and torch.equal(out[1], logits[1])
    for row, tokens in ((0, allowed), (2, [2])):
        finite = torch.isfinite(out[row]).nonzero().flatten().tolist()
        assert finite == [t for t in tokens if t < vocab]
        assert torch.equal(out[row, finite], logits[row, finite])


def test_bad_words_ban_a_last_token_only_after_the_rest_of_its_word():
    """A one-token bad word is always banned; a longer one's last token only when the output
    ends with the tokens before it; the logits given are never changed (the raw logits give
    the logprobs)."""
    from afd.token_masks import apply_bans, banned_tokens

    p = SamplingParams()
    p.bad_words_token_ids = [[5], [7, 8], [1, 2, 3]]
    for output, want in (([], [5]), ([7], [5, 8]), ([9, 7], [5, 8]), ([7, 9], [5]),
                         ([1, 2], [5, 3]), ([2], [5]), ([0, 1, 2], [5, 3]), ([1, 2, 9], [5])):
        assert banned_tokens(p, output) == want, output
    logits = torch.zeros(2, 10)
    free = SamplingParams(allowed_token_ids=[4, 8])
    out = apply_bans(logits, [p, free], [([6, 9, 7], 1, ()), ([6], 1, ())], own=False)
    assert torch.equal(logits, torch.zeros(2, 10))
    assert torch.isinf(out[0]).nonzero().flatten().tolist() == [5, 8]
    assert torch.isfinite(out[1]).nonzero().flatten().tolist() == [4, 8]


TAG_SCHEMA = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0,
                                                     "maximum": 99}},
              "required": ["n"], "additionalProperties": False}


def tagged_parts(text: str, trigger: str) -> list[dict]:
    """Every part of ``text`` a structural tag ``trigger + "(" JSON ")"`` made, parsed and
    checked against TAG_SCHEMA (AssertionError where one breaks it; a last one cut by the
    token limit is left out)."""
    parts, at = [], text.find(trigger)
    while at >= 0:
        rest = at + len(trigger)
        if rest == len(text):
            break  # cut right after the trigger
        assert text[rest] == "(", (text, rest)
        try:
            value, end = json.JSONDecoder().raw_decode(text, rest + 1)
        except ValueError:
            assert len(text) - rest < 40, (text, rest)  # only a cut at the end
            break
        jsonschema.validate(value, TAG_SCHEMA)
        if end < len(text):
            assert text[end] == ")", (text, end)
        parts.append(value)
        at = text.find(trigger, end)
    return parts


def free_trigger(llm, prompt: str) -> tuple[str, str]:
    """(the greedy free text, a trigger it reaches: the text of its first token of three or
    more letters after the first token), so that a structural tag on it must fire."""
    free = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True),
                        use_tqdm=False)[0].outputs[0]
    tok = llm.engine.tokenizer
    for t in free.token_ids[1:]:
        piece = tok.decode([t])
        if len(piece) >= 3 and piece.isalpha():
            return free.text, piece
    raise AssertionError(f"no usable trigger in {free.text!r}")


def test_structural_tag_constrains_after_its_trigger(llm):
    """vLLM's structural tags: free text until the trigger (the same greedy tokens as without
    the tag), then begin + JSON matching the schema + end, every time the trigger comes;
    given as a dict or its JSON text, the same tokens."""
    text, trigger = free_trigger(llm, PROMPTS[0])
    tag = {"structures": [{"begin": trigger + "(", "schema": TAG_SCHEMA, "end": ")"}],
           "triggers": [trigger]}
    outs = llm.generate([PROMPTS[0]] * 3, [
        SamplingParams(temperature=0, max_tokens=60, ignore_eos=True,
                       structured_outputs=SO(structural_tag=tag, disable_any_whitespace=True)),
        SamplingParams(temperature=0, max_tokens=60, ignore_eos=True,
                       structured_outputs=SO(structural_tag=json.dumps(tag),
                                             disable_any_whitespace=True)),
        SamplingParams(temperature=1.0, seed=3, n=2, max_tokens=60, ignore_eos=True,
                       structured_outputs=SO(structural_tag=tag, disable_any_whitespace=True))],
        use_tqdm=False)
    greedy = outs[0].outputs[0]
    first = text.index(trigger) + len(trigger)
    assert greedy.text[:first] == text[:first]  # free before the trigger
    assert greedy.text != text and tagged_parts(greedy.text, trigger)  # the tag fired
    assert outs[1].outputs[0].token_ids == greedy.token_ids
    for c in outs[2].outputs:  # sampled: wherever the trigger comes, the structure follows
        tagged_parts(c.text, trigger)


@pytest.mark.parametrize("tag, says", [
    ({"structures": [{"begin": "x(", "schema": TAG_SCHEMA, "end": ")"}], "triggers": []},
     "structural_tag.triggers must be a non-empty list"),
    ({"structures": [{"begin": "x(", "schema": TAG_SCHEMA, "end": ")"}], "triggers": ["y"]},
     "structural_tag.structures[0].begin 'x(' starts with none of the triggers"),
    ({"structures": [{"begin": "x(", "schema": "int", "end": ")"}], "triggers": ["x"]},
     "structural_tag.structures[0].schema must be a JSON schema"),
    ({"structures": [], "triggers": ["x"]}, "structural_tag.structures must be a non-empty"),
    ({"structures": [{"begin": "x(", "schema": {}, "end": ")", "more": 1}], "triggers": ["x"]},
     "structural_tag.structures[0] must be an object of begin, schema and end"),
    ({"type": "structural_tag", "format": {"type": "triggered_tags"}},
     "xgrammar's newer form"),
    ('{"structures": [', "structural_tag is not valid JSON"),
    ({"structures": [{"begin": "x(", "schema": {"type": "foo"}, "end": ")"}],
      "triggers": ["x"]}, "structural_tag is invalid"),
])
def test_bad_structural_tags_are_refused_by_field(llm, tag, says):
    with pytest.raises(ParamError) as err:
        llm.generate(PROMPTS[0], SamplingParams(structured_outputs=SO(structural_tag=tag)),
                     use_tqdm=False)
    assert err.value.param == "structured_outputs" and says in str(err.value), err.value


def test_server_structural_tag():
    """response_format {"type": "structural_tag", ...} and vLLM's older top-level
    structural_tag (JSON text): the engine's tokens; a bad one a 400 naming the field."""
    from afd.api_server import ServerState, build_app
    from afd.async_engine import AsyncEngine
    from afd.metrics import ServerMetrics

    llm = LLM()
    engine = AsyncEngine(llm.engine)
    try:
        app = build_app(ServerState(engine, "m", None, ServerMetrics("m")))
        free = _chat(app, max_tokens=12, temperature=0).choices[0].message.content
        tok = llm.engine.tokenizer
        trigger = next(p for p in (tok.decode([t]) for t in tok.encode(free)[1:])
                       if len(p) >= 3 and p.isalpha())
        # (compact JSON by the schema's own llguidance option: no field of these bodies
        # turns free whitespace off, and the random model spends its tokens on it)
        schema = {**TAG_SCHEMA, "x-guidance": {"whitespace_flexible": False}}
        tag = {"structures": [{"begin": trigger + "(", "schema": schema, "end": ")"}],
               "triggers": [trigger]}
        texts = []
        for body in ({"response_format": {"type": "structural_tag", **tag}},
                     {"extra_body": {"structural_tag": json.dumps(tag)}}):
            r = _chat(app, max_tokens=60, temperature=0, **body)
            texts.append(r.choices[0].message.content)
            assert tagged_parts(texts[-1], trigger), texts[-1]
        assert texts[0] == texts[1]
        for body, param in (
                ({"response_format": {"type": "structural_tag", "structures": [],
                                      "triggers": ["x"]}}, "response_format"),
                ({"extra_body": {"structural_tag": "{"}}, "structural_tag"),
                ({"response_format": {"type": "json_object"},
                  "extra_body": {"structural_tag": json.dumps(tag)}}, "structural_tag")):
            with pytest.raises(openai.BadRequestError) as err:
                _chat(app, max_tokens=4, **body)
            assert err.value.status_code == 400 and err.value.body["param"] == param, err.value
    finally:
        engine.shutdown()

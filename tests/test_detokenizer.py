"""The incremental detokenizer against the plain form of its algorithm, on random token streams."""

from __future__ import annotations

import copy
import random

import pytest

from afd import LLM, SamplingParams
from afd.detokenizer import _WINDOW, IncrementalDetokenizer, find_stop


@pytest.fixture(scope="module")
def llm():
    llm = LLM(seed=0)
    yield llm
    llm.shutdown()


@pytest.fixture(scope="module")
def tokenizer(llm):
    return llm.get_tokenizer()


class TwoDecodes:
    """The algorithm with nothing kept between steps: every push decodes the window with and
    without its new tokens through ``tokenizer.decode``."""

    def __init__(self, tokenizer, prompt: list[int], skip: bool):
        self.decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=skip)
        # the context: the shortest window of the last 5 to 20 prompt tokens whose text does
        # not end in U+FFFD, or none
        self.tokens = next((prompt[-k:] for k in range(min(_WINDOW, len(prompt)),
                                                       min(len(prompt), 4 * _WINDOW) + 1)
                            if not self.decode(prompt[-k:]).endswith("\ufffd")), [])
        self.prefix_offset, self.read_offset = 0, len(self.tokens)

    def push(self, token_ids: list[int]) -> str:
        self.tokens += token_ids
        prefix = self.decode(self.tokens[self.prefix_offset:self.read_offset])
        full = self.decode(self.tokens[self.prefix_offset:])
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.tokens)
        return full[len(prefix):]


def random_stream(rng: random.Random, vocab: int, length: int) -> list[int]:
    """Token ids from the whole vocabulary, with runs of byte-level tokens (the embedded
    tokenizer's ids 4..259 are single bytes) that split multi-byte UTF-8 characters, leave
    them unfinished or make invalid sequences, and special tokens (ids 0..3)."""
    ids = []
    while len(ids) < length:
        kind = rng.random()
        if kind < 0.3:  # a character's UTF-8 bytes, whole or cut short
            text = rng.choice("éü€中文字😀ß")
            raw = list(text.encode())
            ids += [4 + b for b in raw[:rng.randrange(1, len(raw) + 1)]]
        elif kind < 0.4:  # stray bytes: continuation bytes, lead bytes, 0xff
            ids += [4 + rng.choice([0x80, 0xbf, 0xc3, 0xe4, 0xf0, 0xff])
                    for _ in range(rng.randrange(1, 3))]
        elif kind < 0.5:
            ids.append(rng.randrange(4))  # <｜begin▁of▁sentence｜> ... <｜Assistant｜>
        else:
            ids.append(rng.randrange(vocab))
    return ids[:length]


@pytest.mark.parametrize("cleanup", [False, True])
def test_incremental_text_is_the_two_decode_text(tokenizer, cleanup):
    """Every push returns exactly what the plain algorithm returns, for prompts and outputs
    with split, unfinished and invalid UTF-8, special tokens kept and skipped, pushes of zero
    to three tokens, windows trimmed over long outputs, and one table of single-token texts
    shared by many detokenizers (as the engine shares it). ``cleanup``: transformers' decode
    with clean_up_tokenization_spaces, whose text depends on the tokens around each one (and
    which the detokenizer reaches through ``tokenizer.decode``, not the Rust backend)."""
    old = tokenizer.clean_up_tokenization_spaces
    tokenizer.clean_up_tokenization_spaces = cleanup
    try:
        rng = random.Random(1)
        vocab = len(tokenizer)
        tables = {True: {}, False: {}}
        emitted = 0
        for case in range(300):
            skip = case % 2 == 0
            prompt = random_stream(rng, vocab, rng.randrange(1, 9))
            new = IncrementalDetokenizer(tokenizer, prompt, skip, tables[skip])
            ref = TwoDecodes(tokenizer, prompt, skip)
            stream = random_stream(rng, vocab, rng.randrange(1, 60))
            text = ""
            while stream:
                take = rng.choice([0, 1, 1, 1, 1, 2, 3])
                chunk, stream = stream[:take], stream[take:]
                want = ref.push(chunk)
                assert new.push(chunk) == want, (prompt, chunk, text)
                text += want
            emitted += len(text)
        assert emitted > 1000
    finally:
        tokenizer.clean_up_tokenization_spaces = old


def test_one_table_per_skip_setting(tokenizer):
    """The engine hands its detokenizers one table of single-token texts for
    skip_special_tokens=True and another for False (a special token's text is '' in one and
    its name in the other)."""
    llm = LLM(seed=0)
    engine = llm.engine
    for skip in (True, False):
        engine.add_request(f"r{skip}", {"prompt_token_ids": [5, 6]},
                           SamplingParams(max_tokens=4, skip_special_tokens=skip))
    detok = {skip: engine.requests[f"r{skip}"].completions[0].detok for skip in (True, False)}
    for skip in (True, False):
        assert detok[skip]._token_texts is engine._detok_texts[skip]
        ref = TwoDecodes(tokenizer, [5, 6], skip)
        for token in (40, 0, 41):  # kept, 0 emits alone and is then the prefix's one token
            assert detok[skip].push([token]) == ref.push([token])
    assert engine._detok_texts[False][0] == tokenizer.decode([0]) != ""
    assert 0 not in engine._detok_texts[True]
    llm.shutdown()


def test_find_stop_is_the_first_match_that_touches_the_new_text():
    """find_stop against its definition, over every position: the earliest stop string
    occurrence that ends inside the last ``new_chars`` characters (the first listed stop at
    a tie), including stops longer than the text and new text of the whole string."""
    rng = random.Random(3)
    for _ in range(3000):
        text = "".join(rng.choice("ab\u00e9") for _ in range(rng.randrange(0, 12)))
        new_chars = rng.randrange(0, len(text) + 1)
        stops = ["".join(rng.choice("ab\u00e9") for _ in range(rng.randrange(1, 5)))
                 for _ in range(rng.randrange(1, 4))]
        want = min(((i, s) for i in range(len(text)) for s in stops
                    if text.startswith(s, i) and i + len(s) > len(text) - new_chars),
                   key=lambda hit: (hit[0], stops.index(hit[1])), default=None)
        assert find_stop(text, new_chars, stops) == want, (text, new_chars, stops)


def test_pushes_then_flush_give_the_decode_of_the_output(tokenizer):
    """What the pushes emit, then ``flush`` at the end, is ``tokenizer.decode`` of the output
    ids (vLLM's and SGLang's contract for a byte-level BPE), over outputs that split, cut
    short or garble multi-byte characters and hold special and added tokens, kept and skipped:
    an unfinished character at the end is U+FFFD, as in the decode, not dropped; and a prompt
    that ends inside a character does not swallow the output character that completes it."""
    rng = random.Random(5)
    vocab = len(tokenizer)
    tables = {True: {}, False: {}}
    for case in range(400):
        skip = case % 2 == 0
        prompt = random_stream(rng, vocab, rng.randrange(1, 9))
        if case % 4 < 2:  # the prompt ends inside a character: the output may complete it
            prompt += [4 + rng.choice([0xc3, 0xe4, 0xf0])]
        stream = random_stream(rng, vocab, rng.randrange(1, 40))
        detok = IncrementalDetokenizer(tokenizer, prompt, skip, tables[skip])
        text, rest = "", stream
        while rest:
            take = rng.choice([1, 1, 1, 2, 3])
            text += detok.push(rest[:take])
            rest = rest[take:]
        text += detok.flush()
        assert text == tokenizer.decode(stream, skip_special_tokens=skip), (prompt, stream)
        assert detok.flush() == ""


def test_an_unfinished_last_character_reaches_the_output(llm):
    """The engine flushes the detokenizer when a completion ends: an output whose last bytes
    do not finish a character (max_tokens cut it, or EOS came next) ends in U+FFFD, as
    ``tokenizer.decode`` of its ids, in every output kind; before, the pending bytes' text was
    dropped (here: all of it)."""
    from test_output_kind import _ScriptedCore

    from afd import RequestOutputKind
    from afd.engine import LLMEngine

    tok, base = llm.get_tokenizer(), llm.engine
    eos = base.eos_token_ids[0]
    b = [4 + x for x in "中".encode()]
    scripts = {1: [[b[0]], [b[1]], ([b[2]], "length")],  # a whole character: no change
               2: [[b[0]], [b[1]], ([eos], "stop")],  # EOS after a cut character
               3: [[40], [b[0], b[1]], ([b[0]], "length")],  # cut, then cut again at the end
               4: [[b[0]], ([b[0]], "length")]}
    for seed, steps in scripts.items():
        ids = [t for s in steps for t in (s[0] if isinstance(s, tuple) else s)]
        want = tok.decode(ids[:-1] if ids[-1] == eos else ids)
        for kind in RequestOutputKind:
            for stop in ([], ["zz"]):
                engine = LLMEngine(tok, base.model_cfg, base.engine_cfg,
                                   _ScriptedCore({seed: steps}), base.eos_token_ids)
                engine.add_request("r", {"prompt_token_ids": [5, 6]},
                                   SamplingParams(seed=seed, stop=stop, output_kind=kind))
                texts = []
                while engine.has_unfinished_requests():
                    texts += [o.outputs[0].text for o in engine.step() if o.outputs]
                text = "".join(texts) if kind == RequestOutputKind.DELTA else texts[-1]
                assert text == want, (seed, kind, stop)


def test_stop_strings_stop_only_after_min_tokens(llm):
    """vLLM's rule: a stop string ends the completion only at a token after the first
    min_tokens (where a stop token can come at the earliest); one that the min_tokens-th token
    completes does not (it did), one that a later token completes does, spanning the first
    tokens' text or not."""
    from test_output_kind import _ScriptedCore

    from afd.engine import LLMEngine

    tok, base = llm.get_tokenizer(), llm.engine
    steps = [[4 + ord(c)] for c in "abcd"] + [([4 + ord("e")], "length")]
    cases = [(3, ["c"], "abcde", "length"), (3, ["cd"], "ab", "stop"),
             (2, ["c"], "ab", "stop"), (0, ["a"], "", "stop"), (1, ["a"], "abcde", "length"),
             (3, ["d", "bc"], "abc", "stop")]
    for min_tokens, stop, text, finish in cases:
        engine = LLMEngine(tok, base.model_cfg, base.engine_cfg, _ScriptedCore({1: steps}),
                           base.eos_token_ids)
        engine.add_request("r", {"prompt_token_ids": [5, 6]},
                           SamplingParams(seed=1, stop=stop, min_tokens=min_tokens))
        while engine.has_unfinished_requests():
            out = engine.step()
        [c] = out[0].outputs
        assert (c.text, c.finish_reason) == (text, finish), (min_tokens, stop)


def byte_fallback_tokenizer(folder):
    """A sentencepiece-style BPE (Llama 2's tokenizer.json layout): "▁" for spaces, one
    prepended, characters outside the vocabulary as <0xNN> byte tokens, a decoder that strips
    the text's first space and turns a run of byte tokens into U+FFFDs when any is invalid."""
    import json
    import os

    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"<0x{b:02X}>": 3 + b for b in range(256)})
    merges = [("▁", "a"), ("h", "e"), ("l", "l"), ("▁", "he"), ("▁he", "ll"), ("▁hell", "o")]
    for piece in ["▁", "a", "b", "h", "e", "l", "o", "x", ".", "é", *(a + b for a, b in merges)]:
        vocab.setdefault(piece, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"),
                                           normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens([AddedToken("<s>", special=True), AddedToken("</s>", special=True)])
    tok.save(os.path.join(folder, "tokenizer.json"))
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>",
                   "eos_token": "</s>", "unk_token": "<unk>",
                   "clean_up_tokenization_spaces": False}, f)
    return PreTrainedTokenizerFast.from_pretrained(folder)


def test_byte_fallback_text_is_the_decode_in_the_prompts_context(tmp_path):
    """A sentencepiece-style tokenizer with byte fallback, on random prompts and outputs of
    whole characters (words, spaces, special tokens, characters as 2 to 4 byte tokens): the
    emitted text is the decode of prompt and output less that of the prompt (a first word's
    leading space kept). A prompt whose last 5 tokens start inside a character of byte tokens
    that runs to its end took that window as context, and the output's first bytes joined the
    invalid run: 'é' came out as U+FFFDs."""
    tok = byte_fallback_tokenizer(str(tmp_path))
    words = [tok.convert_tokens_to_ids(w) for w in ("▁hello", "▁a", "a", "▁", "x", ".", "é")]

    def stream(rng: random.Random, units: int) -> list[int]:
        ids = []
        for _ in range(units):
            kind = rng.random()
            if kind < 0.4:
                ids += [3 + b for b in rng.choice("中é€😀ß字").encode()]
            elif kind < 0.5:
                ids.append(rng.choice([1, 2]))
            else:
                ids.append(rng.choice(words))
        return ids

    rng = random.Random(7)
    for case in range(300):
        skip = case % 2 == 0
        prompt, out = stream(rng, rng.randrange(1, 8)), stream(rng, rng.randrange(1, 12))
        before = tok.decode(prompt, skip_special_tokens=skip)
        whole = tok.decode(prompt + out, skip_special_tokens=skip)
        assert whole.startswith(before)
        detok = IncrementalDetokenizer(tok, prompt, skip)
        text = "".join(detok.push([t]) for t in out) + detok.flush()
        assert text == whole[len(before):], (prompt, out)


def test_logprob_tokens_keep_a_sentencepiece_words_space(llm, tmp_path):
    """Each logprob's decoded token is the token alone, with its piece's leading spaces: a
    sentencepiece decoder drops the first space of what it decodes, so '▁hello' alone came out
    as 'hello', and the tokens of an output of words no longer added up to its text."""
    from test_output_kind import _ScriptedCore

    from afd.engine import LLMEngine

    tok = byte_fallback_tokenizer(str(tmp_path))
    base = llm.engine
    ids = tok.encode("hello a hello. x é", add_special_tokens=False)
    assert "▁hello" in tok.convert_ids_to_tokens(ids)
    engine = LLMEngine(tok, base.model_cfg, base.engine_cfg,
                       _ScriptedCore({1: [[t] for t in ids[:-1]] + [([ids[-1]], "length")]}))
    engine.add_request("r", {"prompt_token_ids": [1, 260]}, SamplingParams(seed=1, logprobs=0))
    while engine.has_unfinished_requests():
        out = engine.step()
    [c] = out[0].outputs
    tokens = [step[t].decoded_token for t, step in zip(c.token_ids, c.logprobs)]
    assert "".join(tokens) == c.text == " hello a hello. x é", tokens
    assert engine.token_text(1) == "<s>" and engine.token_text(3 + ord("a")) == "a"


def test_engine_text_against_vllms_rules(llm):
    """Random scripted outputs (words, special tokens, EOS, stop token ids, EOS among them,
    ignore_eos, n = 1 or 2, logprobs, min_tokens, stop strings cut from the outputs' texts,
    kept or not, special tokens kept or not), final-only and joined deltas, against vLLM's
    rules written out plainly: the text is the decode of the tokens (less a stop token's,
    unless kept); after each token past the first min_tokens, the earliest stop string that
    ends in its new text cuts the text there (before it, or after it if kept) and ends the
    completion at that token, with the stop string as stop_reason."""
    from test_output_kind import _ScriptedCore

    from afd import RequestOutputKind
    from afd.engine import LLMEngine
    from afd.sequence import CoreOutput

    class Core(_ScriptedCore):  # steps: [token], or ([token], finish, stop_reason)
        def step(self):
            outs = []
            for rid, (script, req) in list(self.running.items()):
                s = next(script)
                ids, finish, reason = s if isinstance(s, tuple) else (s, None, None)
                logprobs = None if req.params.logprobs is None else [
                    [[t], [-0.01 * t], 1] for t in ids]
                outs.append(CoreOutput(rid, ids, finish, reason, None, None, logprobs))
                if finish is not None:
                    del self.running[rid]
            return outs

    tok, base = llm.get_tokenizer(), llm.engine
    eos = base.eos_token_ids[0]
    words = [4 + b for b in range(32, 127)] + [t for t in range(260, len(tok))
                                               if tok.decode([t]).isascii()]

    def rule(ids: list[int], finish: str, reason, p: SamplingParams) -> tuple:
        text_ids = ids
        if finish == "stop" and (reason is not None or ids[-1] == eos) and (
                not p.include_stop_str_in_output):
            text_ids = ids[:-1]
        before = ""
        for i in range(1, len(text_ids) + 1):
            text = tok.decode(text_ids[:i], skip_special_tokens=p.skip_special_tokens)
            if i > p.min_tokens:
                hits = [(j, s) for s in p.stop
                        if (j := text.find(s, max(0, len(before) - len(s) + 1))) >= 0]
                if hits:
                    j, s = min(hits, key=lambda h: h[0])
                    return (text[:j + len(s)] if p.include_stop_str_in_output else text[:j],
                            ids[:i], "stop", s)
            before = text
        return before, ids, finish, reason

    rng = random.Random(11)
    for trial in range(150):
        n, ignore_eos = rng.choice([1, 2]), rng.random() < 0.3
        stop_ids = [rng.choice(words)] if rng.random() < 0.3 else []
        stop_ids += [eos] if rng.random() < 0.2 else []
        max_tokens = rng.randrange(1, 20)
        min_tokens = min(rng.choice([0, 0, 1, 3]), max_tokens)
        scripts, outputs = {}, []
        for i in range(n):
            ids, finish, reason = [], "length", None
            while len(ids) < max_tokens:
                t = rng.choice(words) if rng.random() < 0.9 else rng.choice([0, 2, 3, eos])
                stops = t in stop_ids or (t == eos and not ignore_eos)
                if stops and len(ids) < min_tokens:
                    continue  # the sampler masks them until min_tokens are out
                ids.append(t)
                if stops:
                    finish, reason = "stop", (None if t == eos and not ignore_eos else t)
                    break
            scripts[1000 * trial + i] = [[t] for t in ids[:-1]] + [([ids[-1]], finish, reason)]
            outputs.append((ids, finish, reason))
        texts = [tok.decode(ids) for ids, _, _ in outputs]
        stops = []
        for text in rng.choices(texts, k=rng.randrange(3)):
            start = rng.randrange(len(text)) if text else 0
            if text[start:start + 1]:
                stops.append(text[start:start + rng.randrange(1, 5)])
        params = SamplingParams(
            n=n, seed=1000 * trial, stop=stops, stop_token_ids=stop_ids, ignore_eos=ignore_eos,
            max_tokens=max_tokens, min_tokens=min_tokens, logprobs=rng.choice([None, 1]),
            include_stop_str_in_output=rng.random() < 0.3,
            skip_special_tokens=rng.random() < 0.5)
        want = [rule(*o, params) for o in outputs]
        for kind in (RequestOutputKind.FINAL_ONLY, RequestOutputKind.DELTA):
            engine = LLMEngine(tok, base.model_cfg, base.engine_cfg, Core(scripts),
                               base.eos_token_ids)
            engine.add_request("r", {"prompt_token_ids": [40, 41]},
                               SamplingParams(**{**params.to_dict(), "output_kind": kind}))
            got: dict[int, list] = {}
            while engine.has_unfinished_requests():
                for out in engine.step():
                    for c in out.outputs:
                        g = got.setdefault(c.index, ["", [], None, None, 0])
                        if kind == RequestOutputKind.DELTA:
                            g[0] += c.text
                            g[1] = g[1] + c.token_ids
                            g[4] += len(c.logprobs or ())
                        else:
                            g[0], g[1], g[4] = c.text, c.token_ids, len(c.logprobs or ())
                        g[2], g[3] = c.finish_reason, c.stop_reason
            for i in range(n):
                assert tuple(got[i][:4]) == want[i], (trial, kind, params, outputs[i])
                assert got[i][4] == (0 if params.logprobs is None else len(got[i][1]))


def test_byte_fallback_flush_gives_one_u_fffd_per_byte_left(tmp_path):
    """A byte-fallback output that ends inside a character, after whole characters of byte
    tokens in the same run: the decode of that run is all U+FFFDs (docs/serving.md, not matched), so
    ``flush`` cut it at the emitted text's length and the text got a U+FFFD for each byte of
    the characters before, less one per character, beyond its own (one per byte left)."""
    tok = byte_fallback_tokenizer(str(tmp_path))
    hello = tok.convert_tokens_to_ids("▁hello")
    for whole in ("é", "中", "😀é"):
        for cut in ("中", "😀"):
            for keep in range(1, len(cut.encode())):
                out = [3 + b for b in whole.encode() + cut.encode()[:keep]]
                detok = IncrementalDetokenizer(tok, [1, hello], True)
                text = "".join(detok.push([t]) for t in out) + detok.flush()
                assert text == whole + "\ufffd" * keep, (whole, cut, keep, text)


def test_a_requests_completions_choose_the_prompts_context_once(llm):
    """The n completions of a request share the prompt's context, chosen once: a prompt that
    ends inside a character tries every window from 5 to 20 tokens (16 decodes), which each
    of n = 8 completions did again (128 decodes when the request was added)."""
    from test_output_kind import _ScriptedCore

    from afd.engine import LLMEngine

    tok, base = llm.get_tokenizer(), llm.engine

    class Counting(type(tok)):  # its own decode: the detokenizer calls it, countably
        calls = 0

        def decode(self, *args, **kwargs):
            Counting.calls += 1
            return super().decode(*args, **kwargs)

    counting = copy.copy(tok)
    counting.__class__ = Counting
    prompt = tok.encode("The quick brown fox jumps over the lazy dog, far away") + [4 + 0xe4]
    alone = IncrementalDetokenizer(counting, prompt, True)
    assert alone.tokens == [] and Counting.calls == 16  # no window helps
    b = [4 + x for x in "中".encode()]  # the output finishes the prompt's character
    engine = LLMEngine(counting, base.model_cfg, base.engine_cfg, _ScriptedCore(
        {i: [[b[1]], ([b[2], 40 + i], "length")] for i in range(8)}), base.eos_token_ids)
    Counting.calls = 0
    engine.add_request("r", {"prompt_token_ids": prompt}, SamplingParams(n=8, seed=0))
    assert Counting.calls == 16, Counting.calls
    while engine.has_unfinished_requests():
        out = engine.step()
    assert [c.text for c in out[0].outputs] == [
        tok.decode([b[1], b[2], 40 + i]) for i in range(8)]

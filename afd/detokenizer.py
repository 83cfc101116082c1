"""Incremental detokenization and stop-string matching for one completion.

Decoding only the newest token can split a multi-byte character or drop a word-initial space, so
each step decodes a short window of recent tokens twice (with and without the new ones) and emits
the difference once it no longer ends in a replacement character. The shorter of the two (the
window's text before the new tokens) is mostly one token decoded alone, the token the previous
step emitted: that text comes from a table of single-token texts shared by every completion with
the same tokenizer and ``skip_special_tokens``, or is kept from the previous step when that step
emitted nothing, so a step usually runs one backend decode, not two. Both are the same decode of
the same ids, so the text is exactly that of decoding both each time. At the end ``flush`` emits
what is still held (an unfinished character as U+FFFD), so the pieces add up to the decode of
the output in the context of the prompt's last tokens (see ``_context``).
"""

from __future__ import annotations

from typing import Callable

_WINDOW = 5


def _direct_decode(tokenizer, skip_special_tokens: bool) -> Callable[[list[int]], str] | None:
    """The Rust backend's own ``decode`` where transformers' ``tokenizer.decode`` would return
    exactly what it returns (a fast tokenizer whose ``decode``/``_decode`` are transformers'
    own and that cleans up no spaces): the wrapper's argument conversion is about 6 us a call,
    four times the decode itself, and the detokenizer decodes twice per token. None otherwise
    (a tokenizer class that overrides either, an older transformers): use ``tokenizer.decode``."""
    try:
        from transformers.tokenization_utils_base import PreTrainedTokenizerBase
        from transformers.tokenization_utils_tokenizers import TokenizersBackend
    except ImportError:
        return None
    cls = type(tokenizer)
    backend = getattr(tokenizer, "_tokenizer", None)
    if (cls.decode is not PreTrainedTokenizerBase.decode
            or cls._decode is not TokenizersBackend._decode or backend is None
            or getattr(tokenizer, "clean_up_tokenization_spaces", True)):
        return None
    decode = backend.decode
    return lambda ids: decode(ids, skip_special_tokens)  # (positional: cheaper to pass)


class IncrementalDetokenizer:
    """``token_texts``: {token id: that id decoded alone}, filled as ids are met, for this
    tokenizer and ``skip_special_tokens``; pass one dict to every detokenizer that shares both
    (each gets its own otherwise)."""

    def __init__(self, tokenizer, prompt_token_ids: list[int], skip_special_tokens: bool = True,
                 token_texts: dict[int, str] | None = None,
                 context: tuple[list[int], str] | None = None):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._decode = _direct_decode(tokenizer, skip_special_tokens) or self._decode_wrapped
        self._token_texts = {} if token_texts is None else token_texts
        # ``context``: another detokenizer's ``context`` for the same prompt and
        # ``skip_special_tokens`` (the n completions of a request), not chosen again
        if context is None:
            context = self._context(prompt_token_ids)
        self.context = context
        window, text = context
        self.tokens = list(window)  # (pushes extend it: the shared window stays as it is)
        self.prefix_offset = 0
        self.read_offset = len(self.tokens)
        # the text of tokens[prefix_offset:read_offset], once known
        self._prefix: str | None = text

    def _context(self, prompt: list[int]) -> tuple[list[int], str]:
        """The prompt's last tokens, decoded before the output's for their context (a word's
        leading space): the last ``_WINDOW``, or more where those end in U+FFFD. That is a
        window that starts inside a character whose bytes run to its end (a byte-fallback
        decoder turns a whole run of bytes into U+FFFDs when any is invalid, and the output's
        first bytes would join that run), so a longer one that starts where a character does
        is taken; or the prompt ends inside a character (or in U+FFFD), so no window helps
        (the output's first bytes would finish it in every decode that starts in the prompt,
        and that character would never be emitted): none, and the output's text is its own
        decode, as ``tokenizer.decode(output ids)``. Returns the window and its text."""
        n = len(prompt)
        for size in range(min(_WINDOW, n), min(n, 4 * _WINDOW) + 1):
            window = list(prompt[n - size:])
            text = self._decode(window)
            if not text.endswith("\ufffd"):
                return window, text
        return [], ""

    def _decode_wrapped(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def _prefix_text(self) -> str:
        """The text of ``tokens[prefix_offset:read_offset]`` (kept until the offsets move)."""
        prefix = self._prefix
        if prefix is None:
            prefix_offset, read_offset = self.prefix_offset, self.read_offset
            if read_offset - prefix_offset == 1:  # one token: its text alone, from the table
                token = self.tokens[prefix_offset]
                prefix = self._token_texts.get(token)
                if prefix is None:
                    prefix = self._token_texts[token] = self._decode([token])
            else:
                prefix = self._decode(self.tokens[prefix_offset:read_offset])
            self._prefix = prefix
        return prefix

    def push(self, token_ids: list[int]) -> str:
        """Add generated tokens; returns the text they complete (maybe empty)."""
        tokens = self.tokens
        tokens += token_ids
        prefix_offset, read_offset = self.prefix_offset, self.read_offset
        if read_offset == len(tokens):
            return ""  # nothing after the prefix: the full text is the prefix's
        prefix = self._prefix_text()
        full = self._decode(tokens[prefix_offset:])
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return ""
        delta = full[len(prefix):]
        prefix_offset, read_offset = read_offset, len(tokens)
        # keep the window short so each push costs O(window)
        if prefix_offset > 4 * _WINDOW:
            drop = prefix_offset - _WINDOW
            del tokens[:drop]
            prefix_offset -= drop
            read_offset -= drop
        self.prefix_offset, self.read_offset, self._prefix = prefix_offset, read_offset, None
        return delta

    def flush(self) -> str:
        """The output is complete: the text of the tokens ``push`` has not emitted yet,
        whatever it ends in (an unfinished character is U+FFFD, as ``tokenizer.decode`` of
        the whole output has it). Call it once, at the end."""
        tokens, prefix_offset, read_offset = self.tokens, self.prefix_offset, self.read_offset
        if read_offset == len(tokens):
            return ""
        prefix = self._prefix_text()
        full = self._decode(tokens[prefix_offset:])
        if not full.startswith(prefix):
            # a byte-fallback decoder made the whole run of byte tokens U+FFFDs, the emitted
            # characters' too: the bytes left, decoded alone (each U+FFFD)
            full = prefix + self._decode(tokens[read_offset:])
        self.prefix_offset, self.read_offset, self._prefix = read_offset, len(tokens), None
        return full[len(prefix):] if len(full) > len(prefix) else ""


def find_stop(text: str, new_chars: int, stops: list[str]) -> tuple[int, str] | None:
    """First stop string that appears in ``text`` overlapping its last ``new_chars`` characters.

    Returns (index where it starts, the stop string) or None.
    """
    best: tuple[int, str] | None = None
    end = len(text) - new_chars + 1  # a stop must end past the old text
    for stop in stops:
        start = end - len(stop)
        i = text.find(stop, start if start > 0 else 0)
        if i >= 0 and (best is None or i < best[0]):
            best = (i, stop)
    return best

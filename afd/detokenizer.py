"""Incremental detokenization and stop-string matching for one completion.

Decoding only the newest token can split a multi-byte character or drop a word-initial space, so
each step decodes a short window of recent tokens twice (with and without the new ones) and emits
the difference once it no longer ends in a replacement character.
"""

from __future__ import annotations

_WINDOW = 5


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_token_ids: list[int], skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.tokens = list(prompt_token_ids[-_WINDOW:])
        self.prefix_offset = 0
        self.read_offset = len(self.tokens)
        self.text = ""

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def push(self, token_ids: list[int]) -> str:
        """Add generated tokens; returns the text they complete (maybe empty)."""
        self.tokens += token_ids
        prefix = self._decode(self.tokens[self.prefix_offset:self.read_offset])
        full = self._decode(self.tokens[self.prefix_offset:])
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return ""
        delta = full[len(prefix):]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.tokens)
        # keep the window short so each push costs O(window)
        if self.prefix_offset > 4 * _WINDOW:
            drop = self.prefix_offset - _WINDOW
            self.tokens = self.tokens[drop:]
            self.prefix_offset -= drop
            self.read_offset -= drop
        self.text += delta
        return delta


def find_stop(text: str, new_chars: int, stops: list[str]) -> tuple[int, str] | None:
    """First stop string that appears in ``text`` overlapping its last ``new_chars`` characters.

    Returns (index where it starts, the stop string) or None.
    """
    best: tuple[int, str] | None = None
    for stop in stops:
        start = max(0, len(text) - new_chars - len(stop) + 1)
        i = text.find(stop, start)
        if i >= 0 and (best is None or i < best[0]):
            best = (i, stop)
    return best

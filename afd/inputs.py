"""The prompt dicts ``LLM.generate`` takes, as vLLM's ``vllm.inputs`` names them (plain dicts at
run time: ``TokensPrompt(prompt_token_ids=[...])`` is ``{"prompt_token_ids": [...]}``)."""

from __future__ import annotations

from typing import TypedDict

from typing_extensions import NotRequired


class TextPrompt(TypedDict):
    """A prompt as text, tokenized by the engine (with the tokenizer's special tokens)."""

    prompt: str
    cache_salt: NotRequired[str]  # prefix-cache isolation (docs/usage.md, Cache salt)


class TokensPrompt(TypedDict):
    """A prompt as token ids, sent as they are; ``prompt`` only labels the output."""

    prompt_token_ids: list[int]
    prompt: NotRequired[str]
    cache_salt: NotRequired[str]


PromptType = str | TextPrompt | TokensPrompt

"""Requests to an in-process FastAPI app (no server process, no port), through httpx's ASGI
transport: raw posts, or the ``openai`` client."""

from __future__ import annotations

import asyncio

import httpx
import openai


def call_app(app, fn, timeout: float = 120):
    """``await fn(client, http)`` with an ``openai.AsyncOpenAI`` client and the raw httpx client
    both talking to ``app``; returns what ``fn`` returns."""
    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                     base_url="http://test", timeout=timeout) as http:
            client = openai.AsyncOpenAI(base_url="http://test/v1", api_key="none",
                                        http_client=http, max_retries=0)
            return await fn(client, http)

    return asyncio.run(go())


def post_app(app, path: str, body: dict, timeout: float = 60) -> httpx.Response:
    """POST ``body`` as JSON to ``path`` of ``app``."""
    async def post(client, http):
        return await http.post(path, json=body)

    return call_app(app, post, timeout)

"""`n` > 1: n choices of one request, each its own sequence on the workers, merged into one reply.

Prefill once: the n sequences share the prompt, so they go to one worker (the router's pick for choice
0, `WorkerPin`), and choices 1..n-1 are sent only when choice 0 produced its first output: its prompt
blocks are in that worker's prefix cache by then, and each other sequence computes only the prompt's
last partial block (the worker's `prefix_hit_tokens` shows it; tests/e2e/test_serve_n.py).

Sampling: choice i samples with `seed + i` when the request has a seed (vLLM's `ParentRequest` does
the same), so choice i equals the n=1 answer for seed + i; without a seed each draws independently.
Usage: prompt tokens once, completion tokens summed, cached tokens as choice 0's (the prompt's).
A failure of any choice fails the request (the others are cancelled); closing the stream (a client
that left) cancels every choice still running.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

import msgspec

from kvrelay.frontend.openai_schema import SEED_MAX, SEED_MIN, ApiError
from kvrelay.frontend.pipeline import Piece, Pipeline, Prepared
from kvrelay.frontend.responses import ResponseBuilder
from kvrelay.frontend.service import WorkerPin
from kvrelay.workers.api.messages import EngineRequest


def choice_request(request: EngineRequest, i: int) -> EngineRequest:
    """The i-th choice's engine request: its own id on the workers (choice 0 keeps the request's),
    and `seed + i`, wrapped into int64 (the wire's range) at the top of the range."""
    seed = request.sampling.seed
    if seed is not None:
        seed = (seed + i - SEED_MIN) % (SEED_MAX - SEED_MIN + 1) + SEED_MIN
    return msgspec.structs.replace(request, request_id=request.request_id if i == 0 else f"{request.request_id}-c{i}",
                                   sampling=msgspec.structs.replace(request.sampling, seed=seed))


async def run_choices(pipeline: Pipeline, p: Prepared) -> AsyncGenerator[Piece, None]:
    """The pieces of all `p.n` choices as they come, each with its `choice`; a finished piece has
    `more` while other choices run. `p.usage` and `p.first_token_at` are the request's (the access log's)."""
    pin = WorkerPin()
    choices = [dataclasses.replace(p, request=choice_request(p.request, i), n=1, pin=pin) for i in range(p.n)]
    outputs: asyncio.Queue[tuple[int, Piece | Exception]] = asyncio.Queue()

    async def one(i: int) -> None:
        try:
            async with contextlib.aclosing(pipeline.run(choices[i], count_prompt=i == 0)) as pieces:
                async for piece in pieces:
                    outputs.put_nowait((i, piece))
        except Exception as e:  # an ApiError (or a bug): it fails the whole request, raised by the reader
            outputs.put_nowait((i, e))

    tasks = [asyncio.ensure_future(one(0))]
    running = p.n
    try:
        while running:
            i, item = await outputs.get()
            if isinstance(item, Exception):
                raise item
            if len(tasks) == 1:  # choice 0's first output: its prompt is in its worker's prefix cache now
                tasks += [asyncio.ensure_future(one(j)) for j in range(1, p.n)]
                p.first_token_at, p.usage.cached_tokens = choices[0].first_token_at, choices[0].usage.cached_tokens
            p.usage.completion_tokens = sum(c.usage.completion_tokens for c in choices)
            item.choice = i
            if item.finish_reason is not None:
                running -= 1
                item.more = running > 0
            yield item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class ChoicesBuilder:
    """The reply of an n > 1 request: one `ResponseBuilder` per choice (its own tool-call parser and
    text offsets), sharing id and created, each chunk carrying its choice's `index`; the usage chunk
    and `[DONE]` once."""

    def __init__(self, endpoint: str, prepared: Prepared, req: Any):
        self.builders = [ResponseBuilder(endpoint, prepared, req) for _ in range(prepared.n)]
        first = self.builders[0].chunker
        for i, b in enumerate(self.builders):
            b.chunker.id, b.chunker.created, b.chunker.index = first.id, first.created, i

    def head_sse(self) -> bytes:
        return b"".join(b.head_sse() for b in self.builders)

    def sse(self, piece: Piece) -> bytes:
        return self.builders[piece.choice].sse(piece)

    def tail_sse(self) -> bytes:
        return self.builders[0].tail_sse()  # its usage is the request's (the shared Prepared's)

    def error_sse(self, e: ApiError) -> bytes:
        return self.builders[0].error_sse(e)

    async def collect(self, pieces: AsyncIterator[Piece]) -> Any:
        per_choice: list[list[Piece]] = [[] for _ in self.builders]
        async for piece in pieces:
            per_choice[piece.choice].append(piece)
        bodies = [await b.collect(_replay(ps)) for b, ps in zip(self.builders, per_choice, strict=True)]
        whole = bodies[0]  # usage: the request's, the same in every body
        whole.choices = [body.choices[0] for body in bodies]
        for i, choice in enumerate(whole.choices):
            choice.index = i
        return whole


async def _replay(pieces: list[Piece]) -> AsyncIterator[Piece]:
    for piece in pieces:
        yield piece

"""The engine interface every engine implements (native, vllm, sglang, trtllm, mocker). The messages
that cross it live in `kvrelay.runtime.messages` (the frontend uses them without importing workers).

Invariants of `Engine.generate(request)`:
- Yields one or more `EngineOutput`s; exactly the last has `finish_reason` set.
- `token_ids` of each output are only the tokens new since the previous output; concatenated they are
  the whole completion (stop tokens included when they end it, as vLLM does).
- Closing the stream early, or `abort(request_id)`, frees every KV block the request held.
- A request the engine cannot take (queue full, prompt too long) raises `EngineError` before any
  output, with a message fit for a client.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Protocol, runtime_checkable

from kvrelay.kvbm.events import KvEvent, KvSnapshot
from kvrelay.runtime.messages import (
    EngineOutput,
    EngineRequest,
    EngineStats,
    KvLayout,
    ModelCard,
    RequestError,
    SamplingParams,
)

__all__ = [
    "Engine", "EngineError", "EngineOutput", "EngineRequest", "EngineStats", "KvLayout", "ModelCard",
    "RequestError", "SamplingParams",
]


class EngineError(RequestError):
    """A request the engine refuses; the message is safe to show a client."""


@runtime_checkable
class Engine(Protocol):
    fingerprint: str  # model fingerprint: root of every block hash (valid after start)
    max_model_len: int  # context length in tokens (valid after start)

    async def start(self) -> None: ...

    def generate(self, request: EngineRequest) -> AsyncIterator[EngineOutput]: ...

    async def abort(self, request_id: str) -> None: ...

    def kv_layout(self) -> KvLayout: ...

    def stats(self) -> EngineStats: ...

    def subscribe_kv_events(self, sink: Callable[[list[KvEvent]], None]) -> None:
        """Receive each step's KV events (worker_id left empty; the worker fills it in)."""

    async def kv_snapshot(self) -> KvSnapshot:
        """The engine's cached blocks, consistent with the events already handed to the sink."""

    async def close(self) -> None: ...

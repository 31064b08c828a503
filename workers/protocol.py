"""The engine interface every engine implements (native, vllm, sglang, trtllm, mocker). The messages
that cross it live in `kvrelay.workers.api.messages` (the worker contract: the frontend, perf and the
planner use them without importing engines).

Invariants of `Engine.generate(request)`:
- Yields one or more `EngineOutput`s; exactly the last has `finish_reason` set.
- `token_ids` of each output are only the tokens new since the previous output; concatenated they are
  the whole completion (stop tokens included when they end it, as vLLM does).
- Closing the stream early, or `abort(request_id)`, frees every KV block the request held.
- A request the engine cannot take (queue full, prompt too long) raises `EngineError` before any
  output, with a message fit for a client.

Disaggregation (docs/ARCHITECTURE.md "Disaggregation"):
- `prefill(request)` computes the prompt and samples the first token. Unless that token finishes the
  request, the prompt's blocks stay allocated (pinned) and their ids are returned; `abort(request_id)`
  frees them. Cancelling `prefill` frees them too.
- `generate(request)` with `request.kv_handle` set allocates blocks for the prompt (reusing its own
  prefix cache), has the `KvPuller` copy the rest from the prefill worker, and decodes on from the
  handle's first token; that token is not repeated in the outputs. If blocks are short or the pull
  fails, it recomputes the prompt locally instead: same tokens, only slower.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol, runtime_checkable

import msgspec

from kvrelay.kvbm.events import KvEvent, KvSnapshot
from kvrelay.workers.api.messages import (
    EngineOutput,
    EngineRequest,
    EngineStats,
    KvHandle,
    KvLayout,
    ModelCard,
    RequestError,
    SamplingParams,
)
from kvrelay.workers.core.errors import EngineError, EngineOverloaded
from kvrelay.workers.core.sequence import PREFILLED

__all__ = [
    "PREFILLED", "Engine", "EngineError", "EngineOverloaded", "EngineOutput", "EngineRequest", "EngineStats", "KvHandle", "KvLayout", "KvPuller",
    "ModelCard", "PrefillResult", "RequestError", "SamplingParams",
]

class PrefillResult(msgspec.Struct):
    output: EngineOutput  # the first token; finish_reason set only if it ended the request
    block_ids: list[int]  # the held prompt blocks, in order; empty when nothing is held
    # An engine that moves KV itself (`owns_kv_transfer`, vLLM's NixlConnector): what its decode side
    # needs to read the blocks, carried in the handle instead of the worker's transfer metadata.
    transfer_params: bytes = b""
    pool: str = "g1"  # the handle's pool name (KvHandle.pool)


class KvPuller(Protocol):
    """How a decode engine gets a handle's blocks; the worker provides it (transfer engine, or a
    simulated link for the mocker)."""

    async def pull(self, handle: KvHandle, local_block_ids: list[int], start: int) -> bool:
        """Copy `handle.block_ids[start:]` into `local_block_ids` (same length; may be empty), then let
        the prefill worker free its lease. True once every byte is in place; False means recompute.
        Raises only CancelledError, and only after the transport stopped writing the blocks."""
        ...


@runtime_checkable
class Engine(Protocol):
    fingerprint: str  # model fingerprint: root of every block hash (valid after start)
    # True when the engine moves KV between workers itself (vLLM's connector): the worker then runs no
    # transfer engine and no puller, and handles carry `PrefillResult.transfer_params`.
    owns_kv_transfer: bool
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

    async def prefill(self, request: EngineRequest) -> PrefillResult: ...

    def set_kv_puller(self, puller: KvPuller) -> None: ...

    def kv_pool(self) -> Any:
        """The G1 pool tensor for transfer registration (block-contiguous), or None if the engine's KV
        is not real memory (mocker)."""

    async def close(self) -> None: ...

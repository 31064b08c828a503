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

from kvrelay.kvbm.events import KvEvent, KvSnapshot
from kvrelay.workers.api.messages import EngineOutput, EngineRequest, EngineStats, KvLayout
from kvrelay.workers.api.prefill import KvPuller, PeerLink, PrefillResult


@runtime_checkable
class Engine(Protocol):
    # True when the engine moves KV between workers itself (vLLM's connector): the worker then runs no
    # transfer engine and no puller, and handles carry `PrefillResult.transfer_params`.
    owns_kv_transfer: bool
    # The cluster KV pool runs inside the engine's KV connector (vLLM): the worker serves `kv_lease` and
    # hands the engine no puller; the engine asks, pulls and lends itself (`lend_pool`).
    lends_through_connector: bool

    @property
    def fingerprint(self) -> str:
        """Model fingerprint: root of every block hash (valid after start). Read-only to the worker."""
        ...

    @property
    def max_model_len(self) -> int:
        """Context length in tokens (valid after start)."""
        ...

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

    def set_peer_puller(self, puller: KvPuller, link: PeerLink) -> None:
        """Let requests pull the prefix a peer holds (`EngineRequest.kv_peer`) with `puller`, leasing it
        over `link` (and within its pull budget)."""

    async def lease_blocks(self, lease_id: str, hashes: list[int]) -> list[int]:
        """Pin the leading run of `hashes` G1 caches for a peer's pull; their block ids ([]: none, or the
        engine does not lend). `abort(lease_id)` frees them."""

    async def block_checksums(self, block_ids: list[int]) -> list[int]:
        """xxh3_64 of each of these (pinned) G1 blocks' bytes, sent with a lease so the puller can verify
        what it got ([]: the engine's KV is not this process's memory, nothing to verify)."""

    def lend_pool(self) -> tuple[str, bytes] | None:
        """Where `lease_blocks`' block ids are read from when the engine lends through its own transfer
        engine (`lends_through_connector`): (pool name, transfer metadata); None: the worker's G1 pool."""

    def transfer_stats(self) -> Any:
        """The stats (kvrelay.transfer.base.TransferStats) of a transfer engine the engine runs itself (vLLM's
        pool, in vLLM's worker process), or None: the worker's `transfer_stats` reports its own."""

    def kv_pool(self) -> Any:
        """The G1 pool tensor for transfer registration (block-contiguous), or None if the engine's KV
        is not real memory (mocker)."""

    async def close(self) -> None: ...

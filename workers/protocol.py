"""The engine interface every engine implements (native, vllm, sglang, trtllm, mocker), and the
messages that cross it. The messages are msgspec Structs because the worker process sends them over
the request plane unchanged.

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

import msgspec

from kvrelay.kvbm.events import KvEvent, KvSnapshot


class SamplingParams(msgspec.Struct, frozen=True, kw_only=True):
    max_tokens: int = 16
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: int | None = None
    stop_token_ids: list[int] = []
    ignore_eos: bool = False
    logprobs: bool = False  # logprob of each chosen token

    def validate(self) -> None:
        if self.max_tokens < 1:
            raise EngineError("max_tokens must be >= 1")
        if self.temperature < 0:
            raise EngineError("temperature must be >= 0")
        if not 0 < self.top_p <= 1:
            raise EngineError("top_p must be in (0, 1]")
        if self.top_k < 0:
            raise EngineError("top_k must be >= 0")


class EngineRequest(msgspec.Struct, frozen=True, kw_only=True):
    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams = SamplingParams()
    cache_salt: str = ""
    lora_name: str = ""


class EngineOutput(msgspec.Struct, kw_only=True):
    request_id: str
    token_ids: list[int]
    logprobs: list[float] | None = None
    finish_reason: str | None = None  # stop | length | abort
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache


class KvLayout(msgspec.Struct, frozen=True, kw_only=True):
    """Describes the engine's G1 pool so KVBM and transfer can move its bytes without knowing the engine."""

    layout: str  # "block_contiguous": [num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim]
    num_blocks: int
    num_layers: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    dtype: str
    device: str

    @property
    def block_bytes(self) -> int:
        itemsize = {"float32": 4, "float16": 2, "bfloat16": 2}[self.dtype]
        return self.num_layers * 2 * self.block_size * self.num_kv_heads * self.head_dim * itemsize


class EngineStats(msgspec.Struct, kw_only=True):
    running: int
    waiting: int
    used_blocks: int
    free_blocks: int
    total_blocks: int
    prefix_hit_tokens: int  # cumulative
    prompt_tokens: int  # cumulative
    generated_tokens: int  # cumulative
    preemptions: int  # cumulative


class EngineError(Exception):
    """A request the engine refuses; the message is safe to show a client."""


@runtime_checkable
class Engine(Protocol):
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

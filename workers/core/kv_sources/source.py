"""What a KV source is, seen from the engine core (vLLM's KV connector, in kvrelay's terms).

A source has two halves. Its *core half* (`KvSource`) lives with the scheduler, on the core's thread,
and only decides: how many tokens after G1's own hit it can supply for a sequence (`match`), which
blocks to fill once the scheduler allocated them (`allocated`), and what it must do when a sequence
is preempted or ends. Its *loop half* (`SourceLoop`) runs on the worker's event loop and does the I/O
the core half asked for as typed jobs (`take_jobs`), reporting back through the core's commands
(commands.py: `KvLoaded`, `KvAnswered`, `KvSaved`, `KvTierEvents`).

The scheduler knows one state for all of it, WAITING_FOR_KV (sequence.py), and nothing about tiers,
handoff or peers (kv_door.py is the only thing it talks to).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

if TYPE_CHECKING:
    from kvrelay.workers.api.messages import EngineRequest
    from kvrelay.workers.core.commands import Command
    from kvrelay.workers.core.sequence import Sequence


@dataclass(frozen=True)
class Match:
    """A source's answer for one sequence: it can fill `num_tokens` tokens after the local (G1) prefix."""

    num_tokens: int
    # Blocks in that range that G1 caches already are taken from G1, not loaded (only full blocks).
    reuse_cached: bool = False
    # Loaded tokens count as prefix-cache hits (`cached_tokens`): true for tiers, false for a handoff,
    # whose tokens the caller paid for on the prefill worker.
    counts_as_cached: bool = True


NO_MATCH = Match(0)


class Job(Protocol):
    """Work for a source's loop half. `source` names the half that runs it."""

    source: ClassVar[str]


class KvSource(Protocol):
    """The core half of a source. Called on the core's thread only, never blocking."""

    name: str

    def add(self, seq: Sequence, request: EngineRequest, hint: Any) -> None:
        """A request was queued; `hint` is what this source's loop half found before (`before_add`)."""

    def match(self, seq: Sequence, local_blocks: int) -> Match | None:
        """Tokens after G1's leading `local_blocks` hit that this source can supply now; `NO_MATCH`:
        none; None: it cannot tell yet (it asked its loop half): the sequence waits for KV until
        `answered`."""

    def allocated(self, seq: Sequence, fresh: list[int] | None) -> None:
        """The scheduler gave `seq` blocks for the last match: `fresh` are the indices into `seq.blocks`
        to fill (a job for the loop half, which must end in exactly one `KvLoaded`). None: blocks were
        short; the match is dropped and the sequence is computed instead."""

    def answered(self, request_id: str, answer: Any) -> None:
        """The loop half answered a question `match` asked."""

    def arrived(self, seq: Sequence, fresh: list[int], kept: int) -> None:
        """A load ended: of `fresh`, those before index `kept` (into `seq.blocks`) were kept."""

    def preempted(self, seq: Sequence, computed_blocks: int) -> None:
        """`seq` loses its blocks (it had computed `computed_blocks` full ones) and waits again."""

    def finished(self, request_id: str) -> None:
        """The request ended (any way): drop what is kept for it."""

    def saved(self, block_ids: list[int]) -> None:
        """The loop half finished a save job of these blocks."""

    def take_jobs(self) -> list[Any]:
        """Jobs for the loop half since the last call (loads, questions, saves), in order."""

    def observe_step(self, prefill_tokens: int, seconds: float) -> None:
        """An engine step computed `prefill_tokens` prompt tokens in `seconds`."""

    def counters(self) -> dict[str, int]:
        """Cumulative counters, by `EngineStats` field name."""

    def close(self) -> None:
        """Shutdown: drop every pin still held for a save."""


Post = Callable[["Command"], None]  # hands a command to the core's owner (thread-safe)


class SourceLoop(Protocol):
    """The loop half of a source: runs on the worker's event loop."""

    name: str

    async def before_add(self, request: EngineRequest) -> Any:
        """What the core half should know when the request is queued (e.g. which tier holds which
        block); None for nothing."""

    def start(self, job: Any, post: Post) -> Awaitable[None] | None:
        """Start a job; its result comes back as a command through `post`, always."""

    def cancel(self, request_id: str) -> None:
        """The request was aborted: stop its jobs early where the I/O allows (they still report)."""

    async def drain(self) -> None:
        """Wait for the jobs in flight that hold core resources (saves) to finish."""

    async def close(self) -> None: ...

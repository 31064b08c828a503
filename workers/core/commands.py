"""What the asyncio side of an engine posts to the core's owner (runner.py applies them in order, with
one `match`). Every command is one frozen dataclass; nothing crosses as a tuple."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from kvrelay.workers.api.messages import EngineRequest

if TYPE_CHECKING:
    from kvrelay.workers.core.streams import Stream


@dataclass(frozen=True)
class Add:
    """Queue a request; its items go to `stream`. `hold`: prefill role (park after the first token,
    blocks kept). `hints`: per KV source, what its loop half found before (source.py `before_add`)."""

    request: EngineRequest
    stream: Stream
    hold: bool = False
    hints: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Abort:
    request_id: str


@dataclass(frozen=True)
class KvLoaded:
    """A source's load for a request ended: `ok[i]` per block of the job, in job order."""

    source: str
    request_id: str
    ok: list[bool]


@dataclass(frozen=True)
class KvAnswered:
    """A source's loop half answered a question its core half asked about a request."""

    source: str
    request_id: str
    answer: Any


@dataclass(frozen=True)
class KvSaved:
    """A source's save job of these G1 blocks ended (their pins may drop)."""

    source: str
    block_ids: list[int]


@dataclass(frozen=True)
class KvTierEvents:
    """A lower tier stored or removed blocks: numbered in the worker's one event log."""

    tier: str
    kind: str  # "stored" | "removed"
    hashes: list[int]


@dataclass(frozen=True)
class Snapshot:
    """Resolve `future` (on its own loop) with the KV snapshot, after publishing the events before it."""

    future: asyncio.Future


@dataclass(frozen=True)
class Lease:
    """Pin the leading run of these hashes that G1 caches for a peer's pull (block_leases.py); resolve
    `future` (on its own loop) with their block ids."""

    lease_id: str
    hashes: list[int]
    future: asyncio.Future


@dataclass(frozen=True)
class LeaseGrow:
    """Add up to `n` fresh G1 blocks to a peer's lease for G2 to fill (block_leases.py `grow`); resolve
    `future` with their ids ([]: none free, nothing added)."""

    lease_id: str
    n: int
    future: asyncio.Future


@dataclass(frozen=True)
class LeaseFilled:
    """G2 filled a lease's grown blocks (`ok` per block): publish and keep the ones that arrived
    (block_leases.py `filled`); resolve `future` with the lease's block ids."""

    lease_id: str
    hashes: list[int]
    ok: list[bool]
    future: asyncio.Future


@dataclass(frozen=True)
class Wake:
    """Nothing: ends a blocking wait of the core's thread."""


Command = (Add | Abort | KvLoaded | KvAnswered | KvSaved | KvTierEvents | Lease | LeaseGrow | LeaseFilled | Snapshot
           | Wake)

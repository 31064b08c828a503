"""The one interface every KV tier store implements (docs/ARCHITECTURE.md "Tiers"), its stats, and its health switch.

A store keeps whole blocks (`block_bytes` bytes each: one block-contiguous range of the engine's KV
cache, docs/ARCHITECTURE.md "KV layout") under their seq_hash. Every call is batched and async:

    put(hashes, srcs) -> list[bool]   True: the block is in the tier now (stored, or already there)
    get(hashes, dsts) -> list[bool]   True: dst holds exactly the bytes that were put under that hash;
                                      False: a miss. On a miss dst's contents are unspecified.
    contains(hashes)  -> list[bool]   a hint (no checksum is verified); `get` is the truth
    remove(hashes)    -> int          how many were dropped

srcs/dsts are contiguous tensors (any dtype/device) of exactly block_bytes bytes, e.g. views
`kv[block_id]` of the engine's pool; stores copy straight into/out of them where they can.

Contract of every store (checked by tests/kvbm):
- Bounded: `stats.footprint_bytes <= stats.capacity_bytes` at every instant, the bytes in flight included.
- Exact: `used_bytes == blocks * block_bytes`; `blocks == len(hashes())`; the `on_event` stream
  ("stored"/"removed") replays to exactly `hashes()`.
- Never wrong: a get that returns True returned the bytes put under that hash; anything else is a miss.
- Dedup: putting a hash already present is a no-op that refreshes its recency.
- Never raises for I/O trouble: an I/O error disables the tier (one WARNING per outage); while disabled
  gets miss and puts are dropped. Misuse (wrong tensor size) raises ValueError.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Literal, Protocol, runtime_checkable

import torch

EventKind = Literal["stored", "removed"]
EventCallback = Callable[[EventKind, list[int]], None]

log = logging.getLogger("kvrelay.kvbm.tiers")


@dataclass(slots=True)
class TierStats:
    """Exact accounting of one store. Counters are cumulative; gauges are as of the snapshot."""

    tier: str
    capacity_bytes: int = 0  # hard bound on footprint_bytes (memory / disk / this worker's objects)
    footprint_bytes: int = 0  # what the tier occupies now: pool, data file + index, objects with headers
    used_bytes: int = 0  # blocks * block_bytes
    blocks: int = 0
    hits: int = 0
    misses: int = 0
    puts: int = 0  # blocks newly stored
    dedup_puts: int = 0  # puts of a hash already present (recency refreshed)
    rejected_puts: int = 0  # dropped: no evictable room, refused by admission, or tier disabled
    evictions: int = 0
    removals: int = 0  # explicit remove() plus blocks found corrupt or gone
    checksum_failures: int = 0
    errors: int = 0  # I/O errors (each one disables the tier)
    bytes_read: int = 0
    bytes_written: int = 0
    read_seconds: float = 0.0
    write_seconds: float = 0.0
    enabled: bool = True

    def copy(self) -> TierStats:
        return replace(self)


@runtime_checkable
class TierStore(Protocol):
    tier: str  # "G2" | "G3" | "G4"
    block_bytes: int

    @property
    def stats(self) -> TierStats: ...

    @property
    def enabled(self) -> bool: ...

    async def put(self, hashes: Sequence[int], srcs: Sequence[torch.Tensor]) -> list[bool]: ...

    async def get(self, hashes: Sequence[int], dsts: Sequence[torch.Tensor]) -> list[bool]: ...

    async def contains(self, hashes: Sequence[int]) -> list[bool]: ...

    async def remove(self, hashes: Sequence[int]) -> int: ...

    def hashes(self) -> list[int]: ...

    async def close(self) -> None: ...


def as_u8(t: torch.Tensor, nbytes: int) -> torch.Tensor:
    """A flat uint8 view of a contiguous tensor of exactly nbytes bytes (no copy)."""
    if t.dtype == torch.uint8 and t.dim() == 1 and t.numel() == nbytes and t.is_contiguous():
        return t  # the fast path: rows of the G1 pool viewed as [num_blocks, block_bytes] uint8
    if not t.is_contiguous():
        raise ValueError("tier stores move contiguous block views only")
    u8 = t.reshape(-1).view(torch.uint8)
    if u8.numel() != nbytes:
        raise ValueError(f"block tensor has {u8.numel()} bytes, the tier stores {nbytes}")
    return u8


def check_batch(hashes: Sequence[int], tensors: Sequence[torch.Tensor], nbytes: int) -> list[torch.Tensor]:
    if len(hashes) != len(tensors):
        raise ValueError(f"{len(hashes)} hashes but {len(tensors)} tensors")
    return [as_u8(t, nbytes) for t in tensors]


RETRY_AFTER_S = 30.0  # default cool-down of a disabled tier before one call probes it again (half-open)


class Health:
    """A tier's on/off switch.

    `fail()` disables (one WARNING per outage, then quiet). With `retry_after_s`, once the cool-down has
    passed `allow()` lets one call through (half-open); `succeed()` re-enables (one WARNING). Without it
    the tier stays off until the store is reopened. Probes ride on traffic: the owner (TieredKv) keeps
    calling a disabled store's put/contains, which answer at once while the cool-down runs.
    """

    def __init__(self, tier: str, retry_after_s: float | None = None):
        self.tier, self.retry_after_s = tier, retry_after_s
        self.enabled = True
        self._probe_at = 0.0

    def allow(self) -> bool:
        if self.enabled:
            return True
        if self.retry_after_s is None or time.monotonic() < self._probe_at:
            return False
        self._probe_at = time.monotonic() + self.retry_after_s  # one probe per cool-down
        return True

    def fail(self, exc: BaseException | str) -> None:
        if self.enabled:
            again = f"; retrying in {self.retry_after_s:g}s" if self.retry_after_s is not None else ""
            log.warning("KV tier %s disabled, serving continues without it: %s%s", self.tier, exc, again)
        else:
            log.debug("KV tier %s still unavailable: %s", self.tier, exc)
        self.enabled = False
        self._probe_at = time.monotonic() + (self.retry_after_s or 0.0)

    def succeed(self) -> None:
        if not self.enabled:
            log.warning("KV tier %s re-enabled", self.tier)
            self.enabled = True


def emit(cb: EventCallback | None, kind: EventKind, hashes: list[int]) -> None:
    """Tell the owner (KV events, metrics); a failing callback never breaks the store's state."""
    if cb is not None and hashes:
        try:
            cb(kind, hashes)
        except Exception:
            log.exception("tier on_event callback failed")

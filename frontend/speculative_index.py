"""Speculative KV-index entries (issue 27): a routed request's prompt blocks count as held by the worker it
was routed to from the moment it is routed, before the worker's KV events confirm them.

Without them, two turns of one conversation routed within the event lag (the first one's prefill has not
ended, so its blocks are not in the `KvIndex` yet) look unrelated to the router, and a burst of requests
sharing a new prefix scatters it over every worker.

- An entry (block hash, worker) lives `ttl` seconds from its last routing, then expires: a request that
  failed before its prefill, or a worker that evicted the blocks at once, cannot keep claiming them.
- A confirmed entry is dropped (`confirm`): from then on the `KvIndex` is authoritative, so an eviction
  the worker reports is seen at once, not `ttl` later. The router confirms lazily, when a lookup finds
  the block in both.
- Memory is bounded by the blocks routed within the last `ttl` seconds (expired entries are pruned on
  every `add` and lookup).

Invariant: `_holders[h][w]` is the expiry of (h, w); every live (h, w, expiry) has an entry in `_queue`
(queued in expiry order: the clock is monotonic and `ttl` fixed), and a queue entry whose expiry no longer
matches `_holders` (refreshed or confirmed since) is skipped when it comes due. No empty dict is kept.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

from kvrelay.frontend.kv_index import KvIndex

_NONE: dict[str, float] = {}


class SpeculativeIndex:
    def __init__(self, ttl: float = 10.0, clock: Callable[[], float] = time.monotonic):
        if ttl < 0:
            raise ValueError("ttl must be >= 0")
        self.ttl, self.clock = ttl, clock
        self._holders: dict[int, dict[str, float]] = {}
        self._queue: deque[tuple[float, str, Sequence[int]]] = deque()

    def add(self, worker_id: str, hashes: Sequence[int]) -> None:
        """`worker_id` will hold `hashes` (it was just routed a prompt with them)."""
        now = self.clock()
        self.prune(now)
        if self.ttl == 0 or not hashes:
            return
        expiry = now + self.ttl
        for h in hashes:
            self._holders.setdefault(h, {})[worker_id] = expiry
        self._queue.append((expiry, worker_id, hashes))

    def holders(self, h: int) -> dict[str, float]:
        """Workers speculatively holding block `h` (-> expiry). Call `prune` first for an exact answer."""
        return self._holders.get(h, _NONE)

    def confirm(self, h: int, worker_id: str) -> None:
        """The KV index now holds (h, worker): the speculation is no longer needed."""
        ws = self._holders.get(h)
        if ws is not None and ws.pop(worker_id, None) is not None and not ws:
            del self._holders[h]

    def prune(self, now: float | None = None) -> None:
        now = self.clock() if now is None else now
        while self._queue and self._queue[0][0] <= now:
            expiry, w, hashes = self._queue.popleft()
            for h in hashes:
                ws = self._holders.get(h)
                if ws is not None and ws.get(w) == expiry:
                    del ws[w]
                    if not ws:
                        del self._holders[h]

    def __len__(self) -> int:
        """Distinct block hashes speculatively held by some worker."""
        return len(self._holders)


class Held(NamedTuple):
    """What a worker holds of a prompt's leading blocks."""

    blocks: int  # leading blocks held anywhere (G1, speculative or a weighted lower tier)
    g1: int  # of those, the leading run held in G1 or speculatively (the blocks it will hit at once)
    credit: float  # sum over the `blocks` of the best tier weight holding each (G1, speculative: 1.0)
    confirmed: int = 0  # of `g1`, the leading run its KV events confirmed (computed, not only routed there)


def held_prefix(hashes: Sequence[int], index: KvIndex, spec: SpeculativeIndex | None,
                tier_weights: Mapping[str, float]) -> dict[str, Held]:
    """Per worker holding at least the first block, what it holds of the leading `hashes`. The walk stops,
    per worker, at the first block held in no weighted tier and not speculatively. A speculative entry
    found confirmed in the index's G1 is dropped (`SpeculativeIndex.confirm`)."""
    if spec is not None:
        spec.prune()
    g1 = index.holders_view("G1")
    tiers = [(wt, index.holders_view(t)) for t, wt in tier_weights.items() if t != "G1" and wt > 0]
    out: dict[str, Held] = {}
    alive: set[str] | None = None
    for i, h in enumerate(hashes):
        step: dict[str, float] = {}
        in_g1 = g1.get(h, _EMPTY_SET)
        for w in in_g1:
            if alive is None or w in alive:
                step[w] = 1.0
        if spec is not None:
            for w in list(spec.holders(h)):
                if w in in_g1:
                    spec.confirm(h, w)
                elif alive is None or w in alive:
                    step[w] = 1.0
        for wt, holders in tiers:
            for w in holders.get(h, _EMPTY_SET):
                if (alive is None or w in alive) and step.get(w, 0.0) < wt:
                    step[w] = wt
        if not step:
            break
        for w, wt in step.items():
            blocks, g1_run, credit, confirmed = out.get(w, _NOTHING)
            out[w] = Held(i + 1, g1_run + 1 if wt >= 1.0 and g1_run == i else g1_run, credit + wt,
                          confirmed + 1 if w in in_g1 and confirmed == i else confirmed)
        alive = set(step)
    return out


_EMPTY_SET: frozenset[str] = frozenset()
_NOTHING = Held(0, 0, 0.0)

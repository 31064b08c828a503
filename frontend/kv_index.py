"""The router's index of which worker holds which KV block (docs/ARCHITECTURE.md "Block identity", "Events").

Fed by `KvEvent`s (and `KvSnapshot`s after a gap). A block is named by its chained `seq_hash`, which
already names the whole prefix before it, so the index needs no tree: a request's prefix overlap on a
worker is the number of leading hashes of the prompt that the worker holds.

Invariants:
- `_held[w][tier]` and `_holders[tier]` are two views of the same relation: `w in _holders[t][h]`
  iff `h in _held[w][t]`. No empty set is ever kept, so memory is bounded by what workers hold
  (removed events and `remove_worker` shrink it).
- Events of one worker are applied strictly in `event_id` order with no holes: an event is applied
  only if its id is `last + 1`; an id `<= last` is stale (already reflected, e.g. by a snapshot) and
  ignored; anything else is a gap, reported to the caller and *not* applied. The first event of a
  worker the index has no state for must have id 1.
- Worker ids are instance ids, unique per worker process (`workers/worker.py`), so a worker's
  event ids never restart under the same id.
- A worker removed by discovery is remembered (a bounded set of tombstones) and its late events are
  ignored, so a dead worker's blocks never come back; `add_worker` lifts the tombstone.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Collection, Mapping, Sequence

from kvrelay.kvbm.events import KvEvent, KvSnapshot

_EMPTY: frozenset[str] = frozenset()


class KvIndex:
    def __init__(self, tiers: Collection[str] = ("G1",), max_tombstones: int = 4096):
        """`tiers`: which tiers to index (events of other tiers only advance the event-id sequence)."""
        self.tiers: frozenset[str] = frozenset(tiers)
        self._holders: dict[str, dict[int, set[str]]] = {t: {} for t in self.tiers}
        self._held: dict[str, dict[str, set[int]]] = {}
        self._last: dict[str, int] = {}  # worker -> last applied event_id (or snapshot's last_event_id)
        self._tombstones: OrderedDict[str, None] = OrderedDict()
        self._max_tombstones = max_tombstones

    # -- updates ---------------------------------------------------------------------------------------
    def apply(self, event: KvEvent) -> bool:
        """Apply one event. False: a gap before it (the event is not applied; resync the worker)."""
        w = event.worker_id
        if w in self._tombstones:
            return True
        last = self._last.get(w, 0)
        if event.event_id <= last:
            return True  # stale: already reflected
        if event.event_id != last + 1:
            return False
        self._last[w] = event.event_id
        if event.tier not in self.tiers:
            return True
        if event.kind == "stored":
            self._add(w, event.tier, event.seq_hashes)
        elif event.kind == "removed":
            self._discard(w, event.tier, event.seq_hashes)
        elif event.kind == "cleared":
            self._discard(w, event.tier, list(self._held.get(w, {}).get(event.tier, ())))
        return True

    def apply_snapshot(self, snap: KvSnapshot) -> None:
        """Replace the worker's state with `snap`; later events with id <= `snap.last_event_id` are
        stale. The snapshot is authoritative even if older than what the index saw."""
        w = snap.worker_id
        self._forget(w)
        self._tombstones.pop(w, None)
        self._last[w] = snap.last_event_id
        for tier, hashes in snap.tiers.items():
            if tier in self.tiers:
                self._add(w, tier, hashes)

    def remove_worker(self, worker_id: str, tombstone: bool = True) -> None:
        """Drop everything of a worker. With `tombstone`, its late events are ignored afterwards
        (discovery says it left); without, the next event from it starts over (id 1 or a gap)."""
        self._forget(worker_id)
        if tombstone:
            self._tombstones[worker_id] = None
            self._tombstones.move_to_end(worker_id)
            while len(self._tombstones) > self._max_tombstones:
                self._tombstones.popitem(last=False)

    def add_worker(self, worker_id: str) -> None:
        """Discovery says the worker is (back) up: accept its events again."""
        self._tombstones.pop(worker_id, None)

    # -- queries ---------------------------------------------------------------------------------------
    def overlap(self, hashes: Sequence[int], tier: str = "G1") -> dict[str, int]:
        """Per worker, the number of leading `hashes` it holds in `tier` (workers with 0 are absent)."""
        holders = self._holders.get(tier)
        out: dict[str, int] = {}
        if not holders or not hashes:
            return out
        alive: set[str] = set(holders.get(hashes[0], _EMPTY))
        depth = 0
        # Invariant: `alive` = workers holding hashes[0..depth-1] and hashes[depth]; each step keeps
        # only those that also hold the next block, recording the depth where the others stopped.
        while alive:
            depth += 1
            if depth == len(hashes):
                break
            nxt = alive.intersection(holders.get(hashes[depth], _EMPTY))
            for w in alive.difference(nxt):
                out[w] = depth
            alive = nxt
        for w in alive:
            out[w] = depth
        return out

    def weighted_overlap(self, hashes: Sequence[int], weights: Mapping[str, float]) -> dict[str, float]:
        """Per worker, the sum over the leading blocks it holds in *any* weighted tier of the best weight
        among the tiers holding each block (G1 = 1.0 and a lower tier 0.5: a block in G2 costs half a
        prefill). The walk stops, per worker, at the first block held in none of them."""
        tiers = [(t, wt, self._holders[t]) for t, wt in weights.items() if t in self._holders and wt > 0]
        out: dict[str, float] = {}
        alive: set[str] | None = None
        for h in hashes:
            credit: dict[str, float] = {}
            for _, wt, holders in tiers:
                for w in holders.get(h, _EMPTY):
                    if (alive is None or w in alive) and credit.get(w, 0.0) < wt:
                        credit[w] = wt
            if not credit:
                break
            alive = set(credit)
            for w, wt in credit.items():
                out[w] = out.get(w, 0.0) + wt
        return out

    def holders_view(self, tier: str = "G1") -> Mapping[int, Collection[str]]:
        """Block hash -> workers holding it in `tier`: the index's own map, read-only for the caller
        (a router walking a prompt block by block; copying it per request would cost more than routing)."""
        return self._holders.get(tier, {})

    def workers(self) -> set[str]:
        """Workers the index has state for (a snapshot or at least one event)."""
        return set(self._last)

    def last_event_id(self, worker_id: str) -> int:
        return self._last.get(worker_id, 0)

    def blocks(self, worker_id: str, tier: str = "G1") -> frozenset[int]:
        return frozenset(self._held.get(worker_id, {}).get(tier, ()))

    def num_hashes(self, tier: str = "G1") -> int:
        return len(self._holders.get(tier, {}))

    # -- internals -------------------------------------------------------------------------------------
    def _add(self, w: str, tier: str, hashes: Sequence[int]) -> None:
        held = self._held.setdefault(w, {}).setdefault(tier, set())
        holders = self._holders[tier]
        for h in hashes:
            if h not in held:
                held.add(h)
                holders.setdefault(h, set()).add(w)

    def _discard(self, w: str, tier: str, hashes: Sequence[int]) -> None:
        per_tier = self._held.get(w)
        held = per_tier.get(tier) if per_tier else None
        if not held:
            return
        assert per_tier is not None  # held came from it
        holders = self._holders[tier]
        for h in hashes:
            if h in held:
                held.discard(h)
                ws = holders[h]
                ws.discard(w)
                if not ws:
                    del holders[h]
        if not held:
            del per_tier[tier]
            if not per_tier:
                del self._held[w]

    def _forget(self, w: str) -> None:
        for tier, held in list(self._held.get(w, {}).items()):
            self._discard(w, tier, list(held))
        self._held.pop(w, None)
        self._last.pop(w, None)

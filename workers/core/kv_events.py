"""A worker's KV events for every tier, numbered in one place (docs/ARCHITECTURE.md "Events").

G1 events come from the engine's own pool; G2/G3/G4 events come from the tier stores on the event loop
and are handed to the engine thread, which numbers them here too. So `event_id` is monotonic across all
tiers, and `snapshot()` (G1 from the pool, lower tiers from the mirrors kept here) reflects exactly the
events numbered up to its `last_event_id`.
"""

from __future__ import annotations

from collections.abc import Iterable

from kvrelay.kvbm.events import KvEvent, KvSnapshot


class KvEventLog:
    def __init__(self) -> None:
        self.events: list[KvEvent] = []  # drained by the owner after each step
        self.last_event_id = 0
        self.lower: dict[str, dict[int, None]] = {}  # tier -> hashes it holds (insertion-ordered)

    def emit(self, kind: str, tier: str, hashes: list[int], parent: int | None = None) -> None:
        self.last_event_id += 1
        self.events.append(KvEvent(worker_id="", event_id=self.last_event_id, kind=kind, tier=tier,  # type: ignore[arg-type]  # kind: str from the tier sinks, checked by KvEvent's Literal on decode
                                   seq_hashes=hashes, parent_hash=parent))

    def g1_stored(self, hashes: list[int], parent: int | None) -> None:
        self.emit("stored", "G1", hashes, parent)

    def g1_removed(self, hashes: list[int]) -> None:
        self.emit("removed", "G1", hashes)

    def tier_event(self, tier: str, kind: str, hashes: list[int]) -> None:
        held = self.lower.setdefault(tier, {})
        if kind == "stored":
            new = [h for h in hashes if h not in held]
            held.update(dict.fromkeys(new))
        else:
            new = [h for h in hashes if h in held]
            for h in new:
                del held[h]
        if new:
            self.emit(kind, tier, new)

    def drain(self) -> list[KvEvent]:
        events, self.events = self.events, []
        return events

    def snapshot(self, g1: Iterable[int]) -> KvSnapshot:
        tiers = {"G1": list(g1)}
        tiers.update({t: list(held) for t, held in self.lower.items()})
        return KvSnapshot(worker_id="", last_event_id=self.last_event_id, tiers=tiers)

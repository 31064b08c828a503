"""The slot table of the fixed-slot stores (G2, G3): which slot holds which seq_hash, which slots are
pinned by I/O in flight, and `coalesce`, which turns runs of neighbouring blocks into one copy."""

from __future__ import annotations

import torch

from .policy import EvictionPolicy

Item = tuple[int, int, torch.Tensor]  # (seq_hash, slot, flat uint8 view of the caller's tensor)


def coalesce(items: list[Item], nbytes: int) -> list[tuple[list[Item], torch.Tensor]]:
    """Items (sorted by slot) grouped where the slots are consecutive and the caller's tensors are
    adjacent in one storage, each group with one flat view over its caller bytes: one copy_ per group
    instead of one per block (engines often hand over runs of neighbouring G1 blocks)."""
    out: list[tuple[list[Item], torch.Tensor]] = []
    ptrs = [it[2].data_ptr() for it in items]
    start = 0
    for k in range(1, len(items) + 1):
        if k < len(items) and items[k][1] == items[k - 1][1] + 1 and ptrs[k] == ptrs[k - 1] + nbytes:
            a, b = items[k - 1][2], items[k][2]
            if a.device == b.device and a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr():
                continue
        first = items[start][2]
        if k - start > 1:
            first = torch.empty(0, dtype=torch.uint8, device=first.device).set_(
                first.untyped_storage(), first.storage_offset(), ((k - start) * nbytes,), (1,))
        out.append((items[start:k], first))
        start = k
    return out


class SlotTable:
    """Which slot holds which seq_hash. Every slot is in exactly one state:

    free       in `free`, holds nothing
    committed  `map[h] == slot`: bytes valid, known to the policy, readable
    pending    `pending[h] == slot`: a put is writing it; neither readable nor evictable
    doomed     dropped (removed, corrupt) while a reader still pins it; freed at its last unpin
    A pinned slot (a read or write in flight) is never chosen as a victim, so a reader can never see
    another hash's bytes: the "never a wrong block" guarantee of G2, and of G3 besides its checksums.
    """

    def __init__(self, num_slots: int, policy: EvictionPolicy):
        self.num_slots, self.policy = num_slots, policy
        self.map: dict[int, int] = {}
        self.pending: dict[int, int] = {}
        self.free: list[int] = list(range(num_slots - 1, -1, -1))  # pop() hands out 0, 1, 2, ...
        self.pins: dict[int, int] = {}
        self.doomed: set[int] = set()

    def has(self, h: int) -> bool:
        return h in self.map or h in self.pending

    def lookup(self, h: int) -> int | None:
        """The committed slot of h, pinned (the caller unpins), recency refreshed."""
        slot = self.map.get(h)
        if slot is not None:
            self.pins[slot] = self.pins.get(slot, 0) + 1
            self.policy.touch(h)
        return slot

    def reserve(self, h: int) -> tuple[int, int | None] | None:
        """A pinned slot for writing h, and the hash evicted to get it; None: no room or not admitted."""
        evicted = None
        if self.free:
            slot = self.free.pop()
        else:
            victim = self.policy.victim(lambda k: self.map[k] in self.pins)
            if victim is None or not self.policy.admit(h, victim):
                return None
            slot = self.map.pop(victim)
            self.policy.remove(victim)
            evicted = victim
        self.pending[h] = slot
        self.pins[slot] = 1
        return slot, evicted

    def evict(self, h: int) -> tuple[int, int] | None:
        """Evict one idle block to make room for h elsewhere (variable-size G3: room is bytes, not
        slots): (victim, its slot), the slot left pinned and doomed (the caller punches it, then
        unpins: it is freed then). None: nothing evictable, or the policy does not admit h."""
        victim = self.policy.victim(lambda k: self.map[k] in self.pins)
        if victim is None or not self.policy.admit(h, victim):
            return None
        slot = self.map.pop(victim)
        self.policy.remove(victim)
        self.pins[slot] = 1
        self.doomed.add(slot)
        return victim, slot

    def take_free(self, slot: int) -> bool:
        """Take a free slot out of the free list, pinned and doomed (as `evict` leaves one); False if it
        is not free (pinned by a reader, or handed out again)."""
        if slot in self.pins:
            return False
        try:
            self.free.remove(slot)  # O(free slots): only for leftovers of removed or corrupt blocks
        except ValueError:
            return False
        self.pins[slot] = 1
        self.doomed.add(slot)
        return True

    def commit(self, h: int) -> None:
        slot = self.pending.pop(h)
        self.map[h] = slot
        self.policy.insert(h)
        self.unpin(slot)

    def abort(self, h: int) -> None:
        slot = self.pending.pop(h)
        self.doomed.add(slot)
        self.unpin(slot)

    def drop(self, h: int) -> int | None:
        """Forget committed h; its slot is freed now, or at its last unpin. Returns the slot."""
        slot = self.map.pop(h, None)
        if slot is not None:
            self.policy.remove(h)
            if slot in self.pins:
                self.doomed.add(slot)
            else:
                self.free.append(slot)
        return slot

    def unpin(self, slot: int) -> None:
        n = self.pins[slot] - 1
        if n:
            self.pins[slot] = n
            return
        del self.pins[slot]
        if slot in self.doomed:
            self.doomed.discard(slot)
            self.free.append(slot)

    def restore(self, entries: list[tuple[int, int]]) -> None:
        """Committed (hash, slot) pairs found on open, oldest first (that is the LRU order rebuilt)."""
        for h, slot in entries:
            self.map[h] = slot
            self.policy.insert(h)
        used = set(self.map.values())
        self.free = [s for s in range(self.num_slots - 1, -1, -1) if s not in used]

    def check(self) -> None:
        """Assert the invariants (tests)."""
        committed, pending = set(self.map.values()), set(self.pending.values())
        parts = [committed, pending, set(self.free), self.doomed]
        assert sum(map(len, parts)) == self.num_slots == len(set().union(*parts)), "slot states overlap"
        assert len(committed) == len(self.map) and len(pending) == len(self.pending)
        assert set(self.policy) == set(self.map), "policy keys != committed keys"
        assert pending <= set(self.pins) and self.doomed <= set(self.pins)

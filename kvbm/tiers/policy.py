"""Eviction and admission policies for the tier stores. Keys are seq_hashes of committed blocks.

The store owns capacity; a policy answers two questions: which key goes next (`victim`), and should a
newcomer displace that victim (`admit`).

- `lru` (default): evicts the least recently used key; admits everything.
- `tinylfu`: the same LRU order plus TinyLFU admission (Einziger, Friedman, Manes, "TinyLFU: A Highly
  Efficient Cache Admission Policy", 2017): a count-min sketch of recent access frequency (4-bit
  counters, all halved every `10 * capacity` recorded accesses so old popularity fades), and a newcomer
  replaces the LRU victim only if it has been seen more often. A burst of one-hit blocks (a long unique
  prompt, a scan) then cannot flush the blocks many requests share. The price: while the tier is full,
  a block seen once is not stored until it is asked for again.

Invariants: the keys are exactly those inserted and not removed; `victim` never returns a key `skip`
rejects; every operation is O(1) except `victim`'s walk past skipped (pinned, in-flight) keys.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Protocol


class EvictionPolicy(Protocol):
    def insert(self, key: int) -> None: ...  # a newly committed key, most recent

    def touch(self, key: int) -> None: ...  # a hit or a dedup put refreshes recency

    def remove(self, key: int) -> None: ...

    def record(self, key: int) -> None: ...  # every get/put attempt, hit or miss (frequency)

    def victim(self, skip: Callable[[int], bool] | None = None) -> int | None: ...

    def admit(self, candidate: int, victim: int) -> bool: ...

    def __len__(self) -> int: ...

    def __contains__(self, key: object) -> bool: ...

    def __iter__(self) -> Iterator[int]: ...  # eviction order, next victim first


class LRUPolicy:
    def __init__(self, capacity: int = 0):
        self._order: OrderedDict[int, None] = OrderedDict()

    def insert(self, key: int) -> None:
        self._order[key] = None
        self._order.move_to_end(key)

    def touch(self, key: int) -> None:
        if key in self._order:
            self._order.move_to_end(key)

    def remove(self, key: int) -> None:
        self._order.pop(key, None)

    def record(self, key: int) -> None:
        pass

    def victim(self, skip: Callable[[int], bool] | None = None) -> int | None:
        for key in self._order:
            if skip is None or not skip(key):
                return key
        return None

    def admit(self, candidate: int, victim: int) -> bool:
        return True

    def __len__(self) -> int:
        return len(self._order)

    def __contains__(self, key: object) -> bool:
        return key in self._order

    def __iter__(self) -> Iterator[int]:
        return iter(self._order)


_HALVE = bytes(i >> 1 for i in range(256))
_SEEDS = (0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9, 0xD6E8FEB86659FD93)
_M64 = (1 << 64) - 1


class FrequencySketch:
    """Count-min sketch: 4 rows of 4-bit saturating counters (one byte each), periodic halving."""

    def __init__(self, capacity: int):
        self.bits = max(4, (max(1, capacity) - 1).bit_length() + 1)  # width >= 2 * capacity
        self.width = 1 << self.bits
        self.table = bytearray(4 * self.width)
        self.sample = 10 * max(1, capacity)
        self.additions = 0

    def _slots(self, key: int) -> list[int]:
        shift = 64 - self.bits
        return [r * self.width + (((key * s) & _M64) >> shift) for r, s in enumerate(_SEEDS)]

    def add(self, key: int) -> None:
        t = self.table
        for i in self._slots(key):
            if t[i] < 15:
                t[i] += 1
        self.additions += 1
        if self.additions >= self.sample:
            self.table = self.table.translate(_HALVE)  # age: halve every counter
            self.additions //= 2

    def estimate(self, key: int) -> int:
        t = self.table
        return min(t[i] for i in self._slots(key))


class TinyLFUPolicy(LRUPolicy):
    def __init__(self, capacity: int):
        super().__init__(capacity)
        self.sketch = FrequencySketch(capacity)

    def record(self, key: int) -> None:
        self.sketch.add(key)

    def admit(self, candidate: int, victim: int) -> bool:
        return self.sketch.estimate(candidate) > self.sketch.estimate(victim)


POLICIES: dict[str, type[LRUPolicy]] = {"lru": LRUPolicy, "tinylfu": TinyLFUPolicy}


def make_policy(name: str, capacity: int) -> EvictionPolicy:
    try:
        return POLICIES[name](capacity)
    except KeyError:
        raise ValueError(f"unknown tier policy {name!r}; choose one of {sorted(POLICIES)}") from None

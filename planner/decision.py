"""Decisions: desired worker counts per pool, with the reason for each, and the bounds they respect."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from kvrelay.planner.observation import Pool


@dataclass(frozen=True)
class Decision:
    counts: dict[Pool, int]
    reasons: dict[Pool, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for pool, n in self.counts.items():  # the invariant the NaN complaint (Dynamo #3132) broke
            if not isinstance(n, int) or n < 0:
                raise ValueError(f"{pool.value}: a decision is a count >= 0, got {n!r}")


@dataclass(frozen=True)
class Bounds:
    min_prefill: int = 0
    max_prefill: int = 8
    min_decode: int = 1
    max_decode: int = 8
    budget: int = 16  # most workers of both pools together (the GPU budget)

    def check(self) -> str | None:
        if not 0 <= self.min_prefill <= self.max_prefill:
            return "--min-prefill/--max-prefill: need 0 <= min <= max"
        if not 0 <= self.min_decode <= self.max_decode:
            return "--min-decode/--max-decode: need 0 <= min <= max"
        if self.budget < self.min_prefill + self.min_decode:
            return "--budget: smaller than the pools' minimums together"
        return None

    def limits(self, pool: Pool) -> tuple[int, int]:
        return ((self.min_prefill, self.max_prefill) if pool is Pool.PREFILL
                else (self.min_decode, self.max_decode))

    def apply(self, desired: Mapping[Pool, float], reasons: dict[Pool, str]) -> Decision:
        """Clamp to [min, max] per pool, then fit the budget by taking from the pool furthest above its
        minimum relative to its size (both shrink in proportion). Non-finite input (never expected)
        keeps the pool at its minimum rather than propagating NaN."""
        counts: dict[Pool, int] = {}
        reasons = dict(reasons)
        for pool in Pool:
            lo, hi = self.limits(pool)
            raw = desired.get(pool, lo)
            n = lo if not math.isfinite(raw) else min(hi, max(lo, math.ceil(raw - 1e-9)))
            if n != raw and math.isfinite(raw) and int(raw) == raw:
                reasons[pool] = f"{reasons.get(pool, '')}; clamped to [{lo}, {hi}]".lstrip("; ")
            counts[pool] = n
        while sum(counts.values()) > self.budget:
            pool = max((p for p in Pool if counts[p] > self.limits(p)[0]),
                       key=lambda p: counts[p] - self.limits(p)[0])
            counts[pool] -= 1
            note = f"trimmed to fit budget {self.budget}"
            if note not in reasons.get(pool, ""):
                reasons[pool] = f"{reasons.get(pool, '')}; {note}".lstrip("; ")
        return Decision(counts, reasons)

"""What the planner sees each interval: one `Observation` (frontend-wide) with a `PoolObservation` per pool.

Every average is `None` when its window had no samples (an idle window): policies must treat `None` as
"unknown", never divide by it, so no decision is ever NaN (Dynamo PR #3132).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum


class Pool(str, Enum):
    PREFILL = "prefill"
    DECODE = "decode"  # aggregated workers count as the decode pool: they decode (and prefill locally)


@dataclass(frozen=True)
class PoolObservation:
    workers: int = 0  # registered (ready) workers of the pool
    running: float = 0.0  # sequences running, summed over the pool
    waiting: float = 0.0  # sequences queued, summed over the pool
    kv_usage: float = 0.0  # used / total G1 blocks over the pool, in [0, 1]
    capacity_seqs: int = 0  # sum of the workers' max_num_seqs (0 = unknown)
    prompt_tokens_rate: float = 0.0  # prompt tokens/s received by the pool
    generated_tokens_rate: float = 0.0

    @property
    def in_flight(self) -> float:
        return self.running + self.waiting


@dataclass(frozen=True)
class Observation:
    interval_s: float
    request_rate: float = 0.0  # requests/s finished at the frontend in the window
    arrival_rate: float | None = None  # requests/s that arrived (finished + growth of in-flight); None = unknown
    isl: float | None = None  # mean prompt length of the window's requests
    osl: float | None = None  # mean completion length
    ttft_p90: float | None = None  # seconds
    itl_p90: float | None = None
    hit_rate: float | None = None  # prompt tokens served from cache / prompt tokens
    pools: dict[Pool, PoolObservation] = field(default_factory=dict)

    def pool(self, pool: Pool) -> PoolObservation:
        return self.pools.get(pool, PoolObservation())

    @property
    def idle(self) -> bool:
        """Nothing finished, nothing running or queued anywhere."""
        return self.request_rate == 0 and all(p.in_flight == 0 for p in self.pools.values())

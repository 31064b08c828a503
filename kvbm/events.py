"""KV events and load metrics on the event plane (docs/ARCHITECTURE.md "Events").

Subjects: `kvrelay.<namespace>.kv_events` and `kvrelay.<namespace>.load`.
A worker numbers its KV events 1, 2, 3, ... (`event_id`, monotonic per worker instance); a consumer
that sees a gap resyncs from the worker's snapshot (`KvSnapshot`), whose `last_event_id` says which
events it already reflects.
"""

from __future__ import annotations

from typing import Literal

import msgspec


class KvEvent(msgspec.Struct, frozen=True, kw_only=True, array_like=True):
    worker_id: str
    event_id: int
    kind: Literal["stored", "removed", "cleared"]
    tier: str = "G1"  # G1 | G2 | G3 | G4
    seq_hashes: list[int] = []  # stored: a chain in prefix order; removed: any hashes
    parent_hash: int | None = None  # stored: hash of the block before seq_hashes[0] (None: first block)


class KvSnapshot(msgspec.Struct, frozen=True, kw_only=True):
    """Everything a worker holds, per tier, as of `last_event_id`."""

    worker_id: str
    last_event_id: int
    tiers: dict[str, list[int]] = {}


class LoadMetrics(msgspec.Struct, frozen=True, kw_only=True):
    worker_id: str
    running: int
    waiting: int
    used_blocks: int
    total_blocks: int
    timestamp: float  # time.time() at the worker
    # Prompt tokens per second of its recent prefill steps (the kv router's expected-TTFT rate); 0: not
    # known yet (no prefill since it started, or an engine that does not count it).
    prefill_rate: float = 0.0
    # Per lower tier, the bytes per second it has delivered into G1 so far (onboard bytes / onboard
    # seconds: raw G1 bytes, so a codec tier's decode time is in it: its effective bandwidth); tiers
    # that have not onboarded yet are absent.
    tier_onboard_rates: dict[str, float] = {}

    @property
    def kv_usage(self) -> float:
        return self.used_blocks / self.total_blocks if self.total_blocks else 0.0


def kv_events_subject(namespace: str) -> str:
    return f"kvrelay.{namespace}.kv_events"


def load_subject(namespace: str) -> str:
    return f"kvrelay.{namespace}.load"

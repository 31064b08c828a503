"""The engine side of the prefill -> decode KV handoff, owned by the engine core (every engine
that schedules with `core.scheduler.Scheduler`). See DESIGN.md "Disaggregation" and workers/protocol.py.

Invariant: a handle is used only if it describes exactly this sequence's prompt under this engine's
model fingerprint and block size; anything else is recomputed. A wrong pull is never possible: at
worst a handle is ignored.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvrelay.workers.api.messages import KvHandle
from kvrelay.workers.core.scheduler import Scheduler
from kvrelay.workers.core.sequence import Sequence


@dataclass(frozen=True)
class PullPlan:
    """Engine -> its asyncio side: pull `handle.block_ids[start:]` into `local_block_ids`. A plan with
    `recompute` set pulls nothing (the sequence waits to be recomputed); the lease is still released."""

    local_block_ids: list[int]
    start: int
    recompute: bool = False


@dataclass
class HandoffCounters:
    remote_prefills: int = 0  # decode role: requests that came with a handle
    pulled_blocks: int = 0
    pull_failures: int = 0  # handles recomputed instead (no blocks, unusable handle, failed pull)


def plan_pull(scheduler: Scheduler, seq: Sequence, handle: KvHandle, fingerprint: str,
              counters: HandoffCounters) -> PullPlan:
    """`seq` was just added (waiting) with the handle's first token appended; give it blocks to pull into."""
    counters.remote_prefills += 1
    bs = scheduler.cfg.block_size
    usable = (handle.fingerprint == fingerprint and handle.num_tokens == len(seq.prompt)
              and len(handle.block_ids) == -(-handle.num_tokens // bs))
    start = scheduler.take_remote(seq) if usable else None
    if start is None:
        counters.pull_failures += 1
        return PullPlan([], len(handle.block_ids), recompute=True)
    return PullPlan([b.block_id for b in seq.blocks[start:]], start)


def finish_pull(scheduler: Scheduler, seq: Sequence | None, plan: PullPlan, ok: bool,
                counters: HandoffCounters) -> None:
    if seq is None or plan.recompute:
        return
    if ok:
        counters.pulled_blocks += len(plan.local_block_ids)
    else:
        counters.pull_failures += 1
    scheduler.pulled(seq, ok)

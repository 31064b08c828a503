"""The engine side of onboarding from lower tiers (kvbm/tiered_kv.py), owned by the core
for every engine that schedules with `core.scheduler.Scheduler`.

Flow: the loop looks the prompt's blocks up in the tiers (`TieredKv.lookup`) before adding the request;
the engine thread walks the prompt's blocks (G1 hit or in a lower tier), keeps the prefix the cost
model says is worth loading (`CostModel.best_cut`), allocates G1 blocks for the ones to load and hands
the loop a ticket; the loop fills them (`TieredKv.onboard`) and reports per block; the engine runs the
request from the longest prefix that arrived intact. Anything that did not arrive is recomputed.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from dataclasses import dataclass
from typing import TYPE_CHECKING

from kvrelay.kvbm.cost_model import CostModel
from kvrelay.workers.core.scheduler import Scheduler
from kvrelay.workers.core.sequence import Sequence

if TYPE_CHECKING:  # tiered_kv imports torch: loaded only once a worker has lower tiers
    from kvrelay.kvbm.tiered_kv import OnboardPlan


@dataclass(frozen=True)
class OnboardTicket:
    plan: OnboardPlan  # what the loop loads, and into which G1 blocks
    fresh_idx: list[int]  # where those blocks sit in the sequence's block list


def plan_onboard(scheduler: Scheduler, seq: Sequence, in_lower: Seq[str | None], cost: CostModel) -> OnboardTicket | None:
    """`in_lower[i]`: the tier holding prompt block i (None: no lower tier). None if nothing is worth
    loading or blocks are short: the request then prefills as usual."""

    def cut(needs_load: list[bool]) -> int:
        return cost.best_cut([in_lower[i] if load else None for i, load in enumerate(needs_load)])

    from kvrelay.kvbm.tiered_kv import OnboardPlan

    fresh_idx = scheduler.take_onboard(seq, [t is not None for t in in_lower], cut)
    if fresh_idx is None:
        return None
    hashes = seq.hasher.hashes
    plan = OnboardPlan(hashes=[hashes[i] for i in fresh_idx], block_ids=[seq.blocks[i].block_id for i in fresh_idx],
                       tiers=[in_lower[i] or "" for i in fresh_idx])
    return OnboardTicket(plan, fresh_idx)

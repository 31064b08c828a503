"""The lower tiers G2/G3/G4 (kvbm/tiered_kv.py) as a KV source (core half): which of a sequence's blocks
to load from them (the cost model, `CostModel.best_cut`), and which G1 blocks to save into them
(`OffloadTracker`, save_pins.py: write-back on release or write-through on publish). The I/O is the
loop half's (tiers_loop.py).

Where the answer comes from: for a new request, the loop half looked its prompt up before queueing it
(the `hint`: per leading block, the fastest tier holding it, or None). A preempted sequence whose
computed blocks left G1 while it waited asks again (`TierLookup`): `match` says "not known yet" and the
scheduler parks it until the answer comes (`answered`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from kvrelay.kvbm.cost_model import CostModel
from kvrelay.workers.api.messages import EngineRequest
from kvrelay.workers.core.commands import Command, KvAnswered, KvLoaded, KvSaved
from kvrelay.workers.core.kv_cache import KvCache
from kvrelay.workers.core.kv_sources.save_pins import OffloadTracker
from kvrelay.workers.core.kv_sources.source import NO_MATCH, Match
from kvrelay.workers.core.sequence import Sequence

NAME = "tiers"
Tiers = list[str | None]  # per leading block: the tier holding it, or None (none, or G1 has it)


@dataclass(frozen=True)
class TierLookup:
    """Which tier holds each of these blocks (a preempted sequence's); answered with `KvAnswered`."""

    source: ClassVar[str] = NAME
    request_id: str
    hashes: list[int]

    def failed(self) -> Command:
        return KvAnswered(NAME, self.request_id, [])


@dataclass(frozen=True)
class TierLoad:
    """Fill G1 `block_ids[i]` with block `hashes[i]`, found in `tiers[i]`; answered with `KvLoaded`."""

    source: ClassVar[str] = NAME
    request_id: str
    hashes: list[int]
    block_ids: list[int]
    tiers: list[str]

    def failed(self) -> Command:
        return KvLoaded(NAME, self.request_id, [False] * len(self.hashes))


@dataclass(frozen=True)
class TierSave:
    """Copy these pinned G1 blocks into every tier; answered with `KvSaved` once all are done."""

    source: ClassVar[str] = NAME
    hashes: list[int]
    block_ids: list[int]

    def failed(self) -> Command:
        return KvSaved(NAME, self.block_ids)


def load_plan(found: Tiers, in_g1: list[bool], cost: CostModel, limit: int | None = None) -> Tiers:
    """Which of a sequence's leading blocks to take, one engine-neutral rule for every engine (the native
    core here, vLLM's tier connector in its worker process): walk the blocks while G1 (`in_g1[i]`) or a
    lower tier (`found[i]`) holds each, at most `limit` of them needing a load, and keep the prefix the
    cost model says saves the most time. Per kept block: None (G1 has it) or the tier to load it from."""
    plan: Tiers = []
    loads = 0
    for i, tier in enumerate(found):
        if i < len(in_g1) and in_g1[i]:
            plan.append(None)
            continue
        if tier is None or (limit is not None and loads >= limit):
            break
        plan.append(tier)
        loads += 1
    return plan[:cost.best_cut(plan)]


class TierSource:
    name = NAME

    def __init__(self, kv: KvCache, block_size: int, mode: str, cost: CostModel):
        self.kv, self.block_size, self.cost = kv, block_size, cost
        self.pins = OffloadTracker(kv.pool, mode, max_pinned=kv.num_blocks // 4)
        self.hints: dict[str, Tiers] = {}  # request id -> the tiers holding its leading blocks
        self.lost: dict[str, int] = {}  # preempted: full blocks it had computed
        self.plans: dict[str, Tiers] = {}  # the last match's per-block tiers (None: G1 has it)
        self.again: dict[str, bool] = {}  # loading: a sequence admitted before (a preempted one)
        self.onboarded_blocks = 0
        self.reonboarded_blocks = 0  # of those, blocks of preempted sequences
        self._jobs: list[Any] = []

    def add(self, seq: Sequence, request: EngineRequest, hint: Any) -> None:
        if hint and any(hint):
            self.hints[seq.request_id] = hint

    def match(self, seq: Sequence, local_blocks: int) -> Match | None:
        rid = seq.request_id
        lost = self.lost.pop(rid, 0)
        if lost > local_blocks:  # G1 lost some of what it had computed: ask where they went
            self._jobs.append(TierLookup(rid, seq.hasher.hashes[:lost]))
            return None
        hint = self.hints.get(rid)  # kept until a load starts: blocks may be short now, not next step
        if hint is None:
            return NO_MATCH
        hashes = seq.hasher.hashes[:(seq.num_tokens - 1) // self.block_size]  # never the last token's block
        found = (hint + [None] * len(hashes))[:len(hashes)]
        src = load_plan(found, [h in self.kv.cached for h in hashes], self.cost)
        if len(src) <= local_blocks:
            return NO_MATCH
        self.plans[rid] = src
        return Match((len(src) - local_blocks) * self.block_size, reuse_cached=True)

    def allocated(self, seq: Sequence, fresh: list[int] | None) -> None:
        plan = self.plans.pop(seq.request_id)
        if fresh is None:
            return  # blocks are short: asked again when the sequence is next at the head
        del self.hints[seq.request_id]
        self.again[seq.request_id] = seq.admitted
        self._jobs.append(TierLoad(seq.request_id, [seq.hasher.hashes[i] for i in fresh],
                                   [seq.blocks[i].block_id for i in fresh], [plan[i] or "" for i in fresh]))

    def arrived(self, seq: Sequence, fresh: list[int], kept: int) -> None:
        n = sum(1 for i in fresh if i < kept)
        self.onboarded_blocks += n
        self.reonboarded_blocks += n if self.again.pop(seq.request_id, False) else 0

    def answered(self, request_id: str, answer: Any) -> None:
        if answer and any(answer):
            self.hints[request_id] = answer

    def preempted(self, seq: Sequence, computed_blocks: int) -> None:
        if computed_blocks:
            self.lost[seq.request_id] = computed_blocks

    def finished(self, request_id: str) -> None:
        for d in (self.hints, self.lost, self.plans, self.again):
            d.pop(request_id, None)

    def saved(self, block_ids: list[int]) -> None:
        self.pins.done(block_ids)

    def take_jobs(self) -> list[Any]:
        batch = self.pins.take()
        if batch is not None:
            self._jobs.append(TierSave(*batch))
        jobs, self._jobs = self._jobs, []
        return jobs

    def observe_step(self, prefill_tokens: int, seconds: float) -> None:
        self.cost.observe_prefill(prefill_tokens, seconds)

    def counters(self) -> dict[str, int]:
        return {"onboarded_blocks": self.onboarded_blocks, "reonboarded_blocks": self.reonboarded_blocks,
                "offload_pinned": self.pins.pinned, "offload_skipped": self.pins.skipped}

    def close(self) -> None:
        self.pins.release_all()

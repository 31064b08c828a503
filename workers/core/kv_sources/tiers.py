"""The lower tiers G2/G3/G4 (kvbm/tiered_kv.py) as a KV source (core half), one tier logic for every
engine: which of a sequence's blocks to load from the tiers (`load_plan`, the cost model's
`CostModel.best_cut`), and, on the native core, which G1 blocks to save into them (`OffloadTracker`,
save_pins.py: write-back on release or write-through on publish). The I/O is the loop half's
(tiers_loop.py on the native core; under vLLM, its worker process: engines/vllm/tier_worker.py).

Where the answer comes from: the tiers that hold each leading block (a *hint*). On the native core the
loop half looked a new request's prompt up before queueing it (`add`'s hint). Otherwise the source asks
(`TierLookup`), `match` says "not known yet" and the sequence waits for KV until `answered`: under vLLM
for every request (`ask_first`: its scheduler has no loop half to look up before), and on both for a
sequence whose G1 hit shrank below what the hint assumed (a preempted sequence whose computed blocks
left G1 while it waited; vLLM evicting part of a hit before admission).

What it reads of a sequence (`TierSeq`): its id, its block hashes, its length, its blocks' ids, and
whether it was admitted before; the native core's `Sequence` is one, vLLM's adapter builds one.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Sequence as Seq
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

from kvrelay.kvbm.cost_model import CostModel
from kvrelay.workers.api.messages import EngineRequest
from kvrelay.workers.core.commands import Command, KvAnswered, KvLoaded, KvSaved
from kvrelay.workers.core.kv_sources.save_pins import OffloadTracker
from kvrelay.workers.core.kv_sources.source import NO_MATCH, Match

NAME = "tiers"
Tiers = list[str | None]  # per leading block: the tier holding it, or None (none, or G1 has it)


class _Hashes(Protocol):
    @property
    def hashes(self) -> list[int]: ...


class _Block(Protocol):
    @property
    def block_id(self) -> int: ...


class TierSeq(Protocol):
    """What the tier source reads of a sequence."""

    @property
    def request_id(self) -> str: ...
    @property
    def hasher(self) -> _Hashes: ...  # its full blocks' hashes, at least up to the last loadable block
    @property
    def num_tokens(self) -> int: ...
    @property
    def blocks(self) -> Seq[_Block]: ...  # the engine's blocks, once allocated
    @property
    def admitted(self) -> bool: ...  # it was admitted before (a preempted sequence)


@dataclass(frozen=True)
class TierLookup:
    """Which tier holds each of these blocks; answered with `KvAnswered` (per block: a tier or None).
    `local`: the leading blocks G1 holds now (they need no tier; an answer may leave them None)."""

    source: ClassVar[str] = NAME
    request_id: str
    hashes: list[int]
    local: int = 0

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


def load_plan(found: Tiers, in_g1: list[bool], cost: CostModel | None, limit: int | None = None) -> Tiers:
    """Which of a sequence's leading blocks to take, one engine-neutral rule for every engine: walk the
    blocks while G1 (`in_g1[i]`) or a lower tier (`found[i]`) holds each, at most `limit` of them needing
    a load, and keep the prefix the cost model says saves the most time (all of it with no cost model:
    the answer was cut where the model lives). Per kept block: None (G1 has it) or its tier."""
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
    return plan if cost is None else plan[:cost.best_cut(plan)]


class TierSource:
    """`cost`: the cost model, where it lives with this half (None: answers come cut by it). `g1_has`:
    whether G1 caches a block hash beyond the sequence's own hit (None: G1's hit is only ever a prefix).
    `pins`: G1 blocks pinned for saves (None: the engine saves without this source)."""

    name = NAME

    def __init__(self, block_size: int, cost: CostModel | None, g1_has: Callable[[int], bool] | None = None,
                 pins: OffloadTracker | None = None, ask_first: bool = False):
        self.block_size, self.cost, self.g1_has, self.pins = block_size, cost, g1_has, pins
        self.ask_first = ask_first
        self.hints: dict[str, Tiers] = {}  # request id -> the tiers holding its leading blocks
        self.covered: dict[str, int] = {}  # leading blocks G1 held when the hint was made (or computed)
        self.asking: dict[str, int] = {}  # a lookup in flight: G1's hit (blocks) when it was asked
        self.asked: set[str] = set()  # requests asked at least once (`ask_first`)
        self.plans: dict[str, Tiers] = {}  # the last match's per-block tiers (None: G1 has it)
        self.again: dict[str, bool] = {}  # loading: a sequence admitted before (a preempted one)
        self.onboarded_blocks = 0
        self.reonboarded_blocks = 0  # of those, blocks of preempted sequences
        self._jobs: list[Any] = []

    def add(self, seq: TierSeq, request: EngineRequest | None, hint: Any) -> None:
        if hint and any(hint):
            self.hints[seq.request_id] = hint

    def match(self, seq: TierSeq, local_blocks: int) -> Match | None:
        rid = seq.request_id
        loadable = (seq.num_tokens - 1) // self.block_size  # never the last token's block
        hashes = seq.hasher.hashes[:loadable]
        asked_at = self.asking.get(rid)
        if asked_at is not None and asked_at <= local_blocks:
            return None  # the answer is on its way and still fits
        stale = (asked_at if asked_at is not None else self.covered.get(rid, 0)) > local_blocks
        if stale or (self.ask_first and rid not in self.asked and loadable > local_blocks):
            self.asking[rid] = local_blocks  # G1 lost part of what the hint assumed, or never asked
            self.asked.add(rid)
            self._jobs.append(TierLookup(rid, hashes, local_blocks))
            return None
        hint = self.hints.get(rid)  # kept until a load starts: blocks may be short now, not next step
        if hint is None:
            return NO_MATCH
        found = (hint + [None] * len(hashes))[:len(hashes)]
        in_g1 = [i < local_blocks or (self.g1_has is not None and self.g1_has(h)) for i, h in enumerate(hashes)]
        src = load_plan(found, in_g1, self.cost)
        if len(src) <= local_blocks:
            return NO_MATCH
        self.plans[rid] = src
        return Match((len(src) - local_blocks) * self.block_size, reuse_cached=self.g1_has is not None)

    def allocated(self, seq: TierSeq, fresh: list[int] | None) -> None:
        plan = self.plans.pop(seq.request_id, None)
        if fresh is None or plan is None:
            return  # blocks are short: asked again when the sequence is next at the head
        self.hints.pop(seq.request_id, None)
        self.again[seq.request_id] = seq.admitted
        self._jobs.append(TierLoad(seq.request_id, [seq.hasher.hashes[i] for i in fresh],
                                   [seq.blocks[i].block_id for i in fresh], [plan[i] or "" for i in fresh]))

    def arrived(self, seq: TierSeq, fresh: list[int], kept: int) -> None:
        n = sum(1 for i in fresh if i < kept)
        self.onboarded_blocks += n
        self.reonboarded_blocks += n if self.again.pop(seq.request_id, False) else 0

    def answered(self, request_id: str, answer: Any) -> None:
        self.covered[request_id] = self.asking.pop(request_id, 0)
        if answer and any(answer):
            self.hints[request_id] = answer

    def preempted(self, seq: TierSeq, computed_blocks: int) -> None:
        if computed_blocks:
            self.covered[seq.request_id] = computed_blocks

    def finished(self, request_id: str) -> None:
        for d in (self.hints, self.covered, self.asking, self.plans, self.again):
            d.pop(request_id, None)
        self.asked.discard(request_id)

    def saved(self, block_ids: list[int]) -> None:
        if self.pins is not None:
            self.pins.done(block_ids)

    def take_jobs(self) -> list[Any]:
        batch = self.pins.take() if self.pins is not None else None
        if batch is not None:
            self._jobs.append(TierSave(*batch))
        jobs, self._jobs = self._jobs, []
        return jobs

    def observe_step(self, prefill_tokens: int, seconds: float) -> None:
        if self.cost is not None:
            self.cost.observe_prefill(prefill_tokens, seconds)

    def counters(self) -> dict[str, int]:
        saves = {} if self.pins is None else {"offload_pinned": self.pins.pinned, "offload_skipped": self.pins.skipped}
        return {"onboarded_blocks": self.onboarded_blocks, "reonboarded_blocks": self.reonboarded_blocks, **saves}

    def close(self) -> None:
        if self.pins is not None:
            self.pins.release_all()

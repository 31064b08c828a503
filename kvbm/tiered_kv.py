"""The lower tiers (G2, G3, G4) seen from one engine's G1 pool: lookup, onboard, offload (kvbm/README.md).

Runs on the worker's event loop; the engine thread talks to it only through plans and callbacks:
- `lookup(hashes)`: per leading prompt block, the fastest tier that holds it (a hint; `get` is the truth).
- `onboard(plan)`: copy blocks from the tiers into the G1 blocks the engine allocated for them; returns
  which arrived. A block missed in one tier is tried in the slower ones that follow.
- `offload(batch, done)`: copy G1 blocks (pinned by the engine) into every tier, then `done(block_ids)`.

Invariants:
- `done` is called exactly once per offload batch, whatever happens (a missed call leaks G1 pins).
- An onboard writes only the plan's G1 blocks, and only until `onboard` returns; callers that are
  cancelled must still await it (`workers/core/kv_sources/tiers_loop.py` `_load`), so the engine never reuses a block a
  tier may still be writing.
- The hierarchy is inclusive: an offloaded block goes to every tier and each evicts by its own policy;
  dedup by seq_hash makes a repeated offload a recency refresh, and a block onboarded from G3/G4 that is
  later released from G1 is written to G2 again (promotion).
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from time import perf_counter

import torch

from kvrelay.kvbm.cost_model import CostModel
from kvrelay.kvbm.tier_config import TierConfig, open_tiers
from kvrelay.kvbm.tiers import TierStats, TierStore
from kvrelay.workers.api.messages import KvLayout

log = logging.getLogger(__name__)
G4_PROBE_BATCH = 8  # HEADs in flight while probing G4 for a prompt's continuation (after the first)
G4_SEEN_MAX = 1 << 16


@dataclass(frozen=True)
class OnboardPlan:
    """Engine -> loop: fill G1 `block_ids[i]` with the block `hashes[i]`, found in `tiers[i]`."""

    hashes: list[int]
    block_ids: list[int]
    tiers: list[str]


@dataclass
class TierFlow:
    """Bytes moved between G1 and one tier (cumulative)."""

    onboard_blocks: int = 0
    onboard_bytes: int = 0
    onboard_seconds: float = 0.0
    offload_blocks: int = 0
    offload_bytes: int = 0
    offload_seconds: float = 0.0


TierSink = Callable[[str, str, list[int]], None]  # (tier, "stored" | "removed", hashes)


class TieredKv:
    def __init__(self, rows: torch.Tensor, cost: CostModel):
        """rows: the G1 pool as uint8 [num_blocks, block_bytes] (a view, no copy)."""
        self.rows, self.cost = rows, cost
        self.block_bytes = rows.shape[1]
        self.stores: list[TierStore] = []
        self.flows: dict[str, TierFlow] = {}
        self._g4_seen: OrderedDict[int, None] = OrderedDict()  # hashes known to be in G4 (ours or not)
        self._offloads: set[asyncio.Task] = set()
        self._sink: TierSink | None = None

    @classmethod
    async def open(cls, cfg: TierConfig, rows: torch.Tensor, block_size: int, fingerprint: str,
                   sink: TierSink | None = None, layout: KvLayout | None = None,
                   word_dtype: str | None = None) -> TieredKv:
        """layout: the G1 pool's (for the G3/G4 codecs, kvbm/codecs); None = blocks are opaque bytes, or,
        with `word_dtype`, words of that dtype in an unknown order (vLLM's rows: lossless splits planes)."""
        from kvrelay.kvbm.codecs.shape import DTYPES, BlockShape

        kv = cls(rows, CostModel(rows.shape[1], block_size, always=cfg.onboard == "always"))
        kv._sink = sink
        callbacks = {t: kv._event_callback(t) for t in ("G2", "G3", "G4")}
        shape = BlockShape.of_layout(layout) if layout is not None and layout.layout == "block_contiguous" else None
        if shape is None and word_dtype in DTYPES:
            shape = BlockShape.words(word_dtype, rows.shape[1])
        kv.stores = await open_tiers(cfg, kv.block_bytes, fingerprint, callbacks, shape)
        kv.flows = {s.tier: TierFlow() for s in kv.stores}
        await kv._fold_codecs()
        return kv

    async def _fold_codecs(self) -> None:
        """Each codec tier's prior becomes its effective bandwidth: the codec's ratio and decode speed,
        measured now on a KV-like block (kvbm/codecs/calibrate.py), folded into the I/O prior."""
        from kvrelay.kvbm.codecs.calibrate import calibrate
        from kvrelay.kvbm.codecs.store import CodecStore

        for store in self.stores:
            if isinstance(store, CodecStore):
                rate = await asyncio.to_thread(calibrate, store.codec)
                if rate is not None:
                    self.cost.fold_codec(store.tier, rate.ratio, rate.decode_bytes_per_s)

    def _event_callback(self, tier: str):
        def on_event(kind: str, hashes: list[int]) -> None:
            if tier == "G4" and kind == "stored":
                self._remember_g4(hashes)
            elif tier == "G4":
                for h in hashes:
                    self._g4_seen.pop(h, None)
            if self._sink is not None:
                self._sink(tier, kind, hashes)
        return on_event

    @property
    def tiers(self) -> list[str]:
        return [s.tier for s in self.stores]

    # -- lookup -----------------------------------------------------------------------------------------
    async def lookup(self, hashes: Sequence[int], in_g1: Callable[[int], bool] | None = None) -> list[str | None]:
        """Per block, the fastest enabled tier that holds it. G4 is probed (HEAD) only for blocks no
        faster tier nor G1 (`in_g1`, a hint) has, in order, stopping at its first miss: one HEAD, then
        batches of 8, so a prompt nobody stored costs one request, not one per block."""
        found: list[str | None] = [None] * len(hashes)
        for store in self.stores:  # a disabled store answers at once, or lets its half-open probe through
            todo = [i for i, t in enumerate(found) if t is None and not (in_g1 is not None and in_g1(hashes[i]))]
            if not todo:
                break
            if store.tier != "G4":
                for i, hit in zip(todo, await store.contains([hashes[i] for i in todo]), strict=True):
                    if hit:
                        found[i] = store.tier
                continue
            k, size = 0, 1  # one HEAD first: a prompt nobody stored costs one request
            while k < len(todo):
                chunk = todo[k:k + size]
                k, size = k + size, G4_PROBE_BATCH
                known = [hashes[i] in self._g4_seen for i in chunk]
                ask = [hashes[i] for i, kn in zip(chunk, known, strict=True) if not kn]
                answers = iter(await store.contains(ask) if ask else [])
                hits = [kn or next(answers) for kn in known]
                for i, hit in zip(chunk, hits, strict=True):
                    if hit:
                        found[i] = "G4"
                if not all(hits):
                    break
        return found

    # -- onboard ----------------------------------------------------------------------------------------
    async def onboard(self, plan: OnboardPlan) -> list[bool]:
        """Copy the plan's blocks into G1; per block, True if it arrived intact."""
        ok = [False] * len(plan.hashes)
        order = [s for s in self.stores if s.enabled]
        for n, store in enumerate(order):
            tried_before = {s.tier for s in order[:n]}
            todo = [i for i in range(len(ok)) if not ok[i] and (plan.tiers[i] == store.tier
                                                                or plan.tiers[i] in tried_before)]
            if not todo:
                continue
            t0 = perf_counter()
            got = await store.get([plan.hashes[i] for i in todo], [self.rows[plan.block_ids[i]] for i in todo])
            seconds = perf_counter() - t0
            hits = 0
            for i, hit in zip(todo, got, strict=True):
                if hit:
                    ok[i] = True
                    hits += 1
                if store.tier == "G4":  # the truth about G4, for later lookups and offloads
                    if hit:
                        self._remember_g4([plan.hashes[i]])
                    else:
                        self._g4_seen.pop(plan.hashes[i], None)
            flow = self.flows[store.tier]
            flow.onboard_blocks += hits
            flow.onboard_bytes += hits * self.block_bytes
            flow.onboard_seconds += seconds
            if hits:
                self.cost.observe_load(store.tier, hits, seconds)
        return ok

    # -- offload ----------------------------------------------------------------------------------------
    def offload(self, hashes: list[int], block_ids: list[int], done: Callable[[list[int]], None]) -> None:
        """Start copying pinned G1 blocks into every tier; `done(block_ids)` once all are finished."""
        task = asyncio.get_running_loop().create_task(self._offload(hashes, block_ids, done))
        self._offloads.add(task)
        task.add_done_callback(self._offloads.discard)

    async def _offload(self, hashes: list[int], block_ids: list[int], done: Callable[[list[int]], None]) -> None:
        try:
            await asyncio.gather(*(self._put(s, hashes, block_ids) for s in self.stores))  # disabled: probe
        except Exception:
            log.exception("KV offload failed; blocks stay only in G1")
        finally:
            done(block_ids)

    async def _put(self, store: TierStore, hashes: list[int], block_ids: list[int]) -> None:
        if store.tier == "G4":  # another worker's object, or ours: a PUT would only be refused
            keep = [i for i, h in enumerate(hashes) if h not in self._g4_seen]
            hashes, block_ids = [hashes[i] for i in keep], [block_ids[i] for i in keep]
            if not hashes:
                return
        t0 = perf_counter()
        stored = await store.put(hashes, [self.rows[b] for b in block_ids])
        flow = self.flows[store.tier]
        flow.offload_seconds += perf_counter() - t0
        n = sum(stored)
        flow.offload_blocks += n
        flow.offload_bytes += n * self.block_bytes

    def _remember_g4(self, hashes: list[int]) -> None:
        for h in hashes:
            self._g4_seen[h] = None
            self._g4_seen.move_to_end(h)
        while len(self._g4_seen) > G4_SEEN_MAX:
            self._g4_seen.popitem(last=False)

    # -- lifecycle and introspection --------------------------------------------------------------------
    def stats(self) -> list[tuple[TierStats, TierFlow]]:
        return [(s.stats, self.flows[s.tier]) for s in self.stores]

    async def drain(self) -> None:
        """Wait for every offload in flight (their `done` callbacks have run when this returns)."""
        while self._offloads:
            await asyncio.gather(*list(self._offloads), return_exceptions=True)

    async def close(self) -> None:
        await self.drain()
        for s in self.stores:
            await s.close()

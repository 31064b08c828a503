"""kvrelay's lower tiers inside vLLM's worker process: the tier loop, the staging rows, the events.

The connector's worker half (`tier_worker.py`) runs in vLLM's worker process, next to vLLM's KV
tensors; so do the tier stores and the cost model. What this owns:
- an asyncio loop on its own thread, where `TieredKv`, every tier store and the lookup server
  (`tier_lookup.py`, the scheduler half's questions) run;
- the staging rows: a uint8 `[rows, block_bytes]` buffer that is `TieredKv`'s "G1" (a tier row is
  block-contiguous, vLLM's cache is per layer, so every move goes through a row: the worker half
  gathers/scatters between rows and vLLM's tensors, the tiers copy between rows and themselves);
- which rows are free (a lock-protected free list: the worker thread takes rows, the loop gives them
  back when a copy has finished);
- the tier events, queued until the worker half hands them to the scheduler half (vLLM's worker
  metadata), which publishes them on vLLM's KV-event stream.

Invariants: a row is owned by exactly one of {free list, a load in flight, a save in flight}; saves
may hold at most `SAVE_SHARE` of the rows, so a load always finds rows unless loads fill them.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
import threading
from collections import deque
from dataclasses import dataclass
from typing import Any

import torch

from kvrelay.kvbm.tier_config import TierConfig
from kvrelay.kvbm.tiered_kv import TieredKv
from kvrelay.workers.api.messages import TierCounters
from kvrelay.workers.core.kv_sources.tiers_loop import tier_counters
from kvrelay.workers.engines.vllm.peer_lend import LendServer
from kvrelay.workers.engines.vllm.peer_pool import PeerPool, PoolSettings
from kvrelay.workers.engines.vllm.tier_lookup import LookupServer

log = logging.getLogger("kvrelay.vllm.tiers")
SAVE_SHARE = 0.5  # at most this share of the staging rows hold saves in flight
DEFAULT_STAGING_BYTES = 128 << 20


@dataclass(frozen=True)
class TierSettings:
    """What the worker process tells the connector (vLLM's `kv_connector_extra_config`, JSON)."""

    key: str  # the engine's private directory: where the lookup socket lives
    fingerprint: str
    block_size: int
    tiers: TierConfig
    staging_bytes: int = DEFAULT_STAGING_BYTES  # at least; more if two engine steps' new blocks need more
    pool: PoolSettings | None = None  # the cluster KV pool (peer_pool.py): lend and pull; None = off

    def to_extra(self) -> dict[str, Any]:
        return {"key": self.key, "fingerprint": self.fingerprint, "block_size": self.block_size,
                "staging_bytes": self.staging_bytes, "tiers": dataclasses.asdict(self.tiers),
                "pool": self.pool.to_extra() if self.pool is not None else None}

    @classmethod
    def from_extra(cls, extra: dict[str, Any]) -> TierSettings:
        pool = extra.get("pool")
        return cls(key=str(extra["key"]), fingerprint=extra["fingerprint"], block_size=int(extra["block_size"]),
                   tiers=TierConfig(**extra["tiers"]),
                   staging_bytes=int(extra.get("staging_bytes", DEFAULT_STAGING_BYTES)),
                   pool=PoolSettings.from_extra(pool) if pool else None)


class TierRuntime:
    def __init__(self, settings: TierSettings):
        self.settings = settings
        self.tiered: TieredKv | None = None  # None until the worker half registered vLLM's caches
        self._lookups: LookupServer | None = None
        self.pool: PeerPool | None = None  # the cluster KV pool, when on and its transfer engine started
        self._lends: LendServer | None = None
        self.rows: torch.Tensor | None = None
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="kvrelay-tiers", daemon=True)
        self._thread.start()
        self._lock = threading.Lock()
        self._free: list[int] = []
        self._saving = 0  # rows held by saves in flight
        self._events: deque[tuple[str, str, list[int]]] = deque()
        # Hashes the fastest tier holds (from its events): a save skips them. The hierarchy is inclusive
        # (a save goes to every tier), so a block the fastest tier lost is saved again, everywhere.
        t = settings.tiers
        self._top = "G2" if t.host_bytes else "G3" if t.disk_dir != "off" else "G4"
        self.known: set[int] = set()
        self.save_skipped = 0  # blocks not saved: no free row (counted, like the native offload_skipped)
        self.onboarded = 0  # blocks loaded into vLLM's cache (the intact prefix of each load: what vLLM used)

    # -- lifecycle --------------------------------------------------------------------------------------
    def open(self, block_bytes: int, min_rows: int = 0, dtype: str | None = None) -> bool:
        """Allocate the staging rows, open the tiers and the lookup server (blocking: at engine start).
        False if no tier opened (each one that failed said why); lookups then answer misses. dtype: the
        cache's element type (a G3/G4 `lossless` codec splits the rows' words into byte planes)."""
        n = max(2, min_rows, self.settings.staging_bytes // max(1, block_bytes))
        self.rows = torch.zeros((n, block_bytes), dtype=torch.uint8)
        self._free = list(range(n))
        self.tiered = self.run(TieredKv.open(self.settings.tiers, self.rows, self.settings.block_size,
                                             self.settings.fingerprint, sink=self._on_event, word_dtype=dtype))
        self.run(self._serve_lookups())
        if self.settings.pool is not None:
            self.run(self._join_pool(self.settings.pool, start=bool(self.tiered.stores)))
        if not self.tiered.stores:
            return False
        log.info("kvrelay tiers under vLLM: %s; %d staging rows of %d B (%.0f MiB); offload write-through, "
                 "onboard %s", ", ".join(self.tiered.tiers), n, block_bytes, n * block_bytes / 2**20,
                 self.settings.tiers.onboard)
        return True

    @property
    def kv(self) -> TieredKv:
        """The open tiers (only used once `open` returned True)."""
        assert self.tiered is not None, "tiers used before open()"
        return self.tiered

    @property
    def staging(self) -> torch.Tensor:
        """The staging rows (only used once `open` returned True)."""
        assert self.rows is not None, "staging rows used before open()"
        return self.rows

    async def _serve_lookups(self) -> None:
        self._lookups = LookupServer(self.settings.key, self.kv, self.num_rows)

    async def _join_pool(self, settings: PoolSettings, start: bool) -> None:
        """Lend and pull (peer_pool.py); without a tier or a transfer engine that starts the pool is off
        here (lends answer nothing at once, lookups plan no pulls), never the tiers."""
        try:
            self.pool = await PeerPool.start(self, settings) if start else None
        except Exception as e:
            log.warning("kvrelay KV pool under vLLM: the transfer engine did not start (%s: %s); this worker "
                        "neither lends nor pulls", type(e).__name__, e)
        self._lends = LendServer(self.settings.key, self.pool)
        assert self._lookups is not None
        self._lookups.pulls = self.pool is not None

    def close(self) -> None:
        if self.tiered is not None:
            try:
                if self._lookups is not None:
                    self.run(self._lookups.close(), timeout=5)
                if self._lends is not None:
                    self.run(self._lends.close(), timeout=5)
                if self.pool is not None:
                    self.run(self.pool.close(), timeout=10)
                self.run(self.tiered.close(), timeout=30)
            except Exception:
                log.exception("closing kvrelay's tiers failed")
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=5)

    # -- the loop thread --------------------------------------------------------------------------------
    def submit(self, coro) -> concurrent.futures.Future:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro, timeout: float | None = None) -> Any:
        return self.submit(coro).result(timeout)

    def call(self, fn, *args) -> None:
        self.loop.call_soon_threadsafe(fn, *args)

    # -- staging rows -----------------------------------------------------------------------------------
    @property
    def num_rows(self) -> int:
        return 0 if self.rows is None else self.rows.shape[0]

    def take_rows(self, n: int, *, save: bool) -> list[int] | None:
        """A load takes all n rows or none (None); a save takes as many as it may (possibly [])."""
        with self._lock:
            if save:
                n = max(0, min(n, len(self._free), int(self.num_rows * SAVE_SHARE) - self._saving))
            elif n > len(self._free):
                return None
            rows, self._free = self._free[:n], self._free[n:]  # lowest first: runs of rows coalesce copies
            if save:
                self._saving += n
            return rows

    def give_rows(self, rows: list[int], *, save: bool) -> None:
        with self._lock:
            self._free.extend(rows)
            self._free.sort()
            if save:
                self._saving -= len(rows)

    @property
    def rows_in_use(self) -> int:
        with self._lock:
            return self.num_rows - len(self._free)

    # -- events and stats -------------------------------------------------------------------------------
    def _on_event(self, tier: str, kind: str, hashes: list[int]) -> None:  # on the loop thread
        if tier == self._top:
            if kind == "stored":
                self.known.update(hashes)
            else:
                self.known.difference_update(hashes)
        self._events.append((tier, kind, hashes))

    def take_events(self) -> list[tuple[str, str, list[int]]]:
        out = []
        while self._events:
            out.append(self._events.popleft())
        return out

    def counters(self) -> list[TierCounters]:
        return [] if self.tiered is None else [tier_counters(s, f) for s, f in self.tiered.stats()]



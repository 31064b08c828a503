"""The cluster KV pool inside vLLM's worker process (docs/ARCHITECTURE.md "Cluster KV pool"): a vLLM
worker lends the blocks its kvrelay tiers hold and pulls the blocks a peer lends, through the tier
connector's staging rows and a transfer engine of its own (NIXL, or the TCP fallback) over them.

Why the staging rows, not vLLM's paged cache: vLLM's KV tensors are per layer and owned by vLLM (a
block is a strided slice of every layer's tensor; lending one would mean pinning it against vLLM's own
allocator, which a connector cannot do). The tiers are write-through under vLLM, so G2 (and G3) hold
every block vLLM computed while they have room, in kvrelay's block-contiguous row format: one
descriptor per block for the transfer engine, the same bytes a tier load would copy.

- Lend (`lend`): the leading run of the asked hashes that G2/G3 hold is copied into staging rows held
  under the lease id; their row ids go back in the peer's `KvHandle` (pool `POOL`). The rows are given
  back exactly once: on the pull's release notification (its HMAC proves the internal token), on `free`
  (the worker's lease timer, `release`, a cancelled ask), or on this side's own timer (twice the lease).
- Pull (`load`): a `TierLoad` whose blocks come from tier `PEER_TIER` reads them from the lender's rows
  into this worker's rows (the release notification rides on the read); blocks from local tiers in the
  same load are onboarded meanwhile; the worker half then scatters the rows into vLLM's blocks as for
  any tier load. A failed read is a miss: vLLM recomputes those blocks; so is a read that could not
  end within half the lease after the handle arrived (vLLM may queue a request longer than a lease):
  the lender's rows are never read after they may have been given back.

Everything here runs on the tier loop (tier_runtime.py). Trust: the transfer engine listens on the
worker's host only and the TCP one requires the internal token (read from `TOKEN_ENV`, set by the
worker process before vLLM starts: never in vLLM's config, which vLLM logs); a handle reaches a puller
only over the token-authenticated request plane.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

import msgspec

from kvrelay.kvbm.tiered_kv import OnboardPlan
from kvrelay.workers.api.messages import KvHandle
from kvrelay.workers.core.kv_sources.tiers import TierLoad
from kvrelay.workers.kv_handoff import parse_release, pull_timeout, release_note

log = logging.getLogger("kvrelay.vllm.pool")
POOL = "vllm-rows"  # the transfer engine's pool over the staging rows (KvHandle.pool of a vLLM lender)
PEER_TIER = "peer"  # a TierLoad's tier for blocks pulled from the request's peer
TOKEN_ENV = "KVRELAY_VLLM_POOL_TOKEN"
PEER_PARAM = "kvrelay_peer"  # the key in vLLM's kv_transfer_params
LENDABLE = ("G2", "G3")  # G4 is shared: a peer reads it itself


@dataclass(frozen=True)
class PoolSettings:
    """The worker's transfer settings, for the pool's transfer engine (no secret: vLLM logs its config)."""

    transfer: str  # auto | nixl | tcp
    host: str
    advertise_host: str
    lease_s: float

    def to_extra(self) -> dict[str, Any]:
        return {"transfer": self.transfer, "host": self.host, "advertise_host": self.advertise_host,
                "lease_s": self.lease_s}

    @classmethod
    def from_extra(cls, extra: dict[str, Any]) -> PoolSettings:
        return cls(transfer=str(extra["transfer"]), host=str(extra["host"]),
                   advertise_host=str(extra.get("advertise_host", "")), lease_s=float(extra["lease_s"]))


class PeerRead(msgspec.Struct, frozen=True):
    """Scheduler -> worker half: where a load's peer blocks are, in the load's order of peer blocks."""

    handle: KvHandle
    remote_ids: list[int]  # the lender's row per PEER_TIER block of the load
    deadline: float  # time.time() by which the read must be done: half the lease after the handle arrived


def peer_params(handle: KvHandle, deadline: float) -> dict[str, Any]:
    """vLLM's `kv_transfer_params` for a request with a leased peer (read by the tier connector's
    scheduler half; JSON-safe: vLLM copies these around)."""
    return {PEER_PARAM: {"handle": msgspec.json.encode(handle).decode(), "deadline": deadline}}


def peer_from_params(params: Any) -> tuple[KvHandle, float] | None:
    """The leased peer in a request's `kv_transfer_params`: (handle, read deadline); None if none or
    malformed (the request then loads nothing from a peer)."""
    peer = params.get(PEER_PARAM) if isinstance(params, dict) else None
    if not isinstance(peer, dict):
        return None
    try:
        return msgspec.json.decode(peer["handle"], type=KvHandle), float(peer["deadline"])
    except (KeyError, TypeError, ValueError, msgspec.DecodeError):
        return None


@dataclass
class PoolCounters:
    pulled_blocks: int = 0  # blocks pulled from peers that vLLM used
    pulled_requests: int = 0
    failures: int = 0  # loads whose peer blocks did not all arrive (recomputed from the first missing)
    lent_blocks: int = 0  # cumulative: blocks lent to peers
    lease_pinned: int = 0  # rows held under leases now
    refused_notes: int = 0  # release notifications without a valid internal-token proof


@dataclass
class _Lease:
    rows: list[int]
    timer: asyncio.TimerHandle | None = field(default=None)


class PeerPool:
    """`rt`: the TierRuntime (its tiers and staging rows); built and used on its loop."""

    def __init__(self, rt: Any, settings: PoolSettings, engine: Any, token: str):
        self.rt, self.settings, self.engine, self.token = rt, settings, engine, token
        self.leases: dict[str, _Lease] = {}
        self.stats = PoolCounters()
        self._notes: asyncio.Task | None = None

    @classmethod
    async def start(cls, rt: Any, settings: PoolSettings) -> PeerPool:
        from kvrelay.transfer import make_transfer_engine

        token = os.environ.get(TOKEN_ENV, "")
        engine = make_transfer_engine(settings.transfer, f"kvrelay-vllm-{os.getpid()}-{id(rt):x}", host=settings.host,
                                      advertise_host=settings.advertise_host or None, token=token)
        rows = rt.staging
        engine.register_pool(POOL, rows, rows.shape[1])
        await engine.start()
        pool = cls(rt, settings, engine, token)
        pool._notes = asyncio.get_running_loop().create_task(pool._consume())
        log.info("kvrelay KV pool under vLLM: lends and pulls through %s over %d staging rows", engine.kind,
                 rows.shape[0])
        return pool

    def metadata(self) -> bytes:
        return self.engine.metadata()

    # -- lending ----------------------------------------------------------------------------------------
    async def lend(self, lease_id: str, hashes: list[int]) -> list[int]:
        """Copy the leading run of `hashes` G2/G3 hold into rows held under `lease_id`; their ids ([]:
        none held, or no free rows: the peer recomputes)."""
        held = self.leases.get(lease_id)
        if held is not None:
            return list(held.rows)
        found = await self.rt.kv.lookup(hashes)
        n = next((i for i, t in enumerate(found) if t not in LENDABLE), len(found))
        rows = self.rt.take_rows(n, save=False) if n else None
        if not rows:
            return []
        ok = await self.rt.kv.onboard(OnboardPlan(hashes[:n], rows, [t or "" for t in found[:n]]))
        k = next((i for i, arrived in enumerate(ok) if not arrived), len(ok))  # the intact prefix
        if k < n:
            self.rt.give_rows(rows[k:], save=False)
        if k == 0:
            return []
        timer = asyncio.get_running_loop().call_later(2 * self.settings.lease_s, self.free, lease_id)
        self.leases[lease_id] = _Lease(rows[:k], timer)
        self.stats.lent_blocks += k
        self.stats.lease_pinned += k
        return rows[:k]

    def free(self, lease_id: str) -> bool:
        """Give a lease's rows back; False if it is not held (already freed, or never was)."""
        lease = self.leases.pop(lease_id, None)
        if lease is None:
            return False
        if lease.timer is not None:
            lease.timer.cancel()
        self.stats.lease_pinned -= len(lease.rows)
        self.rt.give_rows(lease.rows, save=False)
        return True

    async def _consume(self) -> None:
        """Peers' pulls end in a release notification: their lease's rows come back at once."""
        while True:
            note = await self.engine.wait_notification()
            lease_id = parse_release(note.message, self.token)
            if lease_id is None:
                self.stats.refused_notes += 1
                log.warning("refused a KV notification from agent %r without a valid internal-token proof",
                            note.sender)
                continue
            self.free(lease_id)

    # -- pulling ----------------------------------------------------------------------------------------
    async def load(self, job: TierLoad, rows: list[int], read: PeerRead) -> list[bool]:
        """Fill `rows[i]` with the job's block i: from the peer where its tier is PEER_TIER, from the local
        tiers otherwise (both at once); per block, True if it arrived."""
        ok = [False] * len(job.hashes)
        mine = [i for i, t in enumerate(job.tiers) if t != PEER_TIER]
        theirs = [i for i, t in enumerate(job.tiers) if t == PEER_TIER]

        async def local() -> None:
            if mine:
                got = await self.rt.kv.onboard(OnboardPlan([job.hashes[i] for i in mine], [rows[i] for i in mine],
                                                           [job.tiers[i] for i in mine]))
                for i, hit in zip(mine, got, strict=True):
                    ok[i] = hit

        async def remote() -> None:
            left = min(pull_timeout(read.handle), read.deadline - time.time())  # the lease outlives the read
            if theirs and self._pull(read, [rows[i] for i in theirs]) and left > 0:
                h = read.handle
                try:
                    self.engine.add_peer(h.prefill_instance, h.transfer_metadata)
                    await self.engine.read(h.prefill_instance, h.pool, read.remote_ids, POOL,
                                           [rows[i] for i in theirs], notify=release_note(h.request_id, self.token),
                                           timeout=left)
                except Exception as e:  # TransferError, ValueError (other transport, sizes): recompute
                    log.warning("request %s: pulling %d KV blocks from %s failed (%s); recomputing them",
                                job.request_id, len(theirs), h.prefill_instance, e)
                    return
                for i in theirs:
                    ok[i] = True

        await asyncio.gather(local(), remote())
        return ok

    def _pull(self, read: PeerRead, rows: list[int]) -> bool:
        h = read.handle
        return h.pool == POOL and len(read.remote_ids) == len(rows) and bool(rows)

    def loaded(self, job: TierLoad, used: int) -> None:
        """The worker half used the job's first `used` blocks (the intact prefix)."""
        peer = [i for i, t in enumerate(job.tiers) if t == PEER_TIER]
        if not peer:
            return
        pulled = sum(1 for i in peer if i < used)
        self.stats.pulled_blocks += pulled
        self.stats.pulled_requests += pulled > 0
        self.stats.failures += pulled < len(peer)

    def transfer_stats(self) -> dict[str, Any]:
        """The pool's transfer engine's TransferStats, as builtins (they ride vLLM's connector stats)."""
        return msgspec.to_builtins(self.engine.stats())

    def counters(self) -> dict[str, int]:
        s = self.stats
        return {"pulled_blocks": s.pulled_blocks, "pulled_requests": s.pulled_requests, "failures": s.failures,
                "lent_blocks": s.lent_blocks, "lease_pinned": s.lease_pinned}

    async def close(self) -> None:
        if self._notes is not None:
            self._notes.cancel()
            await asyncio.gather(self._notes, return_exceptions=True)
        for lease_id in list(self.leases):
            self.free(lease_id)
        await self.engine.close()

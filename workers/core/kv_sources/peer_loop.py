"""The loop half of the peer source: asks a peer for a lease over the request plane (`kv_lease`, with the
internal token: the worker's `PeerLink`) and pulls the leased blocks with the worker's `KvPuller`
(NIXL/TCP, or the mocker's simulated link), reporting each to the core, always (a `KvAnswered` for an
ask, a `KvLoaded` for a pull: until then the core keeps the sequence waiting and its blocks out of reach).

Verification: a lease carries the lender's checksum of each block (`KvHandle.block_checksums`, taken
when it pinned them); a pulled block whose bytes sum otherwise is reported failed, so it and every block
after it are recomputed, never served (counted: `verify_failures`).

Bounds: every ask and pull holds the worker's pull budget (peer_budget.py) from the ask until its pull
ends or its lease goes back; an ask over budget is not made (the prompt is computed). An ask has
`ASK_TIMEOUT_S`; a pull the transport's timeout, half the lease (workers/kv_handoff.py `pull_timeout`).

Leases never leak from here: an ask that was cancelled (the request ended) or timed out (a frozen peer
may still grant it later) is followed by a `release` of its lease id at the peer (best effort; the
lender's lease expiry is the backstop).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from time import perf_counter
from typing import Any

from kvrelay.workers.api.messages import EngineRequest, KvHandle, PeerLeaseRequest
from kvrelay.workers.api.prefill import KvPuller, PeerLink
from kvrelay.workers.core.commands import KvAnswered, KvLoaded
from kvrelay.workers.core.kv_sources.handoff import PullJob
from kvrelay.workers.core.kv_sources.peer import LEND_WAIT_S, NAME, PeerAsk, PeerWake
from kvrelay.workers.core.kv_sources.peer_budget import PullBudget
from kvrelay.workers.core.kv_sources.peer_pull_stats import PeerPullStats
from kvrelay.workers.core.kv_sources.source import Post

log = logging.getLogger(__name__)
# A peer that does not answer a lease this fast is slower than recomputing (it may hold the ask up to
# LEND_WAIT_S while its own prefill computes the blocks).
ASK_TIMEOUT_S = 2 * LEND_WAIT_S
RELEASE_TIMEOUT_S = 5.0

Checksums = Callable[[list[int]], Awaitable[list[int]]]  # this worker's G1 block ids -> xxh3_64 of their bytes


class PeerLoop:
    name = NAME

    def __init__(self, puller: KvPuller, link: PeerLink, block_bytes: int, checksums: Checksums | None = None):
        """`checksums`: sums this worker's G1 blocks (None: its KV is not real memory, nothing to verify)."""
        self.puller, self.link, self.block_bytes, self.checksums = puller, link, block_bytes, checksums
        self.budget = PullBudget(link.max_pulls, link.max_bytes)
        self.stats = PeerPullStats()
        self._running: dict[str, asyncio.Task] = {}  # reporting jobs that have started, by request id
        self._tasks: set[asyncio.Task] = set()

    async def before_add(self, request: EngineRequest) -> Any:
        return None

    def start(self, job: PeerAsk | PeerWake | PullJob, post: Post) -> None:
        if isinstance(job, PeerWake):  # no I/O: the follower's answer goes back through the core's queue
            post(KvAnswered(NAME, job.request_id, job))
        elif isinstance(job, PeerAsk):
            if not self.budget.take(job.request_id, len(job.hashes) * self.block_bytes):
                post(KvAnswered(NAME, job.request_id, None))  # over budget: computed, nobody asked
                return
            self._spawn(self._ask(job, post))
        else:
            self._spawn(self._pull(job, post))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _ask(self, job: PeerAsk, post: Post) -> None:
        rid, lease_id = job.request_id, f"peer:{job.request_id}"
        self._running[rid] = asyncio.current_task()  # type: ignore[assignment]  # never None in a task
        handle: KvHandle | None = None
        try:
            reply = await asyncio.wait_for(self.link.ask(job.peer.address, PeerLeaseRequest(
                lease_id=lease_id, fingerprint=job.fingerprint, block_hashes=job.hashes)), ASK_TIMEOUT_S)
            handle = reply.handle
        except asyncio.CancelledError:  # the request ended: the peer may have pinned blocks already
            self._spawn(self._give_back(job.peer.address, lease_id))
        except Exception as e:  # gone, refused, slow (a slow peer may grant it later): recompute
            log.info("request %s: peer %s lent no KV (%s); computing the prompt", rid, job.peer.instance_id,
                     e.__class__.__name__ if isinstance(e, TimeoutError) else e)
            self._spawn(self._give_back(job.peer.address, lease_id))
        finally:
            self._running.pop(rid, None)
            if handle is None:
                self.budget.give(rid)
            post(KvAnswered(NAME, rid, handle))

    async def _give_back(self, address: str, lease_id: str) -> None:
        try:
            await asyncio.wait_for(self.link.release(address, lease_id), RELEASE_TIMEOUT_S)
        except Exception as e:  # gone or frozen: its lease expires
            log.debug("could not give back lease %s at %s: %s", lease_id, address, e)

    async def _pull(self, job: PullJob, post: Post) -> None:
        """Pull (or, with no blocks, give the lease back), verify, report; the budget is freed either way."""
        if job.report:
            self._running[job.request_id] = asyncio.current_task()  # type: ignore[assignment]  # never None here
        t0, n = perf_counter(), len(job.local_block_ids)
        ok = [False] * n
        try:  # a cancelled pull returns only once the transport stopped writing the blocks
            if await self.puller.pull(job.handle, job.local_block_ids, job.start):
                ok = await self._verify(job)
        except asyncio.CancelledError:
            pass
        except Exception:
            log.exception("request %s: KV pull from %s failed; recomputing", job.request_id,
                          job.handle.prefill_instance)
        finally:
            self.budget.give(job.request_id)
            if job.report:
                self._running.pop(job.request_id, None)
                if n:
                    self.stats.observe(perf_counter() - t0)
                post(KvLoaded(NAME, job.request_id, ok))

    async def _verify(self, job: PullJob) -> list[bool]:
        """Per pulled block: its bytes sum as the lender's did (True for all when the lender sent no sums
        or this worker's KV is not real memory: the mocker)."""
        n = len(job.local_block_ids)
        want = job.handle.block_checksums[job.start:job.start + n]
        if self.checksums is None or not job.handle.block_checksums:
            ok = [True] * n
        elif len(want) != n:
            log.warning("request %s: peer %s sent %d checksums for %d blocks; recomputing", job.request_id,
                        job.handle.prefill_instance, len(want), n)
            ok = [False] * n
        else:
            ok = [a == b for a, b in zip(await self.checksums(job.local_block_ids), want, strict=True)]
            bad = n - sum(ok)
            if bad:
                self.stats.verify_failures += bad
                log.warning("request %s: %d of %d blocks pulled from %s failed verification; recomputing them",
                            job.request_id, bad, n, job.handle.prefill_instance)
        kept = next((i for i, fine in enumerate(ok) if not fine), n)
        self.stats.pulled_bytes += kept * self.block_bytes
        return ok

    def cancel(self, request_id: str) -> None:
        task = self._running.get(request_id)
        if task is not None:
            task.cancel()

    async def drain(self) -> None:
        pass

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

"""The loop half of the peer source: asks a peer for a lease over the request plane (`kv_lease`, with the
internal token: the worker's `LeaseAsker`) and pulls the leased blocks with the worker's `KvPuller` (NIXL/TCP, or the mocker's
simulated link), reporting each to the core, always (a `KvAnswered` for an ask, a `KvLoaded` for a pull:
until then the core keeps the sequence waiting and its blocks out of reach)."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from kvrelay.workers.api.messages import EngineRequest, KvHandle, PeerLeaseRequest
from kvrelay.workers.api.prefill import KvPuller, LeaseAsker
from kvrelay.workers.core.commands import KvAnswered
from kvrelay.workers.core.kv_sources.handoff import PullJob
from kvrelay.workers.core.kv_sources.handoff_loop import run_pull
from kvrelay.workers.core.kv_sources.peer import LEND_WAIT_S, NAME, PeerAsk
from kvrelay.workers.core.kv_sources.source import Post

log = logging.getLogger(__name__)
# A peer that does not answer a lease this fast is slower than recomputing (it may hold the ask up to
# LEND_WAIT_S while its own prefill computes the blocks).
ASK_TIMEOUT_S = 2 * LEND_WAIT_S


class PeerLoop:
    name = NAME

    def __init__(self, puller: KvPuller, ask: LeaseAsker):
        self.puller, self.ask = puller, ask
        self._running: dict[str, asyncio.Task] = {}  # reporting jobs that have started, by request id
        self._tasks: set[asyncio.Task] = set()

    async def before_add(self, request: EngineRequest) -> Any:
        return None

    def start(self, job: PeerAsk | PullJob, post: Post) -> None:
        coro = self._ask(job, post) if isinstance(job, PeerAsk) else run_pull(self.puller, job, post, self._running)
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _ask(self, job: PeerAsk, post: Post) -> None:
        self._running[job.request_id] = asyncio.current_task()  # type: ignore[assignment]  # never None in a task
        handle: KvHandle | None = None
        try:
            reply = await asyncio.wait_for(self.ask(job.peer.address, PeerLeaseRequest(
                lease_id=f"peer:{job.request_id}", fingerprint=job.fingerprint, block_hashes=job.hashes)),
                ASK_TIMEOUT_S)
            handle = reply.handle
        except asyncio.CancelledError:
            pass
        except Exception as e:  # gone, refused, slow: recompute
            log.info("request %s: peer %s lent no KV (%s); computing the prompt", job.request_id,
                     job.peer.instance_id, e)
        finally:
            self._running.pop(job.request_id, None)
            post(KvAnswered(NAME, job.request_id, handle))

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

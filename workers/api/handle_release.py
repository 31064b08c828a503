"""Freeing a prefill worker's KV handle early over the request plane (docs/ARCHITECTURE.md "Disaggregation").

Used by the decode worker (a pull that failed or had nothing to move) and the frontend (a decode
attempt that ended without finishing). Best effort, in the background: if the prefill worker is gone,
so are its blocks; if the call fails otherwise, the handle's lease expires.
"""

from __future__ import annotations

import asyncio
import logging

from kvrelay.workers.api.client import WorkerClient
from kvrelay.workers.api.messages import KvHandle

log = logging.getLogger(__name__)

RELEASE_TIMEOUT_S = 5.0


class HandleReleaser:
    def __init__(self, workers: WorkerClient):
        self.workers = workers
        self._tasks: set[asyncio.Task] = set()

    def release(self, handle: KvHandle) -> None:
        task = asyncio.get_running_loop().create_task(self._release(handle))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _release(self, handle: KvHandle) -> None:
        try:
            await asyncio.wait_for(self.workers.release(handle.prefill_address, handle.request_id), RELEASE_TIMEOUT_S)
        except Exception as e:
            log.debug("could not release KV handle %s at %s: %s", handle.request_id, handle.prefill_address, e)

    async def close(self) -> None:
        await asyncio.gather(*self._tasks, return_exceptions=True)

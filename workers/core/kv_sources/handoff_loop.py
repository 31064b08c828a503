"""The loop half of the handoff source: runs `PullJob`s with the worker's `KvPuller` (NIXL/TCP, or the
mocker's simulated link) and reports each pull to the core, always (a `KvLoaded`, also when it failed
or was cancelled: until then the core keeps the blocks out of reach)."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from kvrelay.workers.api.messages import EngineRequest
from kvrelay.workers.api.prefill import KvPuller
from kvrelay.workers.core.commands import KvLoaded
from kvrelay.workers.core.kv_sources.handoff import NAME, PullJob
from kvrelay.workers.core.kv_sources.source import Post

log = logging.getLogger(__name__)


class HandoffLoop:
    name = NAME

    def __init__(self, puller: KvPuller):
        self.puller = puller
        self._pulls: dict[str, asyncio.Task] = {}  # reporting pulls that have started, by request id
        self._tasks: set[asyncio.Task] = set()

    async def before_add(self, request: EngineRequest) -> Any:
        return None

    def start(self, job: PullJob, post: Post) -> None:
        task = asyncio.get_running_loop().create_task(run_pull(self.puller, job, post, self._pulls))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def cancel(self, request_id: str) -> None:
        """Only a pull that has started is cancelled (its puller then gives the lease back itself)."""
        task = self._pulls.get(request_id)
        if task is not None:
            task.cancel()

    async def drain(self) -> None:
        pass

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


async def run_pull(puller: KvPuller, job: PullJob, post: Post, running: dict[str, asyncio.Task]) -> None:
    """Run one pull and report it to the core, always (the handoff's and the peer pool's loop halves);
    while it runs, `running[request id]` is its task (a reporting pull can be cancelled by request)."""
    if job.report:
        running[job.request_id] = asyncio.current_task()  # type: ignore[assignment]  # never None in a task
    ok = False
    try:  # a cancelled pull returns only once the transport stopped writing the blocks
        ok = await puller.pull(job.handle, job.local_block_ids, job.start)
    except asyncio.CancelledError:
        pass
    except Exception:
        log.exception("request %s: KV pull from %s failed; recomputing", job.request_id, job.handle.prefill_instance)
    finally:
        if job.report:
            running.pop(job.request_id, None)
            post(KvLoaded(job.source, job.request_id, [ok] * len(job.local_block_ids)))

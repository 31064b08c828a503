"""`SourceLoops`: the loop halves of a core's KV sources, on the worker's event loop. The core's owner
hands it each step's jobs (`submit`, from any thread); each job runs in the loop half that its
`source` names, and its result comes back as a command through `post`.

Invariant: every job ends in exactly one report, also when the loop is gone (then its `failed()`
report is posted at once, so no block stays pinned or out of reach).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from kvrelay.workers.api.messages import EngineRequest
from kvrelay.workers.core.kv_sources.source import Post, SourceLoop

log = logging.getLogger(__name__)


class SourceLoops:
    def __init__(self, loop: asyncio.AbstractEventLoop, post: Post):
        self.loop, self.post = loop, post
        self.halves: dict[str, SourceLoop] = {}

    def add(self, half: SourceLoop) -> None:
        self.halves[half.name] = half

    def get(self, name: str) -> Any:
        return self.halves.get(name)

    async def before_add(self, request: EngineRequest) -> dict[str, Any]:
        """Per source, what its core half should know when `request` is queued."""
        hints = {}
        for name, half in self.halves.items():
            hint = await half.before_add(request)
            if hint is not None:
                hints[name] = hint
        return hints

    def submit(self, jobs: list[Any]) -> None:
        """Run `jobs` on the loop (callable from the core's thread or the loop itself)."""
        if not jobs:
            return
        try:
            self.loop.call_soon_threadsafe(self._start, jobs)
        except RuntimeError:  # the loop is gone (shutdown): nobody will run them
            self._fail(jobs)

    def _start(self, jobs: list[Any]) -> None:
        for i, job in enumerate(jobs):
            half = self.halves.get(job.source)
            if half is None:
                log.error("no loop half for KV source %r; failing its job", job.source)
                self._fail([job])
                continue
            try:
                half.start(job, self.post)
            except Exception:
                log.exception("KV source %r could not start a job", job.source)
                self._fail(jobs[i:i + 1])

    def _fail(self, jobs: list[Any]) -> None:
        for job in jobs:
            report = job.failed()
            if report is not None:
                self.post(report)

    def cancel(self, request_id: str) -> None:
        for half in self.halves.values():
            half.cancel(request_id)

    async def drain(self) -> None:
        for half in self.halves.values():
            await half.drain()

    async def close(self) -> None:
        for half in self.halves.values():
            await half.close()

"""Watching the worker streams in flight: a worker that stops answering without closing its connection
(SIGSTOP, a hung host, a network partition) must not hold its requests (issue 29: a frozen decode worker
held its streams 15 s beside a healthy one).

A watched stream is failed with `RpcConnectionError`, which the caller treats like a lost connection
(suspend the worker, migrate the request or try the next prefill worker):
- at once, when its worker leaves discovery (lease expired, deregistered);
- when it received nothing for `stall_s` seconds, its worker shows no sign of life (no load report
  for LOAD_STALE_S while other workers' reports arrive: a live worker publishes one every 0.5 s, a
  frozen one none) and the request has somewhere else to go (another routable worker of the role; for
  a prefill worker always: local prefill), or for `HUNG_FACTOR * stall_s` seconds whatever the reports
  say (an engine hung behind a live event loop: the client gets an error rather than a hang).
Time this process itself was stalled (its event loop blocked, the machine starved) is not held against
a worker: a check that runs late moves every stream's last-progress time forward by its lateness.
A request waiting in a busy worker's queue produces no frame for a while but its worker keeps
reporting load: that is not a stall.

Invariant: a stream is watched exactly while its caller iterates it (`watching` adds and removes it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from kvrelay.runtime.rpc import RpcConnectionError, RpcStream

log = logging.getLogger(__name__)

HUNG_FACTOR = 4  # no frame for this many stall timeouts fails a stream even when its worker reports load


class _Watched:
    __slots__ = ("last_count", "last_progress")

    def __init__(self, now: float):
        self.last_count, self.last_progress = 0, now


class _Watching:
    __slots__ = ("streams", "worker_id", "stream")

    def __init__(self, by_worker: dict[str, dict[RpcStream, _Watched]], worker_id: str, stream: RpcStream):
        self.streams, self.worker_id, self.stream = by_worker, worker_id, stream

    async def __aenter__(self) -> RpcStream:
        streams = self.streams.get(self.worker_id)
        if streams is None:
            streams = self.streams[self.worker_id] = {}
        streams[self.stream] = _Watched(time.monotonic())
        return self.stream

    async def __aexit__(self, *exc: object) -> None:
        streams = self.streams.get(self.worker_id)
        if streams is not None:
            streams.pop(self.stream, None)
            if not streams:
                del self.streams[self.worker_id]


class StreamWatch:
    def __init__(self, stall_s: float, alive: Callable[[str], bool], elsewhere: Callable[[str], bool]):
        """`alive(worker_id)`: whether the worker reported load recently; `elsewhere(worker_id)`: whether
        its requests could go somewhere else now (a stall of the last worker standing is waited out: a
        starved machine can look like a frozen worker)."""
        self.stall_s, self.alive, self.elsewhere = stall_s, alive, elsewhere
        self._streams: dict[str, dict[RpcStream, _Watched]] = {}
        self._task: asyncio.Task | None = None
        self.period = max(0.05, min(1.0, stall_s / 4))  # between checks

    def start(self) -> None:
        self._task = asyncio.create_task(self._check_loop())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def watching(self, worker_id: str, stream: RpcStream) -> _Watching:
        """`async with watch.watching(worker_id, stream):` around iterating the stream (a plain object, not
        a generator-based context manager: this is on every request's path)."""
        return _Watching(self._streams, worker_id, stream)

    def worker_left(self, worker_id: str) -> None:
        """Discovery removed the worker: fail its streams now (their requests move elsewhere)."""
        streams = self._streams.get(worker_id)
        if not streams:
            return
        log.warning("worker %s left discovery with %d stream(s) in flight; moving them", worker_id, len(streams))
        for stream in list(streams):
            del streams[stream]
            stream.fail(RpcConnectionError(f"worker {worker_id} left discovery"))

    def check(self, now: float, late: float = 0.0) -> None:
        """`late`: how much later than planned this check runs (this process was stalled meanwhile)."""
        for worker_id, streams in list(self._streams.items()):
            alive = None
            for stream, w in list(streams.items()):
                w.last_progress += late
                if stream.received != w.last_count:
                    w.last_count, w.last_progress = stream.received, now
                    continue
                quiet = now - w.last_progress
                if quiet < self.stall_s:
                    continue
                if alive is None:
                    alive = self.alive(worker_id) or not self.elsewhere(worker_id)
                if alive and quiet < HUNG_FACTOR * self.stall_s:
                    continue  # queued or slow behind a worker that is evidently running, or nowhere to go
                log.warning("worker %s sent nothing for %.0f s on a stream (%s); treating it as failed",
                            worker_id, quiet, "load reports continue" if alive else "no load report either")
                del streams[stream]  # failed once; its caller's exit finds it gone
                stream.fail(RpcConnectionError(f"worker {worker_id} sent nothing for {quiet:.0f} s"))

    async def _check_loop(self) -> None:
        while True:
            planned = time.monotonic() + self.period
            await asyncio.sleep(self.period)
            now = time.monotonic()
            late = now - planned
            self.check(now, late if late > 0.25 else 0.0)  # small jitter is not a stall

"""The frontend's live view of workers, fed by a discovery watch (docs/ARCHITECTURE.md "Discovery").

Invariant: a worker is routable exactly while its discovery entry exists; when the entry goes (lease
lost, deregistered) every `on_removed` listener is told once, so the KV index drops its blocks and
no new request is sent to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from kvrelay.kvbm.events import LoadMetrics
from kvrelay.runtime.discovery import Discovery, Instance, list_instances, watch_instances

log = logging.getLogger(__name__)


class WorkerPool:
    def __init__(self, discovery: Discovery, namespace: str, component: str = "backend"):
        self.discovery, self.namespace, self.component = discovery, namespace, component
        self.instances: dict[str, Instance] = {}  # instance_id -> Instance
        self.load: dict[str, LoadMetrics] = {}
        self.on_removed: list[Callable[[str], None]] = []
        self.on_added: list[Callable[[Instance], None]] = []
        self._task: asyncio.Task | None = None
        self._changed = asyncio.Event()
        self._suspended: dict[str, float] = {}  # instance_id -> loop time it becomes routable again

    async def start(self) -> None:
        await self.discovery.start()
        self._task = asyncio.create_task(self._watch())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.discovery.close()

    async def _watch(self) -> None:
        by_key: dict[str, str] = {}
        while True:
            try:
                async for ev in watch_instances(self.discovery, self.namespace, self.component):
                    if ev.instance is not None:
                        by_key[ev.key] = ev.instance.instance_id
                        self._suspended.pop(ev.instance.instance_id, None)
                        self.instances[ev.instance.instance_id] = ev.instance
                        log.info("worker %s up at %s (%s, %s)", ev.instance.instance_id, ev.instance.address,
                                 ev.instance.role, ev.instance.model)
                        for cb in self.on_added:
                            cb(ev.instance)
                    elif ev.key in by_key:
                        self._remove(by_key.pop(ev.key))
                    self._changed.set()
            except asyncio.CancelledError:
                raise
            except Exception:  # a backend bug must not leave the frontend blind: re-watch
                log.exception("discovery watch failed; restarting it")
                await asyncio.sleep(0.5)

    def _remove(self, instance_id: str) -> None:
        inst = self.instances.pop(instance_id, None)
        self.load.pop(instance_id, None)
        self._suspended.pop(instance_id, None)
        if inst is not None:
            log.info("worker %s gone", instance_id)
            for cb in self.on_removed:
                cb(instance_id)

    def suspend(self, instance_id: str, seconds: float) -> None:
        """A worker whose connection broke is unroutable at once, without waiting for its lease to run
        out. If it was only a transient fault and the worker is still registered afterwards, it comes
        back; if it died, its lease expiry removes it for good."""
        self._suspended[instance_id] = asyncio.get_running_loop().time() + seconds

    def update_load(self, metrics: LoadMetrics) -> None:
        if metrics.worker_id in self.instances:
            self.load[metrics.worker_id] = metrics

    def models(self) -> list[str]:
        return sorted({i.model for i in self.instances.values()})

    def workers(self, model: str, roles: tuple[str, ...] = ("agg", "decode")) -> list[Instance]:
        now = asyncio.get_running_loop().time()
        return [i for i in self.instances.values() if i.model == model and i.role in roles
                and self._suspended.get(i.instance_id, 0.0) <= now]

    async def wait_covering(self, timeout: float) -> set[str]:
        """Wait until this pool holds every worker discovery lists now (the watch is a poll or a stream
        behind the store: a process that routes before it caught up answers 'no worker' for workers
        that are registered). A listed worker whose entry is gone meanwhile is no longer waited for.
        Returns the instance ids still missing after `timeout` (empty: covered)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        try:
            want = {i.instance_id for i in await list_instances(self.discovery, self.namespace, self.component)}
        except Exception as e:  # e.g. etcd unreachable: the watch retries on its own; nothing to wait for
            log.warning("cannot list workers to wait for: %s", e)
            return set()
        while True:
            missing = want - self.instances.keys()
            remaining = deadline - loop.time()
            if not missing or remaining <= 0:
                return missing
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), min(remaining, 0.5))
            except asyncio.TimeoutError:  # nothing new: has one of them left discovery since?
                with contextlib.suppress(Exception):
                    want &= {i.instance_id for i in await list_instances(self.discovery, self.namespace,
                                                                           self.component)}

    async def wait_for(self, predicate: Callable[[], bool], timeout: float) -> bool:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not predicate():
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            self._changed.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._changed.wait(), remaining)
        return True

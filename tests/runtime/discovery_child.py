"""A worker stand-in for the discovery failure tests, and the test-side helpers that drive it.

    python tests/runtime/discovery_child.py {file|etcd} LOCATION TTL INSTANCE_ID

registers one Instance (LOCATION is the directory or the etcd endpoints), prints `READY <key>`, and runs
until killed. The tests SIGKILL / SIGSTOP it, or stop etcd under it; it must never exit on its own.
Logs go to stderr. `Child` runs it from a test; `Recorder`, `next_event`, `wait_until`, `assert_paired` are shared
by the discovery test modules.
"""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from kvrelay.runtime.discovery import DiscoveryConfig, Instance, WatchEvent, make_discovery, register_instance

NAMESPACE, COMPONENT = "childtest", "worker"


async def main(backend: str, location: str, ttl: float, instance_id: str) -> None:
    cfg = DiscoveryConfig(discovery=backend, discovery_dir=location, etcd_endpoints=location, lease_ttl=ttl)
    discovery = make_discovery(cfg)
    await discovery.start()
    inst = Instance(namespace=NAMESPACE, component=COMPONENT, instance_id=instance_id, address="127.0.0.1:1")
    await register_instance(discovery, inst)
    print("READY", inst.key, flush=True)
    await asyncio.Event().wait()


# -- test side --------------------------------------------------------------------------------------


class Child:
    """Runs this script as a subprocess; stderr goes to `log_path` so a failing test can show it."""

    def __init__(self, backend: str, location: str, ttl: float, instance_id: str, log_path: Path):
        self.log_path = log_path
        with open(log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, __file__, backend, location, str(ttl), instance_id],
                stdout=subprocess.PIPE, stderr=log,
            )

    async def ready(self, timeout: float = 30.0) -> str:
        """Wait for READY; returns the registered key."""
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(self.proc.stdout.readline), timeout)
        if not line.startswith(b"READY"):
            raise AssertionError(f"child did not get ready (exit {self.proc.poll()}):\n{self.logs()}")
        return line.split()[1].decode()

    def signal(self, sig: int) -> None:
        os.kill(self.proc.pid, sig)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.alive():
            self.proc.kill()
        self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()



async def next_event(events: AsyncIterator[WatchEvent], timeout: float = 5.0) -> WatchEvent:
    return await asyncio.wait_for(anext(events), timeout)


async def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.05)


def assert_paired(events: list[WatchEvent]) -> None:
    """base.py: per key, `removed` only after an `added`, and at most once per `added`."""
    present: set[str] = set()
    for ev in events:
        if ev.kind == "removed":
            assert ev.key in present, f"removed without a prior added: {ev}"
            present.discard(ev.key)
        else:
            present.add(ev.key)



class Recorder:
    """Consumes a watch in a background task, keeping each event with its arrival time, so a test can
    wait for an event or check that none came without cancelling (and so ending) the watch."""

    def __init__(self, events: AsyncIterator[WatchEvent]):
        self.events: list[tuple[float, WatchEvent]] = []
        self._task = asyncio.create_task(self._run(events))

    async def _run(self, events: AsyncIterator[WatchEvent]) -> None:
        async for ev in events:
            self.events.append((time.monotonic(), ev))

    def kinds(self, key: str) -> list[str]:
        return [ev.kind for _, ev in self.events if ev.key == key]

    def state(self) -> dict[str, bytes]:
        """What the events say is registered now."""
        current: dict[str, bytes] = {}
        for _, ev in self.events:
            if ev.kind == "added":
                current[ev.key] = ev.value
            else:
                current.pop(ev.key, None)
        return current

    async def wait_for(self, key: str, kinds: list[str], timeout: float) -> float:
        """Wait until the events for `key` are exactly `kinds`; returns the last one's arrival time."""
        await wait_until(lambda: self.kinds(key) == kinds or self._task.done(), timeout,
                         f"{kinds} for {key} (got {self.kinds(key)})")
        assert self.kinds(key) == kinds, f"watch ended early: {self._task}"
        return [t for t, ev in self.events if ev.key == key][-1]

    def alive(self) -> bool:
        return not self._task.done()

    async def close(self) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname).1s child %(name)s: %(message)s")
    backend, location, ttl, instance_id = sys.argv[1:5]
    asyncio.run(main(backend, location, float(ttl), instance_id))

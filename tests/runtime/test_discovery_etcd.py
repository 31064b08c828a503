"""Discovery under failure, with real processes: a SIGKILLed worker leaves within TTL + 1 s (etcd and
file), and an etcd outage neither kills a worker nor loses its registration or a running watch.

Workers are subprocesses (tests/runtime/discovery_child.py) so "the process never exited" is checked
on a real process. Measured times are printed (visible with `pytest -s`).
"""

from __future__ import annotations

import asyncio
import signal
import time

import pytest

from kvrelay.runtime.discovery import Instance, instances_prefix, list_instances
from kvrelay.runtime.discovery.etcd import DiscoveryUnavailable, EtcdDiscovery
from kvrelay.runtime.discovery.file import FileDiscovery
from kvrelay.runtime.wire import decode
from tests.runtime.discovery_child import NAMESPACE, Child, Recorder, assert_paired, wait_until
from tests.servers import free_port

ETCD_TTL = 2.0
FILE_TTL = 1.0


@pytest.fixture
def children(tmp_path):
    made: list[Child] = []

    def spawn(backend: str, location: str, ttl: float, instance_id: str) -> Child:
        child = Child(backend, location, ttl, instance_id, tmp_path / f"{instance_id}.log")
        made.append(child)
        return child

    yield spawn
    for child in made:
        child.stop()
        print(f"--- {child.log_path.name}\n{child.logs()}")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("backend", ["etcd", "file"])
async def test_sigkilled_worker_leaves_watch_within_ttl(backend, request, tmp_path, children):
    if backend == "etcd":
        ttl, location = ETCD_TTL, f"127.0.0.1:{request.getfixturevalue('etcd').port}"
        watcher = EtcdDiscovery(location, ttl=ttl)
    else:
        ttl, location = FILE_TTL, str(tmp_path / "discovery")
        watcher = FileDiscovery(location, ttl=ttl)
    child = children(backend, location, ttl, "doomed")
    key = await child.ready()
    recorder = Recorder(watcher.watch(instances_prefix(NAMESPACE)))
    try:
        await recorder.wait_for(key, ["added"], timeout=10)
        assert decode(recorder.state()[key], Instance).instance_id == "doomed"
        # Alive, the worker outlives its TTL: keep-alive/heartbeat work (else the kill below proves nothing).
        await asyncio.sleep(1.5 * ttl)
        assert recorder.kinds(key) == ["added"]
        child.signal(signal.SIGKILL)
        killed = time.monotonic()
        elapsed = await recorder.wait_for(key, ["added", "removed"], timeout=ttl + 5) - killed
    finally:
        await recorder.close()
        await watcher.close()
    print(f"{backend}: SIGKILLed worker removed from watch {elapsed:.2f} s after the kill (TTL {ttl})")
    assert elapsed <= ttl + 1.0
    assert await fresh_list(backend, location, ttl) == {}


async def fresh_list(backend: str, location: str, ttl: float) -> dict[str, bytes]:
    fresh = EtcdDiscovery(location, ttl=ttl) if backend == "etcd" else FileDiscovery(location, ttl=ttl)
    try:
        return await fresh.list(instances_prefix(NAMESPACE))
    finally:
        await fresh.close()


@pytest.mark.timeout(90)
async def test_etcd_outage_worker_returns_and_watch_survives(etcd, children):
    endpoints = f"127.0.0.1:{etcd.port}"
    prefix = instances_prefix(NAMESPACE)
    child = children("etcd", endpoints, ETCD_TTL, "survivor")
    key = await child.ready()

    watcher, other, fresh = (EtcdDiscovery(endpoints, ttl=ETCD_TTL) for _ in range(3))
    recorder = Recorder(watcher.watch(prefix))
    try:
        await recorder.wait_for(key, ["added"], timeout=10)
        await other.start()

        etcd.stop()
        stopped = time.monotonic()
        # While etcd is down, user calls fail with a clear error instead of hanging...
        with pytest.raises(DiscoveryUnavailable):
            await other.list(prefix)
        with pytest.raises(DiscoveryUnavailable):  # ...and a failed register is applied once it is back
            await other.register(prefix + "late", b"registered during the outage")
        await asyncio.sleep(5.0 - (time.monotonic() - stopped))  # the outage under test lasts 5 s
        assert child.alive(), "worker exited during the etcd outage"
        etcd.start()
        restarted = time.monotonic()

        while True:
            try:
                found = {i.instance_id for i in await list_instances(fresh, NAMESPACE)}
            except DiscoveryUnavailable:
                found = set()
            if "survivor" in found:
                break
            assert time.monotonic() - restarted < 5.0, "worker not back in list within 5 s of the restart"
            await asyncio.sleep(0.1)
        recovery = time.monotonic() - restarted
        print(f"etcd outage: worker back in list {recovery:.2f} s after the restart")
        assert child.alive(), "worker exited after the etcd outage"

        # The watch started before the outage still works: it shows the worker, the register that
        # failed during the outage, and a change made afterwards.
        await wait_until(lambda: prefix + "late" in recorder.state(), 10, "the outage-time register")
        await other.register(prefix + "after", b"after")
        await wait_until(lambda: prefix + "after" in recorder.state(), 10, "a post-outage change")
        assert key in recorder.state()
        assert recorder.alive()
        assert_paired([ev for _, ev in recorder.events])
        assert child.alive()
    finally:
        await recorder.close()
        for client in (watcher, other, fresh):
            await client.close()


async def test_first_reachable_endpoint_is_used(etcd):
    dead = free_port()
    client = EtcdDiscovery(f"127.0.0.1:{dead}, http://127.0.0.1:{etcd.port}", ttl=ETCD_TTL)
    try:
        await client.start()
        await client.register("kvrelay/t/instances/w/1", b"x")
        assert await client.list("kvrelay/t/") == {"kvrelay/t/instances/w/1": b"x"}
    finally:
        await client.close()
    with pytest.raises(ValueError):
        EtcdDiscovery("localhost", ttl=ETCD_TTL)

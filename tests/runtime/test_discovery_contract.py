"""The discovery contract (runtime/discovery/base.py), one suite for every backend, each against the real
store: a shared MemStore, a shared directory, a real etcd server. Clients made by one `store` share it.

Every test uses its own key prefix (`ns`), so the module-wide etcd server carries no state between tests.
"""

from __future__ import annotations

import asyncio
import signal
import time
import uuid
from collections.abc import Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass

import pytest

from kvrelay.runtime.discovery import Discovery, WatchEvent, instances_prefix
from kvrelay.runtime.discovery.etcd import EtcdDiscovery
from kvrelay.runtime.discovery.file import FileDiscovery
from kvrelay.runtime.discovery.mem import MemDiscovery, MemStore
from tests.runtime.discovery_child import NAMESPACE, Child, Recorder, assert_paired, next_event
from tests.servers import etcd_server

TTL = {"mem": 0.0, "file": 1.0, "etcd": 2.0}  # short leases keep the expiry tests fast


@dataclass
class Store:
    name: str
    ttl: float
    location: str  # the directory (file) or the endpoint (etcd)
    connect: Callable[[], Awaitable[Discovery]]  # a new started client of this store


@pytest.fixture(scope="module")
def shared_etcd(tmp_path_factory):
    server = etcd_server(tmp_path_factory.mktemp("etcd"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(params=["mem", "file", "etcd"])
def backend(request, tmp_path) -> tuple[str, str]:
    if request.param == "etcd":
        return "etcd", f"127.0.0.1:{request.getfixturevalue('shared_etcd').port}"
    return request.param, str(tmp_path / "discovery")


@pytest.fixture
async def store(backend):
    name, location = backend
    mem = MemStore()
    clients: list[Discovery] = []

    async def connect() -> Discovery:
        if name == "mem":
            client: Discovery = MemDiscovery(mem)
        elif name == "file":
            client = FileDiscovery(location, ttl=TTL["file"])
        else:
            client = EtcdDiscovery(location, ttl=TTL["etcd"])
        clients.append(client)
        await client.start()
        return client

    yield Store(name, TTL[name], location, connect)
    for client in clients:
        await client.close()


@pytest.fixture
def ns() -> str:
    return f"t{uuid.uuid4().hex[:8]}/"


async def test_register_then_list_from_any_client(store, ns):
    a, b = await store.connect(), await store.connect()
    await a.register(ns + "w/1", b"one")
    assert await a.list(ns) == {ns + "w/1": b"one"}
    assert await b.list(ns) == {ns + "w/1": b"one"}


async def test_reregister_replaces_value(store, ns):
    a = await store.connect()
    key = ns + "w/1"
    await a.register(key, b"v1")
    async with aclosing(a.watch(ns)) as events:
        assert await next_event(events) == WatchEvent("added", key, b"v1")
        await a.register(key, b"v2")
        assert await next_event(events) == WatchEvent("added", key, b"v2")
    assert await a.list(ns) == {key: b"v2"}


async def test_deregister_removes_only_own_keys(store, ns):
    a, b = await store.connect(), await store.connect()
    await a.register(ns + "1", b"1")
    await a.register(ns + "2", b"2")
    await a.deregister(ns + "1")
    await a.deregister(ns + "never-registered")  # unknown: ignored
    await b.deregister(ns + "2")  # a's key, not b's: ignored
    assert await b.list(ns) == {ns + "2": b"2"}


async def test_list_filters_by_string_prefix(store, ns):
    a = await store.connect()
    x, y, z, q, top = ns + "a/b/x", ns + "a/b/y", ns + "a/c/z", ns + "ab/q", ns + "b"
    for key in (x, y, z, q, top):
        await a.register(key, key.encode())
    assert set(await a.list(ns + "a/b/")) == {x, y}
    assert set(await a.list(ns + "a/")) == {x, y, z}
    assert set(await a.list(ns + "a")) == {x, y, z, q}  # a plain string prefix, not a path prefix
    assert await a.list(x) == {x: x.encode()}
    assert await a.list(ns + "nothing/") == {}
    assert set(await a.list(ns)) == {x, y, z, q, top}


async def test_watch_yields_snapshot_then_changes_in_order(store, ns):
    a, b = await store.connect(), await store.connect()
    await a.register(ns + "w/1", b"1")
    await a.register(ns + "w/2", b"2")
    async with aclosing(b.watch(ns + "w/")) as events:
        snapshot = [await next_event(events), await next_event(events)]
        assert sorted(snapshot, key=lambda e: e.key) == [
            WatchEvent("added", ns + "w/1", b"1"), WatchEvent("added", ns + "w/2", b"2")]
        await a.register(ns + "x/1", b"outside the prefix")  # must never show up below
        await a.register(ns + "w/3", b"3")
        assert await next_event(events) == WatchEvent("added", ns + "w/3", b"3")
        await a.register(ns + "w/1", b"1b")
        assert await next_event(events) == WatchEvent("added", ns + "w/1", b"1b")
        await a.deregister(ns + "w/2")
        assert await next_event(events) == WatchEvent("removed", ns + "w/2")
        await a.deregister(ns + "w/3")
        assert await next_event(events) == WatchEvent("removed", ns + "w/3")


async def test_close_removes_keys_and_watchers_see_removed(store, ns):
    a, b = await store.connect(), await store.connect()
    await a.register(ns + "a1", b"1")
    await a.register(ns + "a2", b"2")
    await b.register(ns + "b", b"b")
    async with aclosing(b.watch(ns)) as events:
        seen = [await next_event(events) for _ in range(3)]
        await a.close()
        seen += [await next_event(events), await next_event(events)]
        assert {e for e in seen[3:]} == {WatchEvent("removed", ns + "a1"), WatchEvent("removed", ns + "a2")}
        assert_paired(seen)
    assert await b.list(ns) == {ns + "b": b"b"}
    await a.close()  # idempotent


async def test_two_clients_see_each_other(store, ns):
    a, b = await store.connect(), await store.connect()
    await a.register(ns + "a", b"A")
    await b.register(ns + "b", b"B")
    both = {ns + "a": b"A", ns + "b": b"B"}
    assert await a.list(ns) == both
    assert await b.list(ns) == both
    async with aclosing(a.watch(ns)) as from_a, aclosing(b.watch(ns)) as from_b:
        assert {await next_event(from_a), await next_event(from_a)} == {
            WatchEvent("added", k, v) for k, v in both.items()}
        assert len({await next_event(from_b), await next_event(from_b)}) == 2
        await b.register(ns + "c", b"C")
        assert await next_event(from_a) == WatchEvent("added", ns + "c", b"C")
        await a.deregister(ns + "a")
        # Order is guaranteed per key only; these two keys may arrive either way round.
        assert {await next_event(from_b), await next_event(from_b)} == {
            WatchEvent("added", ns + "c", b"C"), WatchEvent("removed", ns + "a")}


async def test_invalid_keys_raise_value_error(store):
    a = await store.connect()
    for key in ("", "/a", "a/", "a//b", "a/./b", "a/../b", "..", "."):
        with pytest.raises(ValueError):
            await a.register(key, b"x")


@pytest.mark.timeout(60)
async def test_owner_that_stops_heartbeating_expires_then_returns(store, tmp_path):
    """A live owner outlives its TTL; paused (SIGSTOP), its keys expire within TTL + 1 s; resumed, it
    registers them again. The owner is a real process, as when a worker hangs or is swapped out."""
    if store.name == "mem":
        pytest.skip("mem has no lease TTL: its lease is the client object")
    child = Child(store.name, store.location, store.ttl, f"paused-{uuid.uuid4().hex[:6]}", tmp_path / "child.log")
    watcher = await store.connect()
    recorder = Recorder(watcher.watch(instances_prefix(NAMESPACE)))
    try:
        key = await child.ready()
        await recorder.wait_for(key, ["added"], timeout=10)
        await asyncio.sleep(1.5 * store.ttl)  # heartbeats keep it registered past one TTL
        assert recorder.kinds(key) == ["added"]
        child.signal(signal.SIGSTOP)
        stopped = time.monotonic()
        expired_after = await recorder.wait_for(key, ["added", "removed"], timeout=store.ttl + 5) - stopped
        child.signal(signal.SIGCONT)
        await recorder.wait_for(key, ["added", "removed", "added"], timeout=10)
        print(f"{store.name}: paused owner expired after {expired_after:.2f} s (TTL {store.ttl})")
        assert expired_after <= store.ttl + 1.0
        assert key in await watcher.list(instances_prefix(NAMESPACE))
        assert child.alive()
    finally:
        await recorder.close()
        if child.alive():
            child.signal(signal.SIGCONT)
        child.stop()
        print(child.logs())


async def test_foreign_record_under_the_instances_prefix_is_skipped(store, caplog):
    """A value that is not an Instance (another tool's key, a corrupt record) hides no worker."""
    from kvrelay.runtime.discovery import Instance, list_instances, register_instance, watch_instances

    namespace = f"n{uuid.uuid4().hex[:8]}"
    a = await store.connect()
    good = Instance(namespace=namespace, component="backend", instance_id="w1", address="127.0.0.1:1",
                    role="agg", model="m", block_size=16, kv_capacity_blocks=1)
    await register_instance(a, good)
    await a.register(instances_prefix(namespace) + "backend/junk", b"not an instance")
    assert [i.instance_id for i in await list_instances(a, namespace)] == ["w1"]
    async with aclosing(watch_instances(a, namespace)) as events:
        first = await asyncio.wait_for(anext(events), 5)
    assert first.instance is not None and first.instance.instance_id == "w1"
    assert "not an instance record" in caplog.text

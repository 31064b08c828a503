"""One contract suite for every event-plane backend (see runtime/events/base.py), on real transports:
inproc, zmq through a real `ZmqBroker` (ipc and tcp), nats through a real nats-server."""

from __future__ import annotations

import asyncio
import shutil
import sys
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import msgspec
import pytest

from kvrelay.runtime.events import EventPlane, EventsConfig, Message, Subscription, make_event_plane
from kvrelay.runtime.events.inproc import InprocBroker, InprocEventPlane
from kvrelay.runtime.events.nats_plane import NatsEventPlane
from kvrelay.runtime.events.zmq_plane import ZmqBroker, ZmqBrokerUnreachable, ZmqEventPlane

DEADLINE_S = 5.0
REPO = Path(__file__).resolve().parents[2]


class KvEvent(msgspec.Struct):
    worker_id: str
    event_id: int
    kind: str
    seq_hashes: list[int]


MakePlane = Callable[..., Awaitable[EventPlane]]


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    # ipc:// paths must fit in sun_path (~107 bytes); pytest's tmp_path can be longer.
    d = Path(tempfile.mkdtemp(prefix="kvr-", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(params=["inproc", "zmq-ipc", "zmq-tcp", "nats"])
async def make_plane(request, short_tmp) -> AsyncIterator[MakePlane]:
    """An async factory of started planes, all clients of the same plane (shared broker/server)."""
    kind = request.param
    broker: ZmqBroker | None = None
    if kind == "inproc":
        inproc = InprocBroker()
        new = lambda q: InprocEventPlane(inproc, queue_size=q)  # noqa: E731
    elif kind.startswith("zmq"):
        eps = ((f"ipc://{short_tmp}/pub", f"ipc://{short_tmp}/sub") if kind == "zmq-ipc"
               else ("tcp://127.0.0.1:*", "tcp://127.0.0.1:*"))
        broker = ZmqBroker(*eps)
        broker.start()
        new = lambda q: ZmqEventPlane(broker.pub_endpoint, broker.sub_endpoint, queue_size=q)  # noqa: E731
    else:
        url = f"nats://127.0.0.1:{request.getfixturevalue('nats').port}"
        new = lambda q: NatsEventPlane([url], queue_size=q)  # noqa: E731
    planes: list[EventPlane] = []

    async def make(queue_size: int = 10_000) -> EventPlane:
        plane = new(queue_size)
        planes.append(plane)
        await plane.start()
        return plane

    yield make
    for plane in planes:
        await plane.close()
    if broker is not None:
        broker.close()


async def receive(sub: Subscription, n: int, timeout: float = DEADLINE_S) -> list[Message]:
    it = aiter(sub)

    async def take() -> list[Message]:
        return [await anext(it) for _ in range(n)]

    return await asyncio.wait_for(take(), timeout)


async def until(cond: Callable[[], bool], timeout: float = DEADLINE_S) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not cond():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached before the deadline"
        await asyncio.sleep(0.005)


async def test_struct_roundtrip(make_plane: MakePlane) -> None:
    pub, subp = await make_plane(), await make_plane()
    sub = await subp.subscribe("kvrelay.ns.kv_events")
    event = KvEvent("w1", 7, "stored", [1, 2, 3])
    await pub.publish("kvrelay.ns.kv_events", event)
    [msg] = await receive(sub, 1)
    assert msg.subject == "kvrelay.ns.kv_events"
    assert msg.decode(KvEvent) == event


async def test_raw_bytes(make_plane: MakePlane) -> None:
    pub, subp = await make_plane(), await make_plane()
    sub = await subp.subscribe("raw.x")
    payloads = [b"\x00\xff raw \r\n", b"", bytes(range(256)) * 64]
    for p in payloads:
        await pub.publish("raw.x", p)
    assert [m.data for m in await receive(sub, 3)] == payloads


async def test_wildcards_match_exactly(make_plane: MakePlane) -> None:
    pub, subp = await make_plane(), await make_plane()
    subjects = ["a", "a.b", "a.b.c", "a.x.c", "a.b.c.d", "x.b", "ab.b", "b"]
    expected = {
        "a.*": {"a.b"},
        "a.>": {"a.b", "a.b.c", "a.x.c", "a.b.c.d"},
        "a.*.c": {"a.b.c", "a.x.c"},
        "*.b": {"a.b", "x.b", "ab.b"},
        "a.b": {"a.b"},
        ">": set(subjects),
        "*": {"a", "b"},
    }
    subs = {p: await subp.subscribe(p) for p in expected}
    for s in subjects:
        await pub.publish(s, b"data")
    # One publisher on one connection: every backend keeps its order across subjects, so an END marker
    # on a subject the pattern matches comes after everything else it would receive.
    end_marker = {"a.*": "a.b", "a.>": "a.b", "a.*.c": "a.b.c", "*.b": "a.b", "a.b": "a.b", ">": "a", "*": "a"}
    for s in sorted(set(end_marker.values())):
        await pub.publish(s, b"END")
    for pattern, sub in subs.items():
        got: list[str] = []

        async def collect(sub: Subscription = sub, got: list[str] = got) -> None:
            async for m in sub:
                if m.data == b"END":
                    return
                got.append(m.subject)

        await asyncio.wait_for(collect(), DEADLINE_S)
        assert sorted(got) == sorted(expected[pattern]), pattern


async def test_order_of_1000(make_plane: MakePlane) -> None:
    pub, subp = await make_plane(), await make_plane()
    sub = await subp.subscribe("order.*")
    for i in range(1000):
        await pub.publish("order.x", KvEvent("w", i, "stored", []))
    got = [m.decode(KvEvent).event_id for m in await receive(sub, 1000)]
    assert got == list(range(1000))


async def test_two_subscribers_both_receive(make_plane: MakePlane) -> None:
    pub, s1, s2 = await make_plane(), await make_plane(), await make_plane()
    subs = [await s1.subscribe("fan.>"), await s2.subscribe("fan.>"), await s2.subscribe("fan.out")]
    await pub.publish("fan.out", b"hello")
    for sub in subs:
        assert [m.data for m in await receive(sub, 1)] == [b"hello"]


async def test_live_when_subscribe_returns(make_plane: MakePlane) -> None:
    """No sleeps: a message published right after subscribe() returns must arrive (slow joiners)."""
    pub, subp = await make_plane(), await make_plane()
    for i in range(20):
        sub = await subp.subscribe(f"live.{i}.>")
        await pub.publish(f"live.{i}.x", b"first")
        assert [m.data for m in await receive(sub, 1)] == [b"first"]
        await sub.close()
    # A publisher that has just started loses nothing either.
    sub = await subp.subscribe("fresh.pub")
    fresh = await make_plane()
    await fresh.publish("fresh.pub", b"from a fresh client")
    assert [m.data for m in await receive(sub, 1)] == [b"from a fresh client"]


async def test_closed_subscription_stops_and_iterator_ends(make_plane: MakePlane) -> None:
    pub, subp = await make_plane(), await make_plane()
    closing, staying = await subp.subscribe("cl.*"), await subp.subscribe("cl.*")
    seen: list[bytes] = []

    async def consume() -> None:
        async for m in closing:
            seen.append(m.data)

    consumer = asyncio.create_task(consume())
    await pub.publish("cl.a", b"before")
    await until(lambda: seen == [b"before"])
    await closing.close()
    await asyncio.wait_for(consumer, DEADLINE_S)  # the iterator ended
    await pub.publish("cl.a", b"after")
    # The other subscription on the same filter still receives; the closed one got nothing more.
    assert [m.data for m in await receive(staying, 2)] == [b"before", b"after"]
    assert seen == [b"before"]
    await staying.close()
    # All closed, then subscribe again: the filter comes back.
    again = await subp.subscribe("cl.*")
    await pub.publish("cl.b", b"again")
    assert [m.data for m in await receive(again, 1)] == [b"again"]


async def test_invalid_subjects_and_patterns(make_plane: MakePlane) -> None:
    plane = await make_plane()
    for subject in ["", "a..b", "a.*", "a.>", ".a", "a.", "a b", "a.\tb"]:
        with pytest.raises(ValueError):
            await plane.publish(subject, b"x")
    for pattern in ["", "a..b", "a.>.b", "a*", "a.b>", "> .a", "a.b c"]:
        with pytest.raises(ValueError):
            await plane.subscribe(pattern)


async def test_bounded_queue_drops_oldest(make_plane: MakePlane) -> None:
    pub, subp = await make_plane(), await make_plane(queue_size=10)
    sub = await subp.subscribe("slow.x")
    for i in range(25):
        await pub.publish("slow.x", KvEvent("w", i, "stored", []))
    await until(lambda: sub.dropped == 15)  # the consumer has not read anything yet
    got = [m.decode(KvEvent).event_id for m in await receive(sub, 10)]
    assert got == list(range(15, 25))
    assert sub.dropped == 15


def test_factory_builds_each_backend(short_tmp: Path) -> None:
    assert isinstance(make_event_plane(EventsConfig(events="inproc")), InprocEventPlane)
    assert isinstance(make_event_plane(EventsConfig(events="nats", nats_url="nats://h:1, nats://h:2")),
                      NatsEventPlane)
    zp = make_event_plane(EventsConfig(events="zmq", zmq_pub_endpoint="ipc:///x/p", zmq_sub_endpoint="ipc:///x/s"))
    assert isinstance(zp, ZmqEventPlane) and (zp.pub_endpoint, zp.sub_endpoint) == ("ipc:///x/p", "ipc:///x/s")


async def test_zmq_cross_process_publish(short_tmp: Path) -> None:
    """The embedded shape: a child process publishes through the broker; this process receives."""
    with ZmqBroker(f"ipc://{short_tmp}/pub", f"ipc://{short_tmp}/sub") as broker:
        plane = ZmqEventPlane(broker.pub_endpoint, broker.sub_endpoint)
        try:
            sub = await plane.subscribe("kvrelay.ns.kv_events")
            child = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "tests.runtime.events_child", broker.pub_endpoint, broker.sub_endpoint,
                "kvrelay.ns.kv_events", "200", cwd=REPO, stderr=asyncio.subprocess.PIPE)
            msgs = await receive(sub, 200, timeout=15)
            _, err = await asyncio.wait_for(child.communicate(), 15)
            assert child.returncode == 0, err.decode()
            assert [m.decode(KvEvent).event_id for m in msgs] == list(range(200))
            assert {m.decode(KvEvent).worker_id for m in msgs} == {f"child-{child.pid}"}
        finally:
            await plane.close()


async def test_zmq_broker_unreachable_is_a_clear_error(short_tmp: Path) -> None:
    plane = ZmqEventPlane(f"ipc://{short_tmp}/nobody-pub", f"ipc://{short_tmp}/nobody-sub", ready_timeout=0.3)
    with pytest.raises(ZmqBrokerUnreachable, match="nobody-pub.*not reachable"):
        await plane.start()
    await plane.close()


def test_zmq_second_broker_on_live_ipc_endpoint_refused(short_tmp: Path) -> None:
    with ZmqBroker(f"ipc://{short_tmp}/pub", f"ipc://{short_tmp}/sub"):
        with pytest.raises(RuntimeError, match="already running"):
            ZmqBroker(f"ipc://{short_tmp}/pub", f"ipc://{short_tmp}/sub").start()
    # Once closed, the endpoint can be bound again (a stale socket file is replaced).
    with ZmqBroker(f"ipc://{short_tmp}/pub", f"ipc://{short_tmp}/sub"):
        pass

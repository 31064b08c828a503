"""KvEventsConsumer on the real inproc event plane, with a fake resync (worker snapshot) function."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import pytest

from kvrelay.frontend.kv_events_consumer import KvEventsConsumer
from kvrelay.frontend.kv_index import KvIndex
from kvrelay.kvbm.events import KvEvent, KvSnapshot, kv_events_subject
from kvrelay.runtime.events.inproc import InprocBroker, InprocEventPlane

NS = "test"
DEADLINE_S = 5.0


class FakeWorkers:
    """Snapshots on demand (the next queued one; the last one stays); `gate` holds them back so the
    test can publish meanwhile."""

    def __init__(self) -> None:
        self.snapshots: dict[str, list[KvSnapshot]] = {}
        self.calls: list[str] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.failures = 0

    async def resync(self, worker_id: str) -> KvSnapshot:
        self.calls.append(worker_id)
        await self.gate.wait()
        if self.failures:
            self.failures -= 1
            raise ConnectionError("worker unreachable")
        queue = self.snapshots[worker_id]
        return queue.pop(0) if len(queue) > 1 else queue[0]


@pytest.fixture
async def setup() -> AsyncIterator[tuple[InprocEventPlane, KvIndex, FakeWorkers, KvEventsConsumer]]:
    broker = InprocBroker()
    pub, sub = InprocEventPlane(broker), InprocEventPlane(broker)
    index, workers = KvIndex(), FakeWorkers()
    consumer = KvEventsConsumer(sub, NS, index, workers.resync, backoff_s=0.01, max_attempts=3)
    await consumer.start()
    yield pub, index, workers, consumer
    await consumer.close()
    await pub.close()


def ev(w: str, eid: int, hashes: list[int], kind: str = "stored") -> KvEvent:
    return KvEvent(worker_id=w, event_id=eid, kind=kind, seq_hashes=hashes)  # type: ignore[arg-type]


async def publish(pub: InprocEventPlane, *events: KvEvent) -> None:
    for e in events:
        await pub.publish(kv_events_subject(NS), e)


async def until(cond: Callable[[], bool]) -> None:
    deadline = asyncio.get_running_loop().time() + DEADLINE_S
    while not cond():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached"
        await asyncio.sleep(0.005)


async def test_events_in_order_are_applied(setup) -> None:
    pub, index, workers, consumer = setup
    await publish(pub, ev("a", 1, [1, 2, 3]), ev("a", 2, [3], "removed"), ev("b", 1, [1]))
    await until(lambda: index.last_event_id("a") == 2 and index.last_event_id("b") == 1)
    assert index.overlap([1, 2, 3]) == {"a": 2, "b": 1}
    assert workers.calls == [] and consumer.resyncs_started == 0


async def test_gap_resyncs_buffers_and_replays_newer_events(setup) -> None:
    pub, index, workers, consumer = setup
    workers.gate.clear()
    workers.snapshots["a"] = [KvSnapshot(worker_id="a", last_event_id=4, tiers={"G1": [1, 2, 3, 4]})]
    await publish(pub, ev("a", 1, [1]), ev("a", 3, [9]))  # event 2 lost
    await until(lambda: workers.calls == ["a"])
    assert consumer.resyncing() == {"a"}
    # While the snapshot is on its way: older events (in the snapshot) and newer ones arrive;
    # another worker is not held up.
    await publish(pub, ev("a", 4, [4]), ev("a", 5, [5]), ev("a", 6, [4], "removed"), ev("b", 1, [1]))
    await until(lambda: index.last_event_id("b") == 1)
    assert index.overlap([1, 2, 3, 4, 5]) == {"a": 1, "b": 1}  # "a" still as before the gap
    workers.gate.set()
    await until(lambda: not consumer.resyncing())
    assert index.last_event_id("a") == 6
    assert index.blocks("a") == frozenset({1, 2, 3, 5})  # snapshot + 5 stored + 4 removed; 9 never
    await publish(pub, ev("a", 7, [4]))
    await until(lambda: index.last_event_id("a") == 7)
    assert workers.calls == ["a"] and consumer.resyncs_started == 1


async def test_a_gap_in_the_replayed_events_resyncs_again(setup) -> None:
    pub, index, workers, consumer = setup
    workers.gate.clear()
    workers.snapshots["a"] = [KvSnapshot(worker_id="a", last_event_id=2, tiers={"G1": [1]}),
                              KvSnapshot(worker_id="a", last_event_id=5, tiers={"G1": [1, 2, 4, 5]})]
    await publish(pub, ev("a", 2, [1]))  # the router joined late: first event it sees is 2
    await until(lambda: workers.calls == ["a"])
    await publish(pub, ev("a", 3, [2]), ev("a", 5, [5]))  # 4 lost while resyncing
    await until(lambda: len(consumer._buffers.get("a", ())) == 3)
    workers.gate.set()
    await until(lambda: not consumer.resyncing())
    assert workers.calls == ["a", "a"] and consumer.resyncs_started == 2
    assert index.blocks("a") == frozenset({1, 2, 4, 5}) and index.last_event_id("a") == 5


async def test_worker_removed_during_resync(setup) -> None:
    pub, index, workers, consumer = setup
    await publish(pub, ev("a", 1, [1, 2]), ev("b", 1, [1]))
    await until(lambda: index.last_event_id("b") == 1)
    workers.gate.clear()
    await publish(pub, ev("a", 3, [3]))
    await until(lambda: consumer.resyncing() == {"a"})
    consumer.remove_worker("a")
    assert consumer.resyncing() == set() and index.overlap([1, 2]) == {"b": 1}
    workers.snapshots["a"] = [KvSnapshot(worker_id="a", last_event_id=3, tiers={"G1": [1, 2, 3]})]
    workers.gate.set()
    await publish(pub, ev("a", 4, [4]), ev("b", 2, [2]))  # a late event of the dead worker
    await until(lambda: index.last_event_id("b") == 2)
    assert index.overlap([1, 2]) == {"b": 2} and "a" not in index.workers()
    assert workers.calls == ["a"]
    consumer.add_worker("a")  # re-registered: its next event resyncs it
    workers.snapshots["a"] = [KvSnapshot(worker_id="a", last_event_id=5, tiers={"G1": [5]})]
    await publish(pub, ev("a", 5, [5]))
    await until(lambda: index.last_event_id("a") == 5)
    assert workers.calls == ["a", "a"] and index.overlap([5]) == {"a": 1}


async def test_a_snapshot_that_never_covers_the_gap_gives_up(setup) -> None:
    pub, index, workers, consumer = setup
    workers.snapshots["a"] = [KvSnapshot(worker_id="a", last_event_id=1, tiers={"G1": [1]})]  # stale
    await publish(pub, ev("a", 3, [3]))
    await until(lambda: not consumer.resyncing() and len(workers.calls) == 3)  # max_attempts
    assert "a" not in index.workers()


async def test_failing_resync_retries_then_drops_the_worker(setup) -> None:
    pub, index, workers, consumer = setup
    await publish(pub, ev("a", 1, [1, 2]))
    await until(lambda: index.last_event_id("a") == 1)
    workers.failures = 3  # max_attempts
    await publish(pub, ev("a", 3, [3]))
    await until(lambda: not consumer.resyncing() and len(workers.calls) == 3)
    assert "a" not in index.workers() and index.overlap([1, 2]) == {}  # untrusted state dropped
    workers.snapshots["a"] = [KvSnapshot(worker_id="a", last_event_id=4, tiers={"G1": [1, 2, 3, 4]})]
    await publish(pub, ev("a", 4, [4]))  # the next event starts over
    await until(lambda: index.last_event_id("a") == 4)
    assert index.overlap([1, 2, 3, 4]) == {"a": 4} and len(workers.calls) == 4


async def test_snapshot_worker_id_is_taken_from_the_request(setup) -> None:
    pub, index, workers, consumer = setup
    workers.snapshots["a"] = [KvSnapshot(worker_id="", last_event_id=3, tiers={"G1": [7]})]  # engine-level
    await publish(pub, ev("a", 3, [7]))
    await until(lambda: index.last_event_id("a") == 3)
    assert index.overlap([7]) == {"a": 1} and "" not in index.workers()


async def test_garbage_on_the_subject_is_skipped(setup) -> None:
    pub, index, workers, consumer = setup
    await pub.publish(kv_events_subject(NS), b"\xc1 not msgpack")
    await publish(pub, ev("a", 1, [1]))
    await until(lambda: index.last_event_id("a") == 1)
    assert consumer.undecodable == 1


async def test_close_cancels_pending_resyncs(setup) -> None:
    pub, index, workers, consumer = setup
    workers.gate.clear()
    await publish(pub, ev("a", 2, [1]))
    await until(lambda: consumer.resyncing() == {"a"})
    await consumer.close()
    assert consumer.resyncing() == set()

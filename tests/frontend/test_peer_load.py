"""PeerLoad: frontends sharing workers hold each other's in-flight requests (issue 19), over a real ZMQ broker."""

from __future__ import annotations

import asyncio
import random
import shutil
import tempfile
from pathlib import Path

import pytest

from kvrelay.frontend.kv_index import KvIndex
from kvrelay.frontend.peer_load import PeerLoad
from kvrelay.frontend.router import RouteRequest, WorkerState, make_router
from kvrelay.runtime.events.zmq_plane import ZmqBroker, ZmqEventPlane


async def _until(cond, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not cond():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


@pytest.fixture
def broker():
    d = Path(tempfile.mkdtemp(prefix="kvr-", dir="/tmp"))  # ipc paths must fit in sun_path
    try:
        with ZmqBroker(f"ipc://{d}/pub", f"ipc://{d}/sub") as b:
            yield b
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _plane(broker: ZmqBroker) -> ZmqEventPlane:
    return ZmqEventPlane(broker.pub_endpoint, broker.sub_endpoint)


def _req(i: int, blocks: int = 4) -> RouteRequest:
    return RouteRequest(request_id=f"r{i}", block_hashes=[i * 100 + b for b in range(blocks)],
                        num_prompt_tokens=blocks * 16)


async def _frontend(broker: ZmqBroker, name: str, **kw):
    """A kv router wired to a PeerLoad the way FrontendService wires it."""
    plane = _plane(broker)
    await plane.start()
    router = make_router("kv", index=KvIndex(), rng=random.Random(0), overlap_weight=2.0)
    peers = PeerLoad(plane, "ns", name, {router.label: router}, **kw)
    await peers.start()
    return plane, router, peers


def _load(router, w: str) -> tuple[int, int]:
    return router.inflight.requests(w), router.inflight.blocks(w)


async def test_a_frontend_avoids_the_worker_another_frontend_just_loaded(broker):
    workers = [WorkerState(worker_id="w0"), WorkerState(worker_id="w1")]
    (pa, a, a_peers), (pb, b, b_peers) = [await _frontend(broker, n) for n in ("a", "b")]
    try:
        await asyncio.sleep(0.2)  # both subscriptions live
        for i in range(10):  # alone, b would pick a's worker half the time: 2^-10 to pass by luck
            wa = a.select(_req(2 * i), workers).worker_id
            await _until(lambda wa=wa: _load(b, wa) == (1, 4))
            wb = b.select(_req(2 * i + 1), workers).worker_id
            assert wb != wa
            await _until(lambda wb=wb: _load(a, wb) == (1, 4))
            a.on_finish(f"r{2 * i}")
            b.on_finish(f"r{2 * i + 1}")
            await _until(lambda: len(a.inflight) == len(b.inflight) == 0)
    finally:
        for plane, peers in ((pa, a_peers), (pb, b_peers)):
            await peers.close()
            await plane.close()


async def test_a_block_shared_by_two_frontends_counts_once(broker):
    (pa, a, a_peers), (pb, b, b_peers) = [await _frontend(broker, n) for n in ("a", "b")]
    try:
        await asyncio.sleep(0.2)
        system = [7, 8, 9]  # a system prompt both frontends' requests start with
        for router, rid in ((a, "x"), (b, "y")):
            req = RouteRequest(request_id=rid, block_hashes=[*system, hash(rid)], num_prompt_tokens=4 * 16 + 3)
            router.select(req, [WorkerState(worker_id="w0")])
        # 3 shared + 2 own + 2 partial last blocks, as one frontend with both requests would count them
        await _until(lambda: _load(a, "w0") == _load(b, "w0") == (2, 7))
    finally:
        for plane, peers in ((pa, a_peers), (pb, b_peers)):
            await peers.close()
            await plane.close()


async def test_a_peers_queued_prefill_and_speculative_blocks_count_until_its_first_token(broker):
    """Issue 27: b's router sees the prefill a's request queues on w0 (so a burst across frontends
    spreads on queued work), holds its prompt blocks speculatively (a second turn sent to b goes where
    the first went), and drops the queued prefill when a's first token comes."""
    (pa, a, a_peers), (pb, b, b_peers) = [await _frontend(broker, n) for n in ("a", "b")]
    try:
        await asyncio.sleep(0.2)
        a.select(_req(1, blocks=8), [WorkerState(worker_id="w0")])
        await _until(lambda: b.inflight.queued_prefill("w0") == 8 * 16)
        second = RouteRequest(request_id="t2", block_hashes=[*_req(1, blocks=8).block_hashes, 5],
                              num_prompt_tokens=9 * 16)
        workers = [WorkerState(worker_id=w) for w in ("w1", "w0", "w2")]
        decision = b.select(second, workers)
        assert (decision.worker_id, decision.prefill_tokens) == ("w0", 16)
        b.on_finish("t2")
        a.on_first_token("r1")
        await _until(lambda: b.inflight.queued_prefill("w0") == 0)
        assert b.inflight.requests("w0") == 1  # still in flight: decoding
        a.on_finish("r1")
        await _until(lambda: len(b.inflight) == 0)
    finally:
        for plane, peers in ((pa, a_peers), (pb, b_peers)):
            await peers.close()
            await plane.close()


async def test_a_peer_that_closes_or_goes_silent_is_forgotten(broker):
    a_plane, a, a_peers = await _frontend(broker, "a")
    b_plane, b, b_peers = await _frontend(broker, "b", stale=0.3, heartbeat=0.1)
    c_plane, c, c_peers = await _frontend(broker, "c")
    try:
        await asyncio.sleep(0.2)
        a.select(_req(1), [WorkerState(worker_id="w0")])
        c.select(_req(2), [WorkerState(worker_id="w0")])
        await _until(lambda: _load(b, "w0")[0] == 2 and b_peers.peers() == ["a", "c"])
        await a_peers.close()  # a leaves: it says so
        await _until(lambda: _load(b, "w0")[0] == 1)
        for t in c_peers._tasks:  # c dies without a word: its heartbeats stop
            t.cancel()
        await _until(lambda: _load(b, "w0") == (0, 0) and b_peers.peers() == [], timeout=3)
    finally:
        await c_peers.close()
        await b_peers.close()
        for p in (a_plane, b_plane, c_plane):
            await p.close()


async def test_a_lost_message_heals_with_the_next_full_state(broker):
    a_plane, a, a_peers = await _frontend(broker, "a", heartbeat=0.2)
    b_plane, b, b_peers = await _frontend(broker, "b")
    try:
        await asyncio.sleep(0.3)
        b.inflight.add_entry("\x00peer:a/ghost", "w0", [1, 2], 0)  # as if a's FINISH of it had been lost
        b_peers._held.setdefault("a", (0.0, set()))[1].add(("kv", "ghost"))
        a.select(_req(3), [WorkerState(worker_id="w1")])
        await _until(lambda: _load(b, "w1") == (1, 4) and _load(b, "w0") == (0, 0))
    finally:
        for plane, peers in ((a_plane, a_peers), (b_plane, b_peers)):
            await peers.close()
            await plane.close()


async def test_publishing_is_coalesced(broker):
    plane, router, peers = await _frontend(broker, "a", interval=0.05)
    b_plane, b, b_peers = await _frontend(broker, "b")
    try:
        await asyncio.sleep(0.2)
        assert peers.peers() == ["b"]
        before = peers.published
        for i in range(200):
            router.select(_req(i), [WorkerState(worker_id="w0")])
        await asyncio.sleep(0.12)
        assert peers.published - before <= 4  # 200 changes in one burst: a message or two, not 200
        await _until(lambda: _load(b, "w0")[0] == 200)
    finally:
        for p, pl in ((peers, plane), (b_peers, b_plane)):
            await p.close()
            await pl.close()


async def test_a_lone_frontend_sends_only_heartbeats(broker):
    plane, router, peers = await _frontend(broker, "a", heartbeat=0.5)
    try:
        await asyncio.sleep(0.1)
        before = peers.published
        for i in range(50):
            router.select(_req(i), [WorkerState(worker_id="w0")])
            await asyncio.sleep(0.005)
        assert peers.published - before <= 1  # nobody listens: no per-change messages
    finally:
        await peers.close()
        await plane.close()

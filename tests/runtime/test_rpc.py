"""Request plane against real sockets (and a real child process for the kill test)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import msgspec
import pytest

from kvrelay.runtime.rpc import (
    EndpointNotFound,
    FrameTooLarge,
    RemoteError,
    RpcCancelled,
    RpcClient,
    RpcConnectionError,
    RpcServer,
)
from kvrelay.runtime.rpc.conn import parse_address


class Req(msgspec.Struct):
    count: int
    size: int = 0


class Resp(msgspec.Struct):
    seq: int
    data: bytes = b""


async def count_handler(req: Req):
    for i in range(req.count):
        yield Resp(i, b"x" * req.size)


@pytest.fixture
async def server():
    srv = RpcServer(max_frame=1 << 20)
    srv.add_endpoint("count", count_handler, Req)
    await srv.start()
    yield srv
    await srv.close()


@pytest.fixture
async def client():
    c = RpcClient(max_frame=1 << 20)
    yield c
    await c.close()


async def test_10k_streamed_messages_arrive_in_order(server, client):
    got = [r.seq async for r in client.call(server.address, "count", Req(10_000, 100), Resp)]
    assert got == list(range(10_000))


async def test_concurrent_streams_share_one_connection(server, client):
    async def one(n):
        return [r.seq async for r in client.call(server.address, "count", Req(n), Resp)]

    results = await asyncio.gather(*(one(n) for n in range(1, 200, 7)))
    assert results == [list(range(n)) for n in range(1, 200, 7)]
    assert len(client._conns) == 1


async def test_client_cancel_reaches_handler_within_50ms(client):
    seen: dict[str, float] = {}
    started = asyncio.Event()

    async def forever(_req: bytes):
        started.set()
        try:
            while True:
                yield Resp(0)
                await asyncio.sleep(0.005)
        except asyncio.CancelledError:
            seen["cancelled_at"] = time.monotonic()
            raise

    srv = RpcServer()
    srv.add_endpoint("forever", forever)
    await srv.start()

    async def consume():
        async for _ in client.call(srv.address, "forever", b""):
            pass

    task = asyncio.create_task(consume())
    await started.wait()
    await asyncio.sleep(0.05)
    t0 = time.monotonic()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    deadline = time.monotonic() + 1
    while "cancelled_at" not in seen and time.monotonic() < deadline:
        await asyncio.sleep(0.001)
    latency = seen["cancelled_at"] - t0
    print(f"cancel latency {latency * 1000:.2f} ms")
    assert latency < 0.05
    assert srv.active_calls == 0
    await srv.close()


async def test_leaving_async_with_cancels_the_handler(server, client):
    async with client.call(server.address, "count", Req(1_000_000), Resp) as stream:
        async for r in stream:
            if r.seq == 10:
                break
    deadline = time.monotonic() + 1
    while server.active_calls and time.monotonic() < deadline:
        await asyncio.sleep(0.005)
    assert server.active_calls == 0


async def test_remote_errors_are_typed(server, client):
    async def boom(_req: bytes):
        yield Resp(1)
        raise KeyError("nope")

    server.add_endpoint("boom", boom)
    with pytest.raises(EndpointNotFound):
        await client.call(server.address, "missing", Req(1), Resp).collect()
    stream = client.call(server.address, "boom", b"", Resp)
    assert (await stream.__anext__()).seq == 1
    with pytest.raises(RemoteError) as info:
        await stream.__anext__()
    assert info.value.kind == "KeyError"
    with pytest.raises(RemoteError) as info:  # wrong request type is the caller's error
        await client.call(server.address, "count", {"count": "many"}, Resp).collect()
    assert info.value.kind == "InvalidRequest"
    # and the connection still serves
    assert len(await client.call(server.address, "count", Req(3), Resp).collect()) == 3


async def test_server_shutdown_cancels_streams_on_client(client):
    srv = RpcServer()
    srv.add_endpoint("count", count_handler, Req)
    await srv.start()
    stream = client.call(srv.address, "count", Req(10**9), Resp)
    await stream.__anext__()
    await srv.close()
    with pytest.raises((RpcCancelled, RpcConnectionError)):
        async for _ in stream:
            pass


async def test_max_frame_size(server, client):
    with pytest.raises(FrameTooLarge):
        await client.call(server.address, "count", b"x" * (2 << 20)).collect()
    with pytest.raises(RemoteError) as info:  # a response over the limit fails that call only
        await client.call(server.address, "count", Req(1, size=2 << 20), Resp).collect()
    assert info.value.kind == "FrameTooLarge"
    assert len(await client.call(server.address, "count", Req(5), Resp).collect()) == 5


async def test_garbage_bytes_close_only_that_connection(server, client):
    host, port = parse_address(server.address)
    background = client.call(server.address, "count", Req(200_000, 10), Resp)
    first = await background.__anext__()
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(os.urandom(1 << 20))
    try:
        await writer.drain()
        assert await asyncio.wait_for(reader.read(), 5) == b""  # server hung up on us
    except ConnectionError:
        pass  # or reset us mid-write: either way that connection is gone
    writer.close()
    rest = [r.seq async for r in background]
    assert [first.seq, *rest] == list(range(200_000))
    assert [r.seq for r in await client.call(server.address, "count", Req(3), Resp).collect()] == [0, 1, 2]


async def test_slow_consumer_backpressures_server(client):
    produced = 0

    async def firehose(_req: bytes):
        nonlocal produced
        while True:
            produced += 1
            yield Resp(produced, b"y" * 1024)

    srv = RpcServer()
    srv.add_endpoint("firehose", firehose)
    await srv.start()
    async with client.call(srv.address, "firehose", b"", Resp) as stream:
        await stream.__anext__()
        await asyncio.sleep(0.5)
        # bounded by socket buffers + the client's pause mark, not by the 0.5 s the consumer idled
        assert produced < 40_000, produced
    await srv.close()


async def test_connect_refused_is_a_connection_error(client, server):
    host, port = parse_address(server.address)
    await server.close()
    with pytest.raises(RpcConnectionError):
        await client.call(f"{host}:{port}", "count", Req(1), Resp).collect()


async def test_killed_server_errors_client_within_1s(client):
    child = subprocess.Popen(
        [sys.executable, str(Path(__file__).with_name("rpc_child.py"))],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        address = child.stdout.readline().strip()
        stream = client.call(address, "ticks", b"")
        for _ in range(5):
            await stream.__anext__()
        os.kill(child.pid, signal.SIGKILL)
        t0 = time.monotonic()
        with pytest.raises(RpcConnectionError):
            async for _ in stream:
                assert time.monotonic() - t0 < 1.0
        elapsed = time.monotonic() - t0
        print(f"client saw the dead server after {elapsed * 1000:.1f} ms")
        assert elapsed < 1.0
    finally:
        child.kill()
        child.wait()

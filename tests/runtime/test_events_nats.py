"""NATS outage behaviour against a real nats-server that is stopped and started again."""

from __future__ import annotations

import asyncio
import time

from kvrelay.runtime.events import Message, Subscription
from kvrelay.runtime.events.nats_plane import NatsEventPlane
from tests.servers import ServerProcess

RECOVERY_DEADLINE_S = 5.0


async def next_message(sub: Subscription, timeout: float) -> Message | None:
    try:
        return await asyncio.wait_for(anext(aiter(sub)), timeout)
    except asyncio.TimeoutError:
        return None


async def test_subscriber_keeps_receiving_after_server_restart(nats: ServerProcess) -> None:
    url = f"nats://127.0.0.1:{nats.port}"
    pub, subp = NatsEventPlane([url]), NatsEventPlane([url])
    try:
        sub = await subp.subscribe("kvrelay.ns.load")
        await pub.publish("kvrelay.ns.load", b"before")
        first = await next_message(sub, 5)
        assert first is not None and first.data == b"before"

        nats.stop()
        nats.start()  # same port; both clients must reconnect and the subscriber must resubscribe
        restarted = time.monotonic()

        # Publish until one published after the restart arrives. Messages published while a client is
        # still reconnecting may be lost (at-most-once), hence the retries under one deadline.
        received: Message | None = None
        n = 0
        while received is None and time.monotonic() - restarted < RECOVERY_DEADLINE_S:
            n += 1
            await pub.publish("kvrelay.ns.load", f"after-{n}".encode())
            received = await next_message(sub, 0.1)
        recovery = time.monotonic() - restarted
        print(f"\nNATS recovery after restart: {recovery:.3f}s ({n} publish attempts)")
        assert received is not None, f"nothing received within {RECOVERY_DEADLINE_S}s of the restart"
        assert received.data.startswith(b"after-")

        # And it stays live: the next message arrives promptly and in order.
        await pub.publish("kvrelay.ns.load", b"steady")
        while (m := await next_message(sub, 2)) is not None and m.data != b"steady":
            assert m.data.startswith(b"after-")  # late copies of the retries, nothing else
        assert m is not None and m.data == b"steady"
    finally:
        await pub.close()
        await subp.close()


async def test_start_against_no_server_fails_clearly() -> None:
    from tests.servers import free_port

    plane = NatsEventPlane([f"nats://127.0.0.1:{free_port()}"], connect_timeout=0.2, start_timeout=0.8)
    t0 = time.monotonic()
    try:
        await plane.start()
    except ConnectionError as e:
        assert "not reachable" in str(e)
    else:
        raise AssertionError("start() succeeded without a server")
    assert time.monotonic() - t0 < 3
    await plane.close()

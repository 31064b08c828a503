"""Subprocess helper for the cross-process ZMQ test: publish N KvEvents through a running broker.

usage: python -m tests.runtime.events_child PUB_ENDPOINT SUB_ENDPOINT SUBJECT COUNT
"""

from __future__ import annotations

import asyncio
import os
import sys

from kvrelay.runtime.events.zmq_plane import ZmqEventPlane
from tests.runtime.test_events_contract import KvEvent


async def main(pub: str, sub: str, subject: str, count: int) -> None:
    plane = ZmqEventPlane(pub, sub)
    # Our own copy of the stream comes back through the broker after the parent's (one pipe, in order),
    # so once the last one is back the broker has everything and closing (LINGER 0) loses nothing.
    echo = await plane.subscribe(subject)
    for i in range(count):
        await plane.publish(subject, KvEvent(f"child-{os.getpid()}", i, "stored", [i]))

    async def drain() -> None:
        async for m in echo:
            if m.decode(KvEvent).event_id == count - 1:
                return

    await asyncio.wait_for(drain(), 10)
    await plane.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])))

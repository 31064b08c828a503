"""Core -> event loops: each request's output stream, and batched deliveries.

An engine thread (thread_driver.py) never touches an asyncio object directly: a step's items for every
stream are grouped per loop and handed over with one `call_soon_threadsafe` each. A core that runs on
the loop itself (loop_driver.py) puts them on the queues directly.
"""

from __future__ import annotations

import asyncio
from typing import Any

from kvrelay.workers.api.messages import EngineOutput
from kvrelay.workers.api.prefill import PrefillResult

# What a request's stream carries: outputs, a prefill's result (prefill role), or the error ending it.
Item = EngineOutput | PrefillResult | Exception


class Stream:
    __slots__ = ("loop", "queue")

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.queue: asyncio.Queue[Item] = asyncio.Queue()


def deliver(deliveries: list[tuple[Stream, Item]]) -> None:
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Stream, Item]]] = {}
    for stream, item in deliveries:
        by_loop.setdefault(stream.loop, []).append((stream, item))
    for loop, items in by_loop.items():
        try:
            loop.call_soon_threadsafe(_put_all, items)
        except RuntimeError:  # that loop is closed: nobody is listening
            pass


def resolve(fut: asyncio.Future, value: Any) -> None:
    if not fut.done():
        fut.set_result(value)


def _put_all(items: list[tuple[Stream, Item]]) -> None:
    for stream, item in items:
        stream.queue.put_nowait(item)

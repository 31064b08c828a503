"""A ZMQ ROUTER socket answering on the running event loop, each request in its own task (a slow answer,
a G4 HEAD or a lend's copy, never holds up the next). The serving side of the two sockets that join
kvrelay's processes to vLLM's worker process: the tier lookup (tier_lookup.py) and the pool's lends
(peer_lend.py). Frames: [peer identity, key, payload]; the answer goes back under the same key."""

from __future__ import annotations

import asyncio

import zmq
import zmq.asyncio


class RouterSocketServer:
    def __init__(self, address: str):
        self._ctx = zmq.asyncio.Context()
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.bind(address)
        self._task = asyncio.get_running_loop().create_task(self._serve())
        self._pending: set[asyncio.Task] = set()

    async def answer(self, payload: bytes) -> bytes:
        """The reply to one request's payload; never raises (a failure is the subclass's miss)."""
        raise NotImplementedError

    async def _serve(self) -> None:
        while True:
            ident, key, payload = await self._sock.recv_multipart()
            task = asyncio.get_running_loop().create_task(self._one(ident, key, payload))
            self._pending.add(task)
            task.add_done_callback(self._pending.discard)

    async def _one(self, ident: bytes, key: bytes, payload: bytes) -> None:
        await self._sock.send_multipart([ident, key, await self.answer(payload)])

    async def close(self) -> None:
        self._task.cancel()
        for t in list(self._pending):
            t.cancel()
        self._sock.close(0)
        self._ctx.term()

"""The worker process's `kv_lease` reaching the rows that lend, in vLLM's worker process (peer_pool.py).

A peer's `kv_lease` arrives at kvrelay's worker process (workers/kv_handoff.py `lend_blocks` ->
`VllmEngine.lease_blocks`), but the tiers and the staging rows live in vLLM's worker process. One ZMQ
socket in the engine's private directory joins them, as the tier lookup's does:

    worker process (DEALER)  [key, msgpack(["lend", lease_id, hashes])]  ->  vLLM worker (ROUTER, tier loop)
                             [key, msgpack([row ids, pool, transfer metadata])]  <-
                             [key, msgpack(["free", lease_id])]  ->  [key, msgpack(freed)]  <-

A lend unanswered within `LEND_TIMEOUT_S` lends nothing (the peer recomputes); its rows, if the answer
comes later, go back on the pool's own timer. `free` is idempotent (the pull's notification, the
worker's lease timer and `release` may all free one lease).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import msgspec
import zmq
import zmq.asyncio

from kvrelay.workers.engines.vllm.router_socket import RouterSocketServer

log = logging.getLogger("kvrelay.vllm.pool")
LEND_TIMEOUT_S = 1.5  # under the asker's 2 s (workers/core/kv_sources/peer_loop.py ASK_TIMEOUT_S)


def endpoint(socket_dir: str) -> str:
    return f"ipc://{socket_dir}/kv-pool"


class LendServer(RouterSocketServer):
    """vLLM's worker process: answers on the tier loop. `pool`: the PeerPool, None when it did not start
    (every lend answers nothing)."""

    def __init__(self, socket_dir: str, pool: Any):
        self.pool = pool
        super().__init__(endpoint(socket_dir))

    async def answer(self, payload: bytes) -> bytes:
        reply: Any = [[], "", b""]
        try:
            op, lease_id, *rest = msgspec.msgpack.decode(payload)
            if op == "free":
                reply = self.pool is not None and self.pool.free(lease_id)
            elif self.pool is not None:
                from kvrelay.workers.engines.vllm.peer_pool import POOL

                rows = await self.pool.lend(lease_id, [int(h) for h in rest[0]])
                reply = [rows, POOL, self.pool.metadata() if rows else b""]
        except Exception:
            log.exception("kvrelay KV pool: a lend failed; lending nothing")
        return msgspec.msgpack.encode(reply)


class LendClient:
    """kvrelay's worker process: lends and frees by lease id (on its event loop)."""

    def __init__(self, socket_dir: str):
        self._ctx = zmq.asyncio.Context()
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.connect(endpoint(socket_dir))
        self._waiting: dict[bytes, asyncio.Future] = {}
        self._reader: asyncio.Task | None = None
        self._n = 0

    async def _read(self) -> None:
        while True:
            key, payload = await self._sock.recv_multipart()
            fut = self._waiting.pop(key, None)
            if fut is not None and not fut.done():
                fut.set_result(msgspec.msgpack.decode(payload))

    async def _call(self, message: list[Any], timeout: float) -> Any:
        if self._reader is None:
            self._reader = asyncio.get_running_loop().create_task(self._read())
        self._n += 1
        key = str(self._n).encode()
        fut: asyncio.Future = asyncio.get_running_loop().create_future()
        self._waiting[key] = fut
        try:
            await self._sock.send_multipart([key, msgspec.msgpack.encode(message)])
            return await asyncio.wait_for(fut, timeout)
        finally:
            self._waiting.pop(key, None)

    async def lend(self, lease_id: str, hashes: list[int]) -> tuple[list[int], str, bytes]:
        """(row ids, pool, transfer metadata); no rows when nothing is held or vLLM's worker is slow."""
        try:
            rows, pool, metadata = await self._call(["lend", lease_id, hashes], LEND_TIMEOUT_S)
            return list(rows), pool, metadata
        except (TimeoutError, asyncio.TimeoutError):
            log.info("kvrelay KV pool: lease %s not answered in %.1f s; lending nothing", lease_id, LEND_TIMEOUT_S)
            return [], "", b""

    async def free(self, lease_id: str) -> None:
        try:
            await self._call(["free", lease_id], LEND_TIMEOUT_S)
        except (TimeoutError, asyncio.TimeoutError):
            pass  # the pool's own timer frees it

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
        self._sock.close(0)
        self._ctx.term()

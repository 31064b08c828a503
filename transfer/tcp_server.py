"""The TCP fallback's block server: serves reads of, and writes into, an engine's registered pools.

Endpoints (messages in tcp_wire.py) on a `kvrelay.runtime.rpc.RpcServer`:
- `kv_read`: the requested runs' bytes as a stream of <= 4 MiB `Chunk`s, in order, each a view of the
  pool encoded straight into the frame (one copy);
- `kv_write`: one `WriteRequest` chunk into the pool, bounds-checked, then `Ack`;
- `kv_notify`: hands the notification to the engine's box, then `Ack`.
Requests are checked against the pool's bounds; a bad one fails that call (`RemoteError` at the client)
and nothing is read or written. With a token (the deployment's internal token) a connection that does
not present it is refused before any endpoint runs: nobody else can read or poison the pools.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator

from kvrelay.runtime.rpc import RpcServer
from kvrelay.transfer.metadata import Notification
from kvrelay.transfer.notifications import NotificationBox
from kvrelay.transfer.tcp_wire import Ack, Chunk, NotifyRequest, PoolBytes, ReadRequest, WriteRequest


class BlockServer:
    def __init__(self, pools: dict[str, PoolBytes], box: NotificationBox, host: str, port: int, token: str = ""):
        self._pools, self._box = pools, box  # the engine's own dict: pools registered later are served too
        self.notifications = 0
        self.rpc = RpcServer(host, port, token=token)
        self.rpc.add_endpoint("kv_read", self._read, ReadRequest)
        self.rpc.add_endpoint("kv_write", self._write, WriteRequest)
        self.rpc.add_endpoint("kv_notify", self._notify, NotifyRequest)

    def _pool(self, name: str) -> PoolBytes:
        pool = self._pools.get(name)
        if pool is None:
            raise ValueError(f"no pool {name!r} here")
        return pool

    async def _read(self, req: ReadRequest) -> AsyncGenerator[Chunk, None]:
        pool = self._pool(req.pool)
        pool.check_runs(req.runs)
        for view in pool.chunks(req.runs):
            yield Chunk(view)

    async def _write(self, req: WriteRequest) -> AsyncGenerator[Ack, None]:
        pool = self._pool(req.pool)
        pool.check_range(req.offset, len(req.data))
        pool.put(req.offset, req.data)
        yield Ack()

    async def _notify(self, req: NotifyRequest) -> AsyncGenerator[Ack, None]:
        self.notifications += 1
        self._box.deliver(Notification(req.sender, req.message))
        yield Ack()

"""`TcpTransferEngine`: the same interface as NIXL, over kvrelay's request plane, for machines without it.

Every engine runs a block server (tcp_server.py, on an `RpcServer`) that serves reads of and
writes into its registered pools, and holds one `RpcClient` (one multiplexed TCP connection) per peer.
- read: one `kv_read` call carrying the coalesced remote runs; the server streams the bytes in order in
  chunks of <= 4 MiB, which the reader copies straight from the received frame into its pool.
- write: each run is cut into <= 4 MiB `kv_write` calls, `WRITE_WINDOW` of them in flight at once.
- notify: after the last byte is in place at the destination, one `kv_notify` call (one round trip).
Works across processes and machines; msgpack frames only, no pickle. A peer whose process dies fails
the transfer at once (connection lost / refused), a vanished host within the TCP keepalive (~8 s) or
the transfer's timeout, whichever is first. With `token` (the deployment's internal token, the same
on every peer) the block server refuses connections that do not present it, and this engine presents
it to its peers; without one a registered pool is open to any peer that can reach the port.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Sequence

import msgspec
import torch

from kvrelay.runtime.rpc import RpcClient, RpcError
from kvrelay.transfer.base import DEFAULT_TIMEOUT_S, TransferError, TransferStats
from kvrelay.transfer.blocks import block_runs, describe_pool, resolve_transfer
from kvrelay.transfer.metadata import Notification, TransferMetadata, decode_metadata, encode_metadata
from kvrelay.transfer.notifications import NotificationBox
from kvrelay.transfer.tcp_server import BlockServer
from kvrelay.transfer.tcp_wire import (
    CHUNK_BYTES,
    Ack,
    Chunk,
    NotifyRequest,
    PoolBytes,
    ReadRequest,
    WriteRequest,
)

WRITE_WINDOW = 4


class _Peer(msgspec.Struct):
    raw: bytes
    md: TransferMetadata
    client: RpcClient


class TcpTransferEngine:
    kind = "tcp"

    def __init__(self, name: str, host: str = "127.0.0.1", port: int = 0, advertise_host: str | None = None,
                 *, timeout_s: float = DEFAULT_TIMEOUT_S, notif_capacity: int = 4096, token: str = ""):
        self.name, self.timeout_s, self._token = name, timeout_s, token
        self._advertise = advertise_host or (socket.gethostbyname(socket.gethostname())
                                             if host in ("", "0.0.0.0", "::") else host)
        self._box = NotificationBox(notif_capacity)
        self._pools: dict[str, PoolBytes] = {}
        self._server = BlockServer(self._pools, self._box, host, port, token)
        self._peers: dict[str, _Peer] = {}
        self._closing: set[asyncio.Task[None]] = set()
        self._started = self._closed = False
        self._md: bytes | None = None
        self._active = 0
        self._stats = TransferStats(kind=self.kind)

    # -- setup ---------------------------------------------------------------------------------------
    def register_pool(self, name: str, tensor: torch.Tensor, block_bytes: int) -> None:
        self._check_open()
        if name in self._pools:
            raise ValueError(f"pool {name!r} is already registered")
        self._pools[name] = PoolBytes(describe_pool(name, tensor, block_bytes), tensor)
        self._md = None

    async def start(self) -> None:
        self._check_open()
        if not self._started:
            await self._server.rpc.start()
            self._started = True

    def metadata(self) -> bytes:
        self._check_open()
        if not self._started:
            raise RuntimeError("TcpTransferEngine.metadata() before start(): the server has no port yet")
        if self._md is None:
            self._md = encode_metadata(TransferMetadata(
                kind=self.kind, engine=self.name, address=f"{self._advertise}:{self._server.rpc.port}",
                pools=[p.desc for p in self._pools.values()]))
        return self._md

    def add_peer(self, peer_id: str, metadata: bytes) -> None:
        self._check_open()
        old = self._peers.get(peer_id)
        if old is not None and old.raw == metadata:
            return
        md = decode_metadata(metadata)
        if md.kind != self.kind:
            raise ValueError(f"peer {peer_id!r} runs a {md.kind!r} transfer engine; this one is {self.kind!r}")
        self.remove_peer(peer_id)
        for pid, p in list(self._peers.items()):  # a restarted process that kept its name: same rule as NIXL
            if p.md.engine == md.engine:
                self.remove_peer(pid)
        self._peers[peer_id] = _Peer(metadata, md, RpcClient(token=self._token))

    def remove_peer(self, peer_id: str) -> None:
        peer = self._peers.pop(peer_id, None)
        if peer is None:
            return
        try:
            task = asyncio.get_running_loop().create_task(peer.client.close())
        except RuntimeError:  # no loop: its connection, if any, died with its loop
            return
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    # -- transfers (client side) ---------------------------------------------------------------------
    def _plan(self, peer_id: str, local_pool: str, local_ids: Sequence[int], remote_pool: str,
              remote_ids: Sequence[int], reading: bool) -> tuple[_Peer, PoolBytes, list[tuple[int, int, int]]]:
        self._check_open()
        local, peer, lids, rids = resolve_transfer(self._pools, self._peers, "TCP transfer", peer_id, local_pool,
                                                   local_ids, remote_pool, remote_ids, reading)
        return peer, local, block_runs(lids, rids)  # (local start, remote start, count)

    async def read(self, peer_id: str, remote_pool: str, remote_block_ids: Sequence[int], local_pool: str,
                   local_block_ids: Sequence[int], notify: bytes | None = None,
                   timeout: float | None = None) -> None:
        peer, local, runs = self._plan(peer_id, local_pool, local_block_ids, remote_pool, remote_block_ids, True)
        nbytes = await self._guard(self._read(peer, local, remote_pool, runs, notify), peer_id, timeout)
        self._account(runs, nbytes, notify, reading=True)

    async def write(self, peer_id: str, local_pool: str, local_block_ids: Sequence[int], remote_pool: str,
                    remote_block_ids: Sequence[int], notify: bytes | None = None,
                    timeout: float | None = None) -> None:
        peer, local, runs = self._plan(peer_id, local_pool, local_block_ids, remote_pool, remote_block_ids, False)
        nbytes = await self._guard(self._write(peer, local, remote_pool, runs, notify), peer_id, timeout)
        self._account(runs, nbytes, notify, reading=False)

    async def _read(self, peer: _Peer, local: PoolBytes, remote_pool: str, runs: list[tuple[int, int, int]],
                    notify: bytes | None) -> int:
        bb = local.desc.block_bytes
        if runs:
            # Chunks never straddle runs and come in run order; walk the local runs alongside.
            spans = iter([(ls * bb, (ls + n) * bb) for ls, _, n in runs])
            pos, end = next(spans)
            req = ReadRequest(remote_pool, [(rs, n) for _, rs, n in runs])
            async with peer.client.call(peer.md.address, "kv_read", req, Chunk) as stream:
                async for chunk in stream:
                    if pos == end:
                        pos, end = next(spans, (0, 0))
                    if len(chunk.data) > end - pos:
                        raise TransferError(f"{peer.md.engine} sent more bytes than requested")
                    local.put(pos, chunk.data)
                    pos += len(chunk.data)
            if pos != end or next(spans, None) is not None:
                raise TransferError(f"{peer.md.engine} ended the read early")
        if notify is not None:
            await peer.client.unary(peer.md.address, "kv_notify", NotifyRequest(self.name, notify), Ack)
        return sum(n for _, _, n in runs) * bb

    async def _write(self, peer: _Peer, local: PoolBytes, remote_pool: str, runs: list[tuple[int, int, int]],
                     notify: bytes | None) -> int:
        bb = local.desc.block_bytes
        pending: set[asyncio.Task[object]] = set()
        try:
            for ls, rs, n in runs:
                for off in range(0, n * bb, CHUNK_BYTES):
                    size = min(CHUNK_BYTES, n * bb - off)
                    req = WriteRequest(remote_pool, rs * bb + off, local.view(ls * bb + off, ls * bb + off + size))
                    pending.add(asyncio.ensure_future(peer.client.unary(peer.md.address, "kv_write", req, Ack)))
                    if len(pending) >= WRITE_WINDOW:
                        done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                        for t in done:
                            t.result()
            await asyncio.gather(*pending)
            pending = set()
        finally:
            for t in pending:
                t.cancel()
        if notify is not None:
            await peer.client.unary(peer.md.address, "kv_notify", NotifyRequest(self.name, notify), Ack)
        return sum(n for _, _, n in runs) * bb

    async def _guard(self, work: Awaitable[int], peer_id: str, timeout: float | None) -> int:
        self._active += 1
        try:
            return await asyncio.wait_for(work, self.timeout_s if timeout is None else timeout)
        except asyncio.TimeoutError:
            self._stats.failures += 1
            raise TransferError(f"TCP transfer with {peer_id!r} timed out") from None
        except (RpcError, OSError) as e:
            self._stats.failures += 1
            raise TransferError(f"TCP transfer with {peer_id!r} failed: {e}") from e
        except TransferError:
            self._stats.failures += 1
            raise
        finally:
            self._active -= 1

    def _account(self, runs: list[tuple[int, int, int]], nbytes: int, notify: bytes | None, reading: bool) -> None:
        s = self._stats
        s.descriptors += len(runs)
        s.notifications_sent += notify is not None
        if reading:
            s.reads, s.bytes_read = s.reads + 1, s.bytes_read + nbytes
        else:
            s.writes, s.bytes_written = s.writes + 1, s.bytes_written + nbytes

    async def notify(self, peer_id: str, message: bytes) -> None:
        peer = self._peers.get(peer_id)
        if peer is None:
            raise TransferError(f"unknown TCP transfer peer {peer_id!r}")
        await self._guard(peer.client.unary(peer.md.address, "kv_notify", NotifyRequest(self.name, message), Ack),
                          peer_id, None)
        self._stats.notifications_sent += 1

    async def wait_notification(self, message: bytes | None = None,
                                timeout: float | None = None) -> Notification:
        return await self._box.wait(message, timeout)

    # -- state ---------------------------------------------------------------------------------------
    def stats(self) -> TransferStats:
        s = msgspec.structs.replace(self._stats)
        s.active_handles = self._active
        s.registered_regions = len(self._pools)
        s.peers = len(self._peers)
        s.notifications_pending = self._box.pending
        s.notifications_received = self._server.notifications
        return s

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for peer_id in list(self._peers):
            self.remove_peer(peer_id)
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)
        if self._started:
            await self._server.rpc.close()
        self._pools.clear()

    def _check_open(self) -> None:
        if self._closed:
            raise TransferError("TCP transfer engine is closed")


"""`WorkerClient`: the typed calls a frontend, the decode side of a handoff, a peer pull and the benchmarks make to
workers, over one `RpcClient`. The endpoint names and reply types live here, nowhere else."""

from __future__ import annotations

from kvrelay.kvbm.events import KvSnapshot
from kvrelay.runtime.rpc import RpcClient, RpcStream
from kvrelay.workers.api.endpoints import Endpoint
from kvrelay.workers.api.messages import (
    Empty,
    EngineOutput,
    EngineRequest,
    EngineStats,
    ModelCard,
    PeerLeaseReply,
    PeerLeaseRequest,
    PrefillReply,
    ReleaseRequest,
)


class WorkerClient:
    def __init__(self, rpc: RpcClient | None = None):
        self.rpc = rpc or RpcClient()

    def generate(self, address: str, request: EngineRequest) -> RpcStream:
        """A stream of `EngineOutput`s (use as `async with`; leaving it cancels the request)."""
        return self.rpc.call(address, Endpoint.GENERATE, request, EngineOutput)

    def prefill(self, address: str, request: EngineRequest) -> RpcStream:
        """One `PrefillReply`; read the stream to its end, or the worker drops the handle's lease."""
        return self.rpc.call(address, Endpoint.PREFILL, request, PrefillReply)

    async def release(self, address: str, request_id: str) -> None:
        await self.rpc.unary(address, Endpoint.RELEASE, ReleaseRequest(request_id), Empty)

    async def lease(self, address: str, request: PeerLeaseRequest) -> PeerLeaseReply:
        return await self.rpc.unary(address, Endpoint.KV_LEASE, request, PeerLeaseReply)

    async def kv_snapshot(self, address: str) -> KvSnapshot:
        return await self.rpc.unary(address, Endpoint.KV_SNAPSHOT, Empty(), KvSnapshot)

    async def stats(self, address: str) -> EngineStats:
        return await self.rpc.unary(address, Endpoint.STATS, Empty(), EngineStats)

    async def model_card(self, address: str) -> ModelCard:
        return await self.rpc.unary(address, Endpoint.MODEL_CARD, Empty(), ModelCard)

    async def transfer_stats(self, address: str):  # -> kvrelay.transfer.base.TransferStats
        from kvrelay.transfer.base import TransferStats

        return await self.rpc.unary(address, Endpoint.TRANSFER_STATS, Empty(), TransferStats)

    async def close(self) -> None:
        await self.rpc.close()

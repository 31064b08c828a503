"""A real `kvrelay serve` process for end-to-end tests, and helpers to look at its workers."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

from kvrelay.perf.serve_process import Serve
from kvrelay.runtime.discovery import DiscoveryConfig, list_instances, make_discovery
from kvrelay.runtime.rpc import RpcClient
from kvrelay.workers.api.endpoints import Endpoint
from kvrelay.workers.api.messages import Empty, EngineStats

__all__ = ["Serve", "alive", "wait_idle", "worker_stats"]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is dead for our purposes
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split()[2] != "Z"


async def worker_stats(discovery: DiscoveryConfig, namespace: str = "default") -> dict[str, tuple[int, EngineStats]]:
    """instance_id -> (pid, stats) for every registered worker."""
    disc = make_discovery(discovery)
    await disc.start()
    client = RpcClient()
    try:
        out = {}
        for inst in await list_instances(disc, namespace):
            stats = await client.unary(inst.address, Endpoint.STATS, Empty(), EngineStats)
            out[inst.instance_id] = (int(inst.labels.get("pid", 0)), stats)
        return out
    finally:
        await client.close()
        await disc.close()


async def wait_idle(discovery: DiscoveryConfig, timeout: float = 30.0) -> dict[str, tuple[int, EngineStats]]:
    deadline = time.monotonic() + timeout
    while True:
        stats = await worker_stats(discovery)
        if all(s.running == s.waiting == s.offload_pinned == 0 for _, s in stats.values()) or time.monotonic() > deadline:
            return stats
        await asyncio.sleep(0.1)

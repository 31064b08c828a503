"""A real `kvrelay serve` process for end-to-end tests, and helpers to look at its workers."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from kvrelay.runtime.discovery import DiscoveryConfig, list_instances, make_discovery
from kvrelay.runtime.messages import Empty, EngineStats
from kvrelay.runtime.rpc import RpcClient
from tests.servers import free_port


class Serve:
    def __init__(self, tmp: Path, *args: str, workers: int = 2, env: dict | None = None):
        self.port = free_port()
        self.discovery_dir = str(tmp / "discovery")
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.argv = [sys.executable, "-m", "kvrelay.cli.main", "serve", "--http-port", str(self.port),
                     "--workers", str(workers), *args]
        if "--discovery" not in args:
            self.argv += ["--discovery-dir", self.discovery_dir]
        self.log = open(tmp / "serve.log", "w")  # noqa: SIM115 - closed in stop()
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen | None = None
        self.started_at = 0.0

    def start(self, timeout: float = 60.0) -> Serve:
        self.started_at = time.monotonic()
        self.proc = subprocess.Popen(self.argv, stdout=self.log, stderr=subprocess.STDOUT, env=self.env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"serve exited early: {self.read_log()}"
            try:
                if httpx.get(f"{self.base_url}/ready", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"serve not ready in {timeout}s: {self.read_log()}")

    def read_log(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text()[-4000:]

    def children(self) -> list[int]:
        out = subprocess.run(["pgrep", "-P", str(self.proc.pid)], capture_output=True, text=True)
        return [int(p) for p in out.stdout.split()]

    def stop(self, sig: int = signal.SIGINT, timeout: float = 30.0) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        finally:
            self.log.close()


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
            stats = await client.unary(inst.address, "stats", Empty(), EngineStats)
            out[inst.instance_id] = (int(inst.labels.get("pid", 0)), stats)
        return out
    finally:
        await client.close()
        await disc.close()


async def wait_idle(discovery: DiscoveryConfig, timeout: float = 30.0) -> dict[str, tuple[int, EngineStats]]:
    deadline = time.monotonic() + timeout
    while True:
        stats = await worker_stats(discovery)
        if all(s.running == 0 and s.waiting == 0 for _, s in stats.values()) or time.monotonic() > deadline:
            return stats
        await asyncio.sleep(0.1)

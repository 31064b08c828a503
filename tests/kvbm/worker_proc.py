"""A real `kvrelay worker` process for tier tests: started with given flags, driven over the RPC plane."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from kvrelay.runtime.rpc import RpcClient
from kvrelay.workers.api.endpoints import Endpoint
from kvrelay.workers.api.messages import Empty, EngineOutput, EngineRequest, EngineStats, SamplingParams


class WorkerProcess:
    def __init__(self, workdir: Path, *flags: str):
        self.log_path = workdir / f"worker-{time.monotonic_ns()}.log"
        argv = [sys.executable, "-m", "kvrelay.cli.main", "worker", "--engine", "native", "--model", "tiny", "--events", "inproc",
                "--discovery", "file", "--discovery-dir", str(workdir / "discovery"), *flags]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=self._log, env=env)
        self.address = self._wait_ready()

    def _wait_ready(self, timeout: float = 60.0) -> str:
        end = time.monotonic() + timeout
        assert self.proc.stdout is not None
        while time.monotonic() < end:
            line = self.proc.stdout.readline().decode()
            if line.startswith("READY "):
                return line.split()[1]
            if not line and self.proc.poll() is not None:
                break
        raise AssertionError(f"worker did not start: {self.log_path.read_text()[-3000:]}")

    def log(self) -> str:
        return self.log_path.read_text()

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


async def generate(address: str, tokens: list[int], n: int = 12) -> tuple[list[int], int]:
    client = RpcClient()
    try:
        req = EngineRequest(request_id=f"t{time.monotonic_ns()}", prompt_token_ids=tokens,
                            sampling=SamplingParams(max_tokens=n, ignore_eos=True, temperature=0.0))
        outs = await client.call(address, Endpoint.GENERATE, req, EngineOutput).collect()
        return [t for o in outs for t in o.token_ids], max(o.num_cached_tokens for o in outs)
    finally:
        await client.close()


async def stats(address: str) -> EngineStats:
    client = RpcClient()
    try:
        return await client.unary(address, Endpoint.STATS, Empty(), EngineStats)
    finally:
        await client.close()


async def wait_offloaded(address: str, tier: str, blocks: int, timeout: float = 20.0) -> EngineStats:
    """Poll until `tier` holds at least `blocks` blocks and no offload copy is in flight."""
    end = time.monotonic() + timeout
    while True:
        s = await stats(address)
        t = next((t for t in s.tiers if t.tier == tier), None)
        if t is not None and t.blocks >= blocks and s.offload_pinned == 0:
            return s
        if time.monotonic() > end:
            raise AssertionError(f"{tier} holds {t.blocks if t else 'no tier'} blocks, wanted {blocks}: {s}")
        await asyncio.sleep(0.1)

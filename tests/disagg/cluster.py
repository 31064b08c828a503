"""An in-process disaggregated deployment for tests: real `Worker`s (native or mocker engines, real
transfer engines, real request plane over loopback TCP) and a real `FrontendService`, sharing a
`MemStore` for discovery and an `InprocBroker` for events."""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import replace

from kvrelay.frontend.config import FrontendConfig
from kvrelay.frontend.service import FrontendService
from kvrelay.runtime.discovery import DiscoveryConfig, make_discovery
from kvrelay.runtime.discovery.mem import MemStore
from kvrelay.runtime.events.inproc import InprocBroker, InprocEventPlane
from kvrelay.workers.api.endpoints import Endpoint
from kvrelay.workers.api.messages import Empty, EngineRequest, EngineStats, ModelCard, SamplingParams
from kvrelay.workers.config import WorkerConfig
from kvrelay.workers.worker import Worker


class Cluster:
    def __init__(self, roles: list[str], worker_cfg: WorkerConfig, frontend_cfg: FrontendConfig | None = None,
                 token: str = ""):
        """`token`: the deployment's internal token (workers require it, the frontend presents it)."""
        self.token = token
        self.store, self.broker = MemStore(), InprocBroker()
        self.roles, self.worker_cfg = roles, worker_cfg
        self.frontend_cfg = frontend_cfg or FrontendConfig(disagg_min_tokens=0)
        self.workers: list[Worker] = []
        self.service: FrontendService | None = None
        self.card: ModelCard | None = None

    def _disc(self):
        return make_discovery(DiscoveryConfig(discovery="mem"), mem_store=self.store)

    async def add_worker(self, role: str, **overrides) -> Worker:
        cfg = replace(self.worker_cfg, role=role, **overrides)
        w = Worker(cfg, self._disc(), InprocEventPlane(self.broker), internal_token=self.token)
        await w.start()
        self.workers.append(w)
        return w

    async def __aenter__(self) -> Cluster:
        for role in self.roles:
            await self.add_worker(role)
        self.service = FrontendService(self.frontend_cfg, self._disc(), InprocEventPlane(self.broker),
                                       internal_token=self.token)
        await self.service.start()
        model = self.workers[0].model_name
        assert await self.service.pool.wait_for(lambda: len(self.service.pool.instances) == len(self.workers), 10)
        self.card = await self.service.model_card(model)
        return self

    async def __aexit__(self, *exc) -> None:
        if self.service is not None:
            await self.service.close()
        for w in self.workers:
            await w.close()

    @property
    def model(self) -> str:
        return self.workers[0].model_name

    async def generate(self, prompt: list[int], max_tokens: int = 8, **sampling) -> list[int]:
        req = EngineRequest(request_id=uuid.uuid4().hex, prompt_token_ids=prompt,
                            sampling=SamplingParams(max_tokens=max_tokens, ignore_eos=True, **sampling))
        tokens: list[int] = []
        async for out in self.service.generate(self.model, self.card, req):
            tokens += out.token_ids
        return tokens

    def by_role(self, role: str) -> list[Worker]:
        return [w for w in self.workers if w.cfg.role == role]

    async def stats(self, w: Worker) -> EngineStats:
        return await self.service.rpc.unary(w.instance.address, Endpoint.STATS, Empty(), EngineStats)

    async def settle(self, timeout: float = 10.0) -> None:
        """Wait until no worker runs, waits or holds anything (leases released, pulls and offloads done)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            stats = [w.engine.stats() for w in self.workers]
            if all(s.running == s.waiting == s.held_requests == s.offload_pinned == 0 for s in stats):
                return
            if loop.time() > deadline:
                raise AssertionError(f"workers not idle after {timeout} s: {stats}")
            await asyncio.sleep(0.02)

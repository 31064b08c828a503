"""`NativeEngine`: the native engine as an `Engine` (workers/protocol.py): its `LLMEngine` core stepped
on one dedicated thread (the core's `ThreadDriver`, workers/core/thread_driver.py)."""

from __future__ import annotations

import asyncio
from typing import Any

from kvrelay.workers.api.messages import EngineRequest, KvLayout
from kvrelay.workers.core.engine_loop import EngineLoop
from kvrelay.workers.core.thread_driver import ThreadDriver
from kvrelay.workers.engines.native.llm_engine import LLMEngine, NativeEngineConfig


class NativeEngine(EngineLoop):
    core: LLMEngine | None

    def __init__(self, cfg: NativeEngineConfig):
        super().__init__(ThreadDriver("kvrelay-native-engine"))
        self.cfg = cfg

    async def start(self) -> None:
        if self.running:
            return
        core = await asyncio.to_thread(LLMEngine, self.cfg)  # loading the model takes a while
        await self._attach(core, self.cfg.tiers, core.kv_rows)

    async def _prepare(self, request: EngineRequest) -> None:
        """Compile the request's grammar in a worker thread, before it is posted: the step thread then
        only copies the cached result (grammar_cache.py). A grammar that does not compile is an
        EngineError (400) here, before the request holds anything."""
        structured = request.sampling.structured
        if structured is not None:
            assert self.core is not None, "start() first"
            if not self.core.grammars.cached(structured):
                await asyncio.to_thread(self.core.grammars.compile, structured)

    def kv_pool(self) -> Any:
        assert self.core is not None, "start() first"
        return self.core.kv_cache

    def kv_layout(self) -> KvLayout:
        assert self.core is not None, "start() first"
        return self.core.kv_layout()

"""`NativeEngine`: the native engine as an `Engine` (workers/protocol.py): its `LLMEngine` core run on
one dedicated thread by the core's `ThreadDriver` (workers/core/thread_driver.py)."""

from __future__ import annotations

from typing import Any

from kvrelay.workers.api.messages import KvLayout
from kvrelay.workers.core.thread_driver import ThreadDriver
from kvrelay.workers.engines.native.llm_engine import LLMEngine, NativeEngineConfig


class NativeEngine(ThreadDriver):
    thread_name = "kvrelay-native-engine"
    core: LLMEngine | None

    def __init__(self, cfg: NativeEngineConfig):
        super().__init__()
        self.cfg = cfg

    async def start(self) -> None:
        await self._start_thread(lambda: LLMEngine(self.cfg), self.cfg.tiers, LLMEngine.kv_rows)

    def kv_pool(self) -> Any:
        assert self.core is not None, "start() first"
        return self.core.kv_cache

    def kv_layout(self) -> KvLayout:
        assert self.core is not None, "start() first"
        return self.core.kv_layout()

"""`MockerEngine`: an `Engine` that schedules like the native engine but computes nothing.

Real parts, all from the engine core (workers/core): the scheduler (continuous batching, chunked
prefill, preemption, prefix hits), the KV cache over a `BlockPool`, the block hashing, KV events,
handoff, stats and, with `kv_tiers` (`--mocker-kv-tiers`), the lower tiers G2/G3/G4 with offload and onboarding.
Simulated parts: the step time (`TimingModel`, slept as modeled / speedup) and the tokens
(`tokens.py`). The core runs on the event loop (`LoopDriver`): no thread, no torch (unless tiers).
"""

from __future__ import annotations

import logging
from typing import Any

import msgspec

from kvrelay.kvbm.fingerprint import model_fingerprint
from kvrelay.kvbm.hashing import BlockHasher
from kvrelay.workers.api.messages import EngineStats, KvLayout, SamplingParams
from kvrelay.workers.core.engine_core import EngineCore
from kvrelay.workers.core.engine_loop import EngineLoop
from kvrelay.workers.core.executor import Scheduled
from kvrelay.workers.core.loop_driver import LoopDriver
from kvrelay.workers.engines.mocker.config import DEFAULT_MAX_MODEL_LEN, MockerConfig, ModelInfo
from kvrelay.workers.engines.mocker.executor import MockExecutor
from kvrelay.workers.engines.mocker.timing import TimingModel
from kvrelay.workers.engines.mocker.tokens import MockSequence, TokenSource

log = logging.getLogger(__name__)


class MockerEngine(EngineLoop):
    core: EngineCore

    def __init__(self, cfg: MockerConfig, tiers: Any = None):
        """`tiers`: a `kvbm.tier_config.TierConfig` to open G2/G3/G4 with when `cfg.kv_tiers`."""
        super().__init__(LoopDriver(self.step_time, "kvrelay-mocker"))
        cfg.validate()
        self.cfg, self.tier_cfg = cfg, tiers
        self.info = ModelInfo.from_dir(cfg.model)
        self.timing = TimingModel(cfg)
        vocab = cfg.vocab_size or self.info.vocab_size
        self.tokens = TokenSource(vocab, self.info.excluded_ids, self.info.eos_ids, cfg.eos_probability)

        def new_sequence(rid: str, prompt: list[int], sampling: SamplingParams, hasher: BlockHasher,
                         arrival: int) -> MockSequence:
            return MockSequence(rid, prompt, sampling, hasher, arrival, cfg.seed)

        self.core = EngineCore(
            cfg.limits.for_model(DEFAULT_MAX_MODEL_LEN),
            cfg.num_blocks, MockExecutor(self.tokens),
            # Never equal to a native engine's fingerprint: mocked KV must not look like real KV.
            fingerprint=f"mocker-{model_fingerprint(cfg.model)}", eos_ids=self.info.eos_ids,
            vocab_limit=max(vocab, max(self.info.excluded_ids, default=-1) + 1),  # prompts may hold specials
            new_sequence=new_sequence)
        self.pool, self.scheduler = self.core.pool, self.core.scheduler
        self._no_handle_reason = "no KV puller"

    async def start(self) -> None:
        await self._attach(self.core, self.tier_cfg if self.cfg.kv_tiers else None, self._g1_rows)

    def _g1_rows(self) -> Any:
        """With lower tiers: G1 as real bytes (zeros; the mocker's tokens never read KV) so the tiers
        store, bound and account exactly what a real engine of this shape would move."""
        import torch

        layout = self.kv_layout()
        log.info("mocker KV tiers: G1 stand-in of %d blocks x %d bytes = %.1f MiB of host memory",
                 layout.num_blocks, layout.block_bytes, layout.num_blocks * layout.block_bytes / 2**20)
        return torch.zeros((layout.num_blocks, layout.block_bytes), dtype=torch.uint8)

    def stats(self) -> EngineStats:
        """The core's, with its prefill seconds as the wall-clock seconds its steps took (the core
        counts modeled seconds; the mocker sleeps them divided by its speedup)."""
        s = super().stats()
        return msgspec.structs.replace(s, prefill_seconds=self.timing.wall(s.prefill_seconds))

    def step_time(self, scheduled: Scheduled) -> tuple[float, float]:
        modeled = self.timing.step_seconds(scheduled)
        return modeled, self.timing.wall(modeled)

    def kv_pool(self) -> None:
        return None  # nothing real to transfer: the puller simulates the link

    def kv_layout(self) -> KvLayout:
        i = self.info
        return KvLayout(layout="block_contiguous", num_blocks=self.pool.num_blocks, num_layers=i.num_layers,
                        block_size=self.cfg.limits.block_size, num_kv_heads=i.num_kv_heads, head_dim=i.head_dim,
                        dtype=i.dtype, device="mock")

    def simulated_transfer_seconds(self, num_blocks: int) -> float:
        """Wall seconds (speedup applied) to move `num_blocks` KV blocks at `transfer_gbps` (the
        simulated prefill -> decode handoff; see workers/kv_handoff.py SimulatedPuller)."""
        return self.timing.wall(self.timing.transfer_seconds(num_blocks * self.kv_layout().block_bytes))

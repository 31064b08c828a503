"""`LLMEngine`: the native engine's synchronous core: the engine-neutral `EngineCore` over a loaded
model, its block-contiguous G1 KV cache and a `ModelRunner` (model_runner.py). Single-threaded by
design: only the engine thread (see `engine.py`) touches it."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from kvrelay.kvbm.fingerprint import model_fingerprint
from kvrelay.kvbm.g1_sizing import g1_num_blocks
from kvrelay.kvbm.tier_config import TierConfig
from kvrelay.kvbm.tiers.disk import aligned_empty
from kvrelay.workers.api.messages import KvLayout
from kvrelay.workers.core.engine_core import EngineCore
from kvrelay.workers.core.limits import EngineLimits
from kvrelay.workers.engines.native.config import DTYPES
from kvrelay.workers.engines.native.grammar_cache import GrammarCache
from kvrelay.workers.engines.native.loader import load_model
from kvrelay.workers.engines.native.model_runner import ModelRunner

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class NativeEngineConfig:
    model: str
    dtype: str = "auto"  # auto = the checkpoint's dtype
    device: str = "cpu"
    limits: EngineLimits = EngineLimits()  # max_model_len 0 = the model's max_position_embeddings
    kv_cache_bytes: int = 0  # sizes the G1 pool when num_blocks is 0 (0 = kvbm/g1_sizing.py's default)
    num_blocks: int = 0
    tiers: TierConfig | None = None  # lower tiers (G2/G3/G4) opened by NativeEngine; None = G1 only


class LLMEngine(EngineCore):
    def __init__(self, cfg: NativeEngineConfig):
        self.cfg = cfg
        dtype = None if cfg.dtype == "auto" else DTYPES[cfg.dtype]
        self.model = load_model(cfg.model, dtype=dtype, device=cfg.device)
        m = self.model.cfg
        self.dtype = next(self.model.parameters()).dtype
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        bs = cfg.limits.block_size
        block_bytes = m.num_layers * 2 * bs * m.num_kv_heads * m.head_dim * itemsize
        num_blocks = cfg.num_blocks or g1_num_blocks(cfg.kv_cache_bytes, block_bytes, bs)
        log.info("G1 KV pool: %d blocks x %d tokens = %d tokens (%.0f MiB, %.1f KiB per token)", num_blocks,
                 bs, num_blocks * bs, num_blocks * block_bytes / 2**20, block_bytes / bs / 1024)
        # Block-contiguous layout (docs/ARCHITECTURE.md "KV layout"): one block = one contiguous byte range.
        shape = (num_blocks, m.num_layers, 2, bs, m.num_kv_heads, m.head_dim)
        if torch.device(cfg.device).type == "cpu":  # 4 KiB-aligned: G3 reads/writes blocks in place (O_DIRECT)
            self.kv_cache = aligned_empty(num_blocks * block_bytes).view(self.dtype).view(shape).zero_()
        else:
            self.kv_cache = torch.zeros(shape, dtype=self.dtype, device=cfg.device)
        # Structured outputs: grammars over the model's own tokenizer, the mask as wide as the logits.
        self.grammars = GrammarCache(Path(cfg.model) / "tokenizer.json", m.vocab_size, m.eos_token_ids)
        super().__init__(
            cfg.limits.for_model(m.max_position_embeddings),
            num_blocks, ModelRunner(self.model, self.kv_cache, bs, cfg.device, m.eos_token_ids, self.grammars),
            fingerprint=model_fingerprint(cfg.model), eos_ids=m.eos_token_ids, vocab_limit=m.vocab_size)

    def kv_rows(self) -> torch.Tensor:
        """The G1 pool as uint8 [num_blocks, block_bytes] (a view): what the lower tiers copy."""
        return self.kv_cache.view(self.pool.num_blocks, -1).view(torch.uint8)

    def kv_layout(self) -> KvLayout:
        m = self.model.cfg
        return KvLayout(layout="block_contiguous", num_blocks=self.pool.num_blocks, num_layers=m.num_layers,
                        block_size=self.block_size, num_kv_heads=m.num_kv_heads, head_dim=m.head_dim,
                        dtype=str(self.dtype).removeprefix("torch."), device=str(self.kv_cache.device))


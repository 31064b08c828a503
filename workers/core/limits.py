"""`EngineLimits`: the five limits every engine that runs the core is sized by, declared once. Engine
configs take the group whole (`limits`), and the worker's flags are derived from it (workers/config.py)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EngineLimits:
    block_size: int = 16  # tokens per KV block
    max_num_batched_tokens: int = 2048  # token budget of one engine step (chunked prefill)
    max_num_seqs: int = 64  # most sequences running at once
    max_waiting: int = 1024  # waiting-queue bound; more is rejected as busy (EngineOverloaded)
    max_model_len: int = 4096  # context length in tokens

    def problems(self) -> list[str]:
        """What is wrong with these limits (empty: nothing), each naming the field."""
        return [f"{name} must be >= 1" for name in ("block_size", "max_num_batched_tokens", "max_num_seqs",
                                                      "max_waiting", "max_model_len") if getattr(self, name) < 1]

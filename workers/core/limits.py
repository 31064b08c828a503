"""`EngineLimits`: the five limits every engine is sized by, declared once with their defaults, help and
checks. Engine configs take the group whole (`limits`); the worker's flags are derived from these fields
(workers/config.py), so a default or a help line is written in one place."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from kvrelay.runtime.config import non_negative, positive, setting


@dataclass(frozen=True)
class EngineLimits:
    block_size: int = setting(16, "tokens per KV block", positive)
    max_num_batched_tokens: int = setting(2048, "token budget of one engine step (chunked prefill)", positive)
    max_num_seqs: int = setting(64, "most sequences running at once", positive)
    max_waiting: int = setting(1024, "waiting-queue bound; more is rejected as busy", positive)
    max_model_len: int = setting(0, "context length in tokens (0 = the model's)", non_negative)

    def for_model(self, model_len: int) -> EngineLimits:
        """These limits with the model's context length where none was set."""
        return self if self.max_model_len else dataclasses.replace(self, max_model_len=model_len)

    def problems(self) -> list[str]:
        """What is wrong with these values, each naming its field (empty: nothing)."""
        out = []
        for f in dataclasses.fields(self):
            why = f.metadata["check"](getattr(self, f.name))
            if why:
                out.append(f"{f.name} {why}, got {getattr(self, f.name)!r}")
        return out

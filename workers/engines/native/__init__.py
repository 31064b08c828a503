"""The native PyTorch engine: runs Llama/Qwen2/Qwen3 checkpoints on CPU or GPU with a paged KV cache.

Exports load lazily (PEP 562) so that `scheduler` and `sequence`, which are torch-free and reused by
the mocker engine, can be imported without importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kvrelay.workers.core.engine_core import EngineOverloaded, LLMEngine, NativeEngineConfig
    from kvrelay.workers.core.engine_loop import NativeEngine

_EXPORTS = {"NativeEngine": "kvrelay.workers.core.engine_loop", "EngineOverloaded": "kvrelay.workers.core.engine_core",
            "LLMEngine": "kvrelay.workers.core.engine_core", "NativeEngineConfig": "kvrelay.workers.core.engine_core"}
__all__ = ["EngineOverloaded", "LLMEngine", "NativeEngine", "NativeEngineConfig"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

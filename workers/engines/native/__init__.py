"""The native PyTorch engine: runs Llama/Qwen2/Qwen3 checkpoints on CPU or GPU with a paged KV cache.

Exports load lazily (PEP 562): importing the package (as `kvrelay worker --help` does) imports no torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kvrelay.workers.engines.native.engine import NativeEngine
    from kvrelay.workers.engines.native.llm_engine import LLMEngine, NativeEngineConfig

_EXPORTS = {"NativeEngine": "engine", "LLMEngine": "llm_engine", "NativeEngineConfig": "llm_engine"}
__all__ = ["LLMEngine", "NativeEngine", "NativeEngineConfig"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

"""The native PyTorch engine: runs Llama/Qwen2/Qwen3 checkpoints on CPU or GPU with a paged KV cache."""

from kvrelay.workers.engines.native.engine import NativeEngine
from kvrelay.workers.engines.native.llm_engine import EngineOverloaded, LLMEngine, NativeEngineConfig

__all__ = ["EngineOverloaded", "LLMEngine", "NativeEngine", "NativeEngineConfig"]

"""Model configuration read from a Hugging Face `config.json` (Llama, Qwen2, Qwen3 families).

Accepts both the transformers 4.x spelling (`rope_theta`, `rope_scaling`) and the 5.x spelling
(`rope_parameters`). Anything the native engine cannot run faithfully is rejected with a clear error
rather than served wrong.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

SUPPORTED = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class UnsupportedModel(ValueError):
    pass


@dataclass(frozen=True)
class ModelConfig:
    family: str  # llama | qwen2 | qwen3
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool
    dtype: torch.dtype
    rope: dict[str, Any] = field(default_factory=dict)  # rope_type, rope_theta, and the type's parameters
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> ModelConfig:
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise UnsupportedModel(f"{model_dir}: no config.json (expected a Hugging Face checkpoint directory)")
        cfg = json.loads(path.read_text())
        gen_path = Path(model_dir) / "generation_config.json"
        gen = json.loads(gen_path.read_text()) if gen_path.is_file() else {}
        return cls.from_dict(cfg, gen)

    @classmethod
    def from_dict(cls, cfg: dict[str, Any], gen: dict[str, Any] | None = None) -> ModelConfig:
        archs = cfg.get("architectures") or []
        family = next((SUPPORTED[a] for a in archs if a in SUPPORTED), None)
        if family is None:
            raise UnsupportedModel(
                f"architecture {archs or cfg.get('model_type')!r} is not supported by the native engine "
                f"(supported: {', '.join(sorted(SUPPORTED))})")
        if cfg.get("use_sliding_window"):
            raise UnsupportedModel("sliding-window attention is not supported by the native engine")
        heads = cfg["num_attention_heads"]
        eos = (gen or {}).get("eos_token_id", cfg.get("eos_token_id"))
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        dtype_name = cfg.get("torch_dtype") or cfg.get("dtype") or "float32"
        if dtype_name not in DTYPES:
            raise UnsupportedModel(f"weights dtype {dtype_name!r} is not supported (float32, float16, bfloat16)")
        attention_bias = bool(cfg.get("attention_bias", False))
        return cls(
            family=family,
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=True if family == "qwen2" else attention_bias,
            o_bias=False if family == "qwen2" else attention_bias,
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            qk_norm=family == "qwen3",
            dtype=DTYPES[dtype_name],
            rope=_rope_params(cfg),
            eos_token_ids=eos_ids,
            bos_token_id=cfg.get("bos_token_id"),
        )


def _rope_params(cfg: dict[str, Any]) -> dict[str, Any]:
    params = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    params.setdefault("rope_theta", cfg.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type") or params.get("type") or "default"
    params["rope_type"] = rope_type
    if rope_type not in ("default", "linear", "llama3", "yarn"):
        raise UnsupportedModel(f"RoPE type {rope_type!r} is not supported (default, linear, llama3, yarn)")
    params.setdefault("original_max_position_embeddings", cfg.get("max_position_embeddings", 2048))
    return params

"""Loading a Hugging Face safetensors checkpoint (single file or sharded) into `CausalLM`."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from kvrelay.workers.engines.native.config import ModelConfig, UnsupportedModel
from kvrelay.workers.engines.native.model import CausalLM

_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
# Hugging Face keeps these projections apart; the model stacks them (model.py): fused name -> parts.
_FUSED = {"self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
          "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj")}


def fuse_projections(state: dict[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    """Replace each layer's q/k/v (and gate/up) weights and biases by one row-stacked tensor. Parts
    that are absent are left alone, so a checkpoint that lacks one fails the strict name check."""
    for i in range(num_layers):
        for fused, parts in _FUSED.items():
            for kind in ("weight", "bias"):
                names = [f"model.layers.{i}.{part}.{kind}" for part in parts]
                if all(n in state for n in names):
                    state[f"model.layers.{i}.{fused}.{kind}"] = torch.cat([state.pop(n) for n in names])
    return state


def load_model(model_dir: str | Path, dtype: torch.dtype | None = None,
               device: str | torch.device = "cpu") -> CausalLM:
    model_dir = Path(model_dir)
    cfg = ModelConfig.from_dir(model_dir)
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise UnsupportedModel(f"{model_dir}: no *.safetensors weights (pickled .bin checkpoints are not loaded)")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f), device=str(device)))
    state = {k: v for k, v in state.items() if not k.endswith(_IGNORED_SUFFIXES)}
    if cfg.tie_word_embeddings or "lm_head.weight" not in state:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    target = dtype or cfg.dtype
    state = fuse_projections({k: v.to(target) for k, v in state.items()}, cfg.num_layers)
    with torch.device("meta"):
        model = CausalLM(cfg)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if missing or unexpected:
        raise UnsupportedModel(f"{model_dir}: weights do not match the {cfg.family} architecture "
                               f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
    model.rope.inv_freq = model.rope.inv_freq.to(device)
    return model.eval()

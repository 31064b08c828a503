"""Tiny random Hugging Face checkpoints of each supported family, built with transformers itself.

Weights use a large init std so greedy next-token margins are wide (random weights otherwise give
nearly flat logits), and biases are randomized so Qwen2's qkv bias path is exercised.
"""

from __future__ import annotations

from pathlib import Path

import torch

FAMILIES = ("llama", "qwen2", "qwen3")


def build_hf_model(family: str, out: Path, *, layers: int = 2, hidden: int = 64, vocab: int = 512,
                   rope: dict | None = None, seed: int = 0, head_dim: int | None = None) -> Path:
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config, Qwen3Config

    common = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 3, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=head_dim or hidden // 4,
                  max_position_embeddings=4096, initializer_range=0.3, rms_norm_eps=1e-6,
                  tie_word_embeddings=family == "qwen3", bos_token_id=1, eos_token_id=2)
    if rope is not None:
        common["rope_parameters"] = rope
    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config}[family]
    config = cls(**common)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(out)
    return out

"""GGUF -> Hugging Face layout: config.json, model.safetensors (float32), tokenizer files.

Converted once into the user cache, keyed by the content hash of the GGUF file, and verified (by the
manifest) on every later start, so a start after the first one loads safetensors directly. Every
check runs before the first byte is written: an unsupported or truncated file leaves no cache entry.

Tensor names: llama.cpp's `blk.N.attn_q.weight` -> HF's `model.layers.N.self_attn.q_proj.weight`.
llama.cpp's converter permutes the rows of Llama's q and k projections (it stores RoPE pairs
interleaved, HF keeps them in two halves); `_unpermute` undoes it, so the HF-layout checkpoint computes
exactly what transformers computes from the same GGUF. Qwen2/Qwen3 GGUFs are not permuted.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from kvrelay.runtime.paths import cache_dir
from kvrelay.workers.models.cache_entry import (
    build_entry,
    file_digest,
    read_verified_manifest,
    write_json,
    write_manifest,
)
from kvrelay.workers.models.gguf_file import GgufError, GgufFile
from kvrelay.workers.models.gguf_tokenizer import build_tokenizer

FORMAT = 1  # bump when the converter's output changes, so older cache entries are not reused
_ARCHS = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight", "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.weight": "self_attn.k_proj.weight", "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.weight": "self_attn.v_proj.weight", "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight", "attn_output.bias": "self_attn.o_proj.bias",
    "attn_q_norm.weight": "self_attn.q_norm.weight", "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight", "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                 "output.weight": "lm_head.weight"}

Progress = Callable[[str], None]


def stderr_progress(msg: str) -> None:
    sys.stderr.write(f"kvrelay: {msg}\n")
    sys.stderr.flush()


def gguf_digest(path: Path) -> str:
    return file_digest(path, "xxh3_128")


def converted_path(path: Path, digest: str | None = None) -> Path:
    """Where the conversion of `path` lives in the cache (not built by this call)."""
    digest = digest or gguf_digest(path)
    return cache_dir() / "models" / f"gguf-{path.stem.lower()}-{digest[:16]}-v{FORMAT}"


def ensure_converted(path: str | Path, progress: Progress = stderr_progress) -> Path:
    """The verified HF-layout directory for GGUF `path`, converting it on first use."""
    path = Path(path).resolve()
    digest = gguf_digest(path)
    out = converted_path(path, digest)
    if read_verified_manifest(out) is not None:
        return out
    gguf = GgufFile(path)  # reads the header and checks every tensor's type and bounds
    config = hf_config(gguf)
    tok, tok_config, eos_ids = build_tokenizer(gguf)
    names = _name_map(gguf, config)
    progress(f"converting {path.name} ({path.stat().st_size / 1e6:.0f} MB, {len(names)} tensors) "
             f"into {out} (once; later starts reuse it)")

    def write(d: Path) -> None:
        _write_weights(gguf, config, names, d / "model.safetensors", progress)
        (d / "tokenizer.json").write_bytes(tok.to_str(pretty=False).encode("utf-8"))
        write_json(d / "tokenizer_config.json", tok_config)
        write_json(d / "config.json", config)
        gen: dict[str, Any] = {"bos_token_id": config.get("bos_token_id"), "do_sample": False}
        if eos_ids:
            gen["eos_token_id"] = eos_ids if len(eos_ids) > 1 else eos_ids[0]
        write_json(d / "generation_config.json", gen)
        write_manifest(d, {"name": path.stem, "source": str(path), "source_xxh3_128": digest,
                           "format": FORMAT}, algo="xxh3_128")

    return build_entry(out, write, "GGUF conversion")


def hf_config(gguf: GgufFile) -> dict[str, Any]:
    arch = gguf.architecture
    if arch not in _ARCHS:
        raise GgufError(f"{gguf.path.name}: architecture {arch!r} is not supported ({', '.join(_ARCHS)})")

    def hp(key: str, default: Any = None) -> Any:
        v = gguf.get(f"{arch}.{key}", default)
        if v is None:
            raise GgufError(f"{gguf.path.name}: metadata key {arch}.{key!r} is missing")
        return v

    if gguf.has("rope_freqs.weight"):
        raise GgufError(f"{gguf.path.name}: tensor 'rope_freqs.weight' (Llama 3.1 RoPE scaling) is not supported")
    heads = int(hp("attention.head_count"))
    hidden = int(hp("embedding_length"))
    head_dim = int(gguf.get(f"{arch}.attention.key_length") or hidden // heads)
    vocab = int(gguf.get(f"{arch}.vocab_size") or len(gguf.require("tokenizer.ggml.tokens")))
    cfg: dict[str, Any] = {
        "architectures": [_ARCHS[arch]], "model_type": arch,
        "vocab_size": vocab, "hidden_size": hidden,
        "intermediate_size": int(hp("feed_forward_length")),
        "num_hidden_layers": int(hp("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(gguf.get(f"{arch}.attention.head_count_kv") or heads),
        "head_dim": head_dim,
        "max_position_embeddings": int(hp("context_length")),
        "rms_norm_eps": float(hp("attention.layer_norm_rms_epsilon")),
        "rope_theta": float(gguf.get(f"{arch}.rope.freq_base") or 10000.0),
        "hidden_act": "silu", "torch_dtype": "float32",
        "tie_word_embeddings": not gguf.has("output.weight"),
        "attention_bias": gguf.has("blk.0.attn_q.bias") and arch == "llama",
        "mlp_bias": False,
    }
    scaling = gguf.get(f"{arch}.rope.scaling.type")
    if scaling and scaling != "none":
        if scaling not in ("linear", "yarn"):
            raise GgufError(f"{gguf.path.name}: RoPE scaling {scaling!r} is not supported (linear, yarn)")
        cfg["rope_scaling"] = {"rope_type": scaling, "factor": float(hp("rope.scaling.factor")),
                               "original_max_position_embeddings": int(
                                   gguf.get(f"{arch}.rope.scaling.original_context_length")
                                   or cfg["max_position_embeddings"])}
    for key in ("bos", "eos", "padding"):
        i = gguf.get(f"tokenizer.ggml.{key}_token_id")
        if i is not None:
            cfg[f"{'pad' if key == 'padding' else key}_token_id"] = int(i)
    return cfg


def _name_map(gguf: GgufFile, cfg: dict[str, Any]) -> dict[str, str]:
    """llama.cpp name -> HF name for every tensor; an unknown tensor is an error (it would be dropped)."""
    names: dict[str, str] = {}
    for t in gguf.tensors():
        if t.name in _GLOBAL_NAMES:
            names[t.name] = _GLOBAL_NAMES[t.name]
            continue
        parts = t.name.split(".", 2)
        if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _LAYER_NAMES:
            if int(parts[1]) >= cfg["num_hidden_layers"]:
                raise GgufError(f"{gguf.path.name}: tensor {t.name!r} is beyond block_count")
            names[t.name] = f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}"
            continue
        raise GgufError(f"{gguf.path.name}: tensor {t.name!r} ({t.type_name}) is not part of a "
                        f"{cfg['model_type']} model kvrelay knows")
    if "token_embd.weight" not in names:
        raise GgufError(f"{gguf.path.name}: tensor 'token_embd.weight' is missing")
    return names


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp's q/k row permutation: per head, interleaved RoPE pairs -> two halves."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _write_weights(gguf: GgufFile, cfg: dict[str, Any], names: dict[str, str], out: Path,
                   progress: Progress) -> None:
    import torch
    from safetensors.torch import save_file

    llama = cfg["model_type"] == "llama"
    tensors: dict[str, torch.Tensor] = {}
    started, last = time.monotonic(), 0
    for i, (src, dst) in enumerate(names.items()):
        w = gguf.tensor(src)
        if llama and src.endswith(("attn_q.weight", "attn_q.bias")):
            w = _unpermute(w, cfg["num_attention_heads"])
        elif llama and src.endswith(("attn_k.weight", "attn_k.bias")):
            w = _unpermute(w, cfg["num_key_value_heads"])
        tensors[dst] = torch.from_numpy(w if w.flags.writeable else w.copy())  # F32 ones map the file
        pct = (i + 1) * 100 // len(names)
        if pct // 25 != last:  # four progress lines, not 272
            last = pct // 25
            progress(f"  dequantized {i + 1}/{len(names)} tensors ({time.monotonic() - started:.1f} s)")
    save_file(tensors, str(out), metadata={"format": "pt"})
    out.chmod(0o644)

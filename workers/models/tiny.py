"""The embedded default model: a tiny random-weight Llama checkpoint and a byte-level BPE tokenizer.

Built offline from a fixed seed and the shipped corpus.txt, so every build writes the same bytes:
  config.json, generation_config.json, model.safetensors, tokenizer.json, tokenizer_config.json,
  kvrelay-manifest.json (sha256 of the others; written last, it marks a build as complete).

A build is installed as a cache entry (cache_entry.py): written beside the target, manifest last,
renamed into place, so a reader sees either no model or a whole one.
"""

from __future__ import annotations

import hashlib
import os
from importlib import resources
from pathlib import Path
from typing import Any

from kvrelay.runtime.paths import cache_dir
from kvrelay.workers.models.cache_entry import (
    build_entry,
    json_bytes,
    read_verified_manifest,
    write_json,
    write_manifest,
)

FORMAT = 1  # bump when the builder's output changes for reasons not captured by _spec()
SEED = 20240613
INIT_STD = 0.2  # large on purpose: greedy next-token logits must have clear (not ~0) margins

# Ids follow list order (0..3): the trainer assigns special tokens first.
BOS, EOS, IM_START, IM_END = "<|begin_of_text|>", "<|end_of_text|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = (BOS, EOS, IM_START, IM_END)

ARCH: dict[str, Any] = {
    "vocab_size": 2048,  # == the trained BPE vocab size (checked at build time)
    "hidden_size": 128,
    "intermediate_size": 384,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "max_position_embeddings": 4096,
    "rope_theta": 10000.0,
    "rms_norm_eps": 1e-5,
}

# ChatML turns, Llama-3-style leading BOS (apply_chat_template tokenizes without adding specials).
CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{%- if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{- raise_exception('unsupported chat role: ' + message['role']) }}"
    "{%- endif %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string %}{{- message['content'] }}"
    "{%- else %}{%- for part in message['content'] %}"
    "{%- if part['type'] == 'text' %}{{- part['text'] }}{%- endif %}"
    "{%- endfor %}{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def _corpus() -> bytes:
    return resources.files(__package__).joinpath("corpus.txt").read_bytes()


def _spec() -> dict[str, Any]:
    return {"format": FORMAT, "seed": SEED, "init_std": INIT_STD, "arch": ARCH,
            "special_tokens": list(SPECIAL_TOKENS), "chat_template": CHAT_TEMPLATE}


def version_tag() -> str:
    """Changes whenever the inputs of the build change, so a stale cache entry is never reused."""
    h = hashlib.sha256(json_bytes(_spec()) + _corpus())
    return f"v{FORMAT}-{h.hexdigest()[:10]}"


def tiny_model_path() -> Path:
    """Where the default model lives in the user cache (not built by this call)."""
    return cache_dir() / "models" / f"tiny-llama-{version_tag()}"


def default_model_dir() -> Path:
    """The default model of `kvrelay serve`, built on first use."""
    return ensure_tiny_model()


def ensure_tiny_model(out_dir: Path | None = None) -> Path:
    """Return `out_dir` (default: the cache path) holding a verified tiny model, building it if needed."""
    out = Path(out_dir) if out_dir is not None else tiny_model_path()
    return out if read_verified_manifest(out) is not None else build_tiny_model(out)


def build_tiny_model(out_dir: Path) -> Path:
    """Build the tiny model into `out_dir` atomically; returns `out_dir`.

    Refuses (FileExistsError) to replace a non-empty directory that is not a tiny-model build.
    """
    return build_entry(Path(out_dir), _write_model, "tiny model")


def _write_model(d: Path) -> None:
    tok = _train_tokenizer()
    vocab = tok.get_vocab_size(with_added_tokens=True)
    if vocab != ARCH["vocab_size"]:
        raise RuntimeError(f"BPE trained {vocab} tokens, expected {ARCH['vocab_size']}: corpus too small?")
    ids = [tok.token_to_id(t) for t in SPECIAL_TOKENS]
    if ids != list(range(len(SPECIAL_TOKENS))):
        raise RuntimeError(f"special token ids {ids} are not 0..{len(SPECIAL_TOKENS) - 1}")
    bos, eos = ids[0], [ids[1], ids[3]]  # completions end at EOS, chat turns at IM_END

    (d / "tokenizer.json").write_bytes(tok.to_str(pretty=True).encode("utf-8") + b"\n")
    write_json(d / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS, "eos_token": EOS, "pad_token": EOS,
        "model_max_length": ARCH["max_position_embeddings"],
        "clean_up_tokenization_spaces": False,  # keep decode(encode(s)) == s
        "model_input_names": ["input_ids", "attention_mask"],
        "chat_template": CHAT_TEMPLATE,
    })
    write_json(d / "config.json", {
        **ARCH,
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "attention_dropout": 0.0,
        "initializer_range": INIT_STD, "tie_word_embeddings": False, "use_cache": True,
        "torch_dtype": "float32", "bos_token_id": bos, "eos_token_id": eos, "pad_token_id": ids[1],
    })
    write_json(d / "generation_config.json", {
        "bos_token_id": bos, "eos_token_id": eos, "pad_token_id": ids[1], "do_sample": False,
    })
    _write_weights(d / "model.safetensors")
    # Last: its presence (after the directory rename) is what marks the build complete.
    write_manifest(d, {"name": "tiny-llama", "version": version_tag()})


def _train_tokenizer():
    # Training is deterministic across processes and thread counts: the trainer breaks count ties by
    # pair id and ids come from the fixed byte alphabet (checked by tests with different hash seeds).
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)  # no prefix: exact round trip
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=ARCH["vocab_size"], special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(_corpus().decode("utf-8").splitlines(keepends=True), trainer=trainer)
    # Plain encodes get a leading BOS, as Llama tokenizers do; add_special_tokens=False skips it.
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                      special_tokens=[(BOS, tok.token_to_id(BOS))]),
    ])
    return tok


def _param_shapes() -> list[tuple[str, tuple[int, ...]]]:
    """HF Llama parameter names in a fixed order; the RNG stream is consumed in exactly this order."""
    h, inter, hd = ARCH["hidden_size"], ARCH["intermediate_size"], ARCH["head_dim"]
    q, kv, v = ARCH["num_attention_heads"] * hd, ARCH["num_key_value_heads"] * hd, ARCH["vocab_size"]
    shapes: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (v, h))]
    for i in range(ARCH["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes += [
            (p + "input_layernorm.weight", (h,)),
            (p + "self_attn.q_proj.weight", (q, h)),
            (p + "self_attn.k_proj.weight", (kv, h)),
            (p + "self_attn.v_proj.weight", (kv, h)),
            (p + "self_attn.o_proj.weight", (h, q)),
            (p + "post_attention_layernorm.weight", (h,)),
            (p + "mlp.gate_proj.weight", (inter, h)),
            (p + "mlp.up_proj.weight", (inter, h)),
            (p + "mlp.down_proj.weight", (h, inter)),
        ]
    return shapes + [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]


def _write_weights(path: Path) -> None:
    import torch
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(SEED)
    bound = INIT_STD * 3**0.5  # uniform(-b, b) has std INIT_STD
    tensors = {}
    for name, shape in _param_shapes():
        if name.endswith("norm.weight"):
            tensors[name] = torch.ones(shape, dtype=torch.float32)
        else:
            # Uniform, not normal: torch.rand is bit-exact integer-to-float on every CPU, whereas
            # randn's vectorized Box-Muller may round differently across instruction sets.
            tensors[name] = torch.rand(shape, generator=gen, dtype=torch.float32).mul_(2 * bound).sub_(bound)
    save_file(tensors, str(path), metadata={"format": "pt"})
    os.chmod(path, 0o644)  # safetensors creates it 0600; the other files get the usual umask modes

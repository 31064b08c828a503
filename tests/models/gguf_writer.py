"""Writing a Hugging Face checkpoint as a GGUF file the way llama.cpp's `convert_hf_to_gguf.py` does.

llama.cpp tensor names, Llama's q/k row permutation (applied before quantizing, as llama.cpp does),
norms and biases kept F32, the `<arch>.*` hyperparameters and a gpt2-type (byte-level BPE) tokenizer
with a chat template. 2-D weights get the tensor type the caller picks per tensor.

The `gguf` package quantizes F16, BF16 and the 32-element types but has no K-quant quantizer, so
Q2_K..Q6_K are packed here (plain range scales, not llama.cpp's searched ones: any valid block tests
the reader). Every encoding is checked: gguf's `dequantize` must give the weights back within the
type's step (ROUND_TRIP_TOL), so a packer that put a bit in the wrong place fails here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGUFWriter
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize, quantize

QK_K = 256  # K-quant super-block length: a K-quant row length must be a multiple of it
_CONTROL, _NORMAL = 3, 1

_LAYER = {  # HF name within a layer -> llama.cpp name within `blk.N`
    "input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.weight": "attn_k.weight", "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_norm.weight": "attn_q_norm.weight", "self_attn.k_norm.weight": "attn_k_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
_GLOBAL = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}


def gguf_name(hf_name: str) -> str:
    if hf_name in _GLOBAL:
        return _GLOBAL[hf_name]
    _model, _layers, i, rest = hf_name.split(".", 3)
    return f"blk.{i}.{_LAYER[rest]}"


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's `LlamaModel.permute`: per head, RoPE halves -> interleaved pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# -- K-quant packers (inverses of gguf.quants' Q2_K..Q6_K dequantize_blocks) -----------------------

def _f16(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(bytes of x as float16, the float16 value back as float32)."""
    h = x.astype(np.float16)
    return h.view(np.uint8).reshape(len(x), 2), h.astype(np.float32)


def _pack(q: np.ndarray, k: int, c: int, bits: int) -> np.ndarray:
    """Bytes holding `q` (uint8 per element): element (a, s, j) of the (n, -1, k, c) view sits in
    byte (a, j) at bit bits * s, the order gguf's dequantizers unpack them in."""
    q = q.reshape(len(q), -1, k, c)
    out = np.zeros((len(q), q.shape[1], c), dtype=np.uint8)
    for s in range(k):
        out |= q[:, :, s] << np.uint8(bits * s)
    return out.reshape(len(q), -1)


def _ratio(x: np.ndarray, unit: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(unit > 0, np.rint(x / unit), 0)


def _affine(blocks: np.ndarray, n_sub: int, q_max: int, s_max: int):
    """y = d * sc * q - dmin * m per sub-block, q in 0..q_max, sc and m in 0..s_max (Q2_K, Q4_K, Q5_K)."""
    sub = blocks.reshape(len(blocks), n_sub, -1)
    low = np.minimum(sub.min(axis=2), 0)
    step = (sub.max(axis=2) - low) / q_max
    d_bytes, d = _f16(step.max(axis=1) / s_max)
    m_bytes, dmin = _f16(-low.min(axis=1) / s_max)
    sc = np.clip(_ratio(step, d[:, None]), 0, s_max).astype(np.uint8)
    mn = np.clip(_ratio(-low, dmin[:, None]), 0, s_max).astype(np.uint8)
    unit, offset = (d[:, None] * sc)[:, :, None], (dmin[:, None] * mn)[:, :, None]
    q = np.clip(_ratio(sub + offset, unit), 0, q_max)
    recon = (unit * q - offset).reshape(len(blocks), QK_K)
    return q.astype(np.uint8).reshape(len(blocks), QK_K), sc, mn, d_bytes, m_bytes, recon


def _symmetric(blocks: np.ndarray, n_sub: int, q_min: int, s_max: int):
    """y = d * sc * q per sub-block, q in q_min..-q_min-1, sc in 0..s_max (Q3_K, Q6_K)."""
    sub = blocks.reshape(len(blocks), n_sub, -1)
    step = np.abs(sub).max(axis=2) / (-q_min - 1)  # the largest |x| maps to the top q
    d_bytes, d = _f16(step.max(axis=1) / s_max)
    sc = np.clip(_ratio(step, d[:, None]), 0, s_max)
    unit = (d[:, None] * sc)[:, :, None]
    q = np.clip(_ratio(sub, unit), q_min, -q_min - 1)
    recon = (unit * q).reshape(len(blocks), QK_K)
    return (q - q_min).astype(np.uint8).reshape(len(blocks), QK_K), sc.astype(np.int8), d_bytes, recon


def _scales_6bit(sc: np.ndarray, mn: np.ndarray) -> np.ndarray:
    """Q4_K/Q5_K's 12 bytes of eight 6-bit scales and mins (layout in gguf's Q4_K.get_scale_min)."""
    return np.concatenate([sc[:, :4] | ((sc[:, 4:] >> 4) << 6), mn[:, :4] | ((mn[:, 4:] >> 4) << 6),
                           (sc[:, 4:] & 0x0F) | ((mn[:, 4:] & 0x0F) << 4)], axis=1)


def _q2_k(blocks: np.ndarray) -> np.ndarray:
    q, sc, mn, d, dmin, recon = _affine(blocks, 16, 3, 15)
    return np.concatenate([sc | (mn << 4), _pack(q, 4, 32, 2), d, dmin], axis=1), recon


def _q3_k(blocks: np.ndarray) -> np.ndarray:
    q, sc, d, recon = _symmetric(blocks, 16, -4, 31)
    sc = (sc + 32).astype(np.uint8)  # stored as 6 bits with an offset of 32
    scales = np.concatenate([_pack(sc & 0x0F, 2, 8, 4), _pack(sc >> 4, 4, 4, 2)], axis=1)
    return np.concatenate([_pack(q >> 2, 8, 32, 1), _pack(q & 3, 4, 32, 2), scales, d], axis=1), recon


def _q4_k(blocks: np.ndarray) -> np.ndarray:
    q, sc, mn, d, dmin, recon = _affine(blocks, 8, 15, 63)
    return np.concatenate([d, dmin, _scales_6bit(sc, mn), _pack(q, 2, 32, 4)], axis=1), recon


def _q5_k(blocks: np.ndarray) -> np.ndarray:
    q, sc, mn, d, dmin, recon = _affine(blocks, 8, 31, 63)
    packed = [d, dmin, _scales_6bit(sc, mn), _pack(q >> 4, 8, 32, 1), _pack(q & 0x0F, 2, 32, 4)]
    return np.concatenate(packed, axis=1), recon


def _q6_k(blocks: np.ndarray) -> np.ndarray:
    q, sc, d, recon = _symmetric(blocks, 16, -32, 127)
    packed = [_pack(q & 0x0F, 2, 64, 4), _pack(q >> 4, 4, 32, 2), sc.view(np.uint8), d]
    return np.concatenate(packed, axis=1), recon


_K_PACKERS = {T.Q2_K: _q2_k, T.Q3_K: _q3_k, T.Q4_K: _q4_k, T.Q5_K: _q5_k, T.Q6_K: _q6_k}
# Largest round-trip error as a fraction of a tensor's largest |w|: about one quantization step of a
# block (Q5_0's is max/16, Q4_0's max/8, Q2_K's a third of the range), with room for scale rounding.
ROUND_TRIP_TOL = {T.F32: 0.0, T.F16: 1e-3, T.BF16: 1e-2, T.Q8_0: 0.01, T.Q6_K: 0.04, T.Q5_0: 0.07,
                  T.Q5_1: 0.07, T.Q5_K: 0.07, T.Q4_0: 0.13, T.Q4_1: 0.1, T.Q4_K: 0.12, T.Q3_K: 0.3, T.Q2_K: 0.5}


def encode(w: np.ndarray, qtype: T) -> np.ndarray:
    """`w` (float32, rows first) in `qtype`: the array GGUFWriter.add_tensor takes with raw_dtype."""
    if qtype in _K_PACKERS:
        assert w.shape[-1] % QK_K == 0, f"{qtype.name} needs rows of a multiple of {QK_K}, not {w.shape[-1]}"
        data, recon = _K_PACKERS[qtype](w.reshape(-1, QK_K).astype(np.float32))
        data = data.reshape(*w.shape[:-1], -1)
        assert data.shape[-1] * QK_K == w.shape[-1] * GGML_QUANT_SIZES[qtype][1]
        # The packing itself is exact: gguf unpacks the very levels and scales chosen here.
        back = dequantize(data, qtype).reshape(-1, QK_K)
        assert np.allclose(back, recon, rtol=1e-5, atol=1e-6), f"{qtype.name} packing is wrong"
    else:
        data = quantize(w, qtype)
    err = float(np.abs(dequantize(data, qtype).reshape(w.shape) - w).max())
    assert err <= ROUND_TRIP_TOL[qtype] * float(np.abs(w).max()), f"{qtype.name} round trip is off by {err}"
    return data


# -- the file ------------------------------------------------------------------------------------

def tokenizer_fields(tokenizer_dir: Path) -> tuple[list[str], list[int], list[str]]:
    """(tokens by id, token types, merges "a b") of a byte-level BPE tokenizer.json."""
    j = json.loads((tokenizer_dir / "tokenizer.json").read_text())
    vocab: dict[str, int] = dict(j["model"]["vocab"])
    specials = {t["content"] for t in j["added_tokens"] if t["special"]}
    for t in j["added_tokens"]:
        vocab[t["content"]] = t["id"]
    tokens = [""] * len(vocab)
    for tok, i in vocab.items():
        tokens[i] = tok
    assert all(tokens), "token ids are not contiguous"
    merges = [m if isinstance(m, str) else " ".join(m) for m in j["model"]["merges"]]
    return tokens, [_CONTROL if t in specials else _NORMAL for t in tokens], merges


def write_gguf(path: Path, arch: str, config: dict[str, Any], state: dict[str, np.ndarray],
               types: dict[str, T], tokenizer: dict[str, Any]) -> Path:
    """`state`: HF names -> float32 arrays; `types`: HF name -> type of each 2-D weight (norms and
    biases are F32). `tokenizer`: tokens, token_type, merges, pre, bos, eos, pad, add_bos, chat_template."""
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    hidden = config["hidden_size"]
    head_dim = config.get("head_dim") or hidden // heads
    w = GGUFWriter(str(path), arch)
    w.add_name(f"tiny-{arch}")
    w.add_context_length(config["max_position_embeddings"])
    w.add_embedding_length(hidden)
    w.add_block_count(config["num_hidden_layers"])
    w.add_feed_forward_length(config["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    if head_dim != hidden // heads:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    if arch == "llama":
        w.add_rope_dimension_count(head_dim)
        w.add_vocab_size(config["vocab_size"])
    w.add_rope_freq_base(float(config["rope_parameters"]["rope_theta"]))
    w.add_layer_norm_rms_eps(config["rms_norm_eps"])
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(tokenizer["pre"])
    w.add_token_list(tokenizer["tokens"])
    w.add_token_types(tokenizer["token_type"])
    w.add_token_merges(tokenizer["merges"])
    w.add_bos_token_id(tokenizer["bos"])
    w.add_eos_token_id(tokenizer["eos"])
    w.add_pad_token_id(tokenizer["pad"])
    w.add_add_bos_token(tokenizer["add_bos"])
    w.add_chat_template(tokenizer["chat_template"])
    for name, t in state.items():
        t = np.ascontiguousarray(t, dtype=np.float32)
        if arch == "llama" and name.endswith("q_proj.weight"):
            t = permute(t, heads)
        elif arch == "llama" and name.endswith("k_proj.weight"):
            t = permute(t, kv_heads)
        qtype = types.get(name, T.F32) if t.ndim == 2 else T.F32
        if qtype == T.F32:
            w.add_tensor(gguf_name(name), t)
        else:
            w.add_tensor(gguf_name(name), encode(t, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path

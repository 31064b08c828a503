"""Llama / Qwen2 / Qwen3 decoder in plain torch, reading and writing a paged KV cache.

Parameter names equal Hugging Face's except two fused projections, `qkv_proj` (q, k, v rows stacked)
and `gate_up_proj` (gate, up), which `loader.py` builds from the checkpoint: one GEMM instead of three
and two per layer, the same dot products. Arithmetic otherwise follows the reference implementation
operation for operation (RMSNorm in float32, RoPE angles in float32, SDPA attention) so greedy outputs
match `transformers` token for token.

A step's batch is flat: `T` tokens from many sequences. Decode tokens come first (one per sequence,
attending through the paged cache); then each prefill chunk, attending to its cached prefix plus
itself causally. Every new token's K/V is written into the cache before attention reads it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from kvrelay.kernels import DecodePlan, paged_attention_decode, prefill_attention_ref, write_kv
from kvrelay.workers.engines.native.config import ModelConfig
from kvrelay.workers.engines.native.rope import RotaryEmbedding


@dataclass
class PrefillChunk:
    start: int  # token range [start, end) in the flat batch
    end: int
    num_cached: int  # tokens of this sequence already in the cache before this chunk
    block_table: torch.Tensor  # int64 [blocks] covering num_cached + (end - start) tokens


@dataclass
class BatchMetadata:
    positions: torch.Tensor  # int64 [T]
    slot_blocks: torch.Tensor  # int64 [T]: the block each token's K/V is written to (the sequence's own)
    slot_offsets: torch.Tensor  # int64 [T]: its offset in that block
    num_decode: int = 0  # decode tokens occupy [0, num_decode)
    decode_block_tables: torch.Tensor | None = None  # int32 [num_decode, max_blocks]
    decode_context_lens: torch.Tensor | None = None  # int32 [num_decode]
    decode_plan: DecodePlan | None = None  # the reference kernel's block-table work, shared by all layers
    prefills: list[PrefillChunk] = field(default_factory=list)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        if dtype == torch.float32:  # one fused op; bit-equal to the reference's six here (tested vs HF)
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, rope: RotaryEmbedding):
        super().__init__()
        self.layer, self.rope = layer, rope
        self.nq, self.nkv, self.hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.scale = self.hd ** -0.5
        self.qkv_proj = nn.Linear(cfg.hidden_size, (self.nq + 2 * self.nkv) * self.hd, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.nq * self.hd, cfg.hidden_size, bias=cfg.o_bias)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(self.hd, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(self.hd, cfg.rms_norm_eps)
        self.qk_norm = cfg.qk_norm

    def forward(self, x: torch.Tensor, meta: BatchMetadata, kv_cache: torch.Tensor,
                cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        t, nq, nkv, hd = x.shape[0], self.nq, self.nkv, self.hd
        qkv = self.qkv_proj(x)
        v = qkv[:, (nq + nkv) * hd:].view(t, nkv, hd)
        if self.qk_norm:
            q = self.rope.apply(self.q_norm(qkv[:, : nq * hd].view(t, nq, hd)), cos, sin)
            k = self.rope.apply(self.k_norm(qkv[:, nq * hd: (nq + nkv) * hd].view(t, nkv, hd)), cos, sin)
        else:  # q and k heads are adjacent columns: one RoPE over both
            qk = self.rope.apply(qkv[:, : (nq + nkv) * hd].view(t, nq + nkv, hd), cos, sin)
            q, k = qk[:, :nq], qk[:, nq:]
        write_kv(kv_cache, self.layer, meta.slot_blocks, meta.slot_offsets, k, v)
        out = q.new_empty((t, nq, hd))  # contiguous (q is a strided view of the fused projection)
        nd = meta.num_decode
        if nd:
            # batch.py sets both with num_decode
            assert meta.decode_block_tables is not None and meta.decode_context_lens is not None
            out[:nd] = paged_attention_decode(q[:nd], kv_cache, self.layer, meta.decode_block_tables,
                                              meta.decode_context_lens, self.scale, meta.decode_plan)
        for chunk in meta.prefills:
            qs = q[chunk.start:chunk.end]
            if chunk.num_cached == 0:  # nothing cached: this step's K/V is the whole context
                ks, vs = k[chunk.start:chunk.end], v[chunk.start:chunk.end]
            else:
                ctx = chunk.num_cached + chunk.end - chunk.start
                blocks = kv_cache[chunk.block_table, self.layer]  # [nb, 2, bs, nkv, hd]
                ks = blocks[:, 0].reshape(-1, self.nkv, self.hd)[:ctx]
                vs = blocks[:, 1].reshape(-1, self.nkv, self.hd)[:ctx]
            out[chunk.start:chunk.end] = prefill_attention_ref(qs, ks, vs, self.scale, chunk.num_cached)
        return self.o_proj(out.view(t, self.nq * self.hd))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.inter = cfg.intermediate_size
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        return self.down_proj(F.silu(gate_up[:, : self.inter]) * gate_up[:, self.inter:])


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, rope: RotaryEmbedding):
        super().__init__()
        self.self_attn = Attention(cfg, layer, rope)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, h, meta, kv_cache, cos, sin):
        h = h + self.self_attn(self.input_layernorm(h), meta, kv_cache, cos, sin)
        return h + self.mlp(self.post_attention_layernorm(h))


class Backbone(nn.Module):
    def __init__(self, cfg: ModelConfig, rope: RotaryEmbedding):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, rope) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class CausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.rope = RotaryEmbedding(cfg.rope, cfg.head_dim)
        self.model = Backbone(cfg, self.rope)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def forward(self, input_ids: torch.Tensor, meta: BatchMetadata, kv_cache: torch.Tensor,
                logits_index: torch.Tensor) -> torch.Tensor:
        """Logits (float32) of the tokens at `logits_index` in the flat batch."""
        h = self.model.embed_tokens(input_ids)
        cos, sin = self.rope.cos_sin(meta.positions, h.dtype)
        for layer in self.model.layers:
            h = layer(h, meta, kv_cache, cos, sin)
        h = self.model.norm(h[logits_index])
        return self.lm_head(h).float()

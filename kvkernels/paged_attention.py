"""Paged-attention decode (Triton kernel + PyTorch reference) and the chunked-prefill reference.

Layout contract (docs/ARCHITECTURE.md "KV layout"): `kv_cache` is one tensor
`[num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim]` (index 0 = K, 1 = V).
A sequence's tokens live in the blocks listed in its row of `block_tables`; token t of a sequence is
at block `block_tables[b, t // block_size]`, offset `t % block_size`. Entries of a row past
`ceil(context_lens[b] / block_size)` are padding: any value, never dereferenced.
GQA: q head h reads kv head `h // (num_q_heads // num_kv_heads)`.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

try:  # triton is optional: CPU-only installs run the references.
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - depends on the environment
    HAS_TRITON = False

_HALF = (torch.float16, torch.bfloat16)


def _check_decode_args(q: Tensor, kv_cache: Tensor, layer: int, block_tables: Tensor, context_lens: Tensor) -> None:
    """Shape/dtype/device checks that cost no device sync."""
    if q.dim() != 3:
        raise ValueError(f"q must be [B, num_q_heads, head_dim], got shape {tuple(q.shape)}")
    if kv_cache.dim() != 6 or kv_cache.shape[2] != 2:
        raise ValueError(
            "kv_cache must be [num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim], "
            f"got shape {tuple(kv_cache.shape)}"
        )
    B, hq, d = q.shape
    _, num_layers, _, _, hkv, dk = kv_cache.shape
    if d != dk:
        raise ValueError(f"head_dim mismatch: q has {d}, kv_cache has {dk}")
    if hq % hkv != 0:
        raise ValueError(f"num_q_heads ({hq}) must be a multiple of num_kv_heads ({hkv})")
    if not 0 <= layer < num_layers:
        raise ValueError(f"layer {layer} out of range [0, {num_layers})")
    if q.dtype != kv_cache.dtype:
        raise ValueError(f"dtype mismatch: q is {q.dtype}, kv_cache is {kv_cache.dtype}")
    if block_tables.dim() != 2 or block_tables.shape[0] != B:
        raise ValueError(f"block_tables must be [B={B}, max_blocks], got shape {tuple(block_tables.shape)}")
    if context_lens.shape != (B,):
        raise ValueError(f"context_lens must be [B={B}], got shape {tuple(context_lens.shape)}")
    for name, t in (("block_tables", block_tables), ("context_lens", context_lens)):
        if t.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"{name} must be int32 or int64, got {t.dtype}")
    for name, t in (("kv_cache", kv_cache), ("block_tables", block_tables), ("context_lens", context_lens)):
        if t.device != q.device:
            raise ValueError(f"device mismatch: q is on {q.device}, {name} on {t.device}")


# Per-thread, grow-only CPU scratch for the gathered K/V, keyed by dtype. Why: a fresh multi-MiB
# tensor per call is mmap'd by malloc and page-faulted on first touch, which on CPU cost more than
# the gather itself (~3-5x in perf/kernels_bench). Safe to reuse because the gathered K/V never
# escape a call and a thread runs one call at a time. Holds the high-water mark until released.
_scratch = threading.local()


def release_workspace() -> None:
    """Free this thread's decode scratch buffers (they are re-created on the next call)."""
    _scratch.__dict__.pop("bufs", None)


def _workspace(numel: int, dtype: torch.dtype) -> Tensor:
    bufs: dict[torch.dtype, Tensor] = _scratch.__dict__.setdefault("bufs", {})
    buf = bufs.get(dtype)
    # An inference-mode tensor cannot be written outside inference mode: such a caller gets a new one.
    stale = buf is not None and buf.is_inference() and not torch.is_inference_mode_enabled()
    if buf is None or buf.numel() < numel or stale:
        # 1.5x headroom so a batch or context that grows by a little each step does not realloc each step.
        grown = 0 if buf is None else buf.numel() * 3 // 2
        buf = bufs[dtype] = torch.empty(max(numel, grown), dtype=dtype)
    return buf[:numel]


def _gather_kv(kv_cache: Tensor, layer: int, bt: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """K and V of blocks `bt` of `layer`, each a contiguous [len(bt), bs, Hkv, D] tensor in `dtype`."""
    shape = (bt.numel(), *kv_cache.shape[3:])
    if kv_cache.device.type != "cpu":  # the caching allocator already reuses memory on accelerators
        k, v = kv_cache[:, layer, 0].index_select(0, bt), kv_cache[:, layer, 1].index_select(0, bt)
        return k.to(dtype), v.to(dtype)
    n = math.prod(shape)
    buf = _workspace(2 * n, kv_cache.dtype)
    # kv_cache[:, layer, i] is a [num_blocks, bs, Hkv, D] view; index_select writes packed rows.
    k = torch.index_select(kv_cache[:, layer, 0], 0, bt, out=buf[:n].view(shape))
    v = torch.index_select(kv_cache[:, layer, 1], 0, bt, out=buf[n:].view(shape))
    if dtype != kv_cache.dtype:
        up = _workspace(2 * n, dtype)
        k, v = up[:n].view(shape).copy_(k), up[n:].view(shape).copy_(v)
    return k, v


@dataclass(frozen=True)
class DecodePlan:
    """What the reference decode needs from the block tables, computed once per step: every layer of a
    step shares it (same sequences, same blocks), so building it per layer would repeat the host sync
    and index math num_layers times."""

    bt: Tensor  # [B * n_blk] block ids to gather, padding entries replaced by block 0
    tokens: int  # T = n_blk * block_size key slots per sequence
    mask: Tensor | None  # [B, 1, 1, T] keep-mask, or None when no slot is padding
    pad: Tensor | None  # flat indices of padded slots in [B * T], zeroed after the gather


def plan_decode(block_tables: Tensor, context_lens: Tensor, block_size: int) -> DecodePlan:
    ctx = context_lens.long()
    lo_t, hi_t = torch.aminmax(ctx)
    lo, hi = int(lo_t), int(hi_t)  # one host sync; the reference runs on CPU
    n_blk = -(-hi // block_size)
    if lo < 1:
        raise ValueError(f"context_lens must be >= 1, got min {lo}")
    if n_blk > block_tables.shape[1]:
        raise ValueError(f"context_lens max {hi} needs {n_blk} blocks, block_tables has {block_tables.shape[1]}")
    used = torch.arange(n_blk, device=ctx.device)[None, :] < ((ctx + block_size - 1) // block_size)[:, None]
    # Padding entries may hold garbage (even out-of-range ids): replace them with block 0, which is
    # always a valid address; its tokens are masked out.
    bt = torch.where(used, block_tables[:, :n_blk].long(), 0).reshape(-1)
    T = n_blk * block_size
    if lo == T:  # no key slot is padding; without a mask SDPA can take its fast path
        return DecodePlan(bt, T, None, None)
    keep = torch.arange(T, device=ctx.device)[None, :] < ctx[:, None]  # [B, T]
    return DecodePlan(bt, T, keep[:, None, None, :], (~keep).flatten().nonzero().squeeze(1))


def plan_decode_host(block_tables: list[list[int]], context_lens: list[int], block_size: int,
                     device: str | torch.device = "cpu") -> DecodePlan:
    """`plan_decode` from host lists (the engine's own block tables): the same plan, built in Python
    with one tensor per field and no device sync."""
    if not context_lens or len(block_tables) != len(context_lens):
        raise ValueError(f"need one block table per context length, got {len(block_tables)} and {len(context_lens)}")
    lo, hi = min(context_lens), max(context_lens)
    if lo < 1:
        raise ValueError(f"context_lens must be >= 1, got min {lo}")
    n_blk = -(-hi // block_size)
    T = n_blk * block_size
    bt: list[int] = []
    for row, ctx in zip(block_tables, context_lens, strict=True):
        used = -(-ctx // block_size)
        if used > len(row):
            raise ValueError(f"context length {ctx} needs {used} blocks, its table has {len(row)}")
        bt.extend(row[:used])
        bt.extend([0] * (n_blk - used))  # padding: block 0 is always a valid address; masked out
    bt_t = torch.tensor(bt, dtype=torch.int64, device=device)
    if lo == T:
        return DecodePlan(bt_t, T, None, None)
    ctx_t = torch.tensor(context_lens, dtype=torch.int64, device=device)
    keep = torch.arange(T, device=device)[None, :] < ctx_t[:, None]
    pad = [b * T + j for b, ctx in enumerate(context_lens) for j in range(ctx, T)]
    return DecodePlan(bt_t, T, keep[:, None, None, :], torch.tensor(pad, dtype=torch.int64, device=device))


def paged_attention_decode_ref(
    q: Tensor, kv_cache: Tensor, layer: int, block_tables: Tensor, context_lens: Tensor, scale: float,
    plan: DecodePlan | None = None,
) -> Tensor:
    """One decode step for B sequences: q [B, Hq, D] attends to its first context_lens[b] cached tokens.

    Vectorized over the batch: one gather per K and V of the [B, n_blk] blocks this layer needs
    (n_blk = ceil(max context / block_size)), a key-padding mask, one SDPA call. fp16/bf16 run in fp32
    so the softmax is fp32 whatever SDPA backend is picked. `plan` (from `plan_decode`) lets the
    layers of one step share the block-table work; without it, it is built here.
    """
    if plan is None:
        _check_decode_args(q, kv_cache, layer, block_tables, context_lens)
        plan = plan_decode(block_tables, context_lens, kv_cache.shape[3])
    B, hq, d = q.shape
    hkv, T = kv_cache.shape[4], plan.tokens
    cdtype = torch.float32 if q.dtype in _HALF else q.dtype
    k, v = _gather_kv(kv_cache, layer, plan.bt, cdtype)
    k, v = k.view(B, T, hkv, d), v.view(B, T, hkv, d)  # packed rows: the view is free
    if plan.pad is not None:
        # Slots past a context were never written and may hold NaN/Inf (torch.empty pools, stale
        # blocks); a masked score does not stop 0 * NaN in P @ V, so zero them in our private copy.
        # index_fill_ touches only the padded rows (masked_fill_ would rewrite all of K and V).
        k.view(B * T, hkv, d).index_fill_(0, plan.pad, 0)
        v.view(B * T, hkv, d).index_fill_(0, plan.pad, 0)
    qq = q.unsqueeze(2).to(cdtype)  # [B, Hq, 1, D]
    out = F.scaled_dot_product_attention(
        qq, k.transpose(1, 2), v.transpose(1, 2), attn_mask=plan.mask, scale=scale, enable_gqa=hq != hkv
    )
    return out.squeeze(2).to(q.dtype)


def prefill_attention_ref(q: Tensor, k: Tensor, v: Tensor, scale: float, num_cached: int) -> Tensor:
    """Causal attention for one sequence's chunk of n_new tokens on top of num_cached cached tokens.

    q [n_new, Hq, D]; k, v [n_ctx, Hkv, D] with n_ctx = num_cached + n_new (cached prefix first).
    Query i (absolute position num_cached + i) sees keys [0, num_cached + i]. Returns [n_new, Hq, D].
    """
    if q.dim() != 3 or k.dim() != 3 or k.shape != v.shape:
        raise ValueError(f"expected q [n, Hq, D], k == v [n_ctx, Hkv, D]; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    n_new, hq, d = q.shape
    n_ctx, hkv, dk = k.shape
    if d != dk or hq % hkv != 0:
        raise ValueError(f"incompatible heads/head_dim: q {tuple(q.shape)}, k {tuple(k.shape)}")
    if num_cached < 0 or n_ctx != num_cached + n_new:
        raise ValueError(f"k/v must hold num_cached + n_new = {num_cached} + {n_new} tokens, got {n_ctx}")
    # 4-D [1, H, n, D] with K/V expanded to Hq heads: torch's CPU flash kernel takes only this form;
    # 3-D inputs or enable_gqa fall back to the math path, ~6x slower at 2k tokens (measured).
    qq, kk, vv = q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None]
    if hq != hkv:
        kk, vv = kk.repeat_interleave(hq // hkv, dim=1), vv.repeat_interleave(hq // hkv, dim=1)
    if q.dtype in _HALF:
        qq, kk, vv = qq.float(), kk.float(), vv.float()
    if num_cached == 0:  # plain causal: no mask tensor
        out = F.scaled_dot_product_attention(qq, kk, vv, is_causal=True, scale=scale)
    else:
        pos = torch.arange(n_new, device=q.device)[:, None] + num_cached
        mask = torch.arange(n_ctx, device=q.device)[None, :] <= pos  # [n_new, n_ctx]
        out = F.scaled_dot_product_attention(qq, kk, vv, attn_mask=mask, scale=scale)
    out = out[0]
    return out.transpose(0, 1).to(q.dtype)


if HAS_TRITON:

    @triton.jit
    def _paged_decode_kernel(
        q_ptr, k_ptr, v_ptr, bt_ptr, ctx_ptr, out_ptr, scale,
        sq_b, sq_h, sq_d,  # q strides
        sc_blk, sc_tok, sc_h, sc_d,  # strides of the [num_blocks, bs, Hkv, D] K and V views (same for both)
        sbt_b, sbt_j,  # block_tables strides
        so_b, so_h, so_d,  # out strides
        GROUP: tl.constexpr, GROUP_P: tl.constexpr,  # q heads per kv head, padded to a power of 2
        BLOCK_SIZE: tl.constexpr, BLOCK_T: tl.constexpr,  # tokens per block, padded to a power of 2
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        # One program per (sequence, kv head): K/V of the block are loaded once for all GROUP q heads.
        b = tl.program_id(0)
        kvh = tl.program_id(1)
        g = tl.arange(0, GROUP_P)
        t = tl.arange(0, BLOCK_T)
        dd = tl.arange(0, BLOCK_D)
        gmask = g < GROUP
        dmask = dd < HEAD_DIM
        qh = kvh * GROUP + g
        q = tl.load(q_ptr + b * sq_b + qh[:, None] * sq_h + dd[None, :] * sq_d,
                    mask=gmask[:, None] & dmask[None, :], other=0.0).to(tl.float32)
        q = q * scale
        ctx = tl.load(ctx_ptr + b).to(tl.int32)
        n_blk = tl.cdiv(ctx, BLOCK_SIZE)  # only these table entries are read (rest is padding)
        m_i = tl.full([GROUP_P], float("-inf"), tl.float32)
        l_i = tl.zeros([GROUP_P], tl.float32)
        acc = tl.zeros([GROUP_P, BLOCK_D], tl.float32)
        head_off = kvh * sc_h
        for j in range(0, n_blk):
            blk = tl.load(bt_ptr + b * sbt_b + j * sbt_j).to(tl.int64)  # int64: blk * stride may pass 2**31
            tmask = (t < BLOCK_SIZE) & (j * BLOCK_SIZE + t < ctx)
            off = blk * sc_blk + head_off + t[:, None] * sc_tok + dd[None, :] * sc_d
            kv_mask = tmask[:, None] & dmask[None, :]
            k = tl.load(k_ptr + off, mask=kv_mask, other=0.0).to(tl.float32)  # [BLOCK_T, BLOCK_D]
            v = tl.load(v_ptr + off, mask=kv_mask, other=0.0).to(tl.float32)
            s = tl.sum(q[:, None, :] * k[None, :, :], axis=2)  # [GROUP_P, BLOCK_T]
            s = tl.where(tmask[None, :], s, float("-inf"))
            # Online softmax. Block j < n_blk always has >= 1 valid token, so m_new is finite and
            # alpha = exp(-inf) = 0 on the first block.
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
            m_i = m_new
        out = acc / l_i[:, None]
        tl.store(out_ptr + b * so_b + qh[:, None] * so_h + dd[None, :] * so_d,
                 out.to(out_ptr.dtype.element_ty), mask=gmask[:, None] & dmask[None, :])


def paged_attention_decode_triton(
    q: Tensor, kv_cache: Tensor, layer: int, block_tables: Tensor, context_lens: Tensor, scale: float
) -> Tensor:
    """Same contract as `paged_attention_decode_ref`; Triton kernel, fp32 online softmax.

    No host sync: context_lens are not checked here (>= 1 and <= max_blocks * block_size is the caller's
    invariant, as in every serving engine's decode kernel).
    """
    if not HAS_TRITON:
        raise RuntimeError("triton is not installed; use paged_attention_decode_ref")
    _check_decode_args(q, kv_cache, layer, block_tables, context_lens)
    B, hq, d = q.shape
    bs, hkv = kv_cache.shape[3], kv_cache.shape[4]
    group = hq // hkv
    k_view, v_view = kv_cache[:, layer, 0], kv_cache[:, layer, 1]  # same strides, offset data pointers
    out = torch.empty_like(q)
    group_p = triton.next_power_of_2(group)
    block_t = triton.next_power_of_2(bs)
    block_d = triton.next_power_of_2(d)
    # The [GROUP_P, BLOCK_T, BLOCK_D] product lives in registers; widen the CTA when it is large.
    num_warps = 4 if group_p * block_t * block_d <= 8192 else 8
    _paged_decode_kernel[(B, hkv)](
        q, k_view, v_view, block_tables, context_lens, out, float(scale),
        *q.stride(), *k_view.stride(), *block_tables.stride(), *out.stride(),
        GROUP=group, GROUP_P=group_p, BLOCK_SIZE=bs, BLOCK_T=block_t, HEAD_DIM=d, BLOCK_D=block_d,
        num_warps=num_warps,
    )
    return out


def paged_attention_decode(
    q: Tensor, kv_cache: Tensor, layer: int, block_tables: Tensor, context_lens: Tensor, scale: float,
    plan: DecodePlan | None = None,
) -> Tensor:
    """Dispatch: the Triton kernel for CUDA tensors, the SDPA reference otherwise (`plan` is the
    reference's per-step block-table work; the kernel reads the tables itself)."""
    if q.is_cuda and HAS_TRITON:
        return paged_attention_decode_triton(q, kv_cache, layer, block_tables, context_lens, scale)
    return paged_attention_decode_ref(q, kv_cache, layer, block_tables, context_lens, scale, plan)

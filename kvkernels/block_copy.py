"""Block gather/scatter between the paged pool and a contiguous buffer, and the per-step KV write.

Layout contract (docs/ARCHITECTURE.md "KV layout"): `kv_cache` is `[num_blocks, num_layers, 2, block_size,
num_kv_heads, head_dim]`. Each block (all layers, K and V) is one contiguous run of
`block_numel = L * 2 * bs * H * D` elements; only the stride between blocks (dim 0) may differ from
the packed one. The copy kernels rely on exactly that and nothing more.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

try:  # triton is optional: CPU-only installs run the references.
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - depends on the environment
    HAS_TRITON = False

_CHUNK = 1024  # elements per program in the copy kernels (power of 2)


def _check_cache(kv_cache: Tensor) -> None:
    if kv_cache.dim() != 6 or kv_cache.shape[2] != 2:
        raise ValueError(
            "kv_cache must be [num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim], "
            f"got shape {tuple(kv_cache.shape)}"
        )
    if kv_cache.shape[0] > 0 and not kv_cache[0].is_contiguous():
        raise ValueError(f"each kv_cache block must be contiguous (layout contract), strides {kv_cache.stride()}")


def _check_ids(kv_cache: Tensor, block_ids: Tensor, *, unique: bool) -> Tensor:
    """Validate block ids and return them as int64. Range/uniqueness checks sync once on CUDA."""
    if block_ids.dim() != 1:
        raise ValueError(f"block_ids must be 1-D, got shape {tuple(block_ids.shape)}")
    if block_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"block_ids must be int32 or int64, got {block_ids.dtype}")
    if block_ids.device != kv_cache.device:
        raise ValueError(f"device mismatch: kv_cache is on {kv_cache.device}, block_ids on {block_ids.device}")
    ids = block_ids.long()
    if ids.numel():
        lo, hi = (int(x) for x in torch.aminmax(ids))
        if lo < 0 or hi >= kv_cache.shape[0]:
            raise ValueError(f"block ids must be in [0, {kv_cache.shape[0]}), got min {lo} max {hi}")
        # Duplicate destinations would make a scatter's result depend on write order.
        if unique and torch.unique(ids).numel() != ids.numel():
            raise ValueError("block_ids for a scatter must be distinct")
    return ids


def _check_buffer(kv_cache: Tensor, buf: Tensor, n: int, name: str) -> None:
    want = (n, *kv_cache.shape[1:])
    if tuple(buf.shape) != want:
        raise ValueError(f"{name} must have shape {want}, got {tuple(buf.shape)}")
    if buf.dtype != kv_cache.dtype:
        raise ValueError(f"dtype mismatch: kv_cache is {kv_cache.dtype}, {name} is {buf.dtype}")
    if buf.device != kv_cache.device:
        raise ValueError(f"device mismatch: kv_cache is on {kv_cache.device}, {name} on {buf.device}")


def gather_blocks_ref(kv_cache: Tensor, block_ids: Tensor, out: Tensor | None = None) -> Tensor:
    """Copy blocks `block_ids` of the pool into a contiguous [n, L, 2, bs, H, D] buffer (new or `out`)."""
    _check_cache(kv_cache)
    ids = _check_ids(kv_cache, block_ids, unique=False)
    if out is None:
        return kv_cache.index_select(0, ids)
    _check_buffer(kv_cache, out, ids.numel(), "out")
    return torch.index_select(kv_cache, 0, ids, out=out)


def scatter_blocks_ref(kv_cache: Tensor, block_ids: Tensor, src: Tensor) -> Tensor:
    """Copy src[i] ([L, 2, bs, H, D]) into pool block block_ids[i], in place; returns kv_cache."""
    _check_cache(kv_cache)
    ids = _check_ids(kv_cache, block_ids, unique=True)
    _check_buffer(kv_cache, src, ids.numel(), "src")
    return kv_cache.index_copy_(0, ids, src)


if HAS_TRITON:

    @triton.jit
    def _gather_kernel(cache_ptr, ids_ptr, buf_ptr, stride_blk, BLOCK_NUMEL: tl.constexpr, CHUNK: tl.constexpr):
        # Program (i, c): elements [c * CHUNK, (c + 1) * CHUNK) of block ids[i] -> row i of the buffer.
        i = tl.program_id(0).to(tl.int64)
        offs = tl.program_id(1) * CHUNK + tl.arange(0, CHUNK)
        mask = offs < BLOCK_NUMEL
        blk = tl.load(ids_ptr + i).to(tl.int64)
        x = tl.load(cache_ptr + blk * stride_blk + offs, mask=mask)
        tl.store(buf_ptr + i * BLOCK_NUMEL + offs, x, mask=mask)

    @triton.jit
    def _scatter_kernel(cache_ptr, ids_ptr, buf_ptr, stride_blk, BLOCK_NUMEL: tl.constexpr, CHUNK: tl.constexpr):
        i = tl.program_id(0).to(tl.int64)
        offs = tl.program_id(1) * CHUNK + tl.arange(0, CHUNK)
        mask = offs < BLOCK_NUMEL
        blk = tl.load(ids_ptr + i).to(tl.int64)
        x = tl.load(buf_ptr + i * BLOCK_NUMEL + offs, mask=mask)
        tl.store(cache_ptr + blk * stride_blk + offs, x, mask=mask)


def _launch(kernel, kv_cache: Tensor, ids: Tensor, buf: Tensor) -> None:
    if not HAS_TRITON:
        raise RuntimeError("triton is not installed; use the _ref functions")
    n = ids.numel()
    block_numel = math.prod(kv_cache.shape[1:])
    if n == 0 or block_numel == 0:
        return
    grid = (n, triton.cdiv(block_numel, _CHUNK))
    kernel[grid](kv_cache, ids, buf, kv_cache.stride(0), BLOCK_NUMEL=block_numel, CHUNK=_CHUNK)


def gather_blocks_triton(kv_cache: Tensor, block_ids: Tensor, out: Tensor | None = None) -> Tensor:
    """Triton version of `gather_blocks_ref`; `out`, if given, must be contiguous."""
    _check_cache(kv_cache)
    ids = _check_ids(kv_cache, block_ids, unique=False)
    if out is None:
        out = torch.empty((ids.numel(), *kv_cache.shape[1:]), dtype=kv_cache.dtype, device=kv_cache.device)
    else:
        _check_buffer(kv_cache, out, ids.numel(), "out")
        if not out.is_contiguous():
            raise ValueError("out must be contiguous")
    _launch(_gather_kernel, kv_cache, ids, out)
    return out


def scatter_blocks_triton(kv_cache: Tensor, block_ids: Tensor, src: Tensor) -> Tensor:
    """Triton version of `scatter_blocks_ref` (in place; returns kv_cache)."""
    _check_cache(kv_cache)
    ids = _check_ids(kv_cache, block_ids, unique=True)
    _check_buffer(kv_cache, src, ids.numel(), "src")
    _launch(_scatter_kernel, kv_cache, ids, src.contiguous())
    return kv_cache


def gather_blocks(kv_cache: Tensor, block_ids: Tensor, out: Tensor | None = None) -> Tensor:
    """Dispatch: Triton for CUDA tensors, reference otherwise."""
    if kv_cache.is_cuda and HAS_TRITON:
        return gather_blocks_triton(kv_cache, block_ids, out)
    return gather_blocks_ref(kv_cache, block_ids, out)


def scatter_blocks(kv_cache: Tensor, block_ids: Tensor, src: Tensor) -> Tensor:
    """Dispatch: Triton for CUDA tensors, reference otherwise."""
    if kv_cache.is_cuda and HAS_TRITON:
        return scatter_blocks_triton(kv_cache, block_ids, src)
    return scatter_blocks_ref(kv_cache, block_ids, src)


def write_kv_ref(kv_cache: Tensor, layer: int, slot_mapping: Tensor, k: Tensor, v: Tensor) -> None:
    """Store new tokens' K/V ([n, Hkv, D]) of `layer` at flat slots (block_id * block_size + offset).

    Called every step for every layer: one vectorized index_put per K and V, no per-token loop.
    Slots must be distinct (a duplicate's winner is unspecified) and in [0, num_blocks * block_size);
    there is no "-1 = skip" padding slot: pass only real tokens.
    """
    _check_cache(kv_cache)
    nb, num_layers, _, bs, hkv, d = kv_cache.shape
    if not 0 <= layer < num_layers:
        raise ValueError(f"layer {layer} out of range [0, {num_layers})")
    if slot_mapping.dim() != 1 or slot_mapping.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"slot_mapping must be a 1-D int32/int64 tensor, got {slot_mapping.dtype} "
                         f"{tuple(slot_mapping.shape)}")
    n = slot_mapping.shape[0]
    for name, t in (("k", k), ("v", v)):
        if tuple(t.shape) != (n, hkv, d):
            raise ValueError(f"{name} must be [{n}, {hkv}, {d}], got {tuple(t.shape)}")
        if t.dtype != kv_cache.dtype or t.device != kv_cache.device:
            raise ValueError(f"{name} is {t.dtype} on {t.device}, kv_cache is {kv_cache.dtype} on {kv_cache.device}")
    if slot_mapping.device != kv_cache.device:
        raise ValueError(f"device mismatch: kv_cache is on {kv_cache.device}, slot_mapping on {slot_mapping.device}")
    if n == 0:
        return
    slots = slot_mapping.long()
    if not kv_cache.is_cuda:  # cheap on CPU; on CUDA it would cost a sync every layer
        lo, hi = (int(x) for x in torch.aminmax(slots))
        if lo < 0 or hi >= nb * bs:
            raise ValueError(f"slots must be in [0, {nb * bs}), got min {lo} max {hi}")
    write_kv(kv_cache, layer, slots // bs, slots % bs, k, v)


def write_kv(kv_cache: Tensor, layer: int, blocks: Tensor, offsets: Tensor, k: Tensor, v: Tensor) -> None:
    """`write_kv_ref` without its checks, for the engine's per-layer hot path: token i's K/V go to
    block `blocks[i]`, offset `offsets[i]` (int64 [n]). The caller guarantees what `write_kv_ref`
    checks (the engine derives the indices from its own block tables once per step)."""
    kv_cache[:, layer, 0].index_put_((blocks, offsets), k)  # [nb, bs, H, D] views share kv_cache's storage
    kv_cache[:, layer, 1].index_put_((blocks, offsets), v)

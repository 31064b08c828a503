"""Every Triton kernel in kvrelay.kernels, compiled for the real GPU, against its torch reference
(the CPU suite runs the same kernels only in Triton's interpreter)."""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _cache(num_blocks=64, layers=4, bs=16, heads=4, dim=128, dtype=torch.bfloat16):
    return torch.randn(num_blocks, layers, 2, bs, heads, dim, device="cuda", dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_gather_and_scatter_blocks_match_reference(dtype):
    from kvrelay.kernels.block_copy import (
        gather_blocks_ref,
        gather_blocks_triton,
        scatter_blocks_ref,
        scatter_blocks_triton,
    )

    kv = _cache(dtype=dtype)
    ids = torch.randperm(64, device="cuda")[:23]
    assert torch.equal(gather_blocks_triton(kv, ids), gather_blocks_ref(kv, ids))
    src = torch.randn_like(gather_blocks_ref(kv, ids))
    a, b = kv.clone(), kv.clone()
    scatter_blocks_triton(a, ids, src)
    scatter_blocks_ref(b, ids, src)
    assert torch.equal(a, b)


def test_write_kv_matches_reference():
    from kvrelay.kernels.block_copy import write_kv, write_kv_ref

    kv = _cache()
    slots = torch.randperm(64 * 16, device="cuda")[:37]  # distinct slots: index_put order is free
    k = torch.randn(37, 4, 128, device="cuda", dtype=kv.dtype)
    v = torch.randn_like(k)
    a, b = kv.clone(), kv.clone()
    write_kv(a, 2, slots // 16, slots % 16, k, v)
    write_kv_ref(b, 2, slots, k, v)
    assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_paged_decode_kernel_matches_reference(dtype):
    from kvrelay.kernels.paged_attention import paged_attention_decode_ref, paged_attention_decode_triton

    kv = _cache(dtype=dtype)
    bt = torch.randperm(64, device="cuda")[:48].view(4, 12).int()
    ctx = torch.tensor([1, 100, 192, 77], device="cuda", dtype=torch.int32)
    q = torch.randn(4, 16, 128, device="cuda", dtype=dtype)
    ours = paged_attention_decode_triton(q, kv, 1, bt, ctx, 0.088)
    ref = paged_attention_decode_ref(q, kv, 1, bt, ctx, 0.088)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(ours.float(), ref.float(), atol=tol, rtol=tol)
